"""The pipeline config: one YAML file describes the dataset, the backend, the bucket and the thresholds.

A user brings their own tabular dataset by writing such a file and pointing ``MLFACTORY_CONFIG`` at
it; nothing else changes. ``backend: <name>`` picks where the pipeline runs, and the section of the
same name holds that backend's settings (a model each backend registers: ``mlfactory.backend_registry``). ``${VAR}`` and ``${VAR:-default}`` in a string value are
expanded from the environment (not under ``dataset``, whose names come from the data), and a
bucket given as a plain relative path is resolved against the config file's own folder.

This module is imported by DAG files at parse time: it must stay light (pydantic and yaml only).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from mlfactory import backend_registry
from mlfactory.backend_registry import BackendSettings
from mlfactory.dataset import DatasetSpec
from mlfactory.hyperparameters import Hyperparameters, check_search_space
from mlfactory.specs import Accelerator, BatchSizing, EndpointSizing

# libyaml's loader where PyYAML was built with it: the config is read at every DAG file parse, and the pure-Python
# loader is most of that parse's time
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

CONFIG_ENV = "MLFACTORY_CONFIG"
PROJECT = Path(__file__).resolve().parents[2]  # the project: dags/, plugins/, include/
DEFAULT_CONFIG = PROJECT / "include" / "pipeline.yaml"


class ConfigError(ValueError):
    """The pipeline config file is missing, unreadable or invalid; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    def labels_uri(self) -> str:
        """Where the labels of served predictions arrive later (``mlfactory.monitoring.feedback``), for ml_monitor."""
        return self.uri("predictions_prefix", "labels")

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
    task_timeout_s: int = Field(7200, ge=60, description="a curate task running longer than this fails (execution_timeout)")


class IngestSpec(_Strict):
    poll_interval_s: float = Field(2.0, gt=0, description="how often the landing watcher lists the folder (local, "
                                                          "or S3 without a notification queue)")
    settle_s: float = Field(1.0, ge=0, description="an object must be unchanged this long before it is ingested")
    sweep_schedule: str | None = Field(
        "*/30 * * * *", description="cron: ml_ingest and ml_validate also run on this schedule and take every object or "
                                    "snapshot not done yet (the safety net under the bucket events); null: events only")
    max_object_bytes: int = Field(20 * 2**30, ge=1, description="a landed object larger than this (or decompressing to "
                                                                 "more) is refused")
    max_line_bytes: int = Field(2**20, ge=1024, description="a CSV/JSON Lines line longer than this is refused")
    max_row_group_bytes: int = Field(2**30, ge=2**20, description="a Parquet row group decompressing to more than this "
                                                                  "is refused: ETL reads a row group at a time")
    task_timeout_s: int = Field(3600, ge=60, description="an ingest task running longer than this fails (execution_timeout)")
    parallel_tasks: int = Field(4, ge=1, le=64, description="ml_ingest and ml_validate share the objects or snapshots "
                                                             "waiting among at most this many tasks, side by side")

    @field_validator("sweep_schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            from croniter import croniter

            if not croniter.is_valid(value):
                raise ValueError(f"{value!r} is not a cron expression (e.g. '*/30 * * * *'), or null for events only")
        return value


TRAINING_QUEUE_ENV = "MLFACTORY_TRAINING_QUEUE"
TRAINING_POD_TEMPLATE_ENV = "MLFACTORY_TRAINING_POD_TEMPLATE"


class TrainingSpec(Hyperparameters):
    """Defaults of ml_train: the hyperparameters of its jobs (``mlfactory.hyperparameters``; the trigger form
    offers the knobs a person turns per run), and how the search and the jobs run."""

    blend: bool = Field(True, description="when the search trained both model families: the weighted average of the "
                        "best trial of each (the weight chosen on the validation rows) is the candidate if it beats "
                        "every trial there")
    processes: int = Field(2, ge=1, le=64, description="DDP processes per node (local: CPU processes)")
    accelerator: Accelerator = Field(Accelerator(), description="each training node's hardware: cpu, or e.g. {kind: gpu, "
                                     "model: nvidia-a100, count: 1} (one DDP process per GPU; local: this machine's "
                                     "GPUs, clouds: the instance catalog)")
    nodes: int = Field(1, ge=1, le=64, description="machines per training job (clouds; local runs on one)")
    trials: int = Field(2, ge=1, le=64, description="hyperparameter-search trials, one mapped task each")
    search: Literal["grid", "random", "bayes"] = Field(
        "grid", description="grid: the first combinations of search_space; random: a seeded sample of them; bayes: "
        "Optuna's TPE, in search_batches batches of `trials` jobs, each drawn from the results of those before")
    search_batches: int = Field(1, ge=1, le=20, description="batches of `trials` training jobs, one after the other "
                                "(the DAG's plan/train, plan_2/train_2, ...): what bayes learns between")
    search_space: dict[str, list] = Field(
        default_factory=dict, description="hyperparameter -> candidate values; the search picks from these"
    )
    schedule: str = Field("0 3 * * 0", description="cron of the scheduled retraining (UTC)")
    max_runtime_s: int = Field(3600, ge=10, description="a training job running longer is stopped")
    pool: str = Field("mlfactory_training", min_length=1, description="the Airflow pool every training job runs in")
    concurrent_jobs: int = Field(1, ge=1, description="size of that pool: training jobs at once (make run creates "
                                                      "it; the local stand-in for a GPU quota)")
    queue: str = Field(
        default_factory=lambda: os.environ.get(TRAINING_QUEUE_ENV) or "default", min_length=1,
        description="the Airflow queue of the training tasks: with the CeleryExecutor, the workers on GPU machines "
        f"listen on it (`airflow celery worker --queues gpu`); default ${TRAINING_QUEUE_ENV}, else `default`")
    pod_template_file: str = Field(
        default_factory=lambda: os.environ.get(TRAINING_POD_TEMPLATE_ENV, ""),
        description="with the KubernetesExecutor: the pod template of the training tasks (a GPU node pool, its "
        f"taint, the GPU limit; deploy/helm/gpu-training-pod.yaml); default ${TRAINING_POD_TEMPLATE_ENV}; empty: none")
    retries: int = Field(2, ge=0, le=20, description="retries of a failed training task (a lost worker, a preempted "
                         "spot job): each resumes from the job's last checkpoint")
    retrain_on_new_data: bool = Field(
        False, description="retrain on every curated batch even when a champion exists (default: only until the "
        "first champion; then on the schedule, on drift, or by hand)")

    @field_validator("search_space")
    @classmethod
    def _known_keys(cls, space: dict[str, list]) -> dict[str, list]:
        return check_search_space(space)

    def executor_config(self) -> dict:
        """The training tasks' ``executor_config``: the KubernetesExecutor's pod template, when one is set (the
        other executors ignore it)."""
        return {"pod_template_file": self.pod_template_file} if self.pod_template_file else {}


class PromotionSpec(_Strict):
    """The gate of ml_promote. The metric is ROC AUC for classification and R² for regression."""

    margin: float = Field(0.002, ge=0, description="the challenger must beat the champion by at least this")
    floor: float = Field(0.75, description="and reach at least this on the holdout, even with no champion yet")
    require_approval: bool = Field(False, description="a person approves in the Airflow UI before the alias moves")
    holdout_fraction: float = Field(0.1, gt=0, lt=0.5, description="share of the first curated data frozen as holdout")
    holdout_max_rows: int = Field(50_000, ge=100)
    recent_fraction: float = Field(
        0.3, ge=0, lt=1, description="once a champion exists: this share of the curated rows it never saw (chosen by "
        "row content) is kept out of the challenger's training set as the recent window; 0: no recent window")
    holdout_tolerance: float = Field(
        0.02, ge=0, description="with a recent window, the challenger may trail the champion on the frozen holdout by "
        "this much, and must beat it on the recent window by `margin`")


class ServingSpec(EndpointSizing):
    """The real-time endpoint and ml_deploy's blue/green rollout, on every backend: the sizing of every
    ``EndpointSpec`` (``mlfactory.specs.EndpointSizing``); where the local endpoint listens is in ``local``."""

    endpoint_name: str = Field("", description="the endpoint's name on a cloud; default: the registered model's name")
    log_flush_s: float = Field(10.0, gt=0, description="how often the prediction log is written to the bucket")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        moved = [f"serving.{key} is now local.{key}" for key in ("port", "token") if key in data] \
            if isinstance(data, dict) else []
        if moved:
            raise ValueError("; ".join(moved) + " (the local endpoint's own settings)")
        return data


class BatchScoringSpec(BatchSizing):
    """ml_batch_score: when it runs, and the sizing of every ``BatchJobSpec`` (``mlfactory.specs.BatchSizing``)."""

    schedule: str = Field("0 4 * * *", description="cron of the daily batch scoring (UTC), besides a new champion")


class MonitoringSpec(_Strict):
    """ml_monitor: drift of new curated data and of served traffic against the champion's training data."""

    schedule: str = Field("0 * * * *", description="cron of the drift check (UTC), besides new curated data")
    threshold: float = Field(0.1, gt=0, description="per feature: normalised Wasserstein / Jensen-Shannon distance")
    alpha: float = Field(0.01, gt=0, lt=1, description="significance of the BH-corrected KS / chi-square tests")
    drift_share: float = Field(0.3, gt=0, le=1, description="share of drifted features that means the data drifted")
    min_rows: int = Field(1000, ge=50, description="fewer new rows wait for the next check")
    reference_max_rows: int = Field(200_000, ge=1000, description="sample of the training data used as reference")
    max_metric_drop: float = Field(
        0.05, gt=0, description="the champion's primary metric (ROC AUC; R² for regression) on newly curated, labelled "
        "rows may fall this far below its metric on the frozen holdout; further emits `drift_detected` (reason "
        "performance) even when the features are stable")
    label_wait_hours: float = Field(
        24, ge=0, description="a label file under predictions/labels/ waits this long for every label to find its "
        "served row in the prediction log; then it is taken with the rows matched, the rest reported as unmatched")
    label_lookback_days: int = Field(30, ge=1, description="labels are matched to rows served in this many last days")
    max_label_bytes: int = Field(2**30, ge=1024, description="a label file larger than this, or decompressing to "
                                 "more, is refused (reported, never read whole)")
    prediction_log_days: int = Field(
        30, ge=1, description="the model server's prediction log (every request's raw inputs) is kept this many days; "
        "ml_monitor deletes older days. At least label_lookback_days: labels are matched to logged rows")

    @model_validator(mode="after")
    def _labels_find_their_rows(self) -> MonitoringSpec:
        if self.prediction_log_days < self.label_lookback_days:
            raise ValueError(f"prediction_log_days ({self.prediction_log_days}) must be at least label_lookback_days "
                             f"({self.label_lookback_days}): a label finds its row in the prediction log")
        return self


class MlflowSpec(_Strict):
    tracking_uri: str = Field("http://127.0.0.1:5000", description="the MLflow server (tracking and registry)")
    experiment: str = "mlfactory"
    model_name: str = Field("", description="registered model name; default: the dataset name")


class PipelineConfig(_Strict):
    backend: SerializeAsAny[BackendSettings] = Field(
        description="where events, jobs and endpoints live: `backend: <name>` and its section `<name>:` "
                    "(see mlfactory.backend_registry)")
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
    source: str = Field("", description="the file this config was read from (set by load_config)")

    @model_validator(mode="after")
    def _fits_backend(self) -> PipelineConfig:
        self.backend.check_pipeline(self)
        return self

    @model_validator(mode="after")
    def _weights_need_classes(self) -> PipelineConfig:
        weights = {self.training.class_weight, *self.training.search_space.get("class_weight", [])}
        if self.dataset.task == "regression" and "balanced" in weights:
            raise ValueError(f"training.class_weight balanced applies to classification; {self.dataset.name}'s target "
                             f"{self.dataset.target!r} is a regression target")
        return self

    @property
    def model_name(self) -> str:
        return self.mlflow.model_name or self.dataset.name


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(node, path: Path, where: tuple = ()):
    """``${VAR}`` and ``${VAR:-default}`` expanded in the parsed file's string values: never in its text (a value
    from the environment is a value, not YAML: it adds no key), nor in keys, nor anywhere under ``dataset`` (names
    and categories come from the data, where such text is data)."""
    if isinstance(node, dict):
        return {key: _expand(value, path, (*where, key)) for key, value in node.items()}
    if isinstance(node, list):
        return [_expand(value, path, (*where, i)) for i, value in enumerate(node)]
    if not isinstance(node, str) or where[:1] == ("dataset",):
        return node

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name) or default
        if value is None:
            raise ConfigError(f"pipeline config {path}: {'.'.join(map(str, where))}: environment variable {name} is "
                              "not set and has no default")
        return value

    return _VAR.sub(replace, node)


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


def _backend_settings(raw: dict) -> tuple[BackendSettings | None, list[str]]:
    """``backend: <name>`` and the sections named after backends -> the chosen backend's settings, and the
    errors (as ``section.field: message``). Every backend section present is checked, so switching the
    backend later meets no surprise."""
    name = raw.pop("backend", "local")
    sections = {key: raw.pop(key) for key in list(raw)
                if key not in PipelineConfig.model_fields and backend_registry.is_registered(key)}
    errors: list[str] = []
    if not isinstance(name, str) or not backend_registry.is_registered(name):
        errors.append(f"backend: {name!r} is not a registered backend; registered: {', '.join(backend_registry.names())}")
        name = None
    chosen = None
    for key in sorted({*sections, *([name] if name else [])}):
        section = sections.get(key) or {}
        settings_model = backend_registry.get(key).settings
        if not isinstance(section, dict):
            errors.append(f"{key}: expected a mapping of {key} settings, got {type(section).__name__}")
            continue
        if not sections.get(key):
            required = [f for f, info in settings_model.model_fields.items() if info.is_required() and f != "name"]
            if required:
                errors.append(f"backend {key} needs its section '{key}:' ({' and '.join(required)} at least)")
                continue
        try:
            settings = settings_model.model_validate({**section, "name": key})
        except ValidationError as err:
            errors += [f"{_location((key, *e['loc']), {key: section})}: {e['msg']}" for e in err.errors()]
            continue
        if key == name:
            chosen = settings
    return chosen, errors


def load_config(path: str | os.PathLike[str] | None = None) -> PipelineConfig:
    """Read and validate the pipeline config (``MLFACTORY_CONFIG``, else include/pipeline.yaml)."""
    path = Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG).expanduser().resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"pipeline config {path}: cannot read it ({err.strerror or err})") from err
    try:
        raw = _expand(yaml.load(text, Loader=_YAML_LOADER), path)
    except yaml.YAMLError as err:
        raise ConfigError(f"pipeline config {path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"pipeline config {path}: expected a mapping at the top level, got {type(raw).__name__}")
    _resolve_bucket(raw, path)
    raw["source"] = str(path)
    settings, errors = _backend_settings(raw)
    if settings is not None:
        raw["backend"] = settings
    try:
        if not errors:
            return PipelineConfig.model_validate(raw)
        # report the other sections' errors too: validate them around a placeholder backend
        PipelineConfig.model_validate({**raw, "backend": BackendSettings(name="")})
    except ValidationError as err:
        errors += [f"{_location(e['loc'], raw)}: {e['msg']}" for e in err.errors()]
    raise ConfigError(f"pipeline config {path} is invalid:\n  " + "\n  ".join(errors))
