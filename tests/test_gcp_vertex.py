"""The gcp backend's Vertex AI operators, against a local Vertex fake (tests/vertex_fake.py) spoken to over the
aiplatform_v1 clients' REST transport (every body parsed into Vertex's own protos) and fake-gcs-server
for the bucket. The containers are played here (tests/vertex_containers.py): the training entrypoint
with Vertex's training environment, preempted once; the model server with Vertex's serving environment,
sent Vertex's predict body by the fake's endpoint."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
from cloud_copies import another_version, copy_tree, endpoint_spec, training_job_spec
from task_runs import context, resume, rollout, rollout_step, run_to_end
from conftest import gcp_config
from vertex_containers import ModelContainers, TrainingContainers
from vertex_fake import VertexFake

pytestmark = pytest.mark.gcp
ADAPTER = "mlfactory_airflow.backends.gcp.hooks:VertexEndpointAdapter"


@pytest.fixture
def gcp_training(gcp_emulators, training_set, tmp_path, monkeypatch):
    """Backend gcp on fake-gcs-server and a Vertex fake whose custom jobs run the real entrypoint."""
    player = TrainingContainers(tmp_path / "vertex", preempt_once=True)
    fake = VertexFake(run_job=player).start()
    raw = gcp_config("mlf-vertex-train", tmp_path / "pipeline.yaml", monkeypatch, api_endpoint=fake.url,
                     poll_interval_s=1, budget_usd=20)
    copy_tree(Path(training_set.uri.removeprefix("file://")), f"{raw['storage']['bucket']}/models/training_sets/ts1")
    yield SimpleNamespace(fake=fake, player=player, bucket=raw["storage"]["bucket"])
    fake.stop()


def test_a_custom_job_trains_with_vertex_environment_and_resumes_after_preemption(gcp_training):
    from airflow.exceptions import TaskDeferred

    from mlfactory_airflow.backends.gcp.triggers import VertexJobTrigger
    from mlfactory_airflow.backends.gcp.operators import VertexTrainingOperator

    fake, bucket = gcp_training.fake, gcp_training.bucket
    operator = VertexTrainingOperator(task_id="train", spec=training_job_spec(bucket))
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context(1))
    (name,) = fake.custom_jobs
    assert deferred.value.kwargs == {"job": name} and deferred.value.method_name == "execute_complete"
    classpath, fields = deferred.value.trigger.serialize()
    assert classpath == "mlfactory_airflow.backends.gcp.triggers.VertexJobTrigger"
    assert VertexJobTrigger(**fields).name == name  # what the triggerer rebuilds

    job = fake.custom_jobs[name]
    assert job.job_spec.scheduling.strategy.name == "SPOT" and job.job_spec.scheduling.restart_job_on_worker_restart
    assert job.job_spec.base_output_directory.output_uri_prefix == f"{bucket}/models/runs/run-1/trial-0"
    assert job.job_spec.worker_pool_specs[0].machine_spec.machine_type == "n1-standard-4"
    assert job.labels["mlfactory_job"] == "run-1-t0"

    result = resume(operator, deferred.value)
    assert result["metric"] == "val_roc_auc" and 0.5 < result["value"] <= 1
    assert result["model_bundle_uri"] == f"{bucket}/models/runs/run-1/trial-0/model/model.pt"
    assert result["vertex_job"] == name
    (run,) = gcp_training.player.runs
    assert run["preempted"], "the first container was not killed mid-run"
    assert "resuming from checkpoint" in run["log"] and f"{bucket}/models/runs/run-1/trial-0/checkpoints" in run["log"]
    assert run["env"]["AIP_TRAINING_DATA_URI"] == f"{bucket}/models/training_sets/ts1"

    # a retry of a task whose job succeeded takes that job over: no second job
    with pytest.raises(TaskDeferred) as again:
        VertexTrainingOperator(task_id="train", spec=training_job_spec(bucket)).execute(context(2))
    assert again.value.kwargs == {"job": name} and len(fake.custom_jobs) == 1
    assert not fake.refused


def test_a_failed_job_fails_the_task_with_vertex_error_and_a_retry_starts_another(gcp_training):
    from airflow.exceptions import TaskDeferred
    from airflow.sdk.exceptions import AirflowException

    from mlfactory_airflow.backends.gcp.operators import VertexTrainingOperator

    fake, bucket = gcp_training.fake, gcp_training.bucket
    fake.fail_next_job("The replica workerpool0-0 exited with a non-zero status of 137 (out of memory)")
    operator = VertexTrainingOperator(task_id="train", spec=training_job_spec(bucket, hyperparameters={"epochs": 1}))
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context(1))
    with pytest.raises(AirflowException, match=r"customJobs/\d+ failed: The replica workerpool0-0 exited .* \(out of memory\)"):
        resume(operator, deferred.value)
    result = run_to_end(VertexTrainingOperator(task_id="train", spec=training_job_spec(bucket, hyperparameters={"epochs": 1})),
                        try_number=2)
    assert len(fake.custom_jobs) == 2 and result["vertex_job"] != deferred.value.kwargs["job"]


def test_killing_the_deferred_task_cancels_the_job_and_over_budget_jobs_never_start(gcp_training, monkeypatch):
    import threading

    from airflow.exceptions import TaskDeferred
    from airflow.sdk.exceptions import AirflowFailException

    from mlfactory_airflow.backends.gcp.operators import VertexTrainingOperator

    fake, bucket = gcp_training.fake, gcp_training.bucket
    release = threading.Event()
    fake.run_job = lambda job: release.wait(60)  # a job that runs until told otherwise
    with pytest.raises(TaskDeferred) as deferred:
        VertexTrainingOperator(task_id="train", spec=training_job_spec(bucket)).execute(context(1))
    asyncio.run(deferred.value.trigger.on_kill())
    release.set()
    (name,) = fake.custom_jobs
    assert fake.calls(r"POST .*customJobs/\d+:cancel")
    for _ in range(50):
        if fake.custom_jobs[name].state.name == "JOB_STATE_CANCELLED":
            break
        asyncio.run(asyncio.sleep(0.1))
    assert fake.custom_jobs[name].state.name == "JOB_STATE_CANCELLED"

    before = len(fake.requests)
    eight_h100 = {"kind": "gpu", "model": "nvidia-h100", "count": 8}
    with pytest.raises(AirflowFailException, match=r"up to \$\d+.*a3-highgpu-8g.*above gcp.budget_usd \$20.00"):
        VertexTrainingOperator(task_id="train", spec=training_job_spec(bucket, name="big", accelerator=eight_h100)).execute(
            context(1))
    assert len(fake.requests) == before  # refused before any call to Vertex


@pytest.fixture
def gcp_serving(gcp_emulators, champion, mlflow_server, tmp_path, monkeypatch):
    """Backend gcp with the champion's model files and frozen holdout in GCS, the registered model of the
    `champion` fixture in MLflow, and a Vertex fake whose deployed models run the project's model server."""
    import yaml

    import mlflow
    import mlflow.artifacts

    from mlfactory import storage

    cfg_local = champion[0]
    containers = ModelContainers(tmp_path / "containers")
    fake = VertexFake(serve=containers).start()
    path = tmp_path / "pipeline.yaml"
    raw = gcp_config("mlf-vertex-serve", path, monkeypatch, api_endpoint=fake.url, poll_interval_s=1,
                     serving={"endpoint_name": "churn-endpoint", "canary_wait_s": 0, "canary_requests": 20,
                              "canary_percent": 50, "min_replicas": 1, "max_replicas": 3})
    raw["mlflow"].update(tracking_uri=mlflow_server.url, experiment="serving-test", model_name="churn_served")
    path.write_text(yaml.safe_dump(raw))
    bucket = raw["storage"]["bucket"]
    copy_tree(Path(storage.local_path(cfg_local.storage.models_uri)), f"{bucket}/models")
    mlflow.set_tracking_uri(mlflow_server.url)  # models:/ resolves through the global registry URI (an earlier test's)
    local_model = Path(mlflow.artifacts.download_artifacts("models:/churn_served/1", dst_path=str(tmp_path / "v1")))
    copy_tree(local_model, f"{bucket}/mlflow-models/v1")
    yield SimpleNamespace(fake=fake, containers=containers, bucket=bucket)
    containers.stop()
    fake.stop()


def model_version(bucket: str, version: str) -> dict:
    """The endpoint spec of ``version``, whose files are the champion's, copied to GCS."""
    return endpoint_spec(f"{bucket}/mlflow-models/v1", version)


def test_the_endpoint_rollout_uploads_deploys_with_a_canary_split_and_undeploys_the_old_model(gcp_serving):
    from mlflow import MlflowClient

    from mlfactory.config import load_config
    from mlfactory.serving.deployment import read_endpoint_state

    fake, bucket = gcp_serving.fake, gcp_serving.bucket
    cfg = load_config()
    client = MlflowClient(cfg.mlflow.tracking_uri)
    v2 = another_version(client)

    # first rollout: the model uploaded, the endpoint created, v1 deployed alone
    run = rollout(ADAPTER, model_version(bucket, "1"))
    plan, canary, state = run["stage"], run["canary"], run["full_traffic"]
    endpoint_name = "projects/mlfactory-test/locations/us-central1/endpoints/churn-endpoint"
    assert plan["serving"] == {} and plan["endpoint"] == endpoint_name
    model = fake.models["projects/mlfactory-test/locations/us-central1/models/churn-served-v1"]
    assert model.artifact_uri == f"{bucket}/mlflow-models/v1" and model.container_spec.predict_route == "/predict"
    assert canary["errors"] == 0 and canary["requests"] == 20 and canary["percent"] == 100
    first = state["deployed_model_id"]
    assert canary["answered_by"] == {first: 20}
    assert dict(fake.endpoints[endpoint_name].traffic_split) == {first: 100}
    resources = fake.endpoints[endpoint_name].deployed_models[0].dedicated_resources
    assert (resources.min_replica_count, resources.max_replica_count) == (1, 3)
    assert resources.autoscaling_metric_specs[0].metric_name == "aiplatform.googleapis.com/prediction/online/cpu/utilization"
    assert state["served_version"] == "1" and state["deployed_model_id"] == first

    # second rollout: v2 beside v1 at the canary share, checked through the endpoint, then alone
    run = rollout(ADAPTER, model_version(bucket, v2))
    plan, canary, state = run["stage"], run["canary"], run["full_traffic"]
    assert plan["serving"] == {first: 100} and plan["old"] == first
    staging = "projects/mlfactory-test/locations/us-central1/endpoints/churn-endpoint-staging"
    assert plan["staging"] == staging
    # the smoke test reached v2 alone, on the staging endpoint, whose copy is gone once v2 is on the endpoint
    assert len(fake.calls(r"churn-endpoint-staging:predict")) == 1
    assert fake.endpoints[staging].deployed_models == [] and fake.endpoints[staging].traffic_split == {}
    assert len(fake.calls(r":deployModel")) == 3  # v1; v2 on the staging endpoint; v2 beside v1
    second = state["deployed_model_id"]
    assert set(canary["answered_by"]) == {first, second}, canary  # the 50 % split reached both deployed models
    assert dict(fake.endpoints[endpoint_name].traffic_split) == {second: 100}
    assert [d.id for d in fake.endpoints[endpoint_name].deployed_models] == [second]
    assert read_endpoint_state(cfg)["served_version"] == v2
    assert client.get_model_version("churn_served", v2).tags["mlfactory.deployment"] == "serving"
    assert not fake.refused

    # a retry of the whole rollout changes nothing
    rollout(ADAPTER, model_version(bucket, v2))
    assert len(fake.calls(r":deployModel")) == 3
    assert fake.ungranted() == {}  # least privilege: every call made is granted by Airflow's role

def test_a_failing_canary_puts_the_traffic_back_and_undeploys_the_new_model(gcp_serving):
    from mlflow import MlflowClient

    from mlfactory.config import load_config
    from mlfactory.serving.deployment import DeploymentFailed
    from mlfactory_airflow.backends.gcp import GcpBackend

    fake, bucket = gcp_serving.fake, gcp_serving.bucket
    cfg = load_config()
    client = MlflowClient(cfg.mlflow.tracking_uri)
    state = rollout(ADAPTER, model_version(bucket, "1"))["full_traffic"]
    served = state["deployed_model_id"]
    v_bad = another_version(client)
    spec = model_version(bucket, v_bad)
    plan = rollout_step(ADAPTER, "stage", spec)
    assert rollout_step(ADAPTER, "smoke_test", spec, plan)["rows"] >= 1  # the staging copy answers
    # the new version's container dies once deployed on the endpoint (its machine, its model): its share fails
    real_serve = fake.serve

    def serve_then_die(model):
        url = real_serve(model)
        if model["name"].endswith(f"-v{v_bad}"):
            process, _ = gcp_serving.containers.processes.pop(model["name"])
            process.kill()
            process.wait()
        return url

    fake.serve = serve_then_die
    with pytest.raises(DeploymentFailed, match=r"canary of v\d+ on .*churn-endpoint: \d+ of 20 requests failed"):
        rollout_step(ADAPTER, "canary", spec, plan)
    endpoint_name = plan["endpoint"]
    assert len(fake.endpoints[endpoint_name].deployed_models) == 2
    restored = GcpBackend(cfg).rollback(v_bad)  # ml_deploy's `rollback`
    for _ in range(50):  # the undeploy is an operation: started, not waited for
        if len(fake.endpoints[endpoint_name].deployed_models) == 1:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert dict(fake.endpoints[endpoint_name].traffic_split) == {served: 100}
    assert [d.id for d in fake.endpoints[endpoint_name].deployed_models] == [served]
    assert restored["serving"] == "1" and "requests failed" in restored["reason"]
    assert fake.ungranted() == {}  # least privilege: every call made is granted by Airflow's role

def test_batch_prediction_scores_the_unscored_snapshots_with_the_model_server(gcp_serving, monkeypatch):
    import json

    from mlfactory import storage

    from mlfactory.data import sample_data
    from mlfactory.serving.batch import plan, unscored
    from mlfactory.config import load_config
    from mlfactory.serving.deployment import sane_prediction
    from mlfactory.specs import ModelRef
    from mlfactory_airflow.backends.gcp.operators import VertexBatchPredictionOperator

    fake, bucket = gcp_serving.fake, gcp_serving.bucket
    cfg = load_config()
    sample_data.land_and_curate(cfg, 500, seed=5)
    spec = plan(cfg, "manual__2026-12-01").model_copy(
        update={"model": ModelRef(name="churn_served", version="1", uri=f"{bucket}/mlflow-models/v1")})
    result = run_to_end(VertexBatchPredictionOperator(task_id="score", spec=spec.model_dump()))
    (job,) = fake.batch_jobs.values()
    assert job.input_config.instances_format == "jsonl" and job.output_config.predictions_format == "jsonl"
    assert "_source" in job.instance_config.excluded_fields
    assert result["rows"] == 500 and result["snapshots"] == spec.snapshots
    (output,) = [o for o in storage.list_objects(result["output"]) if "prediction.results" in o.key]
    lines = [json.loads(line) for line in storage.read_bytes(output.uri).decode().splitlines()]
    assert len(lines) == 500 and {line["instance"]["_source"] for line in lines} == set(spec.snapshots)
    assert all(sane_prediction(line["prediction"]) for line in lines), lines[0]
    assert unscored(cfg, "next") == {}  # the job's snapshots are scored
