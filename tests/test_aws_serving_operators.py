"""The aws deploy and batch operators against moto's server over HTTP (SageMaker Model, EndpointConfig,
Endpoint, Application Auto Scaling, transform jobs) and a real MLflow registry. UpdateEndpoint,
which moto does not implement, goes through a client whose botocore Stubber checks the request
against the service model and against the exact blue/green request expected."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import AWS_ROLE, aws_config_on_moto

BUCKET = "mlfactory-serving"


@pytest.fixture
def aws_cfg(moto_server, champion, tmp_path, monkeypatch):
    """backend aws on moto, with the `champion` fixture's MLflow registry (model versions 1 and 2)."""
    import boto3

    from mlfactory.config import load_config
    from mlfactory.registry import CHAMPION, Registry

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)  # the storage layer (s3fs) on moto too
    served = champion[0]
    path = tmp_path / "pipeline.yaml"
    raw = aws_config_on_moto(moto_server, BUCKET, path, monkeypatch, serving={
        "endpoint_name": "churn", "rollback_alarms": ["churn-5xx"], "canary_wait_s": 120, "max_replicas": 3})
    raw["mlflow"] = served.mlflow.model_dump()
    path.write_text(yaml.safe_dump(raw))
    registry = Registry(served)
    registry.client.set_registered_model_alias(served.model_name, CHAMPION, "1")
    if registry.alias_version("second") is None:
        first = registry.client.get_model_version(served.model_name, "1")
        second = registry.register(first.source, first.run_id, {})
        registry.client.set_registered_model_alias(served.model_name, "second", second)
    cfg = load_config()
    return SimpleNamespace(cfg=cfg, registry=registry, second=registry.alias_version("second"),
                           sagemaker=boto3.client("sagemaker", endpoint_url=moto_server, region_name="us-east-1"),
                           scaling=boto3.client("application-autoscaling", endpoint_url=moto_server, region_name="us-east-1"))


def run_trigger(trigger) -> dict:
    async def wait():
        return [event async for event in trigger.run()]

    (event,) = asyncio.run(wait())
    return event.payload


def deploy(spec: dict):
    """ml_deploy's deploy group on aws: `stage`, then `full_traffic` up to its deferral:
    (the full_traffic operator, the TaskDeferred, what stage returned)."""
    from airflow.exceptions import TaskDeferred

    from mlfactory_airflow.backends.aws.sagemaker import SageMakerEndpointOperator, SageMakerEndpointStageOperator

    context = {"ti": SimpleNamespace(try_number=1)}
    staged = SageMakerEndpointStageOperator(task_id="stage", spec=spec).execute(context)
    operator = SageMakerEndpointOperator(task_id="full_traffic", spec=spec, staged=staged, waiter_delay=1)
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context)
    return operator, deferred.value, staged


MODEL = "churn-served-v1"  # the SageMaker Model of version 1 of registered model churn_served


def test_a_first_deploy_creates_model_config_endpoint_and_autoscaling(aws_cfg):
    from mlfactory.deployment import endpoint_spec, read_endpoint_state

    spec = endpoint_spec(aws_cfg.cfg, "1")
    # the registry's proxied artifact path, under the bucket's MLflow prefix (what a SageMaker Model loads)
    assert spec.model.uri.startswith(f"s3://{BUCKET}/mlflow/") and spec.model.uri.endswith("/artifacts")
    operator, deferred, staged = deploy(spec.model_dump())
    assert deferred.trigger.job_type == "endpoint" and staged["endpoint"] == "churn" and staged["model"] == MODEL
    model = aws_cfg.sagemaker.describe_model(ModelName=MODEL)
    assert model["PrimaryContainer"]["Environment"] == {
        "MLFACTORY_MODEL_URI": spec.model.uri, "MLFACTORY_MODEL_VERSION": "1",
        "MLFACTORY_PREDICTION_LOG_URI": f"s3://{BUCKET}/predictions/serving"}  # what ml_monitor reads
    assert model["ExecutionRoleArn"] == AWS_ROLE
    config = aws_cfg.sagemaker.describe_endpoint_config(EndpointConfigName=staged["config"])
    (variant,) = config["ProductionVariants"]
    assert (variant["VariantName"], variant["ModelName"], variant["InstanceType"]) == ("primary", MODEL, "ml.m5.large")
    assert aws_cfg.sagemaker.describe_endpoint(EndpointName="churn")["EndpointConfigName"] == staged["config"]

    payload = run_trigger(deferred.trigger)  # the provider's endpoint_in_service waiter, over HTTP
    assert payload["status"] == "success"
    state = operator.execute_complete({"ts": "2026-11-22T06:00:00+00:00"}, payload, **deferred.kwargs)
    assert state["served_version"] == "1" and state["endpoint"] == "churn" and read_endpoint_state(aws_cfg.cfg) == state
    (scalable,) = aws_cfg.scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (scalable["ResourceId"], scalable["MinCapacity"], scalable["MaxCapacity"]) == ("endpoint/churn/variant/primary", 1, 3)
    (policy,) = aws_cfg.scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    assert policy["TargetTrackingScalingPolicyConfiguration"]["TargetValue"] == 1000.0
    tags = aws_cfg.registry.client.get_model_version(aws_cfg.cfg.model_name, "1").tags
    assert tags["mlfactory.deployment"] == "serving" and tags["mlfactory.endpoint"] == "churn"

    # a retry (or a second run for the same version) takes the endpoint over: no new config, no update
    _, again, restaged = deploy(spec.model_dump())
    assert restaged["config"] == staged["config"] and again.kwargs["previous_config"] is None
    assert len(aws_cfg.sagemaker.list_endpoint_configs()["EndpointConfigs"]) == 1


def test_an_update_is_blue_green_and_a_rollback_fails_the_task_and_restores_the_champion(aws_cfg):
    import boto3
    from airflow.exceptions import AirflowException
    from botocore.stub import ANY, Stubber

    from mlfactory.backends.aws import sagemaker as aws
    from mlfactory.deployment import endpoint_spec, read_endpoint_state, restore_after_failure
    from mlfactory.registry import CHAMPION

    first, deferred, staged = deploy(endpoint_spec(aws_cfg.cfg, "1").model_dump())
    first.execute_complete({"ts": None}, run_trigger(deferred.trigger), **deferred.kwargs)

    # v2 becomes champion; its deploy updates the endpoint blue/green (moto has no UpdateEndpoint:
    # that one call goes through a Stubber that validates it against botocore's service model)
    second = aws_cfg.second
    aws_cfg.registry.client.set_registered_model_alias(aws_cfg.cfg.model_name, CHAMPION, second)
    stubbed = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    spec = endpoint_spec(aws_cfg.cfg, second)
    expected = aws.update_endpoint_request("churn", "placeholder", spec)
    from airflow.exceptions import TaskDeferred

    from mlfactory_airflow.backends.aws.sagemaker import SageMakerEndpointOperator, SageMakerEndpointStageOperator

    restaged = SageMakerEndpointStageOperator(task_id="stage", spec=spec.model_dump()).execute({})
    assert restaged["config"] != staged["config"] and restaged["model"] == f"churn-served-v{second}"
    operator = SageMakerEndpointOperator(task_id="full_traffic", spec=spec.model_dump(), staged=restaged, waiter_delay=1)
    operator.hook.conn.update_endpoint = stubbed.update_endpoint
    with Stubber(stubbed) as stub:
        stub.add_response("update_endpoint", {"EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/churn"},
                          {**expected, "EndpointConfigName": ANY})
        with pytest.raises(TaskDeferred) as update:
            operator.execute({"ti": SimpleNamespace(try_number=1)})
        stub.assert_no_pending_responses()
    routing = expected["DeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]
    assert routing == {"Type": "CANARY", "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": aws_cfg.cfg.serving.canary_percent},
                       "WaitIntervalInSeconds": 120}
    assert expected["DeploymentConfig"]["AutoRollbackConfiguration"] == {"Alarms": [{"AlarmName": "churn-5xx"}]}
    assert update.value.kwargs["previous_config"] == staged["config"]
    assert aws_cfg.sagemaker.describe_model(ModelName=f"churn-served-v{second}")  # the new version's Model exists

    # The endpoint is back in service on the OLD config (what SageMaker shows after an alarm rolled
    # the canary back): the task fails saying so; ml_deploy's rollback puts `champion` back on v1.
    with pytest.raises(AirflowException, match=f"churn did not take v{second} .*rolled back to {staged['config']}"):
        operator.execute_complete({"ts": None}, {"status": "success"}, **update.value.kwargs)
    state = read_endpoint_state(aws_cfg.cfg)
    assert state["served_version"] == "1" and "rolled back" in state["last_failure"]["reason"]
    assert state["last_failure"]["step"] == "full_traffic"
    restored = restore_after_failure(aws_cfg.cfg, second)
    assert restored["serving"] == "1" and aws_cfg.registry.alias_version(CHAMPION) == "1"
    assert aws_cfg.registry.client.get_model_version(aws_cfg.cfg.model_name, second).tags["mlfactory.deployment"] == "rolled_back"


def write_curated(cfg, snapshot: str, rows: pa.Table) -> str:
    from mlfactory import storage

    uri = storage.join(cfg.storage.curated_uri, "ingest_date=2026-11-22", f"snapshot={snapshot}", "part-0.parquet")
    with storage.atomic_write(uri) as f:
        pq.write_table(rows, f)
    return uri


def test_batch_transform_scores_the_unscored_snapshots_through_a_manifest(aws_cfg, champion):
    from airflow.exceptions import TaskDeferred

    from mlfactory import NothingToDo, storage
    from mlfactory.batch_scoring import plan
    from mlfactory_airflow.backends.aws.sagemaker import SageMakerTransformOperator

    rows = pa.Table.from_pandas(champion[2].head(50), preserve_index=False)
    files = [write_curated(aws_cfg.cfg, sid, rows) for sid in ("aaaa", "bbbb")]
    run_id = "scheduled__2026-11-22T04:00:00+00:00"
    context = {"run_id": run_id, "ti": SimpleNamespace(try_number=1)}
    spec = plan(aws_cfg.cfg, run_id, "1")  # ml_batch_score's `plan`: the snapshots not scored yet
    assert spec.snapshots == ["aaaa", "bbbb"] and spec.output_uri.endswith("/predictions/batch/run=scheduled__2026-11-22T04-00-00-00-00")
    operator = SageMakerTransformOperator(task_id="score", spec=spec.model_dump(), waiter_delay=1)
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context)
    kwargs = deferred.value.kwargs
    job = aws_cfg.sagemaker.describe_transform_job(TransformJobName=kwargs["job"])
    source = job["TransformInput"]["DataSource"]["S3DataSource"]
    assert source["S3DataType"] == "ManifestFile" and job["TransformInput"]["ContentType"] == "application/vnd.apache.parquet"
    assert job["TransformOutput"]["S3OutputPath"] == spec.output_uri and job["ModelName"] == MODEL
    manifest = json.loads(storage.read_bytes(source["S3Uri"]))
    assert [manifest[0]["prefix"] + key for key in manifest[1:]] == files

    result = operator.execute_complete(context, run_trigger(deferred.value.trigger), **kwargs)
    assert result["version"] == "1" and result["snapshots"] == ["aaaa", "bbbb"] and result["uri"] == spec.output_uri
    with pytest.raises(NothingToDo, match="scored already"):  # the next run has nothing new
        plan(aws_cfg.cfg, "scheduled__2026-11-23T04:00:00+00:00", "1")
