"""The `azure` backend's translation layer: cloud-neutral specs (``mlfactory.specs``) -> ``azure-ai-ml``
entities (and an ``azure-mgmt-monitor`` autoscale setting), Azure ML jobs -> ``JobStatus``. No Airflow
and no network.

Every request is an SDK entity; ``rest(entity)`` serialises it with the SDK's own ``_to_rest_object()``
against its REST models, so a name, size or field Azure ML would refuse is an error here, naming it.

VM catalog: a job asks for an accelerator (kind, model, count per node) and this table picks the VM size;
``azure.training_instance_type`` and ``azure.endpoint_instance_type`` override it.

| accelerator | 1 per node | 2 | 4 | 8 |
|---|---|---|---|---|
| cpu | Standard_DS3_v2 | | | |
| nvidia-t4 (the default GPU) | Standard_NC4as_T4_v3 | | Standard_NC64as_T4_v3 | |
| nvidia-v100 | Standard_NC6s_v3 | Standard_NC12s_v3 | Standard_NC24s_v3 | Standard_ND40rs_v2 |
| nvidia-a100 | Standard_NC24ads_A100_v4 | Standard_NC48ads_A100_v4 | Standard_NC96ads_A100_v4 | Standard_ND96asr_v4 |
| nvidia-a100-80gb | Standard_NC24ads_A100_v4 | Standard_NC48ads_A100_v4 | Standard_NC96ads_A100_v4 | Standard_ND96amsr_A100_v4 |
| nvidia-h100 | Standard_NC40ads_H100_v5 | Standard_NC80adis_H100_v5 | | Standard_ND96isr_H100_v5 |

Distribution: ``PyTorchDistribution(process_count_per_instance=processes_per_node)`` on ``instance_count =
nodes``; Azure ML starts every process with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set, and the entrypoint runs as one of them (``mlfactory.training.cluster``).

Data: the bucket's container is an Azure ML datastore (``azure.datastore``, identity-based); the job's
``train`` input and its ``model`` and ``checkpoints`` outputs are ``uri_folder`` paths on it
(``azureml://datastores/<ds>/paths/...``), mounted into the container, so the entrypoint reads and writes
plain folders and the model lands at the spec's ``output_uri``.

Spot and checkpoints: serverless jobs run at ``queue_settings.job_tier = "Spot"`` by default (or on
``azure.compute``, a cluster whose tier you choose, e.g. low priority). A preempted Spot job is requeued by
Azure ML and the entrypoint resumes from the ``checkpoints`` output, a fixed path per trial, so a job
started by an Airflow retry resumes from it too.

Cost guard: before a job starts, its worst case (list price x nodes x max runtime) is compared with
``azure.budget_usd``. The prices below are approximate East US pay-as-you-go prices; set
``azure.prices_usd_per_hour`` for your region and discounts, or a VM not listed.
"""

from __future__ import annotations

import re
from urllib.parse import urlparse

from mlfactory import BadInput
from mlfactory.backends.azure import AzureSettings, quiet_sdk_logs
from mlfactory.runtime import environment as runtime_environment
from mlfactory.specs import (METRICS_FILE, MODEL_FILE, Accelerator, BatchJobSpec, CostEstimate, EndpointSpec, JobStatus,
                             ModelRef, TrainingJobSpec, check_budget)

quiet_sdk_logs()
DEFAULT_GPU = "nvidia-t4"
CPU_VM = "Standard_DS3_v2"
SERVING_PORT = 8080
# the model server's routes (mlfactory.serving), declared in the deployment's inference config
LIVENESS_ROUTE, READINESS_ROUTE, SCORING_ROUTE = "/live", "/ready", "/score"
JOB_TAG = "mlfactory_job"  # every job carries the spec's name: Studio filters and retries find it
BATCH_DRIVER = "batch_driver.py"  # the batch deployment's scoring script (mlfactory.backends.azure.batch_driver)

CATALOG: dict[tuple[str, int], str] = {
    ("nvidia-t4", 1): "Standard_NC4as_T4_v3", ("nvidia-t4", 4): "Standard_NC64as_T4_v3",
    ("nvidia-v100", 1): "Standard_NC6s_v3", ("nvidia-v100", 2): "Standard_NC12s_v3",
    ("nvidia-v100", 4): "Standard_NC24s_v3", ("nvidia-v100", 8): "Standard_ND40rs_v2",
    ("nvidia-a100", 1): "Standard_NC24ads_A100_v4", ("nvidia-a100", 2): "Standard_NC48ads_A100_v4",
    ("nvidia-a100", 4): "Standard_NC96ads_A100_v4", ("nvidia-a100", 8): "Standard_ND96asr_v4",
    ("nvidia-a100-80gb", 1): "Standard_NC24ads_A100_v4", ("nvidia-a100-80gb", 2): "Standard_NC48ads_A100_v4",
    ("nvidia-a100-80gb", 4): "Standard_NC96ads_A100_v4", ("nvidia-a100-80gb", 8): "Standard_ND96amsr_A100_v4",
    ("nvidia-h100", 1): "Standard_NC40ads_H100_v5", ("nvidia-h100", 2): "Standard_NC80adis_H100_v5",
    ("nvidia-h100", 8): "Standard_ND96isr_H100_v5",
}
ALIASES = {"nvidia-h100-80gb": "nvidia-h100", "nvidia-tesla-t4": "nvidia-t4", "nvidia-tesla-v100": "nvidia-v100",
           "nvidia-tesla-a100": "nvidia-a100"}
# USD/hour, East US, pay-as-you-go Linux (approximate list prices)
PRICES_USD_PER_HOUR: dict[str, float] = {
    "Standard_DS3_v2": 0.293, "Standard_D4s_v3": 0.192, "Standard_F4s_v2": 0.169,
    "Standard_NC4as_T4_v3": 0.526, "Standard_NC64as_T4_v3": 4.352,
    "Standard_NC6s_v3": 3.06, "Standard_NC12s_v3": 6.12, "Standard_NC24s_v3": 12.24, "Standard_ND40rs_v2": 22.03,
    "Standard_NC24ads_A100_v4": 3.673, "Standard_NC48ads_A100_v4": 7.346, "Standard_NC96ads_A100_v4": 14.692,
    "Standard_ND96asr_v4": 27.197, "Standard_ND96amsr_A100_v4": 32.77,
    "Standard_NC40ads_H100_v5": 6.98, "Standard_NC80adis_H100_v5": 13.96, "Standard_ND96isr_H100_v5": 98.32,
}


class AzureRequestError(BadInput):
    """A spec this backend cannot run, or an entity the azure-ai-ml SDK refuses."""


def rest(entity):
    """``entity`` as the REST object the SDK sends (its own validation and serialisation): an entity Azure ML
    would refuse raises AzureRequestError naming the problem."""
    from azure.ai.ml.exceptions import MlException

    try:
        if hasattr(entity, "_validate"):
            entity._validate()
        for method in ("_to_rest_online_endpoint", "_to_rest_batch_endpoint"):  # endpoints take their region
            if hasattr(entity, method):
                return getattr(entity, method)("")
        return entity._to_rest_object(location="") if hasattr(entity, "endpoint_name") else entity._to_rest_object()
    except (MlException, ValueError, TypeError, AttributeError) as err:
        raise AzureRequestError(f"azure-ai-ml refuses {type(entity).__name__} {getattr(entity, 'name', '')}: "
                                f"{getattr(err, 'message', None) or err}") from None


# ---------------------------------------------------------------------------------------------
# VMs and cost


def vm_size(accelerator: Accelerator, override: str = "", setting: str = "") -> str:
    """The catalog's VM size for ``accelerator`` (``override``, the config's ``setting``, replaces it)."""
    if override:
        return override
    if accelerator.kind == "cpu":
        return CPU_VM
    if accelerator.kind == "tpu":
        raise AzureRequestError("Azure has no TPUs: ask for a gpu (or cpu) accelerator on backend azure")
    model = ALIASES.get((accelerator.model or DEFAULT_GPU).lower(), (accelerator.model or DEFAULT_GPU).lower())
    if (model, accelerator.count) not in CATALOG:
        counts = sorted(c for m, c in CATALOG if m == model)
        known = sorted({m for m, _ in CATALOG})
        raise AzureRequestError(f"no Azure VM in the catalog has {accelerator.count} x {model}: "
                                + (f"{model} comes {counts} per VM" if counts else f"known GPUs: {known}")
                                + (f"; or set {setting}" if setting else ""))
    return CATALOG[(model, accelerator.count)]


def estimate_training_cost(spec: TrainingJobSpec, azure: AzureSettings) -> CostEstimate:
    size = vm_size(spec.accelerator, azure.training_instance_type, "azure.training_instance_type")
    prices = {**PRICES_USD_PER_HOUR, **azure.prices_usd_per_hour}
    if size not in prices:
        raise AzureRequestError(f"no price for {size}: add it to azure.prices_usd_per_hour so the cost guard can check it")
    return CostEstimate(size, spec.nodes, spec.max_runtime_s / 3600, prices[size])


def check_training_budget(spec: TrainingJobSpec, azure: AzureSettings) -> CostEstimate:
    return check_budget(f"training job {spec.name}", estimate_training_cost(spec, azure), azure.budget_usd,
                        "azure.budget_usd")


# ---------------------------------------------------------------------------------------------
# Data on the workspace's datastore


def container_of(uri: str) -> str:
    parsed = urlparse(uri)
    if parsed.scheme not in ("abfs", "abfss", "az"):
        raise AzureRequestError(f"{uri!r} is not on Azure Blob Storage (abfs://container/path)")
    return parsed.netloc.split("@")[0]


def datastore_uri(uri: str, azure: AzureSettings) -> str:
    """``abfs://container/path`` -> ``azureml://datastores/<azure.datastore>/paths/path`` (the datastore is the
    bucket's container)."""
    container_of(uri)
    path = urlparse(uri).path.strip("/")
    return f"azureml://datastores/{azure.datastore}/paths/{path}/"


def datastore(azure: AzureSettings, container: str):
    """The identity-based datastore on the bucket's container: jobs and deployments read it as their identity."""
    from azure.ai.ml.entities import AzureBlobDatastore

    endpoint, protocol = "core.windows.net", "https"
    if azure.blob_endpoint:
        parsed = urlparse(azure.blob_endpoint)
        protocol, endpoint = parsed.scheme, parsed.netloc
    return AzureBlobDatastore(name=azure.datastore, account_name=azure.storage_account, container_name=container,
                              protocol=protocol, endpoint=endpoint,
                              description="mlfactory's bucket (identity-based access: no key stored)")


# ---------------------------------------------------------------------------------------------
# Training


def job_name(spec_name: str, attempt: int) -> str:
    """The Azure ML job of one try of a spec: names are unique in a workspace, for ever."""
    return f"{spec_name}-t{attempt}"[:255]


def checkpoint_uri(spec: TrainingJobSpec) -> str:
    from mlfactory import storage

    return spec.checkpoint_uri or storage.join(spec.output_uri, "_checkpoints")


def command_job(spec: TrainingJobSpec, azure: AzureSettings, name: str):
    """The ``command()`` job for ``spec``: the training entrypoint on the project's image, ``nodes`` instances
    with ``processes_per_node`` processes each (PyTorchDistribution), the data as mounted datastore folders."""
    import shlex

    from azure.ai.ml import Input, Output, command
    from azure.ai.ml.constants import AssetTypes, InputOutputModes
    from azure.ai.ml.entities import Environment, JobResourceConfiguration, ManagedIdentityConfiguration, QueueSettings

    if not spec.image and not azure.image_uri:
        raise AzureRequestError(f"job {spec.name}: no container image (azure.image_uri)")
    entrypoint = " ".join(shlex.quote(a) for a in spec.entrypoint)
    arguments = " ".join(shlex.quote(a) for a in spec.hyperparameter_arguments())
    resources = JobResourceConfiguration(instance_count=spec.nodes)
    if not azure.compute:
        resources.instance_type = vm_size(spec.accelerator, azure.training_instance_type, "azure.training_instance_type")
    job = command(
        name=name, display_name=spec.name, experiment_name=azure.experiment,
        command=(f"{entrypoint} --train-uri ${{{{inputs.train}}}} --output-uri ${{{{outputs.model}}}} "
                 f"--checkpoint-uri ${{{{outputs.checkpoints}}}} {arguments}").strip(),
        environment=Environment(image=spec.image or azure.image_uri),
        inputs={"train": Input(type=AssetTypes.URI_FOLDER, path=datastore_uri(spec.input_uri, azure),
                               mode=InputOutputModes.RO_MOUNT)},
        outputs={"model": Output(type=AssetTypes.URI_FOLDER, path=datastore_uri(spec.output_uri, azure),
                                 mode=InputOutputModes.RW_MOUNT),
                 "checkpoints": Output(type=AssetTypes.URI_FOLDER, path=datastore_uri(checkpoint_uri(spec), azure),
                                       mode=InputOutputModes.RW_MOUNT)},
        compute=azure.compute or None,
        distribution={"type": "pytorch", "process_count_per_instance": spec.processes_per_node},
        environment_variables={**spec.environment, **runtime_environment("azure")},
        tags={**azure.tags, **spec.tags, JOB_TAG: spec.name},
        timeout=spec.max_runtime_s,
        identity=ManagedIdentityConfiguration(resource_id=azure.training_identity) if azure.training_identity else None,
    )
    job.resources = resources
    if not azure.compute:
        job.queue_settings = QueueSettings(job_tier="Spot" if spec.spot or azure.job_tier == "Spot" else "Standard")
    rest(job._to_job() if hasattr(job, "_to_job") else job)
    return job


ENDED = {"Completed": "succeeded", "Failed": "failed", "Canceled": "stopped", "NotResponding": "failed",
         "Paused": "stopped"}


def job_status(job) -> JobStatus:
    """An Azure ML job (a Command or a batch invocation's pipeline job) -> JobStatus."""
    status = str(getattr(job.status, "value", job.status) or "NotStarted")
    state = ENDED.get(status, "running")
    detail = status
    if state == "failed":
        error = (getattr(job, "properties", None) or {}).get("azureml.error") or ""
        detail = f"{status}: {error}" if error else status
    return JobStatus(state, detail)


def training_result(metrics: bytes, spec: TrainingJobSpec, job: str) -> dict:
    """The entrypoint's metrics.json from the ``model`` output, its paths pointing at the bucket (the job saw
    the output as a mounted folder)."""
    import json

    from mlfactory import storage

    try:
        result = json.loads(metrics)
    except ValueError as err:
        raise AzureRequestError(f"job {job}: {METRICS_FILE} is not JSON ({err})") from None
    if "metric" not in result:
        raise AzureRequestError(f"job {job}: {METRICS_FILE} has no metric: did the job run the mlfactory.training.train entrypoint?")
    return {**result, "output_uri": spec.output_uri, "model_bundle_uri": storage.join(spec.output_uri, MODEL_FILE),
            "azureml_job": job}


# ---------------------------------------------------------------------------------------------
# The deployable model (the registry of record is MLflow), online and batch endpoints


def resource_name(name: str, max_length: int = 32) -> str:
    """An endpoint or deployment name: 3-32 letters, digits and '-', starting with a letter."""
    cleaned = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", name.lower())).strip("-")
    if not cleaned or not cleaned[0].isalpha():
        cleaned = "m-" + cleaned
    cleaned = cleaned[:max_length].rstrip("-")
    return cleaned if len(cleaned) >= 3 else f"{cleaned}-ep"


def model_asset(model: ModelRef, azure: AzureSettings):
    """The version as an Azure ML model (its files stay where MLflow keeps them; a deployment mounts them at
    ``AZUREML_MODEL_DIR``)."""
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import Model

    return Model(name=re.sub(r"[^A-Za-z0-9_.-]", "-", model.name)[:255], version=model.version,
                 path=datastore_uri(model.uri, azure), type=AssetTypes.CUSTOM_MODEL,
                 description=f"MLflow model {model.registry_uri}",
                 tags={**azure.tags, "mlfactory.registry_uri": model.registry_uri})


def deployment_name(version: str) -> str:
    return resource_name(f"version-{version}")


def online_endpoint(spec: EndpointSpec, azure: AzureSettings):
    """The managed online endpoint: callers authenticate with a Microsoft Entra token (the ``score/action`` data
    action), never a key anyone could list; its deployments run as ``azure.endpoint_identity`` (the serving identity)."""
    from azure.ai.ml.entities import IdentityConfiguration, ManagedIdentityConfiguration, ManagedOnlineEndpoint

    identity = IdentityConfiguration(type="user_assigned", user_assigned_identities=[
        ManagedIdentityConfiguration(resource_id=azure.endpoint_identity)]) if azure.endpoint_identity else None
    endpoint = ManagedOnlineEndpoint(name=resource_name(spec.name), auth_mode="aad_token", identity=identity,
                                     tags=dict(azure.tags), description=f"mlfactory: {spec.model.name}")
    rest(endpoint)
    return endpoint


def online_deployment(spec: EndpointSpec, azure: AzureSettings, model_id: str, environment: dict[str, str]):
    """One version's ``ManagedOnlineDeployment``: the project's model server (its routes in the inference
    config), the model mounted from the datastore, ``min_replicas`` instances to start with."""
    from azure.ai.ml.entities import (Environment, ManagedOnlineDeployment, OnlineRequestSettings, ProbeSettings)

    server = Environment(image=azure.image_uri, inference_config={
        "liveness_route": {"port": SERVING_PORT, "path": LIVENESS_ROUTE},
        "readiness_route": {"port": SERVING_PORT, "path": READINESS_ROUTE},
        "scoring_route": {"port": SERVING_PORT, "path": SCORING_ROUTE}})
    deployment = ManagedOnlineDeployment(
        name=deployment_name(spec.model.version), endpoint_name=resource_name(spec.name), model=model_id,
        environment=server, instance_type=vm_size(spec.accelerator, azure.endpoint_instance_type,
                                                  "azure.endpoint_instance_type"),
        instance_count=spec.min_replicas,
        environment_variables={"MLFACTORY_MODEL_VERSION": spec.model.version, **environment, **runtime_environment("azure")},
        request_settings=OnlineRequestSettings(request_timeout_ms=60_000, max_concurrent_requests_per_instance=8),
        liveness_probe=ProbeSettings(initial_delay=30, period=10, failure_threshold=30),
        readiness_probe=ProbeSettings(initial_delay=10, period=10, failure_threshold=30),
        tags={**azure.tags, "mlfactory.registry_uri": spec.model.registry_uri})
    rest(deployment)
    return deployment


def canary_traffic(serving: dict[str, int], new: str, percent: float) -> dict[str, int]:
    """The endpoint's traffic with ``new`` at ``percent`` (whole, at least 1) and the rest shared as before:
    the values always sum to 100 (Azure ML refuses anything else)."""
    canary = max(1, min(99, round(percent)))
    serving = {k: v for k, v in serving.items() if k != new and v > 0}
    if not serving:
        return {new: 100}
    total, rest_ = sum(serving.values()), 100 - canary
    split = {k: v * rest_ // total for k, v in serving.items()}
    first = max(split, key=lambda k: serving[k])
    split[first] += rest_ - sum(split.values())
    return {**split, new: canary}


def autoscale_setting(spec: EndpointSpec, azure: AzureSettings, deployment_id: str):
    """Azure Monitor autoscale on one deployment: ``min_replicas``..``max_replicas`` instances, one more when
    mean CPU is above ``azure.autoscale_target_cpu`` % for 5 minutes, one fewer below half of it for 10."""
    from azure.mgmt.monitor.models import (AutoscaleProfile, AutoscaleSettingResource,
                                           MetricTrigger, ScaleAction, ScaleCapacity, ScaleRule)

    def rule(operator: str, threshold: float, direction: str, window: str) -> ScaleRule:
        return ScaleRule(
            metric_trigger=MetricTrigger(metric_name="CpuUtilizationPercentage", metric_resource_uri=deployment_id,
                                         time_grain="PT1M", statistic="Average", time_window=window,
                                         time_aggregation="Average", operator=operator, threshold=threshold),
            scale_action=ScaleAction(direction=direction, type="ChangeCount", value="1", cooldown="PT5M"))

    target = azure.autoscale_target_cpu
    profile = AutoscaleProfile(
        name="mlfactory", capacity=ScaleCapacity(minimum=str(spec.min_replicas), maximum=str(spec.max_replicas),
                                                 default=str(spec.min_replicas)),
        rules=[rule("GreaterThan", target, "Increase", "PT5M"), rule("LessThan", target / 2, "Decrease", "PT10M")])
    setting = AutoscaleSettingResource(location=azure.location, profiles=[profile], enabled=True,
                                       target_resource_uri=deployment_id, tags=dict(azure.tags))
    try:
        setting.serialize()  # msrest checks required fields and constraints here
    except Exception as err:  # noqa: BLE001 - msrest's SerializationError or ValidationError
        raise AzureRequestError(f"azure-mgmt-monitor refuses the autoscale setting: {err}") from None
    return setting


def autoscale_name(deployment_id: str) -> str:
    endpoint, deployment = deployment_id.rstrip("/").split("/")[-3], deployment_id.rstrip("/").split("/")[-1]
    return f"{endpoint}-{deployment}-autoscale"


def batch_endpoint(spec: BatchJobSpec, azure: AzureSettings):
    from azure.ai.ml.entities import BatchEndpoint

    endpoint = BatchEndpoint(name=resource_name(f"{spec.model.name}-batch"), tags=dict(azure.tags),
                             description=f"mlfactory batch scoring of {spec.model.name}")
    rest(endpoint)
    return endpoint


def batch_deployment(spec: BatchJobSpec, azure: AzureSettings, endpoint: str, model_id: str, code_id: str):
    """One version's ``ModelBatchDeployment``: ``batch_scoring.instances`` nodes of ``azure.batch_compute``, one
    manifest file (one snapshot) per mini-batch, scored by the project's batch driver on its image."""
    from azure.ai.ml.constants import BatchDeploymentOutputAction
    from azure.ai.ml.entities import (BatchRetrySettings, CodeConfiguration, Environment, ModelBatchDeployment,
                                      ModelBatchDeploymentSettings)

    deployment = ModelBatchDeployment(
        name=deployment_name(spec.model.version), endpoint_name=endpoint, model=model_id,
        environment=Environment(image=azure.image_uri),
        code_configuration=CodeConfiguration(code=code_id, scoring_script=BATCH_DRIVER),
        compute=azure.batch_compute,
        settings=ModelBatchDeploymentSettings(
            mini_batch_size=1, instance_count=spec.instances, max_concurrency_per_instance=1,
            output_action=BatchDeploymentOutputAction.SUMMARY_ONLY,
            retry_settings=BatchRetrySettings(max_retries=2, timeout=min(spec.max_runtime_s, 86400)),
            environment_variables={"MLFACTORY_MODEL_VERSION": spec.model.version, **runtime_environment("azure")}),
        tags={**azure.tags, "mlfactory.registry_uri": spec.model.registry_uri})
    rest(deployment)
    return deployment
