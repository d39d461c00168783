"""ml_deploy's rollout on aws, step by step as its tasks run them, against moto's server over HTTP
(SageMaker Models, EndpointConfigs, the endpoint and its variant weights, Application Auto Scaling,
CloudWatch alarms), a real MLflow registry, and every SageMaker Model played as a real container:
the project's model server loading the version's files from S3 (tests/sagemaker_runtime.py serves
InvokeEndpoint and plays UpdateEndpoint, which moto lacks).

A good version goes through the smoke test and a canary to all the traffic. A model with NaN
weights, one that raises on every prediction, and a container that hangs are each deployed: the
new variant stands beside the served one at weight 0, fails its smoke test, no client request
reaches it, and ml_deploy's rollback leaves the old variant serving with `champion` restored. A
good model whose canary trips a rollback alarm is rolled back the same way.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import boto3
import pytest
import yaml
from aws_iam import ACCOUNT, REGION, Call, Recording, policy, refused
from cloud_copies import copy_tree
from conftest import aws_config_on_moto
from sagemaker_runtime import SageMakerRuntime
from task_runs import rollout as run_rollout
from test_deployment import broken_model_uri

BUCKET = "mlfactory-rollout"
AIRFLOW_KEY = "AKIDAIRFLOWROLLOUT01"  # what the operators sign with: their requests in moto's recording


def rollout(cfg, version: str) -> dict:
    """ml_deploy on aws: resolve, the deploy group's five steps, and `rollback` if one fails. Returns the run's
    outcome: {"failed": step or None, "plan", "result"}."""
    from mlfactory.serving.deployment import DeploymentFailed, endpoint_spec
    from mlfactory.serving.rollout import STEPS
    from mlfactory_airflow.backends import backend_for

    backend = backend_for(cfg)
    done = {}
    try:
        run_rollout(backend.endpoint_adapter, endpoint_spec(cfg, version).model_dump(), done, poll_interval=1)
    except DeploymentFailed:
        return {"failed": STEPS[len(done)], "plan": done.get("stage"), "result": backend.rollback(version)}
    return {"failed": None, "plan": done["stage"], "result": done["full_traffic"]}


@pytest.fixture
def aws(moto_server, champion, tmp_path, monkeypatch):
    """backend aws on moto with the played runtime; the champion's registry, every version's files in S3."""
    from airflow.providers.amazon.aws.hooks.base_aws import AwsGenericHook

    from mlfactory import storage
    from mlfactory.config import load_config
    from mlfactory.registry import CHAMPION, Registry
    from mlfactory.training.data import HOLDOUT_MANIFEST, frozen_holdout, holdout_uri

    served = champion[0]
    runtime = SageMakerRuntime(moto_server, tmp_path / "containers", timeout_s=5, environment={
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_server, "MLFLOW_S3_ENDPOINT_URL": moto_server})
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)  # the storage layer (s3fs) on moto too
    path = tmp_path / "pipeline.yaml"
    raw = aws_config_on_moto(moto_server, BUCKET, path, monkeypatch, runtime_url=runtime.url, access_key=AIRFLOW_KEY,
                             serving={
        "endpoint_name": "churn", "rollback_alarms": ["churn-5xx"], "canary_wait_s": 0, "canary_requests": 40,
        "canary_percent": 30, "smoke_rows": 20})
    raw["mlflow"] = served.mlflow.model_dump()
    path.write_text(yaml.safe_dump(raw))
    original = AwsGenericHook.get_client_type

    def get_client_type(self, *args, **kwargs):  # UpdateEndpoint, which moto lacks, played by the runtime
        client = original(self, *args, **kwargs)
        if hasattr(client, "meta") and client.meta.service_model.service_name == "sagemaker":  # not the async one
            client.update_endpoint = runtime.update_endpoint
        return client

    monkeypatch.setattr(AwsGenericHook, "get_client_type", get_client_type)
    boto3.client("cloudwatch", endpoint_url=moto_server, region_name="us-east-1").put_metric_alarm(
        AlarmName="churn-5xx", MetricName="Invocation5XXErrors", Namespace="AWS/SageMaker", Statistic="Sum",
        Period=60, EvaluationPeriods=1, Threshold=1, ComparisonOperator="GreaterThanOrEqualToThreshold")
    registry = Registry(served)
    registry.client.set_registered_model_alias(served.model_name, CHAMPION, "1")
    cfg = load_config()
    recording = Recording(moto_server)
    frozen = frozen_holdout(served)  # the holdout ml_train froze, copied into this bucket
    copy = storage.join(holdout_uri(cfg), frozen.uri.rsplit("/", 1)[-1])
    storage.write_bytes(copy, storage.read_bytes(frozen.uri))
    storage.write_bytes(storage.join(holdout_uri(cfg), HOLDOUT_MANIFEST),
                        json.dumps({**dataclasses.asdict(frozen), "uri": copy}).encode())
    try:
        yield cfg, registry, runtime, recording
    finally:
        runtime.stop()
        registry.client.set_registered_model_alias(served.model_name, CHAMPION, "1")  # as the fixture left it


def register(cfg, registry, source: str) -> str:
    """A new version of ``source``, its files put where the registry says they are in S3 (as an MLflow server
    keeping its artifacts in the bucket has them)."""
    import mlflow.artifacts

    from mlfactory.serving.deployment import model_ref

    version = registry.register(source, None, {})
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{cfg.model_name}/{version}"))
    copy_tree(local, model_ref(cfg, version).uri)
    return version


def test_bad_models_stand_beside_the_served_one_at_weight_0_and_are_rolled_back(aws, champion):
    from mlfactory.backends.aws.sagemaker import model_name_for
    from mlfactory.serving.deployment import model_ref, read_endpoint_state
    from mlfactory.registry import CHAMPION

    cfg, registry, runtime, recording = aws
    _, _, holdout = champion
    sagemaker = runtime.sagemaker
    good = registry.client.get_model_version(cfg.model_name, "1").source
    first = register(cfg, registry, good)
    registry.client.set_registered_model_alias(cfg.model_name, CHAMPION, first)

    # First deployment: the endpoint on v<first>, smoke-tested, then its canary: all the traffic is its own.
    run = rollout(cfg, first)
    assert run["failed"] is None and run["result"]["served_version"] == first
    assert [v["VariantName"] for v in sagemaker.describe_endpoint(EndpointName="churn")["ProductionVariants"]] == \
        [f"v{first}"]
    smoke = [i for i in runtime.invocations if i["target"]]
    assert smoke and all(i["target"] == f"v{first}" and i["status"] == 200 for i in smoke)
    canary = [i for i in runtime.invocations if not i["target"]]
    assert len(canary) == 40 and all(i["status"] == 200 and i["variant"] == f"v{first}" for i in canary)
    model = sagemaker.describe_model(ModelName=model_name_for(model_ref(cfg, first)))
    assert model["PrimaryContainer"]["Environment"] == {
        "MLFACTORY_MODEL_URI": model_ref(cfg, first).uri, "MLFACTORY_MODEL_VERSION": first,
        "MLFACTORY_PREDICTION_LOG_URI": f"s3://{BUCKET}/predictions/serving",  # what ml_monitor reads
        "MLFACTORY_RUNTIME": "aws"}  # the server reads SageMaker's conventions

    # Deploying the served version again (a retry, a second run) takes the endpoint over: no new config, no update.
    configs = len(sagemaker.list_endpoint_configs()["EndpointConfigs"])
    run = rollout(cfg, first)
    assert run["failed"] is None and run["plan"]["already_served"] and run["result"]["served_version"] == first
    assert len(sagemaker.list_endpoint_configs()["EndpointConfigs"]) == configs and not runtime.updates

    # A good upgrade: beside the served variant at weight 0, smoke-tested alone, a 30 % canary, then alone.
    second = register(cfg, registry, good)
    registry.client.set_registered_model_alias(cfg.model_name, CHAMPION, second)
    runtime.invocations.clear()
    run = rollout(cfg, second)
    assert run["failed"] is None, run
    staged = sagemaker.describe_endpoint_config(EndpointConfigName=run["plan"]["config"])["ProductionVariants"]
    assert [(v["VariantName"], v["InitialVariantWeight"]) for v in staged] == [(f"v{first}", 1.0), (f"v{second}", 0.0)]
    canary = [i for i in runtime.invocations if not i["target"]]
    assert len(canary) == 40 and all(i["status"] == 200 for i in canary)
    answered = {i["variant"] for i in canary}
    assert answered == {f"v{first}", f"v{second}"}  # the canary share reached both
    endpoint = sagemaker.describe_endpoint(EndpointName="churn")
    assert [v["VariantName"] for v in endpoint["ProductionVariants"]] == [f"v{second}"]  # the old instances went
    assert read_endpoint_state(cfg)["served_version"] == second
    scaling = boto3.client("application-autoscaling", endpoint_url=runtime.sagemaker.meta.endpoint_url,
                           region_name="us-east-1")
    targets = [t["ResourceId"] for t in scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]]
    assert targets == [f"endpoint/churn/variant/v{second}"]  # the old variant's target deregistered

    # Three bad versions, each forced onto `champion` and deployed.
    bad = {"nan": register(cfg, registry, broken_model_uri(registry.cfg, holdout, "nan")),
           "raises": register(cfg, registry, broken_model_uri(registry.cfg, holdout, "raises")),
           "hangs": register(cfg, registry, good)}
    runtime.hang(model_name_for(model_ref(cfg, bad["hangs"])))  # its container takes requests, never answers
    for how, version in bad.items():
        registry.client.set_registered_model_alias(cfg.model_name, CHAMPION, version)
        runtime.invocations.clear()
        updates = len(runtime.updates)
        run = rollout(cfg, version)
        assert run["failed"] == "smoke_test", (how, run)
        reason = run["result"]["reason"]
        print(f"ROLLBACK {how} v{version}: {reason[:400]}")
        assert f"smoke test of v{version}" in reason, reason
        if how == "raises":
            assert "ModelError" in reason and "(500)" in reason, reason
        if how == "hangs":
            assert "ModelError" in reason and "no answer within 5s" in reason, reason
        # no client request reached it: only the smoke test's, sent to it by name
        assert [i["target"] for i in runtime.invocations] == [f"v{version}"], runtime.invocations
        # the rollback: the endpoint back on the config that served v<second> alone, `champion` back on it
        assert len(runtime.updates) == updates + 2  # stage's, and the rollback's back to the old config
        assert runtime.updates[-1]["EndpointConfigName"] == run["plan"]["previous_config"]
        endpoint = sagemaker.describe_endpoint(EndpointName="churn")
        assert endpoint["EndpointConfigName"] == run["plan"]["previous_config"]
        assert [v["VariantName"] for v in endpoint["ProductionVariants"]] == [f"v{second}"]
        assert run["result"]["serving"] == second and registry.alias_version(CHAMPION) == second
        tags = registry.client.get_model_version(cfg.model_name, version).tags
        assert tags["mlfactory.deployment"] == "rolled_back" and "smoke test" in tags["mlfactory.deployment_reason"]
        state = read_endpoint_state(cfg)
        assert state["served_version"] == second and state["rollout"] is None

    # A good model whose canary trips a rollback alarm: the canary fails, the weights and the config go back.
    cloudwatch = boto3.client("cloudwatch", endpoint_url=sagemaker.meta.endpoint_url, region_name="us-east-1")
    cloudwatch.set_alarm_state(AlarmName="churn-5xx", StateValue="ALARM", StateReason="5xx over the threshold")
    fourth = register(cfg, registry, good)
    registry.client.set_registered_model_alias(cfg.model_name, CHAMPION, fourth)
    runtime.invocations.clear()
    run = rollout(cfg, fourth)
    assert run["failed"] == "canary" and "alarm churn-5xx fired" in run["result"]["reason"], run
    assert {i["variant"] for i in runtime.invocations if not i["target"]} == {f"v{second}", f"v{fourth}"}
    endpoint = sagemaker.describe_endpoint(EndpointName="churn")
    assert endpoint["EndpointConfigName"] == run["plan"]["previous_config"]
    assert [v["VariantName"] for v in endpoint["ProductionVariants"]] == [f"v{second}"]
    assert registry.alias_version(CHAMPION) == second
    cloudwatch.set_alarm_state(AlarmName="churn-5xx", StateValue="OK", StateReason="quiet again")

    # Clients get v<second>'s answers throughout.
    from mlfactory.serving.deployment import holdout_requests

    reply = sagemaker_runtime(runtime).invoke_endpoint(EndpointName="churn", ContentType="application/json",
                                                       Body=json.dumps({"dataframe_records": holdout_requests(cfg, 3)}))
    assert reply["InvokedProductionVariant"] == f"v{second}"

    # Least privilege: every call the operators sent (moto's recording; UpdateEndpoint and InvokeEndpoint, which
    # the played runtime took) is granted by the pipeline's policy.
    endpoint_arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/churn"
    calls = Recording.calls(recording.stop(), AIRFLOW_KEY) + [
        Call("sagemaker:UpdateEndpoint", (endpoint_arn,), "UpdateEndpoint") for _ in runtime.updates] + [
        Call("sagemaker:InvokeEndpoint", (endpoint_arn,), "InvokeEndpoint")]
    granted = policy("airflow-policy.json", MLFACTORY_BUCKET=BUCKET, MLFACTORY_LANDING_QUEUE="mlfactory-landing",
                     MLFACTORY_TRAINING_ROLE="mlfactory-training", MLFACTORY_SERVING_ROLE="mlfactory-serving",
                     MLFACTORY_MODEL="churn-served", MLFACTORY_ENDPOINT="churn")
    assert refused(granted, calls) == []
    actions = {c.action for c in calls}
    assert {"sagemaker:UpdateEndpointWeightsAndCapacities", "application-autoscaling:DeregisterScalableTarget",
            "cloudwatch:DescribeAlarms", "sagemaker:CreateEndpointConfig"} <= actions, actions


def sagemaker_runtime(runtime: SageMakerRuntime):
    return boto3.client("sagemaker-runtime", endpoint_url=runtime.url, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")
