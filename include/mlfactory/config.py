"""The pipeline config: one YAML file describes the dataset, the backend, the bucket and the thresholds.

A user brings their own tabular dataset by writing such a file and pointing ``MLFACTORY_CONFIG`` at
it; nothing else changes. ``${VAR}`` and ``${VAR:-default}`` are expanded from the environment, and a
bucket given as a plain relative path is resolved against the config file's own folder.

This module is imported by DAG files at parse time: it must stay light (pydantic and yaml only).
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_ENV = "MLFACTORY_CONFIG"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "pipeline.yaml"

ColumnType = Literal["integer", "float", "string", "category", "boolean", "datetime"]
NUMERIC_TYPES = ("integer", "float")


class ConfigError(ValueError):
    """The pipeline config file is missing, unreadable or invalid; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnSpec(_Strict):
    """One column of the landed dataset."""

    name: str = Field(min_length=1)
    type: ColumnType
    required: bool = Field(True, description="nulls are not allowed in this column")
    unique: bool = Field(False, description="every non-null value appears once per batch")
    min: float | datetime | None = Field(None, description="inclusive lower bound (numeric or datetime)")
    max: float | datetime | None = Field(None, description="inclusive upper bound (numeric or datetime)")
    categories: list[str] | None = Field(None, description="allowed values of a category column")
    description: str = ""

    @model_validator(mode="after")
    def _bounds_fit_type(self) -> ColumnSpec:
        if self.type == "category" and not self.categories:
            raise ValueError(f"column {self.name!r} has type category but no 'categories' list")
        if self.categories is not None and self.type != "category":
            raise ValueError(f"column {self.name!r}: 'categories' is only allowed on type category")
        for bound in ("min", "max"):
            value = getattr(self, bound)
            if value is None:
                continue
            if self.type in NUMERIC_TYPES and isinstance(value, datetime):
                raise ValueError(f"column {self.name!r}: {bound} must be a number for type {self.type}")
            if self.type == "datetime" and not isinstance(value, datetime):
                raise ValueError(f"column {self.name!r}: {bound} must be a datetime for type datetime")
            if self.type not in (*NUMERIC_TYPES, "datetime"):
                raise ValueError(f"column {self.name!r}: {bound} is not allowed on type {self.type}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"column {self.name!r}: min {self.min} is greater than max {self.max}")
        return self


class DerivedFeature(_Strict):
    """A feature computed during ETL from other columns and written to the curated data."""

    name: str = Field(min_length=1)
    kind: Literal["ratio", "log1p", "day_of_week", "month", "days_since"]
    inputs: list[str] = Field(min_length=1, max_length=2)

    @model_validator(mode="after")
    def _arity(self) -> DerivedFeature:
        want = 2 if self.kind == "ratio" else 1
        if len(self.inputs) != want:
            raise ValueError(f"derived feature {self.name!r} ({self.kind}) takes {want} input(s)")
        return self


class DatasetSpec(_Strict):
    name: str = Field(min_length=1)
    task: Literal["classification", "regression"]
    target: str
    columns: list[ColumnSpec] = Field(min_length=2)
    derived: list[DerivedFeature] = []
    min_rows: int = Field(1, ge=1, description="a batch with fewer rows fails as a whole")
    max_rows: int | None = Field(None, ge=1)
    csv_delimiter: str = Field(",", min_length=1, max_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> DatasetSpec:
        names = [c.name for c in self.columns]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate column names: {dupes}")
        by_name = {c.name: c for c in self.columns}
        if self.target not in by_name:
            raise ValueError(f"target {self.target!r} is not one of the columns {names}")
        if not by_name[self.target].required:
            raise ValueError(f"target {self.target!r} must be required (a row without a label is useless)")
        target_types = ("boolean", "category") if self.task == "classification" else NUMERIC_TYPES
        if by_name[self.target].type not in target_types:
            raise ValueError(
                f"target {self.target!r} is {by_name[self.target].type}; a {self.task} target must be "
                f"{' or '.join(target_types)}"
            )
        for feature in self.derived:
            if feature.name in by_name:
                raise ValueError(f"derived feature {feature.name!r} clashes with a column of that name")
            for source in feature.inputs:
                if source not in by_name:
                    raise ValueError(f"derived feature {feature.name!r}: unknown input column {source!r}")
                wanted = ("datetime",) if feature.kind in ("day_of_week", "month", "days_since") else NUMERIC_TYPES
                if by_name[source].type not in wanted:
                    raise ValueError(
                        f"derived feature {feature.name!r} ({feature.kind}) needs {' or '.join(wanted)} "
                        f"input, column {source!r} is {by_name[source].type}"
                    )
        return self

    def column(self, name: str) -> ColumnSpec:
        return next(c for c in self.columns if c.name == name)


class StorageSpec(_Strict):
    """Where the pipeline's data lives. Every prefix is relative to ``bucket``."""

    bucket: str = Field(description="file://, s3://, gs:// or abfs:// URI, or a path relative to this file")
    landing_prefix: str = "landing/"
    raw_prefix: str = "raw/"
    curated_prefix: str = "curated/"
    quarantine_prefix: str = "quarantine/"
    reports_prefix: str = "reports/"
    models_prefix: str = Field("models/", description="training sets, the frozen holdout, job outputs, checkpoints")
    predictions_prefix: str = Field("predictions/", description="batch predictions and the endpoint's prediction log")
    state_prefix: str = "_mlfactory/"
    mlflow_prefix: str = Field("mlflow/", description="the MLflow server's artifact store (its --artifacts-destination): "
                                                      "run artifacts and registered models")

    @field_validator("bucket")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split("://", 1)[0] if "://" in value else "file"
        if scheme not in ("file", "s3", "gs", "abfs", "az"):
            raise ValueError(f"unsupported bucket scheme {scheme!r}: use file://, s3://, gs:// or abfs://")
        return value

    def uri(self, prefix_field: str, *parts: str) -> str:
        base = self.bucket.rstrip("/") + "/" + getattr(self, prefix_field).strip("/")
        return "/".join([base, *(p.strip("/") for p in parts if p)])

    @property
    def mlflow_artifacts_uri(self) -> str:
        return self.uri("mlflow_prefix")

    @property
    def prediction_log_uri(self) -> str:
        """Where the endpoint logs what it served (every backend), for ml_monitor."""
        return self.uri("predictions_prefix", "serving")

    @property
    def landing_uri(self) -> str:
        return self.uri("landing_prefix")

    @property
    def raw_uri(self) -> str:
        return self.uri("raw_prefix")

    @property
    def curated_uri(self) -> str:
        return self.uri("curated_prefix")

    @property
    def quarantine_uri(self) -> str:
        return self.uri("quarantine_prefix")

    @property
    def reports_uri(self) -> str:
        return self.uri("reports_prefix")

    @property
    def models_uri(self) -> str:
        return self.uri("models_prefix")

    @property
    def predictions_uri(self) -> str:
        return self.uri("predictions_prefix")

    @property
    def state_uri(self) -> str:
        return self.uri("state_prefix")


class ValidationSpec(_Strict):
    max_quarantine_fraction: float = Field(
        0.05, ge=0, le=1, description="a batch fails as a whole when more rows than this share are quarantined"
    )
    chunk_rows: int = Field(
        1_000_000, ge=1_000, description="rows read, checked and written at a time; bounds memory on big files"
    )


class IngestSpec(_Strict):
    poll_interval_s: float = Field(2.0, gt=0, description="how often the landing watcher lists the folder (local, "
                                                          "or S3 without a notification queue)")
    settle_s: float = Field(1.0, ge=0, description="an object must be unchanged this long before it is ingested")


HiddenSizes = list[Annotated[int, Field(ge=1, le=4096)]]
SEARCHABLE = ("learning_rate", "batch_size", "hidden_sizes", "dropout", "weight_decay", "epochs")


class TrainingSpec(_Strict):
    """Defaults of ml_train; every one of them can be changed per run in the trigger form."""

    epochs: int = Field(12, ge=1, le=1000)
    learning_rate: float = Field(0.003, gt=0, le=1)
    batch_size: int = Field(512, ge=8, le=65536)
    hidden_sizes: HiddenSizes = Field([128, 64], min_length=1, max_length=8)
    dropout: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(1e-5, ge=0, le=1)
    processes: int = Field(2, ge=1, le=64, description="DDP processes per node (local: CPU processes)")
    validation_fraction: float = Field(0.15, gt=0, lt=0.5, description="share of training rows held out per run")
    seed: int = 42
    trials: int = Field(2, ge=1, le=64, description="hyperparameter-search trials, one mapped task each")
    search: Literal["grid", "random"] = "grid"
    search_space: dict[str, list] = Field(
        default_factory=dict, description="hyperparameter -> candidate values; the search picks from these"
    )
    schedule: str = Field("0 3 * * 0", description="cron of the scheduled retraining (UTC)")
    max_runtime_s: int = Field(3600, ge=10, description="a training job running longer is stopped")
    concurrent_jobs: int = Field(1, ge=1, description="size of the mlfactory_training pool (the local GPU quota)")
    retrain_on_new_data: bool = Field(
        False, description="retrain on every curated batch even when a champion exists (default: only until the "
        "first champion; then on the schedule, on drift, or by hand)")

    @field_validator("search_space")
    @classmethod
    def _known_keys(cls, space: dict[str, list]) -> dict[str, list]:
        return check_search_space(space)


def check_search_space(space: dict[str, list]) -> dict[str, list]:
    """A search space names searchable hyperparameters, each with at least one candidate value."""
    unknown = sorted(set(space) - set(SEARCHABLE))
    if unknown:
        raise ValueError(f"search_space has unknown hyperparameter(s) {unknown}; searchable: {list(SEARCHABLE)}")
    empty = sorted(k for k, v in space.items() if not v)
    if empty:
        raise ValueError(f"search_space lists no candidate values for {empty}")
    return space


class PromotionSpec(_Strict):
    """The gate of ml_promote. The metric is ROC AUC for classification and R² for regression."""

    margin: float = Field(0.002, ge=0, description="the challenger must beat the champion by at least this")
    floor: float = Field(0.75, description="and reach at least this on the holdout, even with no champion yet")
    require_approval: bool = Field(False, description="a person approves in the Airflow UI before the alias moves")
    holdout_fraction: float = Field(0.1, gt=0, lt=0.5, description="share of the first curated data frozen as holdout")
    holdout_max_rows: int = Field(50_000, ge=100)


class ServingSpec(_Strict):
    """The real-time endpoint (on `local`: the model server on this machine) and ml_deploy's rollout."""

    port: int = Field(8090, ge=1, le=65535, description="local endpoint port (on 127.0.0.1)")
    token: str = Field("", description="bearer token of the endpoint; empty: one is generated and kept in the state folder")
    smoke_rows: int = Field(20, ge=1, description="holdout rows sent to a new version before it gets traffic")
    canary_percent: float = Field(10, gt=0, lt=100, description="share of traffic the new version gets first")
    canary_requests: int = Field(200, ge=0, description="requests sent through the endpoint during the canary")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="a canary failing more requests than this rolls back")
    log_flush_s: float = Field(10.0, gt=0, description="how often the prediction log is written to the bucket")

    @field_validator("token", mode="before")
    @classmethod
    def _empty_token(cls, value):
        return "" if value is None else value  # `token: ${UNSET:-}` reads as YAML null


class BatchScoringSpec(_Strict):
    schedule: str = Field("0 4 * * *", description="cron of the daily batch scoring (UTC), besides a new champion")
    chunk_rows: int = Field(100_000, ge=1_000, description="rows scored at a time; bounds memory")


class MonitoringSpec(_Strict):
    """ml_monitor: drift of new curated data and of served traffic against the champion's training data."""

    schedule: str = Field("0 * * * *", description="cron of the drift check (UTC), besides new curated data")
    threshold: float = Field(0.1, gt=0, description="per feature: normalised Wasserstein / Jensen-Shannon distance")
    alpha: float = Field(0.01, gt=0, lt=1, description="significance of the BH-corrected KS / chi-square tests")
    drift_share: float = Field(0.3, gt=0, le=1, description="share of drifted features that means the data drifted")
    min_rows: int = Field(1000, ge=50, description="fewer new rows wait for the next check")
    reference_max_rows: int = Field(200_000, ge=1000, description="sample of the training data used as reference")


class MlflowSpec(_Strict):
    tracking_uri: str = Field("http://127.0.0.1:5000", description="the MLflow server (tracking and registry)")
    experiment: str = "mlfactory"
    model_name: str = Field("", description="registered model name; default: the dataset name")


class AwsSpec(_Strict):
    """The `aws` backend: SageMaker training, endpoints and batch transform, S3 and S3 -> SQS events.

    Every request is built from these fields by ``mlfactory.aws``; what IAM permissions each step
    needs is in ``deploy/aws/`` (``airflow-policy.json`` for Airflow, ``sagemaker-execution-role-policy.json``
    for the role jobs and endpoints run as)."""

    region: str = Field("us-east-1", min_length=1)
    conn_id: str = Field("aws_default", description="Airflow connection (credentials; extra endpoint_url for an emulator)")
    role_arn: str = Field(description="IAM role SageMaker assumes for jobs and endpoints (arn:aws:iam::<account>:role/...)")
    image_uri: str = Field(description="the project's container image in ECR: training entrypoint and model server")
    sqs_queue_url: str = Field("", description="queue that receives the bucket's ObjectCreated notifications for the "
                                               "landing prefix; empty: the landing watcher polls S3 (ListObjectsV2) "
                                               "every ingest.poll_interval_s")
    training_instance_type: str = Field("", description="overrides the catalog's choice from the accelerator")
    volume_size_gb: int = Field(50, ge=1, le=16384)
    spot: bool = Field(True, description="managed spot training; preempted jobs resume from their checkpoints")
    max_wait_s: int | None = Field(None, ge=1, description="spot: longest wait + run time; default 2 x max runtime")
    budget_usd: float = Field(100.0, gt=0, description="a training job whose worst-case cost is above this is refused")
    prices_usd_per_hour: dict[str, float] = Field(
        default_factory=dict, description="instance type -> USD/hour; overrides the catalog's on-demand list prices")
    subnets: list[str] = []
    security_group_ids: list[str] = []
    kms_key_id: str = Field("", description="KMS key for job volumes, outputs and endpoint storage; empty: AWS-managed")
    endpoint_name: str = Field("", description="default: the model name")
    endpoint_instance_type: str = "ml.m5.large"
    endpoint_min_instances: int = Field(1, ge=1)
    endpoint_max_instances: int = Field(2, ge=1)
    invocations_per_instance: int = Field(1000, ge=1, description="autoscaling target: invocations per instance per minute")
    canary_wait_s: int = Field(600, ge=0, le=3600, description="blue/green: how long the canary runs before the rest shifts")
    rollback_alarms: list[str] = Field(default_factory=list, description="CloudWatch alarms that roll a deployment back")
    transform_instance_type: str = "ml.m5.xlarge"
    transform_instance_count: int = Field(1, ge=1)
    tags: dict[str, str] = {}

    @model_validator(mode="after")
    def _consistent(self) -> AwsSpec:
        if not re.fullmatch(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+", self.role_arn):
            raise ValueError(f"role_arn {self.role_arn!r} is not an IAM role ARN (arn:aws:iam::<12-digit account>:role/<name>)")
        if self.endpoint_min_instances > self.endpoint_max_instances:
            raise ValueError("endpoint_min_instances is greater than endpoint_max_instances")
        if bool(self.subnets) != bool(self.security_group_ids):
            raise ValueError("a VPC config needs both subnets and security_group_ids")
        return self


class PipelineConfig(_Strict):
    backend: Literal["local", "aws", "gcp", "azure"] = "local"
    dataset: DatasetSpec
    storage: StorageSpec
    ingest: IngestSpec = IngestSpec()
    validation: ValidationSpec = ValidationSpec()
    training: TrainingSpec = TrainingSpec()
    promotion: PromotionSpec = PromotionSpec()
    mlflow: MlflowSpec = MlflowSpec()
    serving: ServingSpec = ServingSpec()
    batch_scoring: BatchScoringSpec = BatchScoringSpec()
    monitoring: MonitoringSpec = MonitoringSpec()
    aws: AwsSpec | None = None
    source: str = Field("", description="the file this config was read from (set by load_config)")

    @model_validator(mode="after")
    def _backend_configured(self) -> PipelineConfig:
        if self.backend == "aws":
            if self.aws is None:
                raise ValueError("backend aws needs an 'aws' section (role_arn and image_uri at least)")
            if not self.storage.bucket.startswith("s3://"):
                raise ValueError(f"backend aws needs an s3:// bucket, got {self.storage.bucket!r}")
        return self

    @property
    def model_name(self) -> str:
        return self.mlflow.model_name or self.dataset.name


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(text: str, path: Path) -> str:
    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name) or default
        if value is None:
            raise ConfigError(f"pipeline config {path}: environment variable {name} is not set and has no default")
        return value

    return _VAR.sub(replace, text)


def _location(errors_loc: tuple, raw: dict) -> str:
    """dataset.columns.3.min -> dataset.columns[3] (age).min, so the user can find the line."""
    parts: list[str] = []
    node = raw
    for key in errors_loc:
        if isinstance(key, int):
            label = f"[{key}]"
            if isinstance(node, list) and key < len(node) and isinstance(node[key], dict) and "name" in node[key]:
                label += f" ({node[key]['name']})"
            parts.append(label)
        else:
            parts.append(("." if parts else "") + str(key))
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            node = None
    return "".join(parts) or "(top level)"


def _resolve_bucket(raw: dict, path: Path) -> None:
    storage = raw.get("storage")
    if isinstance(storage, dict) and isinstance(storage.get("bucket"), str) and "://" not in storage["bucket"]:
        storage["bucket"] = (path.parent / storage["bucket"]).resolve().as_uri()


def load_config(path: str | os.PathLike[str] | None = None) -> PipelineConfig:
    """Read and validate the pipeline config (``MLFACTORY_CONFIG``, else include/pipeline.yaml)."""
    path = Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG).expanduser().resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"pipeline config {path}: cannot read it ({err.strerror or err})") from err
    try:
        raw = yaml.safe_load(_expand(text, path))
    except yaml.YAMLError as err:
        raise ConfigError(f"pipeline config {path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"pipeline config {path}: expected a mapping at the top level, got {type(raw).__name__}")
    _resolve_bucket(raw, path)
    raw["source"] = str(path)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        lines = [f"{_location(e['loc'], raw)}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"pipeline config {path} is invalid:\n  " + "\n  ".join(lines)) from None
