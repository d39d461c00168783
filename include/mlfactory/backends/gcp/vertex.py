"""The `gcp` backend's translation layer: cloud-neutral specs (``mlfactory.specs``) -> Vertex AI request
messages (``google.cloud.aiplatform_v1``), Vertex resources -> ``JobStatus``. No Airflow and no network.

Every request is built as the ``aiplatform_v1`` proto message the client sends: a wrong field name or
enum value is an error here, naming it, and never reaches the wire.

Machine catalog: a job asks for an accelerator (kind, model, count per node) and this table picks the
Vertex machine (and attached accelerator, or TPU topology). Endpoints and batch prediction use the same
table for GPUs and n1-standard-4 on CPU; ``gcp.training_machine_type``, ``gcp.endpoint_machine_type`` and
``gcp.batch_machine_type`` override it (the accelerator still comes from the table).

| accelerator | 1 per node | 2 | 4 | 8 |
|---|---|---|---|---|
| cpu | n1-standard-4 | | | |
| nvidia-l4 (the default GPU) | g2-standard-8 | g2-standard-24 | g2-standard-48 | g2-standard-96 |
| nvidia-t4 | n1-standard-8 + T4 | n1-standard-16 + 2 T4 | n1-standard-32 + 4 T4 | |
| nvidia-v100 | n1-standard-8 + V100 | n1-standard-16 + 2 V100 | n1-standard-32 + 4 V100 | n1-standard-64 + 8 V100 |
| nvidia-a100 | a2-highgpu-1g | a2-highgpu-2g | a2-highgpu-4g | a2-highgpu-8g |
| nvidia-a100-80gb | a2-ultragpu-1g | a2-ultragpu-2g | a2-ultragpu-4g | a2-ultragpu-8g |
| nvidia-h100 (-80gb) | | | | a3-highgpu-8g |
| tpu-v5e (the default TPU) | ct5lp-hightpu-1t (1x1) | | ct5lp-hightpu-4t (2x2) | ct5lp-hightpu-8t (2x4) |

A TPU job sets ``PJRT_DEVICE=TPU``: the training entrypoint then takes its XLA path (``torch_xla``, in
a TPU image). Multi-node jobs run the chief in worker pool 0 and ``nodes - 1`` workers in pool 1; the
entrypoint reads Vertex's ``CLUSTER_SPEC`` (``mlfactory.training.cluster``).

Spot and checkpoints: training runs on Spot VMs by default (``Scheduling.strategy = SPOT``) with
``restart_job_on_worker_restart``: Vertex restarts a preempted worker in the same job, and the
entrypoint resumes from ``AIP_CHECKPOINT_DIR``, which Vertex sets to ``<base_output_directory>/checkpoints/``;
``base_output_directory`` is the spec's ``output_uri``, so a job started by a retry resumes from the same
checkpoints too. The model lands in ``AIP_MODEL_DIR`` = ``<output_uri>/model/``.

Cost guard: before a job starts, its worst case (list price x replicas x max runtime; the price of the
machine plus its attached GPUs) is compared with ``gcp.budget_usd``. The prices below are approximate
us-central1 on-demand prices for Vertex AI custom training; set ``gcp.prices_usd_per_hour`` for your
region and discounts, or a machine not listed. Spot usually costs 60-90 % less; the guard does not count on it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import urlparse

from mlfactory import BadInput
from mlfactory.backends.gcp import GcpSettings
from mlfactory.runtime import environment as runtime_environment
from mlfactory.specs import (Accelerator, BatchJobSpec, CostEstimate, EndpointSpec, JobStatus, ModelRef, TrainingJobSpec,
                             check_budget)

DEFAULT_GPU, DEFAULT_TPU = "nvidia-l4", "tpu-v5e"
CPU_MACHINE = "n1-standard-4"
MODEL_SUBDIR = "model"  # AIP_MODEL_DIR = <base_output_directory>/model/
SERVING_PORT = 8080
PREDICT_ROUTE, HEALTH_ROUTE = "/predict", "/health"


@dataclass(frozen=True)
class Machine:
    machine_type: str
    accelerator_type: str = ""  # aiplatform_v1.AcceleratorType name; "" for CPU and TPU VMs
    accelerator_count: int = 0
    tpu_topology: str = ""


def _gpus(model: str, enum: str, machines: dict[int, str]) -> dict:
    return {("gpu", model, n): Machine(m, enum, n) for n, m in machines.items()}


CATALOG: dict[tuple[str, str | None, int], Machine] = {
    ("cpu", None, 0): Machine(CPU_MACHINE),
    **_gpus("nvidia-l4", "NVIDIA_L4", {1: "g2-standard-8", 2: "g2-standard-24", 4: "g2-standard-48", 8: "g2-standard-96"}),
    **_gpus("nvidia-t4", "NVIDIA_TESLA_T4", {1: "n1-standard-8", 2: "n1-standard-16", 4: "n1-standard-32"}),
    **_gpus("nvidia-v100", "NVIDIA_TESLA_V100", {1: "n1-standard-8", 2: "n1-standard-16", 4: "n1-standard-32",
                                                  8: "n1-standard-64"}),
    **_gpus("nvidia-a100", "NVIDIA_TESLA_A100", {1: "a2-highgpu-1g", 2: "a2-highgpu-2g", 4: "a2-highgpu-4g",
                                                  8: "a2-highgpu-8g"}),
    **_gpus("nvidia-a100-80gb", "NVIDIA_A100_80GB", {1: "a2-ultragpu-1g", 2: "a2-ultragpu-2g", 4: "a2-ultragpu-4g",
                                                      8: "a2-ultragpu-8g"}),
    **_gpus("nvidia-h100", "NVIDIA_H100_80GB", {8: "a3-highgpu-8g"}),
    ("tpu", "tpu-v5e", 1): Machine("ct5lp-hightpu-1t", tpu_topology="1x1"),
    ("tpu", "tpu-v5e", 4): Machine("ct5lp-hightpu-4t", tpu_topology="2x2"),
    ("tpu", "tpu-v5e", 8): Machine("ct5lp-hightpu-8t", tpu_topology="2x4"),
}
ALIASES = {"nvidia-h100-80gb": "nvidia-h100", "nvidia-tesla-t4": "nvidia-t4", "nvidia-tesla-v100": "nvidia-v100",
           "nvidia-tesla-a100": "nvidia-a100", "tpu-v5-lite": "tpu-v5e", "tpu-v5litepod": "tpu-v5e", "v5e": "tpu-v5e"}
# USD/hour, us-central1, Vertex AI custom training (approximate list prices); GPUs of n1 machines are
# attached and priced per GPU, the others come with the machine.
PRICES_USD_PER_HOUR: dict[str, float] = {
    "n1-standard-4": 0.219, "n1-standard-8": 0.438, "n1-standard-16": 0.876, "n1-standard-32": 1.751,
    "n1-standard-64": 3.502, "e2-standard-4": 0.155, "e2-standard-8": 0.309,
    "g2-standard-8": 1.01, "g2-standard-24": 2.30, "g2-standard-48": 4.61, "g2-standard-96": 9.22,
    "a2-highgpu-1g": 4.22, "a2-highgpu-2g": 8.43, "a2-highgpu-4g": 16.87, "a2-highgpu-8g": 33.74,
    "a2-ultragpu-1g": 5.79, "a2-ultragpu-2g": 11.58, "a2-ultragpu-4g": 23.16, "a2-ultragpu-8g": 46.32,
    "a3-highgpu-8g": 101.0,
    "ct5lp-hightpu-1t": 1.38, "ct5lp-hightpu-4t": 5.52, "ct5lp-hightpu-8t": 11.04,
    "NVIDIA_TESLA_T4": 0.403, "NVIDIA_TESLA_V100": 2.852,
}
ATTACHED = {"NVIDIA_TESLA_T4", "NVIDIA_TESLA_V100"}


class VertexRequestError(BadInput):
    """A spec this backend cannot run, or a request the aiplatform_v1 protos refuse."""


def types():
    """``google.cloud.aiplatform_v1`` (imported on first use: ~1 s)."""
    from google.cloud import aiplatform_v1

    return aiplatform_v1


def message(type_name: str, **fields):
    """An ``aiplatform_v1`` message: an unknown field or a wrong enum value raises, naming it."""
    from functools import reduce

    try:
        return reduce(getattr, type_name.split("."), types())(**fields)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise VertexRequestError(f"aiplatform_v1.{type_name} refuses {sorted(fields)}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Machines and cost


def _model(accelerator: Accelerator) -> str:
    default = DEFAULT_TPU if accelerator.kind == "tpu" else DEFAULT_GPU
    name = (accelerator.model or default).lower()
    return ALIASES.get(name, name)


def machine(accelerator: Accelerator, override: str = "", setting: str = "", cpu: str = CPU_MACHINE) -> Machine:
    """The catalog's machine for ``accelerator`` (``override``, the config's ``setting``, replaces its type)."""
    if accelerator.kind == "cpu":
        return Machine(override or cpu)
    model = _model(accelerator)
    key = (accelerator.kind, model, accelerator.count)
    if key not in CATALOG:
        counts = sorted(c for k, m, c in CATALOG if k == accelerator.kind and m == model)
        known = sorted({m for k, m, _ in CATALOG if k == accelerator.kind})
        raise VertexRequestError(
            f"no Vertex AI machine in the catalog has {accelerator.count} x {model}: "
            + (f"{model} comes {counts} per machine" if counts else f"known {accelerator.kind.upper()}s: {known}")
            + (f"; or set {setting}" if setting else ""))
    found = CATALOG[key]
    return Machine(override, found.accelerator_type, found.accelerator_count, found.tpu_topology) if override else found


def machine_spec(m: Machine):
    fields = {"machine_type": m.machine_type}
    if m.accelerator_type:
        fields.update(accelerator_type=m.accelerator_type, accelerator_count=m.accelerator_count)
    if m.tpu_topology:
        fields["tpu_topology"] = m.tpu_topology
    return message("MachineSpec", **fields)


def hourly_price(m: Machine, gcp: GcpSettings) -> float:
    prices = {**PRICES_USD_PER_HOUR, **gcp.prices_usd_per_hour}
    missing = [k for k in (m.machine_type, m.accelerator_type if m.accelerator_type in ATTACHED else "") if k and k not in prices]
    if missing:
        raise VertexRequestError(f"no price for {missing}: add it to gcp.prices_usd_per_hour so the cost guard can check it")
    extra = prices[m.accelerator_type] * m.accelerator_count if m.accelerator_type in ATTACHED else 0.0
    return prices[m.machine_type] + extra


def training_machine(spec: TrainingJobSpec, gcp: GcpSettings) -> Machine:
    if spec.accelerator.kind == "tpu" and spec.nodes > 1:
        raise VertexRequestError(f"job {spec.name}: a TPU job runs on one TPU slice here (nodes 1); ask for more "
                                 "chips per node (tpu-v5e: 1, 4 or 8) instead of {spec.nodes} nodes")
    return machine(spec.accelerator, gcp.training_machine_type, "gcp.training_machine_type")


def estimate_training_cost(spec: TrainingJobSpec, gcp: GcpSettings) -> CostEstimate:
    m = training_machine(spec, gcp)
    label = m.machine_type + (f"+{m.accelerator_count}x{m.accelerator_type}" if m.accelerator_type in ATTACHED else "")
    return CostEstimate(label, spec.nodes, spec.max_runtime_s / 3600, hourly_price(m, gcp))


def check_training_budget(spec: TrainingJobSpec, gcp: GcpSettings) -> CostEstimate:
    return check_budget(f"training job {spec.name}", estimate_training_cost(spec, gcp), gcp.budget_usd, "gcp.budget_usd")


# ---------------------------------------------------------------------------------------------
# Names


def gs_uri(uri: str, what: str) -> str:
    if urlparse(uri).scheme != "gs":
        raise VertexRequestError(f"{what} must be a gs:// URI on the gcp backend, got {uri!r}")
    return uri


def resource_id(name: str, max_length: int = 63) -> str:
    """A Vertex resource id (model, endpoint): lowercase letters, digits and '-', starting with a letter."""
    cleaned = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", name.lower())).strip("-")
    if cleaned and not cleaned[0].isalpha():
        cleaned = "m-" + cleaned
    cleaned = cleaned[:max_length].rstrip("-")
    if not cleaned:
        raise VertexRequestError(f"cannot make a Vertex resource id from {name!r}")
    return cleaned


def labels(*groups: dict[str, str]) -> dict[str, str]:
    """Vertex labels: at most 64, keys and values lowercase [a-z0-9_-], at most 63 characters."""
    merged: dict[str, str] = {}
    for group in groups:
        for key, value in group.items():
            k = re.sub(r"[^a-z0-9_-]", "_", key.lower())[:63]
            merged[k if k[:1].isalpha() else f"l_{k}"[:63]] = re.sub(r"[^a-z0-9_-]", "_", str(value).lower())[:63]
    return dict(sorted(merged.items())[:64])


def parent(gcp: GcpSettings) -> str:
    return f"projects/{gcp.project}/locations/{gcp.region}"


def _encryption(gcp: GcpSettings) -> dict:
    return {"encryption_spec": message("EncryptionSpec", kms_key_name=gcp.kms_key_name)} if gcp.kms_key_name else {}


# ---------------------------------------------------------------------------------------------
# Training


def strategy(spec: TrainingJobSpec, gcp: GcpSettings) -> str:
    if gcp.spot or spec.spot:
        return "SPOT"
    return "FLEX_START" if gcp.flex_start else "STANDARD"


def custom_job(spec: TrainingJobSpec, gcp: GcpSettings, display_name: str | None = None):
    """The ``CustomJob`` for ``spec``: the training entrypoint as the container's command, its data through
    ``AIP_TRAINING_DATA_URI``, the model to ``AIP_MODEL_DIR`` and checkpoints to ``AIP_CHECKPOINT_DIR`` (both
    under ``base_output_directory`` = ``output_uri``), the chief in pool 0 and ``nodes - 1`` workers in pool 1."""
    from google.protobuf import duration_pb2

    m = training_machine(spec, gcp)
    env = {**spec.environment, "PYTHONUNBUFFERED": "1", "AIP_TRAINING_DATA_URI": gs_uri(spec.input_uri, "the training set"),
           **runtime_environment("gcp")}
    if spec.accelerator.kind == "tpu":
        env["PJRT_DEVICE"] = "TPU"
    container = message("ContainerSpec", image_uri=gcp.image_uri, command=list(spec.entrypoint),
                        args=spec.hyperparameter_arguments(),
                        env=[message("EnvVar", name=k, value=v) for k, v in sorted(env.items())])
    disk = message("DiskSpec", boot_disk_type="pd-ssd", boot_disk_size_gb=gcp.boot_disk_gb)
    pools = [message("WorkerPoolSpec", container_spec=container, machine_spec=machine_spec(m), replica_count=1,
                     disk_spec=disk)]
    if spec.nodes > 1:
        pools.append(message("WorkerPoolSpec", container_spec=container, machine_spec=machine_spec(m),
                             replica_count=spec.nodes - 1, disk_spec=disk))
    chosen = strategy(spec, gcp)
    scheduling = {"timeout": duration_pb2.Duration(seconds=spec.max_runtime_s), "restart_job_on_worker_restart": True,
                  "strategy": chosen}
    if chosen == "FLEX_START":
        wait = max(gcp.max_wait_s or 2 * spec.max_runtime_s, 60)
        scheduling["max_wait_duration"] = duration_pb2.Duration(seconds=wait)
    job_spec = {"worker_pool_specs": pools, "scheduling": message("Scheduling", **scheduling),
                "base_output_directory": message("GcsDestination",
                                                 output_uri_prefix=gs_uri(spec.output_uri, "the job output"))}
    if gcp.service_account:
        job_spec["service_account"] = gcp.service_account
    if gcp.network:
        job_spec["network"] = gcp.network
    return message("CustomJob", display_name=display_name or resource_id(spec.name, 128),
                   job_spec=message("CustomJobSpec", **job_spec),
                   labels=labels(gcp.labels, spec.tags, {JOB_LABEL: spec.name}), **_encryption(gcp))


JOB_LABEL = "mlfactory_job"  # on every CustomJob and BatchPredictionJob: the spec's name, found again by a retry


def job_filter(name: str) -> str:
    """The list filter that finds the jobs started for spec ``name`` (by this try or an earlier one)."""
    return f'labels.{JOB_LABEL}="{labels({JOB_LABEL: name})[JOB_LABEL]}"'


STATES = {"JOB_STATE_QUEUED": "running", "JOB_STATE_PENDING": "running", "JOB_STATE_RUNNING": "running",
          "JOB_STATE_CANCELLING": "running", "JOB_STATE_UPDATING": "running", "JOB_STATE_PAUSED": "running",
          "JOB_STATE_SUCCEEDED": "succeeded", "JOB_STATE_PARTIALLY_SUCCEEDED": "failed", "JOB_STATE_FAILED": "failed",
          "JOB_STATE_EXPIRED": "failed", "JOB_STATE_CANCELLED": "stopped", "JOB_STATE_UNSPECIFIED": "running"}


def job_status(job) -> JobStatus:
    """A CustomJob or BatchPredictionJob -> a JobStatus; a failure carries Vertex's error message."""
    state = types().JobState(job.state).name
    error = job.error.message if job.error and job.error.message else ""
    return JobStatus(STATES[state], error or state)


def model_dir(output_uri: str) -> str:
    return f"{output_uri.rstrip('/')}/{MODEL_SUBDIR}"


def training_result(metrics: bytes, output_uri: str, job: str) -> dict:
    """The entrypoint's metrics.json from ``AIP_MODEL_DIR``, with the job that made it."""
    result = json.loads(metrics)
    where = model_dir(output_uri)
    if not str(result.get("model_bundle_uri", "")).startswith(where):
        raise VertexRequestError(f"job {job}: metrics.json names {result.get('model_bundle_uri')}, not a file under "
                                 f"AIP_MODEL_DIR {where}: did the job run the mlfactory.training.train entrypoint?")
    return {**result, "vertex_job": job}


# ---------------------------------------------------------------------------------------------
# Model registry (the deployable artifact only; the registry of record is MLflow) and endpoints


def model_id(model: ModelRef) -> str:
    """The Vertex model of one registered version (shared by the endpoint and batch prediction)."""
    return resource_id(f"{model.name}-v{model.version}")


def upload_model_request(model: ModelRef, gcp: GcpSettings, environment: dict[str, str] | None = None):
    """UploadModel: the version's MLflow model folder in GCS as ``artifact_uri`` (Vertex hands it to the
    container as ``AIP_STORAGE_URI``) and the project's model server as the serving container. The upload, the
    deployed models and batch prediction run as the serving service account (``gcp.serving_account``), never the
    training one."""
    env = {"MLFACTORY_MODEL_VERSION": model.version, **(environment or {}), **runtime_environment("gcp")}
    container = message("ModelContainerSpec", image_uri=gcp.image_uri,
                        command=["python", "-m", "mlfactory.serving"],
                        env=[message("EnvVar", name=k, value=v) for k, v in sorted(env.items())],
                        ports=[message("Port", container_port=SERVING_PORT)],
                        predict_route=PREDICT_ROUTE, health_route=HEALTH_ROUTE)
    vertex_model = message("Model", display_name=f"{model.name} v{model.version}",
                           description=f"MLflow {model.registry_uri}", artifact_uri=gs_uri(model.uri, "the model files"),
                           container_spec=container,
                           labels=labels(gcp.labels, {"mlflow_model": model.name, "mlflow_version": model.version}),
                           **_encryption(gcp))
    return message("UploadModelRequest", parent=parent(gcp), model_id=model_id(model), model=vertex_model,
                   **({"service_account": gcp.serving_account} if gcp.serving_account else {}))


def endpoint_id(spec: EndpointSpec) -> str:
    """The endpoint's id, chosen by us (a letter first, then up to 62 of [a-z0-9-]): stable across retries."""
    return resource_id(spec.name)


def staging_id(spec: EndpointSpec) -> str:
    """The id of the endpoint's staging endpoint (``<id>-staging``), where a new version answers smoke tests alone."""
    return f"{endpoint_id(spec)[:55]}-staging"


def create_endpoint_request(spec: EndpointSpec, gcp: GcpSettings, staging: bool = False):
    endpoint = message("Endpoint", display_name=f"{spec.name} (staging)" if staging else spec.name,
                       labels=labels(gcp.labels), **_encryption(gcp))
    return message("CreateEndpointRequest", parent=parent(gcp), endpoint=endpoint,
                   endpoint_id=staging_id(spec) if staging else endpoint_id(spec))


def endpoint_name(spec: EndpointSpec, gcp: GcpSettings, staging: bool = False) -> str:
    return f"{parent(gcp)}/endpoints/{staging_id(spec) if staging else endpoint_id(spec)}"


def autoscaling_metric(accelerator: Accelerator) -> str:
    kind = "gpu/duty_cycle" if accelerator.kind == "gpu" else "cpu/utilization"
    return f"aiplatform.googleapis.com/prediction/online/{kind}"


def deploy_model_request(spec: EndpointSpec, gcp: GcpSettings, model_name: str, serving: dict[str, int],
                         staging: bool = False):
    """DeployModel of ``model_name`` (a Vertex model resource) to the endpoint (``staging``: its staging endpoint,
    alone there) with autoscaling between
    ``min_replicas`` and ``max_replicas`` (CPU utilization or GPU duty cycle at
    ``gcp.autoscaling_target_utilization``); ``serving``: the deployed model ids that serve now -> their
    share. The new model ("0" in a traffic split) gets ``canary_percent``, the served ones the rest in
    proportion; with nothing served it gets everything."""
    if spec.accelerator.kind == "tpu":
        raise VertexRequestError("serving on TPUs is not in this backend: ask serving.accelerator for a cpu or gpu")
    m = machine(spec.accelerator, gcp.endpoint_machine_type, "gcp.endpoint_machine_type")
    resources = message("DedicatedResources", machine_spec=machine_spec(m), min_replica_count=spec.min_replicas,
                        max_replica_count=spec.max_replicas, autoscaling_metric_specs=[
                            message("AutoscalingMetricSpec", metric_name=autoscaling_metric(spec.accelerator),
                                    target=gcp.autoscaling_target_utilization)])
    deployed = message("DeployedModel", model=model_name, display_name=model_name.rsplit("/", 1)[-1][:128],
                       dedicated_resources=resources,
                       **({"service_account": gcp.serving_account} if gcp.serving_account else {}))
    return message("DeployModelRequest", endpoint=endpoint_name(spec, gcp, staging), deployed_model=deployed,
                   traffic_split=canary_split(serving, spec.canary_percent))


def canary_split(serving: dict[str, int], canary_percent: float) -> dict[str, int]:
    """The traffic split with the new deployed model ("0") at ``canary_percent`` (whole percent, at least 1),
    the ones serving now sharing the rest in proportion; everything when nothing serves. Sums to 100."""
    live = {k: v for k, v in serving.items() if v > 0}
    if not live:
        return {"0": 100}
    canary = min(99, max(1, round(canary_percent)))
    total, rest = sum(live.values()), 100 - canary
    split = {k: rest * v // total for k, v in live.items()}
    first = max(live, key=live.get)
    split[first] += rest - sum(split.values())
    return {"0": canary, **split}


def update_endpoint_request(endpoint, traffic_split: dict[str, int]):
    """UpdateEndpoint of the traffic split alone (update_mask ``traffic_split``)."""
    from google.protobuf import field_mask_pb2

    if sum(traffic_split.values()) != 100:
        raise VertexRequestError(f"a traffic split must sum to 100, got {traffic_split}")
    endpoint = types().Endpoint(endpoint)
    endpoint.traffic_split = traffic_split
    return message("UpdateEndpointRequest", endpoint=endpoint,
                   update_mask=field_mask_pb2.FieldMask(paths=["traffic_split"]))


# ---------------------------------------------------------------------------------------------
# Batch prediction


def batch_prediction_job(name: str, model_name: str, inputs: list[str], spec: BatchJobSpec, gcp: GcpSettings,
                         excluded_fields: list[str] = ()):
    """A BatchPredictionJob of ``model_name`` over JSON Lines instance files (``inputs``, gs://): each line
    one row as a caller sends it, plus ``excluded_fields`` (keys, the source label) that Vertex keeps out of
    the model's request and writes beside its prediction; the predictions land under ``spec.output_uri``
    as Vertex's ``prediction.results-*`` files (each line the instance and its prediction)."""
    if not inputs:
        raise VertexRequestError(f"batch job {name} has no input files")
    m = machine(spec.accelerator, gcp.batch_machine_type, "gcp.batch_machine_type")
    resources = message("BatchDedicatedResources", machine_spec=machine_spec(m), starting_replica_count=spec.instances,
                        max_replica_count=spec.instances)
    job = {"display_name": resource_id(name, 128), "model": model_name,
           "input_config": message("BatchPredictionJob.InputConfig", instances_format="jsonl",
                                   gcs_source=message("GcsSource", uris=[gs_uri(u, "a batch input") for u in inputs])),
           "output_config": message("BatchPredictionJob.OutputConfig", predictions_format="jsonl",
                                    gcs_destination=message("GcsDestination", output_uri_prefix=gs_uri(
                                        spec.output_uri, "the predictions location"))),
           "dedicated_resources": resources,
           "manual_batch_tuning_parameters": message("ManualBatchTuningParameters", batch_size=64),
           "labels": labels(gcp.labels, {JOB_LABEL: name}), **_encryption(gcp)}
    if excluded_fields:
        job["instance_config"] = message("BatchPredictionJob.InstanceConfig", excluded_fields=list(excluded_fields))
    if gcp.serving_account:
        job["service_account"] = gcp.serving_account
    return message("BatchPredictionJob", **job)
