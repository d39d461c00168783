"""The lifecycle with `backend: azure` under a REAL Airflow 3 (scheduler, DAG processor, triggerer, API
server), a real MLflow server keeping its artifacts in Blob Storage (Azurite), BlobCreated events on a
Storage Queue (Azurite) as Event Grid delivers them, and the Azure ML fake (tests/azureml_fake.py) reached
over HTTPS through azure-ai-ml's MLClient, its containers played here (tests/azure_containers.py).

A blob written to the bucket, its event on the queue, must start ml_ingest through the AssetWatcher, then
ml_validate, ml_train (an Azure ML command job running the training entrypoint with Azure ML's
environment), ml_promote, ml_deploy (Azure ML model, online endpoint, deployment with autoscale, canary
traffic checked through the endpoint's /score) and ml_batch_score (a batch endpoint job), by themselves.
Then, on the same Airflow, a burst of 50 blobs written at once is ingested and curated once each.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from azure_containers import BatchContainers, ModelContainers, TrainingContainers
from azure_rbac import assert_role_covers
from conftest import AZURE_SUBSCRIPTION, azure_blob_created, azure_config, azure_queue
from intake_bursts import Burst, burst_files, intake_only

from mlfactory import storage

from mlfactory.data import sample_data
from mlfactory.config import load_config
from mlfactory.backends.local.local_airflow import LocalAirflow
from mlfactory.backends.local.mlflow_server import LocalMlflow
from mlfactory.backends.local.processes import free_port

pytestmark = [pytest.mark.scheduler, pytest.mark.azure]

CONTAINER = "mlf-azure-lifecycle"
STAGES = ["ml_ingest", "ml_validate", "ml_train", "ml_promote", "ml_deploy", "ml_batch_score"]


def test_a_blob_written_to_azure_storage_runs_the_lifecycle_on_azure_ml(tmp_path, azurite, azureml_fake, monkeypatch,
                                                                         airflow_db_template):
    from mlflow import MlflowClient

    from mlfactory.serving.deployment import read_endpoint_state
    from mlfactory.registry import CHAMPION, Registry

    fake = azureml_fake
    training = fake.run_job = TrainingContainers(fake, tmp_path / "azureml-training")
    serving = fake.serve = ModelContainers(fake, tmp_path / "azureml-serving")
    batch_runs = fake.run_batch = BatchContainers(fake, tmp_path / "azureml-batch")
    events = azure_queue(azurite, "landing-events")
    path = tmp_path / "pipeline.yaml"
    raw = azure_config(CONTAINER, path, monkeypatch, fake.url, re.search(r"BlobEndpoint=([^;]+)", azurite)[1],
                       event_queue="landing-events", poll_interval_s=2, budget_usd=50,
                       serving={"endpoint_name": "churn-lifecycle", "canary_wait_s": 0, "canary_requests": 20})
    # MLflow's own Blob Storage artifact store (wasbs://, AZURE_STORAGE_CONNECTION_STRING -> Azurite): the same
    # container as the bucket, under storage.mlflow_prefix
    mlflow_server = LocalMlflow(tmp_path / "mlflow", f"wasbs://{CONTAINER}@devstoreaccount1.blob.core.windows.net/mlflow",
                                port=free_port()).launch()
    raw["training"].update(epochs=2, trials=1, processes=2, search_space={})
    raw["promotion"].update(floor=0.6)
    raw["mlflow"].update(tracking_uri=mlflow_server.url, experiment="azure-lifecycle", model_name="churn_azure")
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config()
    airflow = LocalAirflow(tmp_path / "airflow", api_port=free_port(), env_overrides={"MLFACTORY_CONFIG": cfg.source},
                           db_template=airflow_db_template)  # inherits Azurite's and the fake's variables
    try:
        airflow.start()
        mlflow_server.wait_ready()
        airflow.wait_for_dags(STAGES)  # raises on any DAG import error (the azure branches of every DAG)

        # A blob written to the container -> its BlobCreated event on the queue -> the AssetWatcher -> ml_ingest.
        local = sample_data.write(sample_data.generate(3000, seed=41), tmp_path / "june batch.csv")
        events.send_message(azure_blob_created(azurite, CONTAINER, "landing/june batch.csv", local.read_bytes()))
        ingest = airflow.wait_for_run("ml_ingest", 1, timeout=180, run_type="asset_triggered")
        assert ingest["state"] == "success"
        validate = airflow.wait_for_run("ml_validate", 1, timeout=240, run_type="asset_triggered")
        assert validate["state"] == "success"
        assert events.peek_messages() == []  # the event's message deleted once announced

        # `curated` -> ml_train: one command job, the entrypoint run as 2 processes with Azure ML's environment.
        train = airflow.wait_for_run("ml_train", 1, timeout=600, run_type="asset_triggered")
        assert train["state"] == "success", airflow.task_log("ml_train", train["dag_run_id"], "train", map_index=0)
        (job,) = fake.find(r"/jobs/[^/]+$").values()
        assert job["properties"]["distribution"]["processCountPerInstance"] == 2
        assert job["properties"]["queueSettings"] == {"jobTier": "Spot"}
        (run,) = training.runs
        assert run["processes"] == 2 and "2 process(es)" in run["log"]
        candidate = airflow.xcom("ml_train", train["dag_run_id"], "select_best")
        assert candidate["model_bundle_uri"].startswith(f"abfs://{CONTAINER}/models/runs/")
        studio = "https://ml.azure.com"
        workspace = (f"?wsid=/subscriptions/{AZURE_SUBSCRIPTION}/resourcegroups/mlfactory-rg"
                     "/providers/Microsoft.MachineLearningServices/workspaces/mlfactory-ws")
        assert airflow.links("ml_train", train["dag_run_id"], "train", 0) == {
            "Job in the console": f"{studio}/runs/{job['name']}{workspace}"}

        # `candidate` -> ml_promote: the registry stays MLflow; the model's files are in the container.
        promote = airflow.wait_for_run("ml_promote", 1, timeout=300)
        assert promote["state"] == "success"
        champion = Registry(cfg).alias_version(CHAMPION)
        model_uri = Registry(cfg).model_storage_uri(champion)
        assert model_uri.startswith(f"abfs://{CONTAINER}/mlflow/") and storage.exists(storage.join(model_uri, "MLmodel"))

        # `champion` -> ml_deploy: Azure ML model, endpoint, deployment with autoscale, canary through /score.
        deploy = airflow.wait_for_run("ml_deploy", 1, timeout=420)
        assert deploy["state"] == "success", airflow.task_log("ml_deploy", deploy["dag_run_id"], "deploy.canary")
        (endpoint,) = fake.find(r"/onlineEndpoints/churn-lifecycle$").values()
        assert endpoint["properties"]["traffic"] == {f"version-{champion}": 100}
        assert fake.find(rf"autoscalesettings/churn-lifecycle-version-{champion}-autoscale$")
        assert fake.answered[f"version-{champion}"] >= 20  # the canary's requests reached the model server
        state = read_endpoint_state(cfg)
        assert state["served_version"] == champion and state["deployment"] == f"version-{champion}"
        assert MlflowClient(mlflow_server.url).get_model_version("churn_azure", champion).tags[
            "mlfactory.deployment"] == "serving"
        assert airflow.links("ml_deploy", deploy["dag_run_id"], "deploy.full_traffic") == {
            "Endpoint in the console": f"{studio}/endpoints/realtime/churn-lifecycle/detail{workspace}"}

        # `champion` -> ml_batch_score: a batch endpoint job over the unscored curated snapshot.
        batch = airflow.wait_for_run("ml_batch_score", 1, timeout=300, run_type="asset_triggered")
        assert batch["state"] == "success", airflow.task_log("ml_batch_score", batch["dag_run_id"], "score")
        scored = airflow.xcom("ml_batch_score", batch["dag_run_id"], "score")
        assert len(scored["snapshots"]) == 1 and len(batch_runs.runs) == 1
        assert airflow.links("ml_batch_score", batch["dag_run_id"], "score") == {
            "Job in the console": f"{studio}/runs/{scored['job']}{workspace}"}
        assert "3000 rows" in batch_runs.runs[0]
        assert not fake.refused, fake.refused
        used = assert_role_covers(fake.requests)  # every call of every DAG, granted by deploy/azure's role
        assert "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/score/action" in used

        # Then the intake alone, on the same Airflow: 50 blobs written at once, each announced by its own
        # BlobCreated event (as Event Grid delivers them, in any order, one twice); every blob ingested and
        # curated once, from Blob Storage, and every message deleted.
        intake_only(airflow)
        burst, bodies = Burst(cfg), burst_files(tmp_path / "burst", 50)
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            messages = list(pool.map(lambda item: azure_blob_created(azurite, CONTAINER, f"landing/{item[0]}", item[1]),
                                     bodies.items()))
        for message in [*messages, messages[0]]:  # Event Grid delivers at least once
            events.send_message(message)
        elapsed = burst.wait_each_curated_once(airflow, [f"{cfg.storage.landing_uri}/{name}" for name in bodies]) - started
        airflow.wait_until(lambda: not events.peek_messages(), 30, "every queue message deleted")
        print(f"azure: 50 blobs written at once -> last curated in {elapsed:.1f} s; stranded: 0")
    finally:
        airflow.stop()
        mlflow_server.stop()
        serving.stop()
