"""Cloud-neutral specs: what to run, on what, reading and writing which URIs.

Every backend takes the same specs and turns them into its own requests (torchrun and the local
model server on `local`, SageMaker on `aws`, ...) and reports back in the same ``JobStatus``; the
specs are declared once, from the pipeline config, never per cloud. They travel through XCom as
plain JSON (``model_dump()`` / ``model_validate``).

- ``TrainingJobSpec``: the training entrypoint, its hyperparameters (``mlfactory.hyperparameters``), its
  data, its hardware (nodes, processes, accelerator), spot capacity, max runtime and checkpoints.
- ``EndpointSpec``: a registered model version on a real-time endpoint, sized by an ``EndpointSizing``
  (hardware, replicas and the load each takes, the canary and what rolls it back): the config's
  ``serving`` section is that sizing.
- ``BatchJobSpec``: a model version over a set of inputs into one output prefix, sized by a
  ``BatchSizing`` (hardware, instances): the config's ``batch_scoring`` section.
- ``JobStatus``: what a backend says about a job, endpoint or batch job.
- ``CostEstimate`` and ``check_budget``: the cost guard a cloud backend runs before it submits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlfactory import BadInput
from mlfactory.hyperparameters import Hyperparameters

# The training job's files: what it reads beside its data, and what it leaves in its output folder.
DATASET_FILE = "dataset.json"  # in a training set folder: the dataset spec
MODEL_FILE = "model.pt"  # the bundle: dataset spec, preprocessor, network shape and weights
METRICS_FILE = "metrics.json"  # the entrypoint's result: the metric, its history, the MLflow run and model
VALIDATION_FILE = "validation.npz"  # beside the model: its scores on the validation rows (for ml_train's blend)
CHECKPOINT_FILE = "checkpoint.pt"  # in the checkpoint folder, rewritten every epoch


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Accelerator(_Spec):
    kind: Literal["cpu", "gpu", "tpu"] = "cpu"
    model: str | None = Field(None, description="e.g. nvidia-l4, nvidia-h100-80gb, tpu-v5e; None: the backend's default")
    count: int = Field(0, ge=0, description="per node; 0 for cpu")

    @model_validator(mode="after")
    def _count_fits_kind(self) -> Accelerator:
        if self.kind == "cpu" and self.count:
            raise ValueError("a cpu job has no accelerator count")
        if self.kind != "cpu" and self.count < 1:
            raise ValueError(f"a {self.kind} job needs count >= 1")
        return self


class TrainingJobSpec(_Spec):
    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9-]*$",
                      description="stable across retries: a retried job resumes its own checkpoints")
    image: str | None = Field(None, description="container image for cloud backends; local runs this checkout")
    entrypoint: list[str] = ["python", "-m", "mlfactory.training.train"]
    hyperparameters: Hyperparameters = Hyperparameters()
    input_uri: str
    output_uri: str
    checkpoint_uri: str | None = None
    nodes: int = Field(1, ge=1)
    processes_per_node: int = Field(1, ge=1)
    accelerator: Accelerator = Accelerator()
    spot: bool = False
    max_runtime_s: int = Field(3600, ge=1)
    environment: dict[str, str] = {}
    tags: dict[str, str] = {}

    def arguments(self) -> list[str]:
        """The entrypoint's command-line arguments (without the launcher)."""
        args = ["--train-uri", self.input_uri, "--output-uri", self.output_uri]
        if self.checkpoint_uri:
            args += ["--checkpoint-uri", self.checkpoint_uri]
        return args + self.hyperparameter_arguments()

    def hyperparameter_arguments(self) -> list[str]:
        """The hyperparameters (one JSON argument) and tags as arguments; a cloud container takes its data
        locations from its platform's variables instead (``mlfactory.runtime``)."""
        # only the values that differ from the defaults (the entrypoint's own): all of them are more than the
        # 256 characters SageMaker takes in an argument
        args = ["--hyperparameters", self.hyperparameters.model_dump_json(exclude_defaults=True)]
        for key, value in sorted(self.tags.items()):
            args += ["--tag", f"{key}={value}"]
        return args


# A model given by hand (ml_promote's form): a logged model or a run's artifact path, no "." segment first
HAND_MODEL_URI = r"models:/(m-[0-9a-f]{32})|runs:/([0-9a-f]{32})/[A-Za-z0-9_][A-Za-z0-9_./-]*"


class ModelRef(_Spec):
    """One registered model version, and where its files are in the bucket (what a cloud container loads)."""

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    uri: str = Field(description="the version's MLflow model folder in the bucket (s3://..., file://...)")

    @property
    def registry_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


class EndpointSizing(_Spec):
    """How an endpoint is sized and guarded, on every backend: declared once, as the config's ``serving``."""

    accelerator: Accelerator = Field(Accelerator(), description="hardware of each replica (cpu, or a gpu model and count)")
    min_replicas: int = Field(1, ge=1, description="autoscaling: replicas always running")
    max_replicas: int = Field(2, ge=1, description="autoscaling: most replicas")
    target_requests_per_replica: int = Field(1000, ge=1, description="autoscaling target: requests per minute per replica")
    smoke_rows: int = Field(20, ge=1, description="holdout rows sent to a new version before it gets traffic")
    canary_percent: float = Field(10, gt=0, lt=100, description="share of traffic the new version gets first")
    canary_wait_s: int = Field(600, ge=0, le=3600, description="clouds: how long the canary runs on real traffic "
                                                                "before the rest shifts")
    canary_requests: int = Field(200, ge=0, description="holdout rows the canary sends, one per request (at least "
                                                        "smoke_rows)")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="a canary failing more requests than this rolls back")
    max_latency_ms: float | None = Field(None, gt=0, description="a canary whose requests' 95th percentile latency "
                                                                  "is above this rolls back; empty: not checked")
    rollback_alarms: list[str] = Field([], description="clouds: the platform's alarms (CloudWatch alarm names on aws, "
                                                       "Azure Monitor metric alert rules on azure; refused on gcp) whose firing rolls a canary back")

    @model_validator(mode="after")
    def _replicas(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is greater than max_replicas {self.max_replicas}")
        return self


class EndpointSpec(EndpointSizing):
    """A model version on the pipeline's real-time endpoint, rolled out blue/green behind a canary."""

    name: str = Field(min_length=1, description="the endpoint")
    model: ModelRef


class BatchSizing(_Spec):
    """How a batch job is sized, on every backend: declared once, as the config's ``batch_scoring``."""

    accelerator: Accelerator = Field(Accelerator(), description="hardware of each scoring instance")
    instances: int = Field(1, ge=1, description="clouds: instances scoring at once")
    chunk_rows: int = Field(100_000, ge=1_000, description="rows scored at a time; bounds memory")
    max_runtime_s: int = Field(6 * 3600, ge=60, description="a batch job running longer is stopped")


class BatchJobSpec(BatchSizing):
    """A model version over ``inputs`` (Parquet folders or files) into ``output_uri``."""

    name: str = Field(min_length=1, description="stable for a run: a retry replaces its own output")
    model: ModelRef
    inputs: dict[str, str] = Field(min_length=1, description="source label -> URI; the label is written beside "
                                                             "each prediction (a curated snapshot id, or the URI)")
    snapshots: list[str] = Field([], description="the curated snapshots this job scores, marked scored when it succeeds")
    output_uri: str


def sizing(settings, model: type[_Spec]) -> dict:
    """The fields of ``model`` (a sizing class) from ``settings`` (the config section that extends it)."""
    return settings.model_dump(include=set(model.model_fields))


@dataclass(frozen=True)
class JobStatus:
    state: Literal["running", "succeeded", "failed", "stopped"]
    detail: str  # the platform's status words, or its failure reason
    artifact: str | None = None  # where a succeeded training job left its model (e.g. s3://.../model.tar.gz)


@dataclass(frozen=True)
class CostEstimate:
    """The worst case of a cloud job: every instance for its whole max runtime at the on-demand price."""

    instance_type: str
    instances: int
    hours: float
    usd_per_hour: float

    @property
    def usd(self) -> float:
        return self.instances * self.hours * self.usd_per_hour

    def __str__(self) -> str:
        return (f"{self.instances} x {self.instance_type} x {self.hours:.2f} h max runtime x "
                f"${self.usd_per_hour:.3f}/h = ${self.usd:.2f} at most (on-demand)")


class BudgetExceeded(BadInput):
    """A job's worst-case cost is above the backend's budget."""


def check_budget(job: str, estimate: CostEstimate, budget_usd: float, setting: str) -> CostEstimate:
    """``estimate`` if it fits ``budget_usd`` (the config's ``setting``); else an error that says what to change."""
    if estimate.usd > budget_usd:
        raise BudgetExceeded(f"{job} would cost up to ${estimate.usd:.2f} ({estimate}), above {setting} "
                             f"${budget_usd:.2f}: lower max_runtime_s or nodes, or raise the budget")
    return estimate
