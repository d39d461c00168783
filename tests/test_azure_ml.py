"""The azure backend's Azure ML operators, through azure-ai-ml's real MLClient (and azure-mgmt-monitor's client)
over HTTPS to a local fake of the management API (tests/azureml_fake.py: every body checked against the SDK's
REST models), with Azurite as the workspace's datastore. The containers are played here
(tests/azure_containers.py): the training entrypoint as a 2-process PyTorch job, preempted once; the model
server with Azure ML's online environment, sent the documented ``{"input_data": ...}`` body; the batch driver
with Azure ML's batch environment."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from azure_containers import BatchContainers, ModelContainers, TrainingContainers
from azure_rbac import assert_role_covers
from cloud_copies import another_version, copy_tree, endpoint_spec, training_job_spec
from task_runs import context, resume, rollout, rollout_step, run_to_end
from conftest import azure_config

pytestmark = pytest.mark.azure
ADAPTER = "mlfactory_airflow.backends.azure.hooks:AzureMLEndpointAdapter"


def blob_endpoint(connection_string: str) -> str:
    return re.search(r"BlobEndpoint=([^;]+)", connection_string)[1]


@pytest.fixture
def azure_training(azurite, azureml_fake, training_set, tmp_path, monkeypatch):
    """Backend azure on Azurite and the Azure ML fake, whose command jobs run the real entrypoint."""
    player = TrainingContainers(azureml_fake, tmp_path / "jobs", preempt_once=True)
    azureml_fake.run_job = player
    raw = azure_config("mlf-azure-train", tmp_path / "pipeline.yaml", monkeypatch, azureml_fake.url,
                       blob_endpoint(azurite), budget_usd=20)
    copy_tree(Path(training_set.uri.removeprefix("file://")), f"{raw['storage']['bucket']}/models/training_sets/ts1")
    return SimpleNamespace(fake=azureml_fake, player=player, bucket=raw["storage"]["bucket"])


def job_spec(bucket: str, **changes) -> dict:
    """A 2-process job on spot capacity."""
    return training_job_spec(bucket, **{"processes_per_node": 2, "spot": True, **changes})


def test_a_command_job_trains_on_two_processes_and_resumes_after_preemption(azure_training):
    from airflow.exceptions import TaskDeferred

    from mlfactory_airflow.backends.azure.operators import AzureMLTrainingOperator
    from mlfactory_airflow.backends.azure.triggers import AzureMLJobTrigger

    fake, bucket = azure_training.fake, azure_training.bucket
    operator = AzureMLTrainingOperator(task_id="train", spec=job_spec(bucket))
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context(1))
    assert deferred.value.kwargs == {"job": "run-1-t0-t1"} and deferred.value.method_name == "execute_complete"
    classpath, fields = deferred.value.trigger.serialize()
    assert classpath == "mlfactory_airflow.backends.azure.triggers.AzureMLJobTrigger"
    assert AzureMLJobTrigger(**fields).name == "run-1-t0-t1"  # what the triggerer rebuilds
    (job,) = fake.find(r"/jobs/run-1-t0-t1$").values()
    props = job["properties"]
    assert props["distribution"] == {"distributionType": "PyTorch", "processCountPerInstance": 2}
    assert props["queueSettings"] == {"jobTier": "Spot"} and props["resources"]["instanceType"] == "Standard_DS3_v2"
    assert props["tags"]["mlfactory_job"] == "run-1-t0"
    assert fake.find(r"/datastores/mlfactory$")  # the bucket's container registered once, identity-based

    result = resume(operator, deferred.value, context(1))
    assert result["metric"] == "val_roc_auc" and 0.5 < result["value"] <= 1
    assert result["model_bundle_uri"] == f"{bucket}/models/runs/run-1/trial-0/model.pt"
    assert result["azureml_job"] == "run-1-t0-t1"
    (run,) = azure_training.player.runs
    assert run["processes"] == 2 and run["preempted"], "the job was not preempted mid-run"
    assert "resuming from checkpoint" in run["log"]
    assert "2 process(es), backend gloo" in run["log"]  # one world of the two processes Azure ML started

    # a retry of a task whose job succeeded takes that job over: no second job
    with pytest.raises(TaskDeferred) as again:
        AzureMLTrainingOperator(task_id="train", spec=job_spec(bucket)).execute(context(2))
    assert again.value.kwargs == {"job": "run-1-t0-t1"} and not fake.find(r"/jobs/run-1-t0-t2$")
    assert not fake.refused


def test_a_failed_job_fails_the_task_a_retry_starts_another_and_kill_cancels(azure_training):
    from airflow.exceptions import AirflowFailException, TaskDeferred
    from airflow.sdk.exceptions import AirflowException

    from mlfactory_airflow.backends.azure.operators import AzureMLTrainingOperator

    fake, bucket = azure_training.fake, azure_training.bucket
    azure_training.player.preempt_once = False
    fake.fail_next_job("Out of memory on node 0")
    with pytest.raises(AirflowException, match=r"Azure ML job run-1-t0-t1 failed: Failed: Out of memory"):
        run_to_end(AzureMLTrainingOperator(task_id="train", spec=job_spec(bucket)))
    # the retry starts run-1-t0-t2 on the same outputs (and checkpoints)
    fake.run_job = lambda job: asyncio.run(asyncio.sleep(30))  # a long job, to be killed
    operator = AzureMLTrainingOperator(task_id="train", spec=job_spec(bucket))
    with pytest.raises(TaskDeferred):
        operator.execute(context(2))
    (second,) = fake.find(r"/jobs/run-1-t0-t2$").values()
    assert second["properties"]["outputs"]["checkpoints"]["uri"].endswith("/run-1/trial-0/_checkpoints/")
    operator.on_kill()
    assert fake.calls(r"POST .*/jobs/run-1-t0-t2/cancel") and second["properties"]["status"] == "Canceled"
    assert "Microsoft.MachineLearningServices/workspaces/jobs/cancel/action" in assert_role_covers(fake.requests)

    before = len(fake.requests)
    eight_h100 = {"kind": "gpu", "model": "nvidia-h100", "count": 8}
    with pytest.raises(AirflowFailException, match=r"Standard_ND96isr_H100_v5.*above azure.budget_usd \$20.00"):
        AzureMLTrainingOperator(task_id="train", spec=job_spec(bucket, name="big", accelerator=eight_h100)).execute(
            context(1))
    assert len(fake.requests) == before  # refused before any call to Azure


@pytest.fixture
def azure_serving(azurite, azureml_fake, champion, mlflow_server, tmp_path, monkeypatch):
    """Backend azure with the champion's model files and frozen holdout on Azurite, the registered model of the
    `champion` fixture in MLflow, and the fake's deployments running the project's model server."""
    import mlflow
    import mlflow.artifacts
    import yaml

    from mlfactory import storage

    containers = ModelContainers(azureml_fake, tmp_path / "containers")
    azureml_fake.serve = azureml_fake_serve = containers
    azureml_fake.run_batch = BatchContainers(azureml_fake, tmp_path / "batch")
    path = tmp_path / "pipeline.yaml"
    raw = azure_config("mlf-azure-serve", path, monkeypatch, azureml_fake.url, blob_endpoint(azurite),
                       serving={"endpoint_name": "churn-endpoint", "canary_wait_s": 0, "canary_requests": 20,
                                "canary_percent": 50, "min_replicas": 1, "max_replicas": 3})
    raw["mlflow"].update(tracking_uri=mlflow_server.url, experiment="serving-test", model_name="churn_served")
    path.write_text(yaml.safe_dump(raw))
    bucket = raw["storage"]["bucket"]
    copy_tree(Path(storage.local_path(champion[0].storage.models_uri)), f"{bucket}/models")
    mlflow.set_tracking_uri(mlflow_server.url)
    local_model = Path(mlflow.artifacts.download_artifacts("models:/churn_served/1", dst_path=str(tmp_path / "v1")))
    copy_tree(local_model, f"{bucket}/mlflow-models/v1/model")
    yield SimpleNamespace(fake=azureml_fake, containers=azureml_fake_serve, bucket=bucket)
    containers.stop()


def model_version(bucket: str, version: str) -> dict:
    """The endpoint spec of ``version``, whose files are the champion's, copied to the bucket."""
    return endpoint_spec(f"{bucket}/mlflow-models/v1/model", version)


def test_the_online_rollout_deploys_blue_green_with_canary_traffic_autoscale_and_deletes_the_old(azure_serving):
    from mlflow import MlflowClient

    from mlfactory.config import load_config
    from mlfactory.serving.deployment import read_endpoint_state

    fake = azure_serving.fake
    cfg = load_config()
    client = MlflowClient(cfg.mlflow.tracking_uri)
    v2 = another_version(client)

    run = rollout(ADAPTER, model_version(azure_serving.bucket, "1"))
    plan, canary, state = run["stage"], run["canary"], run["full_traffic"]
    assert plan["endpoint"] == "churn-endpoint" and plan["serving"] == {} and plan["deployment"] == "version-1"
    assert canary["errors"] == 0 and canary["requests"] == 20 and canary["percent"] == 100
    assert canary["answered_by"] == {"version-1": 20}  # a first deployment: all the traffic, the same canary
    assert fake.answered == {"version-1": 21}  # the smoke test, then the canary: the scoring URI with an Entra token, /score
    (endpoint,) = fake.find(r"/onlineEndpoints/churn-endpoint$").values()
    assert endpoint["properties"]["traffic"] == {"version-1": 100}
    (autoscale,) = fake.find(r"autoscalesettings/churn-endpoint-version-1-autoscale$").values()
    capacity = autoscale["properties"]["profiles"][0]["capacity"]
    assert (capacity["minimum"], capacity["maximum"]) == ("1", "3")
    assert autoscale["properties"]["targetResourceUri"].endswith("/onlineEndpoints/churn-endpoint/deployments/version-1")
    assert state["served_version"] == "1" and state["deployment"] == "version-1"

    run = rollout(ADAPTER, model_version(azure_serving.bucket, v2))
    plan, canary, state = run["stage"], run["canary"], run["full_traffic"]
    new = f"version-{v2}"
    assert plan["serving"] == {"version-1": 100} and canary["percent"] == 50
    assert canary["errors"] == 0 and canary["requests"] == 20 and sum(canary["answered_by"].values()) == 20
    assert set(canary["answered_by"]) == {"version-1", new}  # the 50 % split reached both deployments
    assert fake.answered[new] == 1 + canary["answered_by"][new]  # its smoke test (by name), then its canary share
    (endpoint,) = fake.find(r"/onlineEndpoints/churn-endpoint$").values()
    assert endpoint["properties"]["traffic"] == {new: 100}
    assert [d["name"] for d in fake.find(r"/onlineEndpoints/churn-endpoint/deployments/[^/]+$").values()] == [new]
    assert read_endpoint_state(cfg)["served_version"] == v2
    assert client.get_model_version("churn_served", v2).tags["mlfactory.deployment"] == "serving"
    assert not fake.refused

    puts = len(fake.calls(r"PUT .*/deployments/"))
    rollout(ADAPTER, model_version(azure_serving.bucket, v2))  # a retry of the whole rollout changes nothing
    assert len(fake.calls(r"PUT .*/deployments/")) == puts


def test_a_failing_canary_puts_the_traffic_back_and_deletes_the_new_deployment(azure_serving):
    import time

    from mlflow import MlflowClient

    from mlfactory.config import load_config
    from mlfactory.serving.deployment import DeploymentFailed
    from mlfactory_airflow.backends.azure import AzureBackend

    fake = azure_serving.fake
    cfg = load_config()
    rollout(ADAPTER, model_version(azure_serving.bucket, "1"))
    v_bad = another_version(MlflowClient(cfg.mlflow.tracking_uri))
    spec = model_version(azure_serving.bucket, v_bad) | {"rollback_alarms": ["churn-5xx", "churn-latency"]}
    plan = rollout_step(ADAPTER, "stage", spec)
    rollout_step(ADAPTER, "health_check", spec, plan)
    rollout_step(ADAPTER, "smoke_test", spec, plan)
    # serving.rollback_alarms: Azure Monitor metric alert rules, read through the SDK's own client
    with pytest.raises(DeploymentFailed, match="no metric alert rule of that name"):
        rollout_step(ADAPTER, "canary", spec, plan)  # a rule that does not exist is named, not taken as quiet
    fake.alerts.update({"churn-5xx": "Unhealthy", "churn-latency": "Healthy"})
    with pytest.raises(DeploymentFailed, match=r"canary of v\d+ on churn-endpoint: alarm churn-5xx fired"):
        rollout_step(ADAPTER, "canary", spec, plan)
    fake.alerts["churn-5xx"] = "Healthy"
    # the new version's container dies once it passed its smoke test: its share of the canary's requests fail
    process, _ = azure_serving.containers.processes.pop(f"version-{v_bad}")
    process.kill()
    process.wait()
    with pytest.raises(DeploymentFailed, match=r"canary of v\d+ on churn-endpoint: \d+ of 20 requests failed"):
        rollout_step(ADAPTER, "canary", spec, plan)
    (endpoint,) = fake.find(r"/onlineEndpoints/churn-endpoint$").values()
    assert endpoint["properties"]["traffic"] == {"version-1": 50, f"version-{v_bad}": 50}
    restored = AzureBackend(cfg).rollback(v_bad)  # ml_deploy's `rollback`
    (endpoint,) = fake.find(r"/onlineEndpoints/churn-endpoint$").values()
    assert endpoint["properties"]["traffic"] == {"version-1": 100}
    for _ in range(50):  # the delete is an operation: started, not waited for
        if len(fake.find(r"/onlineEndpoints/churn-endpoint/deployments/[^/]+$")) == 1:
            break
        time.sleep(0.1)
    assert [d["name"] for d in fake.find(r"/onlineEndpoints/churn-endpoint/deployments/[^/]+$").values()] == ["version-1"]
    assert restored["serving"] == "1" and "requests failed" in restored["reason"]
    assert "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/deployments/delete" in assert_role_covers(
        fake.requests)


def test_the_batch_endpoint_scores_the_unscored_snapshots_with_the_batch_driver(azure_serving):
    import pyarrow.parquet as pq

    from mlfactory import storage

    from mlfactory.data import sample_data
    from mlfactory.serving.batch import plan, unscored
    from mlfactory.config import load_config
    from mlfactory.specs import ModelRef
    from mlfactory_airflow.backends.azure.operators import AzureMLBatchOperator

    fake, bucket = azure_serving.fake, azure_serving.bucket
    cfg = load_config()
    sample_data.land_and_curate(cfg, 500, seed=5)
    spec = plan(cfg, "manual__2026-12-01").model_copy(
        update={"model": ModelRef(name="churn_served", version="1", uri=f"{bucket}/mlflow-models/v1/model")})
    result = run_to_end(AzureMLBatchOperator(task_id="score", spec=spec.model_dump()))
    (deployment,) = fake.find(r"/batchEndpoints/churn-served-batch/deployments/version-1$").values()
    assert deployment["properties"]["codeConfiguration"]["scoringScript"] == "batch_driver.py"
    assert result["snapshots"] == spec.snapshots and result["job"].startswith("batchjob-")
    parts = [o for o in storage.list_objects(result["uri"]) if o.key.endswith(".parquet")]
    assert parts
    rows = 0
    for part in parts:
        with storage.open_uri(part.uri) as f:
            rows += pq.read_metadata(f).num_rows
    assert rows == 500 and {p.key.split("/")[0] for p in parts} == {f"source={s}" for s in spec.snapshots}
    assert unscored(cfg, "next") == {}  # the job's snapshots are scored
    assert not fake.refused
