"""The gcp backend's translation of the cloud-neutral specs into Vertex AI requests: machines (GPU and TPU),
spot and flex-start scheduling, the cost guard, the canary traffic split, autoscaling and the config's
checks. Every request is an aiplatform_v1 message; its JSON is parsed back by the same protos, refusing
unknown fields, as the Vertex fake does with what the SDK sends."""

from __future__ import annotations

import pytest
from vertex_fake import parse

from mlfactory.backends.gcp import GcpSettings
from mlfactory.backends.gcp import vertex as v
from mlfactory.specs import Accelerator, EndpointSpec, ModelRef, TrainingJobSpec

pytestmark = pytest.mark.gcp


def settings(**changes) -> GcpSettings:
    return GcpSettings(**{"project": "mlf-prod-1", "image_uri": "us-docker.pkg.dev/mlf-prod-1/r/mlfactory:3", **changes})


def training(**changes) -> TrainingJobSpec:
    return TrainingJobSpec(**{"name": "run-7-t0", "input_uri": "gs://b/models/training_sets/ts", "output_uri": "gs://b/runs/r7",
                              "hyperparameters": {"epochs": 5, "hidden_sizes": [64, 32]}, "max_runtime_s": 7200,
                              "environment": {"MLFLOW_TRACKING_URI": "https://mlflow"}, **changes})


def roundtrip(message):
    """``message`` as JSON, parsed back by its proto with unknown fields refused."""
    return parse(type(message).to_json(message).encode(), type(message))


def test_a_multi_node_gpu_job_is_a_chief_pool_and_a_worker_pool_on_spot_with_checkpoints():
    gcp = settings(service_account="trainer@mlf-prod-1.iam.gserviceaccount.com", network="projects/12/global/networks/ml",
                   kms_key_name="projects/mlf-prod-1/locations/us-central1/keyRings/ml/cryptoKeys/jobs", labels={"team": "Risk"})
    job = roundtrip(v.custom_job(training(nodes=3, accelerator=Accelerator(kind="gpu", model="nvidia-l4", count=4)), gcp))
    chief, workers = job.job_spec.worker_pool_specs
    assert (chief.replica_count, workers.replica_count) == (1, 2)
    assert chief.machine_spec.machine_type == "g2-standard-48" and chief.machine_spec.accelerator_count == 4
    assert chief.machine_spec.accelerator_type.name == "NVIDIA_L4"
    assert chief.container_spec.command == ["python", "-m", "mlfactory.training.train"]
    assert chief.container_spec.args[:2] == ["--hyperparameters", '{"epochs":5,"hidden_sizes":[64,32]}']
    assert "--output-uri" not in chief.container_spec.args  # AIP_MODEL_DIR gives it
    env = {e.name: e.value for e in chief.container_spec.env}
    assert env["AIP_TRAINING_DATA_URI"] == "gs://b/models/training_sets/ts" and "PJRT_DEVICE" not in env
    assert env["MLFACTORY_RUNTIME"] == "gcp"  # the container reads Vertex's conventions (mlfactory.runtime)
    scheduling = job.job_spec.scheduling
    assert scheduling.strategy.name == "SPOT" and scheduling.restart_job_on_worker_restart
    assert scheduling.timeout.total_seconds() == 7200 and not scheduling.max_wait_duration
    assert job.job_spec.base_output_directory.output_uri_prefix == "gs://b/runs/r7"  # AIP_CHECKPOINT_DIR beneath
    assert job.job_spec.service_account == "trainer@mlf-prod-1.iam.gserviceaccount.com"
    assert job.job_spec.network == "projects/12/global/networks/ml"
    assert job.encryption_spec.kms_key_name.endswith("/cryptoKeys/jobs")
    assert dict(job.labels) == {"team": "risk", "mlfactory_job": "run-7-t0"}


def test_a_tpu_job_takes_a_v5e_slice_with_its_topology_and_the_xla_path():
    job = roundtrip(v.custom_job(training(accelerator=Accelerator(kind="tpu", count=4)), settings()))
    (pool,) = job.job_spec.worker_pool_specs
    assert (pool.machine_spec.machine_type, pool.machine_spec.tpu_topology) == ("ct5lp-hightpu-4t", "2x2")
    assert {e.name: e.value for e in pool.container_spec.env}["PJRT_DEVICE"] == "TPU"
    eight = v.custom_job(training(accelerator=Accelerator(kind="tpu", model="tpu-v5-lite", count=8)), settings())
    assert eight.job_spec.worker_pool_specs[0].machine_spec.tpu_topology == "2x4"
    with pytest.raises(v.VertexRequestError, match="TPU job runs on one TPU slice"):
        v.custom_job(training(nodes=2, accelerator=Accelerator(kind="tpu", count=4)), settings())
    with pytest.raises(v.VertexRequestError, match=r"no Vertex AI machine in the catalog has 2 x tpu-v5e: tpu-v5e comes \[1, 4, 8\]"):
        v.custom_job(training(accelerator=Accelerator(kind="tpu", count=2)), settings())


def test_machines_come_from_the_catalog_unless_overridden():
    h100 = Accelerator(kind="gpu", model="nvidia-h100-80gb", count=8)
    assert v.training_machine(training(accelerator=h100), settings()).machine_type == "a3-highgpu-8g"
    t4 = v.training_machine(training(accelerator=Accelerator(kind="gpu", model="nvidia-tesla-t4", count=2)), settings())
    assert (t4.machine_type, t4.accelerator_type, t4.accelerator_count) == ("n1-standard-16", "NVIDIA_TESLA_T4", 2)
    with pytest.raises(v.VertexRequestError, match=r"known GPUs: \[.*'nvidia-l4'.*\]; or set gcp.training_machine_type"):
        v.training_machine(training(accelerator=Accelerator(kind="gpu", model="radeon", count=1)), settings())
    overridden = v.training_machine(training(accelerator=Accelerator(kind="gpu", count=1)),
                                    settings(training_machine_type="g2-standard-16"))
    assert (overridden.machine_type, overridden.accelerator_type) == ("g2-standard-16", "NVIDIA_L4")
    with pytest.raises(v.VertexRequestError, match="MachineSpec refuses"):
        v.message("MachineSpec", machine_type="n1-standard-4", accelerator_type="NVIDIA_TESLA_Z9")


def test_flex_start_waits_for_capacity_and_spot_is_the_default():
    job = roundtrip(v.custom_job(training(), settings(spot=False, flex_start=True, max_wait_s=1800)))
    assert job.job_spec.scheduling.strategy.name == "FLEX_START"
    assert job.job_spec.scheduling.max_wait_duration.total_seconds() == 1800
    assert v.custom_job(training(), settings(spot=False)).job_spec.scheduling.strategy.name == "STANDARD"
    with pytest.raises(ValueError, match="spot and flex_start are two scheduling strategies"):
        settings(flex_start=True)


def test_the_cost_guard_prices_machines_and_attached_gpus():
    from mlfactory.specs import BudgetExceeded

    t4 = training(nodes=2, accelerator=Accelerator(kind="gpu", model="nvidia-t4", count=4))  # 2 h max runtime
    estimate = v.estimate_training_cost(t4, settings())
    assert estimate.instance_type == "n1-standard-32+4xNVIDIA_TESLA_T4"
    assert estimate.usd == pytest.approx(2 * 2 * (1.751 + 4 * 0.403))
    with pytest.raises(BudgetExceeded, match=r"\$13\.45 .* above gcp.budget_usd \$10\.00"):
        v.check_training_budget(t4, settings(budget_usd=10))
    cheaper = settings(prices_usd_per_hour={"n1-standard-32": 1.0, "NVIDIA_TESLA_T4": 0.1})
    assert v.estimate_training_cost(t4, cheaper).usd == pytest.approx(2 * 2 * 1.4)
    with pytest.raises(v.VertexRequestError, match=r"no price for \['c3-standard-8'\]: add it to gcp.prices_usd_per_hour"):
        v.estimate_training_cost(training(), settings(training_machine_type="c3-standard-8"))


def endpoint(**changes) -> EndpointSpec:
    return EndpointSpec(**{"name": "Churn_Endpoint", "model": ModelRef(name="customer_churn", version="12",
                                                                      uri="gs://b/mlflow/1/models/m-1/artifacts"),
                           "min_replicas": 2, "max_replicas": 6, "canary_percent": 10, **changes})


def test_the_model_upload_points_at_the_mlflow_files_with_the_project_model_server():
    request = roundtrip(v.upload_model_request(endpoint().model, settings(), {"MLFACTORY_PREDICTION_LOG_URI": "gs://b/p"}))
    assert request.parent == "projects/mlf-prod-1/locations/us-central1" and request.model_id == "customer-churn-v12"
    model = request.model
    assert model.artifact_uri == "gs://b/mlflow/1/models/m-1/artifacts"  # Vertex hands it over as AIP_STORAGE_URI
    assert model.container_spec.command == ["python", "-m", "mlfactory.serving"]
    assert (model.container_spec.predict_route, model.container_spec.health_route) == ("/predict", "/health")
    assert model.container_spec.ports[0].container_port == 8080
    assert {e.name: e.value for e in model.container_spec.env}["MLFACTORY_MODEL_VERSION"] == "12"
    with pytest.raises(v.VertexRequestError, match="must be a gs:// URI"):
        v.upload_model_request(ModelRef(name="m", version="1", uri="s3://x/y"), settings())


def test_a_deployment_takes_the_canary_share_with_autoscaling():
    gpu = endpoint(accelerator=Accelerator(kind="gpu", model="nvidia-t4", count=1))
    request = roundtrip(v.deploy_model_request(gpu, settings(autoscaling_target_utilization=70),
                                               "projects/p/locations/l/models/m", {"4411": 100}))
    assert request.endpoint == "projects/mlf-prod-1/locations/us-central1/endpoints/churn-endpoint"
    assert dict(request.traffic_split) == {"0": 10, "4411": 90}
    resources = request.deployed_model.dedicated_resources
    assert (resources.min_replica_count, resources.max_replica_count) == (2, 6)
    assert resources.machine_spec.accelerator_type.name == "NVIDIA_TESLA_T4"
    (metric,) = resources.autoscaling_metric_specs
    assert (metric.metric_name, metric.target) == ("aiplatform.googleapis.com/prediction/online/gpu/duty_cycle", 70)
    first = v.deploy_model_request(endpoint(), settings(), "projects/p/locations/l/models/m", {})
    assert dict(first.traffic_split) == {"0": 100}
    with pytest.raises(v.VertexRequestError, match="serving on TPUs"):
        v.deploy_model_request(endpoint(accelerator=Accelerator(kind="tpu", count=1)), settings(), "m", {})


def test_endpoints_and_batch_predictions_run_as_the_serving_account_and_training_as_its_own():
    from mlfactory.specs import BatchJobSpec

    trainer, server = "trainer@mlf-prod-1.iam.gserviceaccount.com", "server@mlf-prod-1.iam.gserviceaccount.com"
    gcp = settings(service_account=trainer, serving_service_account=server)
    batch = BatchJobSpec(name="score-1", model=endpoint().model, inputs={"s": "gs://b/curated/s"},
                         output_uri="gs://b/predictions/batch/run=score-1")
    serving = [v.upload_model_request(endpoint().model, gcp).service_account,
               v.deploy_model_request(endpoint(), gcp, "projects/p/locations/l/models/m", {}).deployed_model.service_account,
               roundtrip(v.batch_prediction_job("score-1", "m", ["gs://b/predictions/batch/_instances/a.jsonl"], batch,
                                                gcp)).service_account]
    assert serving == [server] * 3 and v.custom_job(training(), gcp).job_spec.service_account == trainer
    # a config without a serving account (written before the two were split) runs everything as service_account
    assert v.deploy_model_request(endpoint(), settings(service_account=trainer), "m", {}).deployed_model.service_account == trainer


@pytest.mark.parametrize("serving,percent,expected", [
    ({"a": 100}, 10, {"0": 10, "a": 90}),
    ({"a": 70, "b": 30}, 10, {"0": 10, "a": 63, "b": 27}),
    ({"a": 50, "b": 50}, 33.3, {"0": 33, "a": 34, "b": 33}),
    ({"a": 100, "b": 0}, 0.2, {"0": 1, "a": 99}),
    ({}, 10, {"0": 100}),
])
def test_the_canary_split_always_sums_to_100(serving, percent, expected):
    split = v.canary_split(serving, percent)
    assert split == expected and sum(split.values()) == 100


def test_the_traffic_update_touches_the_split_alone():
    from google.cloud import aiplatform_v1

    current = aiplatform_v1.Endpoint(name="projects/p/locations/l/endpoints/e", traffic_split={"1": 10, "2": 90})
    request = v.update_endpoint_request(current, {"1": 100})
    assert list(request.update_mask.paths) == ["traffic_split"] and dict(request.endpoint.traffic_split) == {"1": 100}
    with pytest.raises(v.VertexRequestError, match="must sum to 100"):
        v.update_endpoint_request(current, {"1": 60})


def test_names_and_labels_fit_vertex_rules():
    assert v.resource_id("Customer_Churn v2!") == "customer-churn-v2"
    assert v.resource_id("9lives") == "m-9lives" and len(v.resource_id("x" * 200)) == 63
    assert v.labels({"Team Name": "Risk/Ops", "1x": "y"}) == {"l_1x": "y", "team_name": "risk_ops"}
    assert v.job_filter("run-7-t0") == 'labels.mlfactory_job="run-7-t0"'


@pytest.mark.parametrize("change,message", [
    ({"project": "X"}, "gcp.project: String should match pattern"),
    ({"service_account": "not an email"}, "is not a service account email"),
    ({"serving_service_account": "nope"}, "serving_service_account 'nope' is not a service account email"),
    ({"kms_key_name": "my-key"}, "is not projects/P/locations/L/keyRings/R/cryptoKeys/K"),
    ({"labels": {"Bad Key": "v"}}, "labels .*'Bad Key'"),
    ({"region": "Iowa"}, "gcp.region: String should match pattern"),
])
def test_a_wrong_gcp_section_names_the_field(tmp_path, change, message):
    import yaml

    from mlfactory.config import DEFAULT_CONFIG, ConfigError, load_config

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw.update(backend="gcp", gcp={"project": "mlf-prod-1", "image_uri": "img", **change})
    raw["storage"]["bucket"] = "gs://b"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_the_backend_calls_exactly_the_methods_its_permissions_list():
    """Every Vertex, Pub/Sub and GCS client method called in the gcp backend's Airflow package is listed for Airflow in
    deploy/gcp/permissions.yaml, and every such method listed there is called: a permission for a call the code
    no longer makes is an unused grant (test_deploy_manifests checks the bindings grant those and nothing else)."""
    import ast
    import re
    from pathlib import Path

    from airflow.providers.google.cloud.hooks.pubsub import PubSubAsyncHook
    from google.cloud import aiplatform_v1, storage
    from iam_scope import manifest

    root = Path(__file__).resolve().parents[1]
    clients = {"JobService": aiplatform_v1.JobServiceClient, "EndpointService": aiplatform_v1.EndpointServiceClient,
               "ModelService": aiplatform_v1.ModelServiceClient, "PredictionService": aiplatform_v1.PredictionServiceClient}
    api = {name: f"{service}.{''.join(w.title() for w in name.split('_'))}" for service, cls in clients.items()
           for name in dir(cls) if not name.startswith("_") and callable(getattr(cls, name))
           and name not in ("from_service_account_file", "from_service_account_info", "from_service_account_json")
           and not name.endswith("_path") and "path" not in name}
    api.update(get_operation="Operations.GetOperation", pull="Subscriber.Pull", acknowledge="Subscriber.Acknowledge",
               list_blobs="Storage.ListObjects")
    assert hasattr(PubSubAsyncHook, "pull") and hasattr(storage.Client, "list_blobs")
    called = set()
    for path in (root / "plugins" / "mlfactory_airflow" / "backends" / "gcp").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in api:  # a call, or a method passed on to be called
                called.add(api[node.attr])
    assert {"JobService.CreateCustomJob", "EndpointService.DeployModel", "Subscriber.Acknowledge",
            "Operations.GetOperation", "PredictionService.Predict", "JobService.CancelBatchPredictionJob",
            "JobService.ListCustomJobs"} <= called
    listed = {re.sub(r" \(.*\)$", "", method) for part in manifest("gcp")["airflow"].values() for method in part}
    assert called - listed == set(), "called but not in deploy/gcp/permissions.yaml"
    assert (listed & set(api.values())) - called == set(), "listed in deploy/gcp/permissions.yaml but never called"
