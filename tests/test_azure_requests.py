"""The azure backend's translation: specs -> azure-ai-ml entities, serialised by the SDK itself and checked
field by field against its REST models (the same check the Azure ML fake makes on every request body)."""

from __future__ import annotations

import base64
import json

import pytest

from azureml_fake import check_autoscale, check_body
from conftest import AZURE_IMAGE, AZURE_SUBSCRIPTION

pytestmark = pytest.mark.azure


@pytest.fixture
def azure():
    from mlfactory.backends.azure import AzureSettings

    return AzureSettings(subscription_id=AZURE_SUBSCRIPTION, resource_group="rg", workspace="mlfactory-ws",
                         storage_account="acct", image_uri=AZURE_IMAGE)


def training_spec(**changes):
    from mlfactory.specs import TrainingJobSpec

    fields = dict(name="trial-3", input_uri="abfs://data/training/set=1", output_uri="abfs://data/models/runs/r1/trial-3",
                  nodes=2, processes_per_node=4, spot=True, max_runtime_s=3600,
                  accelerator={"kind": "gpu", "model": "nvidia-a100", "count": 4},
                  hyperparameters={"epochs": 5, "hidden_sizes": [64, 32]}, environment={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    return TrainingJobSpec.model_validate({**fields, **changes})


def rest_json(entity) -> dict:
    from mlfactory.backends.azure.azureml import rest

    return json.loads(json.dumps(rest(entity).as_dict(), default=str))  # the body the SDK sends


def test_command_job_runs_the_entrypoint_distributed_on_spot_serverless_gpus(azure):
    from mlfactory.backends.azure.azureml import command_job

    job = command_job(training_spec(), azure, "trial-3-t1")
    body = rest_json(job._to_job())
    body["properties"]["environmentId"] = "/environments/anonymous"  # the SDK registers the inline image first
    body["properties"].pop("environment", None)
    check_body("JobBase", body)
    props = body["properties"]
    assert props["jobType"] == "Command" and props["experimentName"] == "mlfactory"
    assert props["distribution"] == {"distributionType": "PyTorch", "processCountPerInstance": 4}
    assert props["resources"]["instanceCount"] == 2
    assert props["resources"]["instanceType"] == "Standard_NC96ads_A100_v4"  # 4 x A100 per node
    assert props["queueSettings"]["jobTier"] == "Spot"
    assert "computeId" not in props or not props["computeId"]  # serverless
    assert props["command"].startswith("python -m mlfactory.training.train --train-uri ${{inputs.train}} --output-uri "
                                       "${{outputs.model}} --checkpoint-uri ${{outputs.checkpoints}}")
    assert props["command"].endswith(""" --hyperparameters '{"epochs":5,"hidden_sizes":[64,32]}'""")
    assert props["inputs"]["train"] == {"jobInputType": "uri_folder", "mode": "ReadOnlyMount",
                                        "uri": "azureml://datastores/mlfactory/paths/training/set=1/"}
    assert props["outputs"]["model"]["uri"] == "azureml://datastores/mlfactory/paths/models/runs/r1/trial-3/"
    assert props["outputs"]["checkpoints"]["uri"].endswith("/trial-3/_checkpoints/")
    assert props["environmentVariables"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFACTORY_RUNTIME": "azure"}
    assert props["tags"]["mlfactory_job"] == "trial-3"
    assert job.environment.image == AZURE_IMAGE


IDENTITIES = "/subscriptions/" + AZURE_SUBSCRIPTION + "/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/"


def test_training_runs_as_the_training_identity_and_endpoints_as_the_serving_one(azure):
    from mlfactory.backends.azure import AzureSettings
    from mlfactory.backends.azure.azureml import command_job, online_endpoint

    split = azure.model_copy(update={"training_identity": IDENTITIES + "mlf-training",
                                     "serving_identity": IDENTITIES + "mlf-serving"})
    job = rest_json(command_job(training_spec(), split, "trial-3-t1")._to_job())["properties"]
    assert job["identity"] == {"identityType": "Managed", "resourceId": IDENTITIES + "mlf-training"}
    endpoint = rest_json(online_endpoint(endpoint_spec(), split))
    assert endpoint["identity"] == {"type": "UserAssigned", "userAssignedIdentities": {IDENTITIES + "mlf-serving": {}}}
    # a config with one identity (written before the two were split) serves as it too
    one = azure.model_copy(update={"training_identity": IDENTITIES + "mlf-training"})
    assert list(rest_json(online_endpoint(endpoint_spec(), one))["identity"]["userAssignedIdentities"]) == [
        IDENTITIES + "mlf-training"]
    assert "identity" not in rest_json(command_job(training_spec(), azure, "trial-3-t1")._to_job())["properties"]
    with pytest.raises(ValueError, match="serving_identity 'mlf-serving' is not the resource id of a user-assigned"):
        AzureSettings(**{**azure.model_dump(), "serving_identity": "mlf-serving"})


def test_command_job_on_a_cluster_and_standard_tier(azure):
    from mlfactory.backends.azure.azureml import command_job

    props = rest_json(command_job(training_spec(spot=False), azure.model_copy(update={"compute": "gpu-cluster"}),
                                  "x-t1")._to_job())["properties"]
    assert props["computeId"] == "gpu-cluster" and "instanceType" not in props["resources"]
    assert not props.get("queueSettings")
    props = rest_json(command_job(training_spec(spot=False), azure, "x-t1")._to_job())["properties"]
    assert props["queueSettings"]["jobTier"] == "Spot"  # azure.job_tier's default
    standard = azure.model_copy(update={"job_tier": "Standard"})
    props = rest_json(command_job(training_spec(spot=False), standard, "x-t1")._to_job())["properties"]
    assert props["queueSettings"]["jobTier"] == "Standard"


def test_catalog_and_cost_guard_refuse_with_what_to_change(azure):
    from mlfactory.backends.azure.azureml import AzureRequestError, check_training_budget, vm_size
    from mlfactory.specs import Accelerator, BudgetExceeded

    assert vm_size(Accelerator(kind="gpu", model="nvidia-a100", count=1)) == "Standard_NC24ads_A100_v4"
    assert vm_size(Accelerator(kind="gpu", model="nvidia-h100-80gb", count=8)) == "Standard_ND96isr_H100_v5"
    with pytest.raises(AzureRequestError, match=r"3 x nvidia-a100: nvidia-a100 comes \[1, 2, 4, 8\]"):
        vm_size(Accelerator(kind="gpu", model="nvidia-a100", count=3))
    with pytest.raises(AzureRequestError, match="no TPUs"):
        vm_size(Accelerator(kind="tpu", count=4))
    estimate = check_training_budget(training_spec(max_runtime_s=1800), azure)
    assert estimate.instances == 2 and estimate.usd == pytest.approx(2 * 0.5 * 14.692)
    with pytest.raises(BudgetExceeded, match=r"above azure.budget_usd \$100.00"):
        check_training_budget(training_spec(max_runtime_s=4 * 3600), azure)
    with pytest.raises(AzureRequestError, match="no price for Standard_X"):
        check_training_budget(training_spec(), azure.model_copy(update={"training_instance_type": "Standard_X"}))


def endpoint_spec(**changes):
    from mlfactory.specs import EndpointSpec

    return EndpointSpec.model_validate({"name": "customer_churn-endpoint", "min_replicas": 2, "max_replicas": 5,
                                        "model": {"name": "customer_churn", "version": "12",
                                                  "uri": "abfs://data/mlflow/1/abc/artifacts/model"}, **changes})


def test_online_deployment_declares_the_model_servers_routes(azure):
    from mlfactory.backends.azure.azureml import model_asset, online_deployment, online_endpoint

    endpoint = rest_json(online_endpoint(endpoint_spec(), azure))
    endpoint["properties"].pop("provisioningState", None)
    check_body("OnlineEndpoint", endpoint)
    assert endpoint["properties"]["authMode"] == "AADToken"  # callers bring an Entra token: no key to list
    assert endpoint["identity"] == {"type": "SystemAssigned"}  # no serving identity configured: its own
    deployment = online_deployment(endpoint_spec(), azure, "/models/customer_churn/versions/12", {"A": "1"})
    assert deployment.name == "version-12" and deployment.endpoint_name == "customer-churn-endpoint"
    config = deployment.environment.inference_config
    assert (config["liveness_route"]["path"], config["readiness_route"]["path"], config["scoring_route"]["path"]) == (
        "/live", "/ready", "/score")
    body = rest_json(deployment)
    body["properties"]["environmentId"] = "/environments/anonymous"
    check_body("OnlineDeployment", body)
    assert body["properties"]["instanceType"] == "Standard_DS3_v2" and body["sku"]["capacity"] == 2
    assert body["properties"]["environmentVariables"] == {"MLFACTORY_MODEL_VERSION": "12", "A": "1", "MLFACTORY_RUNTIME": "azure"}
    model = model_asset(endpoint_spec().model, azure)
    assert model.path == "azureml://datastores/mlfactory/paths/mlflow/1/abc/artifacts/model/"
    check_body("ModelVersion", rest_json(model))


@pytest.mark.parametrize("serving,percent,expected", [
    ({}, 10, {"new": 100}),
    ({"old": 100}, 10, {"old": 90, "new": 10}),
    ({"a": 50, "b": 50}, 15, {"a": 43, "b": 42, "new": 15}),
    ({"old": 100}, 0.2, {"old": 99, "new": 1}),
])
def test_canary_traffic_always_sums_to_100(serving, percent, expected):
    from mlfactory.backends.azure.azureml import canary_traffic

    split = canary_traffic(serving, "new", percent)
    assert sum(split.values()) == 100 and split == expected


def test_autoscale_setting_scales_the_deployment_between_min_and_max(azure):
    from mlfactory.backends.azure.azureml import autoscale_name, autoscale_setting

    deployment = (f"/subscriptions/{AZURE_SUBSCRIPTION}/resourceGroups/rg/providers/Microsoft.MachineLearningServices"
                  "/workspaces/ws/onlineEndpoints/churn/deployments/version-12")
    setting = autoscale_setting(endpoint_spec(), azure, deployment)
    body = setting.serialize()
    check_autoscale(body)
    (profile,) = body["properties"]["profiles"]
    assert profile["capacity"] == {"minimum": "2", "maximum": "5", "default": "2"}
    up, down = profile["rules"]
    assert up["metricTrigger"]["metricResourceUri"] == deployment and up["metricTrigger"]["threshold"] == 70
    assert (up["scaleAction"]["direction"], down["scaleAction"]["direction"]) == ("Increase", "Decrease")
    assert body["properties"]["targetResourceUri"] == deployment
    assert autoscale_name(deployment) == "churn-version-12-autoscale"


def test_batch_deployment_runs_the_batch_driver_one_manifest_per_mini_batch(azure):
    from mlfactory.backends.azure.azureml import batch_deployment, batch_endpoint
    from mlfactory.specs import BatchJobSpec

    spec = BatchJobSpec(name="run-1", model=endpoint_spec().model, inputs={"s1": "abfs://data/curated/s1"},
                        output_uri="abfs://data/predictions/batch/run=run-1", instances=3)
    endpoint = batch_endpoint(spec, azure)
    assert endpoint.name == "customer-churn-batch"
    body = rest_json(batch_deployment(spec, azure, endpoint.name, "/models/m/versions/12", "/codes/c/versions/1"))
    body["properties"]["environmentId"] = "/environments/anonymous"
    check_body("BatchDeployment", body)
    props = body["properties"]
    assert props["codeConfiguration"] == {"codeId": "/codes/c/versions/1", "scoringScript": "batch_driver.py"}
    assert (props["miniBatchSize"], props["resources"]["instanceCount"], props["outputAction"]) == (1, 3, "SummaryOnly")


def test_an_entity_the_sdk_refuses_is_an_error_before_anything_is_sent(azure):
    from azure.ai.ml.entities import ManagedOnlineDeployment

    from mlfactory.backends.azure.azureml import AzureRequestError, deployment_name, resource_name, rest

    with pytest.raises(AzureRequestError, match="refuses ManagedOnlineDeployment v1: .*at least 3"):
        rest(ManagedOnlineDeployment(name="v1", endpoint_name="churn", model="azureml:m:1"))
    # which is why names are made from the spec, never taken as they come
    assert deployment_name("1") == "version-1" and resource_name("9_Churn.Model endpoint!!" * 3) == "m-9-churn-model-endpoint-9-churn"


def event_grid(name: str, etag: str = "0x8DC0FFEE", size: int = 120, api: str = "PutBlob",
               kind: str = "Microsoft.Storage.BlobCreated", account: str = "acct") -> dict:
    """A BlobCreated event in Event Grid's schema, as Event Grid writes it."""
    return {"topic": f"/subscriptions/{AZURE_SUBSCRIPTION}/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/{account}",
            "subject": f"/blobServices/default/containers/data/blobs/{name}", "eventType": kind,
            "id": "831e1650-001e-001b-66ab-eeb76e069631", "eventTime": "2026-12-01T10:00:00.0000000Z",
            "data": {"api": api, "clientRequestId": "6d79dbfb", "requestId": "831e1650", "eTag": etag,
                     "contentType": "text/csv", "contentLength": size, "blobType": "BlockBlob",
                     "url": f"https://{account}.blob.core.windows.net/data/{name}", "sequencer": "00000000000004420000000000028963",
                     "storageDiagnostics": {"batchId": "b68529f3"}},
            "dataVersion": "", "metadataVersion": "1"}


def test_blob_created_events_become_landing_events_once_per_etag():
    from mlfactory.backends.azure.events import NotAnEvent, blob_landing_event, decode

    message = base64.b64encode(json.dumps(event_grid("landing/2026/a.csv")).encode()).decode()
    event = blob_landing_event(decode(message), "abfs", "data", "landing/", "acct")
    assert event == {"uri": "abfs://data/landing/2026/a.csv", "bucket": "data", "key": "2026/a.csv", "size": 120,
                     "etag": "0x8DC0FFEE", "fingerprint": "120:0x8DC0FFEE",
                     "url": "https://acct.blob.core.windows.net/data/landing/2026/a.csv"}
    cloud_event = {"specversion": "1.0", "type": "Microsoft.Storage.BlobCreated", "source": event_grid("x")["topic"],
                   "subject": "/blobServices/default/containers/data/blobs/landing/b.csv", "id": "1",
                   "data": event_grid("landing/b.csv")["data"]}
    assert blob_landing_event(decode(json.dumps(cloud_event)), "abfs", "data", "landing/")["key"] == "b.csv"
    ignored = [event_grid("landing/a.csv", kind="Microsoft.Storage.BlobDeleted"), event_grid("other/a.csv"),
               event_grid("landing/.a.csv.tmp"), event_grid("landing/_tmp/a.csv"), event_grid("landing/a.csv", api="CreateFile", size=0),
               event_grid("landing/a.csv", account="otheracct")]
    assert [blob_landing_event(e, "abfs", "data", "landing/", "acct") for e in ignored] == [None] * len(ignored)
    for bad in ("bm90IGpzb24=", json.dumps({"hello": "world"}), "{"):
        with pytest.raises(NotAnEvent):
            decode(bad)
    broken = event_grid("landing/a.csv")
    del broken["data"]["eTag"]
    with pytest.raises(NotAnEvent, match="eTag"):
        blob_landing_event(broken, "abfs", "data", "landing/")


def test_settings_refuse_a_bucket_that_is_not_blob_storage(tmp_path, monkeypatch):
    import yaml

    from mlfactory.config import DEFAULT_CONFIG, ConfigError, load_config

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw.update(backend="azure", azure={"subscription_id": "not-a-guid", "resource_group": "rg", "workspace": "mlfactory-ws",
                                       "storage_account": "acct", "image_uri": AZURE_IMAGE})
    raw["storage"]["bucket"] = "s3://data"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="azure.subscription_id"):
        load_config(tmp_path / "p.yaml")
    raw["azure"]["subscription_id"] = AZURE_SUBSCRIPTION
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="backend azure needs an abfs:// "):
        load_config(tmp_path / "p.yaml")


def test_the_request_log_checks_map_each_call_to_its_action():
    """(deploy/azure grants each identity what permissions.json lists and nothing else: test_deploy_manifests.)"""
    from azure_rbac import action

    # the mapping the request-log checks use, on the calls each part makes
    ws = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.MachineLearningServices/workspaces/ws"
    assert action("POST", f"{ws}/jobs/j-t1/cancel") == "Microsoft.MachineLearningServices/workspaces/jobs/cancel/action"
    assert action("DELETE", f"{ws}/onlineEndpoints/e/deployments/d") == \
        "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/deployments/delete"
    assert action("POST", "/score/e") == "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/score/action"
    assert action("GET", "/devstoreaccount1/q/messages?numofmessages=32&visibilitytimeout=300") == \
        "Microsoft.Storage/storageAccounts/queueServices/queues/messages/process/action"
