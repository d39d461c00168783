"""The `aws` backend's translation layer: cloud-neutral specs (``mlfactory.specs``) -> SageMaker and
Application Auto Scaling requests, responses -> ``JobStatus``. Pure functions, no Airflow and no network.

Every request leaves through ``validated``, which checks it against botocore's own service model
(the one boto3 sends with), so a wrong name, type or missing field is an error here, naming the
field, and never reaches the wire. The Airflow operators in ``plugins/mlfactory_airflow`` send what
these functions build through the amazon provider's hooks.

Instance catalog: a job asks for an accelerator (kind, model, count per node) and this table picks
the SageMaker instance type; endpoints and batch transform use the same table for GPUs, and
ml.m5.large / ml.m5.xlarge on CPU. ``aws.training_instance_type``, ``aws.endpoint_instance_type`` and
``aws.transform_instance_type`` in the config override it.

| accelerator | 1 per node | 4 per node | 8 per node |
|---|---|---|---|
| cpu | ml.m5.xlarge | | |
| nvidia-t4 | ml.g4dn.xlarge | ml.g4dn.12xlarge | |
| nvidia-a10g (the default GPU) | ml.g5.xlarge | ml.g5.12xlarge | ml.g5.48xlarge |
| nvidia-l4 | ml.g6.xlarge | ml.g6.12xlarge | ml.g6.48xlarge |
| nvidia-v100 | ml.p3.2xlarge | ml.p3.8xlarge | ml.p3.16xlarge |
| nvidia-a100 | | | ml.p4d.24xlarge |
| nvidia-h100 | | | ml.p5.48xlarge |

Cost guard: before a training job starts, its worst case (on-demand price x instances x max
runtime) is compared with ``aws.budget_usd`` and the job is refused above it. Spot usually costs
less; the guard does not count on it. The prices below are approximate us-east-1 on-demand list
prices for SageMaker training; set ``aws.prices_usd_per_hour`` for your region, your discounts or
an instance type not listed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import urlparse

from mlfactory import BadInput
from mlfactory.backends.aws import AwsSettings
from mlfactory.backends.aws.runtime import CHECKPOINT_DIR  # synced with CheckpointConfig.S3Uri; the entrypoint reads it
from mlfactory.runtime import environment as runtime_environment
from mlfactory.specs import (METRICS_FILE, MODEL_FILE, VALIDATION_FILE, Accelerator, BatchJobSpec, CostEstimate,
                             EndpointSpec, JobStatus, ModelRef, TrainingJobSpec, check_budget)

DEFAULT_GPU = "nvidia-a10g"
CATALOG: dict[tuple[str, str | None, int], str] = {
    ("cpu", None, 0): "ml.m5.xlarge",
    ("gpu", "nvidia-t4", 1): "ml.g4dn.xlarge",
    ("gpu", "nvidia-t4", 4): "ml.g4dn.12xlarge",
    ("gpu", "nvidia-a10g", 1): "ml.g5.xlarge",
    ("gpu", "nvidia-a10g", 4): "ml.g5.12xlarge",
    ("gpu", "nvidia-a10g", 8): "ml.g5.48xlarge",
    ("gpu", "nvidia-l4", 1): "ml.g6.xlarge",
    ("gpu", "nvidia-l4", 4): "ml.g6.12xlarge",
    ("gpu", "nvidia-l4", 8): "ml.g6.48xlarge",
    ("gpu", "nvidia-v100", 1): "ml.p3.2xlarge",
    ("gpu", "nvidia-v100", 4): "ml.p3.8xlarge",
    ("gpu", "nvidia-v100", 8): "ml.p3.16xlarge",
    ("gpu", "nvidia-a100", 8): "ml.p4d.24xlarge",
    ("gpu", "nvidia-h100", 8): "ml.p5.48xlarge",
}
PRICES_USD_PER_HOUR: dict[str, float] = {
    "ml.m5.large": 0.115, "ml.m5.xlarge": 0.23, "ml.m5.2xlarge": 0.461, "ml.m5.4xlarge": 0.922,
    "ml.g4dn.xlarge": 0.736, "ml.g4dn.12xlarge": 4.89,
    "ml.g5.xlarge": 1.408, "ml.g5.12xlarge": 7.09, "ml.g5.48xlarge": 20.36,
    "ml.g6.xlarge": 1.006, "ml.g6.12xlarge": 5.52, "ml.g6.48xlarge": 16.63,
    "ml.p3.2xlarge": 3.825, "ml.p3.8xlarge": 14.688, "ml.p3.16xlarge": 28.152,
    "ml.p4d.24xlarge": 37.688, "ml.p5.48xlarge": 113.07,
}
CPU_INSTANCES = {"endpoint": "ml.m5.large", "transform": "ml.m5.xlarge"}
TRAIN_CHANNEL = "train"  # -> SM_CHANNEL_TRAIN in the container


class AwsRequestError(BadInput):
    """A request that botocore's service model rejects, or a spec this backend cannot run."""


def validated(service: str, operation: str, params: dict) -> dict:
    """``params`` if botocore's model of ``service.operation`` accepts them; else an error naming each problem."""
    from botocore.validate import ParamValidator

    report = ParamValidator().validate(params, _service_model(service).operation_model(operation).input_shape)
    if report.has_errors():
        raise AwsRequestError(f"{service} {operation} request is invalid:\n{report.generate_report()}")
    return params


_MODELS: dict = {}


def _service_model(service: str):
    if service not in _MODELS:
        import botocore.session

        _MODELS[service] = botocore.session.get_session().get_service_model(service)
    return _MODELS[service]


# ---------------------------------------------------------------------------------------------
# Training


def _gpu_model(model: str | None) -> str:
    """nvidia-h100-80gb -> nvidia-h100: memory variants share a row of the catalog."""
    name = (model or DEFAULT_GPU).lower()
    return re.sub(r"-\d+gb$", "", name)


def training_instance(accelerator: Accelerator, aws: AwsSettings) -> str:
    return aws.training_instance_type or _instance(accelerator, CATALOG[("cpu", None, 0)], "aws.training_instance_type")


def endpoint_instance(accelerator: Accelerator, aws: AwsSettings) -> str:
    return aws.endpoint_instance_type or _instance(accelerator, CPU_INSTANCES["endpoint"], "aws.endpoint_instance_type")


def transform_instance(accelerator: Accelerator, aws: AwsSettings) -> str:
    return aws.transform_instance_type or _instance(accelerator, CPU_INSTANCES["transform"], "aws.transform_instance_type")


def _instance(accelerator: Accelerator, cpu: str, setting: str) -> str:
    if accelerator.kind == "tpu":
        raise AwsRequestError("TPUs exist on the gcp backend (Vertex AI) only; ask for a gpu or cpu on aws")
    if accelerator.kind == "cpu":
        return cpu
    model = _gpu_model(accelerator.model)
    key = ("gpu", model, accelerator.count)
    if key not in CATALOG:
        counts = sorted(c for k, m, c in CATALOG if k == "gpu" and m == model)
        known = sorted({m for k, m, _ in CATALOG if k == "gpu"})
        raise AwsRequestError(
            f"no SageMaker instance in the catalog has {accelerator.count} x {model}: "
            + (f"{model} comes {counts} per instance" if counts else f"known GPUs: {known}")
            + f"; or set {setting}")
    return CATALOG[key]


def estimate_training_cost(spec: TrainingJobSpec, aws: AwsSettings) -> CostEstimate:
    instance = training_instance(spec.accelerator, aws)
    prices = {**PRICES_USD_PER_HOUR, **aws.prices_usd_per_hour}
    if instance not in prices:
        raise AwsRequestError(f"no price for {instance}: add it to aws.prices_usd_per_hour so the cost guard can check it")
    return CostEstimate(instance, spec.nodes, spec.max_runtime_s / 3600, prices[instance])


def check_training_budget(spec: TrainingJobSpec, aws: AwsSettings) -> CostEstimate:
    return check_budget(f"training job {spec.name}", estimate_training_cost(spec, aws), aws.budget_usd, "aws.budget_usd")


def s3_uri(uri: str, what: str) -> str:
    if urlparse(uri).scheme != "s3":
        raise AwsRequestError(f"{what} must be an s3:// URI on the aws backend, got {uri!r}")
    return uri


def job_name(name: str) -> str:
    """A SageMaker job name: [a-zA-Z0-9-], no leading/trailing or doubled hyphen, at most 63 characters."""
    cleaned = re.sub(r"-{2,}", "-", re.sub(r"[^a-zA-Z0-9-]", "-", name))[:63].strip("-")
    if not cleaned:
        raise AwsRequestError(f"cannot make a SageMaker job name from {name!r}")
    return cleaned


def _tags(*groups: dict[str, str]) -> list[dict[str, str]]:
    """SageMaker tags (values at most 256 characters of a restricted set)."""
    merged: dict[str, str] = {}
    for group in groups:
        merged.update(group)
    return [{"Key": k[:128], "Value": re.sub(r"[^\w\s.:/=+\-@]", "_", str(v))[:256]} for k, v in sorted(merged.items())]


def _vpc(aws: AwsSettings) -> dict:
    return {"VpcConfig": {"SecurityGroupIds": aws.security_group_ids, "Subnets": aws.subnets}} if aws.subnets else {}


def create_training_job_request(spec: TrainingJobSpec, aws: AwsSettings) -> dict:
    """CreateTrainingJob for ``spec``: the training entrypoint as the container's entrypoint, its data
    through the ``train`` channel (SM_CHANNEL_TRAIN), the model from SM_MODEL_DIR to ``output_uri``,
    torch distributed across ``nodes`` instances (mlfactory.training.cluster reads SM_HOSTS), managed spot with
    checkpoints synced to ``checkpoint_uri`` so a preempted job resumes."""
    instance = training_instance(spec.accelerator, aws)
    stopping = {"MaxRuntimeInSeconds": spec.max_runtime_s}
    spot = aws.spot or spec.spot  # on by default (aws.spot); a spec may ask for it too
    if spot:
        stopping["MaxWaitTimeInSeconds"] = max(aws.max_wait_s or 2 * spec.max_runtime_s, spec.max_runtime_s)
    arguments = spec.hyperparameter_arguments()
    # botocore's model says how long an argument may be; its validator does not check it
    limit = _service_model("sagemaker").shape_for("TrainingContainerArgument").metadata["max"]
    too_long = [a for a in arguments if len(a) > limit]
    if too_long:
        raise AwsRequestError(f"job {spec.name}: SageMaker takes container arguments of at most {limit} characters; "
                              f"{too_long[0]!r} has {len(too_long[0])} (fewer hyperparameters off their defaults, or "
                              "a shorter tag, fit)")
    request = {
        "TrainingJobName": job_name(spec.name),
        "AlgorithmSpecification": {
            "TrainingImage": aws.image_uri,
            "TrainingInputMode": "File",
            "ContainerEntrypoint": list(spec.entrypoint),
            "ContainerArguments": arguments,
        },
        "RoleArn": aws.role_arn,
        "InputDataConfig": [{
            "ChannelName": TRAIN_CHANNEL,
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": s3_uri(spec.input_uri, "the training set"),
                                            "S3DataDistributionType": "FullyReplicated"}},
        }],
        "OutputDataConfig": {"S3OutputPath": s3_uri(spec.output_uri, "the job output"),
                             **({"KmsKeyId": aws.kms_key_id} if aws.kms_key_id else {})},
        "ResourceConfig": {"InstanceType": instance, "InstanceCount": spec.nodes, "VolumeSizeInGB": aws.volume_size_gb,
                           **({"VolumeKmsKeyId": aws.kms_key_id} if aws.kms_key_id else {})},
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": spot,
        "Environment": {**spec.environment, "PYTHONUNBUFFERED": "1", **runtime_environment("aws")},
        "Tags": _tags(aws.tags, spec.tags),
        **_vpc(aws),
    }
    if spec.checkpoint_uri:
        request["CheckpointConfig"] = {"S3Uri": s3_uri(spec.checkpoint_uri, "the checkpoint location"),
                                       "LocalPath": CHECKPOINT_DIR}
    elif spot:
        raise AwsRequestError(f"job {spec.name} uses spot instances but has no checkpoint_uri: a preempted job "
                              "would start over")
    return validated("sagemaker", "CreateTrainingJob", request)


def training_status(described: dict) -> JobStatus:
    """DescribeTrainingJob's answer -> a JobStatus; a failure carries SageMaker's FailureReason."""
    status = described["TrainingJobStatus"]
    state = {"InProgress": "running", "Stopping": "running", "Completed": "succeeded", "Failed": "failed",
             "Stopped": "stopped"}[status]
    detail = described.get("FailureReason") or described.get("SecondaryStatus") or status
    artifact = (described.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
    return JobStatus(state, detail, artifact if state == "succeeded" else None)


def training_result(model_tar_gz: bytes, output_uri: str, job: str, artifact: str) -> tuple[dict, dict[str, bytes]]:
    """A finished job's model.tar.gz (the container's SM_MODEL_DIR) -> (the entrypoint's metrics with
    its paths pointing at ``output_uri`` instead of the container's, the files to put there: the metrics,
    the model and, when the job wrote it, its validation scores)."""
    import io
    import tarfile

    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(model_tar_gz), mode="r:gz") as archive:
        for member in archive.getmembers():
            name = member.name.lstrip("./")
            if member.isfile() and name in (METRICS_FILE, MODEL_FILE, VALIDATION_FILE):
                files[name] = archive.extractfile(member).read()
    missing = sorted({METRICS_FILE, MODEL_FILE} - set(files))
    if missing:
        raise AwsRequestError(f"{artifact} lacks {missing}: did the job run the mlfactory.training.train entrypoint?")
    result = json.loads(files[METRICS_FILE])
    base = output_uri.rstrip("/")
    result.update(output_uri=base, model_bundle_uri=f"{base}/{MODEL_FILE}", sagemaker_job=job, model_artifact=artifact)
    files[METRICS_FILE] = json.dumps(result, indent=2).encode()
    return result, files


# ---------------------------------------------------------------------------------------------
# Real-time endpoints


@dataclass(frozen=True)
class Variant:
    name: str
    model_name: str
    weight: float
    instance_type: str
    instances: int


def create_model_request(name: str, model_uri: str, aws: AwsSettings, environment: dict[str, str] | None = None) -> dict:
    """A SageMaker Model running the project's model server (it speaks the SageMaker container contract)
    on the MLflow model at ``model_uri`` (its artifacts in S3), as the serving role: the endpoint's variants
    and the batch transforms of this model run as it, never as the training role."""
    return validated("sagemaker", "CreateModel", {
        "ModelName": job_name(name),
        "PrimaryContainer": {"Image": aws.image_uri, "Mode": "SingleModel",
                             "Environment": {"MLFACTORY_MODEL_URI": model_uri, **(environment or {}),
                                             **runtime_environment("aws")}},
        "ExecutionRoleArn": aws.serving_role,
        "Tags": _tags(aws.tags),
        **_vpc(aws),
    })


def endpoint_config_request(name: str, variants: list[Variant], aws: AwsSettings) -> dict:
    if not variants or sum(v.weight for v in variants) <= 0:
        raise AwsRequestError(f"endpoint config {name} needs at least one variant with weight > 0")
    return validated("sagemaker", "CreateEndpointConfig", {
        "EndpointConfigName": job_name(name),
        "ProductionVariants": [{"VariantName": v.name, "ModelName": job_name(v.model_name), "InitialInstanceCount": v.instances,
                                "InstanceType": v.instance_type, "InitialVariantWeight": float(v.weight)} for v in variants],
        **({"KmsKeyId": aws.kms_key_id} if aws.kms_key_id else {}),
        "Tags": _tags(aws.tags),
    })


def variant_name(version: str) -> str:
    """The production variant serving registered version ``version`` (a rollout has the old and the new side by side)."""
    return f"v{version}"


def endpoint_variant(spec: EndpointSpec, model_name: str, aws: AwsSettings, weight: float = 1.0) -> Variant:
    """The production variant of ``spec``'s version, on ``min_replicas`` instances, at ``weight``."""
    return Variant(variant_name(spec.model.version), model_name, weight, endpoint_instance(spec.accelerator, aws),
                   spec.min_replicas)


def config_variants(described: dict) -> list[Variant]:
    """DescribeEndpointConfig's answer -> its production variants."""
    return [Variant(v["VariantName"], v["ModelName"], float(v.get("InitialVariantWeight", 1.0)), v["InstanceType"],
                    v.get("InitialInstanceCount", 1)) for v in described["ProductionVariants"]]


def create_endpoint_request(name: str, config_name: str, aws: AwsSettings) -> dict:
    return validated("sagemaker", "CreateEndpoint", {"EndpointName": job_name(name), "EndpointConfigName": job_name(config_name),
                                                     "Tags": _tags(aws.tags)})


def update_endpoint_request(name: str, config_name: str, rollback_alarms: list[str]) -> dict:
    """Blue/green to endpoint config ``config_name``, all at once once the new fleet is healthy; the CloudWatch
    alarms in ``rollback_alarms`` roll it back. mlfactory's configs change which variants exist (the new version
    beside the old at weight 0, then the new one alone): the traffic itself moves with ``weights_request``."""
    deployment = {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0},
            "TerminationWaitInSeconds": 300,
            "MaximumExecutionTimeoutInSeconds": 3600,
        },
    }
    if rollback_alarms:
        deployment["AutoRollbackConfiguration"] = {"Alarms": [{"AlarmName": a} for a in rollback_alarms]}
    return validated("sagemaker", "UpdateEndpoint", {"EndpointName": job_name(name), "EndpointConfigName": job_name(config_name),
                                                     "DeploymentConfig": deployment})


def weights_request(name: str, weights: dict[str, float]) -> dict:
    """UpdateEndpointWeightsAndCapacities: the share of the traffic of each named variant (no fleet change)."""
    return validated("sagemaker", "UpdateEndpointWeightsAndCapacities", {
        "EndpointName": job_name(name),
        "DesiredWeightsAndCapacities": [{"VariantName": v, "DesiredWeight": float(w)} for v, w in weights.items()]})


def invoke_request(name: str, rows: list[dict], variant: str | None = None) -> dict:
    """InvokeEndpoint with ``rows`` as the model server's JSON; ``variant`` sends it to that variant alone."""
    return validated("sagemaker-runtime", "InvokeEndpoint", {
        "EndpointName": job_name(name), "Body": json.dumps({"dataframe_records": rows}).encode(),
        "ContentType": "application/json", "Accept": "application/json", **({"TargetVariant": variant} if variant else {})})


def scalable_target(endpoint: str, variant: str) -> dict:
    """Application Auto Scaling's name for the instance count of one production variant."""
    return {"ServiceNamespace": "sagemaker", "ResourceId": f"endpoint/{endpoint}/variant/{variant}",
            "ScalableDimension": "sagemaker:variant:DesiredInstanceCount"}


def autoscaling_requests(spec: EndpointSpec, variant: str) -> tuple[dict, dict]:
    """RegisterScalableTarget and PutScalingPolicy (target tracking on invocations per instance per minute)."""
    endpoint = endpoint_name(spec)
    where = scalable_target(endpoint, variant)
    target = validated("application-autoscaling", "RegisterScalableTarget", {
        **where, "MinCapacity": spec.min_replicas, "MaxCapacity": spec.max_replicas,
    })
    policy = validated("application-autoscaling", "PutScalingPolicy", {
        "PolicyName": f"{endpoint}-{variant}-invocations"[:256], **where,
        "PolicyType": "TargetTrackingScaling",
        "TargetTrackingScalingPolicyConfiguration": {
            "TargetValue": float(spec.target_requests_per_replica),
            "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
            "ScaleInCooldown": 300, "ScaleOutCooldown": 60,
        },
    })
    return target, policy


def endpoint_state(described: dict, config_name: str | None = None) -> JobStatus:
    """DescribeEndpoint's answer -> a JobStatus. With ``config_name``, an endpoint back in service on
    another config is a failed deployment: SageMaker rolled it back (an alarm fired, or the new fleet
    was unhealthy) and the old model still serves."""
    status = described["EndpointStatus"]
    state = {"Creating": "running", "Updating": "running", "SystemUpdating": "running", "RollingBack": "running",
             "InService": "succeeded", "Failed": "failed", "Deleting": "stopped", "OutOfService": "failed",
             "UpdateRollbackFailed": "failed"}[status]
    serving = described.get("EndpointConfigName")
    if state == "succeeded" and config_name and serving != job_name(config_name):
        reason = described.get("FailureReason") or "a rollback alarm fired or the new fleet failed its health checks"
        return JobStatus("failed", f"rolled back to {serving}: {reason}")
    return JobStatus(state, described.get("FailureReason") or status)


def endpoint_configs(described: dict | None) -> tuple[str | None, str | None]:
    """(the config in service, the config an update is moving to) of a DescribeEndpoint answer (None: no endpoint)."""
    described = described or {}
    return described.get("EndpointConfigName"), (described.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")


def endpoint_name(spec: EndpointSpec) -> str:
    """The SageMaker name of the pipeline's endpoint (``serving.endpoint_name``, else the registered model's)."""
    return job_name(spec.name.replace("_", "-"))


def model_name_for(model: ModelRef) -> str:
    """The SageMaker Model of one registered version (shared by the endpoint and batch transform)."""
    return job_name(f"{model.name.replace('_', '-')[:50]}-v{model.version}")


# ---------------------------------------------------------------------------------------------
# Batch transform


def transform_manifest(prefix: str, files: list[str]) -> bytes:
    """A SageMaker manifest file: the exact objects a transform job reads (the snapshots not scored yet)."""
    base = s3_uri(prefix, "the manifest prefix").rstrip("/") + "/"
    keys = []
    for uri in files:
        if not uri.startswith(base):
            raise AwsRequestError(f"{uri} is not under the manifest prefix {base}")
        keys.append(uri[len(base):])
    return json.dumps([{"prefix": base}, *keys]).encode()


def transform_job_request(name: str, model_name: str, input_uri: str, spec: BatchJobSpec, aws: AwsSettings,
                          manifest: bool = False) -> dict:
    """Batch transform over curated Parquet files: each file is one request (``SplitType`` None) to
    the model server, which reads Parquet bodies; the answers (JSON, in the file's row order) land
    under the spec's output URI as ``<file>.out``. ``input_uri`` is a prefix, or with ``manifest`` a
    manifest file listing the objects (``transform_manifest``)."""
    return validated("sagemaker", "CreateTransformJob", {
        "TransformJobName": job_name(name),
        "ModelName": job_name(model_name),
        "MaxPayloadInMB": 100,
        "BatchStrategy": "SingleRecord",
        "TransformInput": {"DataSource": {"S3DataSource": {"S3DataType": "ManifestFile" if manifest else "S3Prefix",
                                                           "S3Uri": s3_uri(input_uri, "the input")}},
                           "ContentType": "application/vnd.apache.parquet", "SplitType": "None"},
        "TransformOutput": {"S3OutputPath": s3_uri(spec.output_uri, "the predictions location"), "Accept": "application/json",
                            **({"KmsKeyId": aws.kms_key_id} if aws.kms_key_id else {})},
        "TransformResources": {"InstanceType": transform_instance(spec.accelerator, aws), "InstanceCount": spec.instances,
                               **({"VolumeKmsKeyId": aws.kms_key_id} if aws.kms_key_id else {})},
        "Tags": _tags(aws.tags),
    })


def transform_status(described: dict) -> JobStatus:
    status = described["TransformJobStatus"]
    state = {"InProgress": "running", "Stopping": "running", "Completed": "succeeded", "Failed": "failed",
             "Stopped": "stopped"}[status]
    return JobStatus(state, described.get("FailureReason") or status)
