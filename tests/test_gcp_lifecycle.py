"""The lifecycle with `backend: gcp` under a REAL Airflow 3 (scheduler, DAG processor, triggerer, API
server), a real MLflow server keeping its artifacts in GCS, fake-gcs-server publishing bucket
notifications to the Pub/Sub emulator, and the Vertex AI fake (tests/vertex_fake.py) over the
aiplatform_v1 REST transport, its containers played here (tests/vertex_containers.py).

An object written to the bucket must reach Pub/Sub as a notification, start ml_ingest through the
AssetWatcher, then ml_validate, ml_train (a Vertex CustomJob running the training entrypoint with
Vertex's environment), ml_promote, ml_deploy (model upload, endpoint, deployment with autoscaling,
the canary checked through the endpoint by the model server) and ml_batch_score (a batch prediction
job), by themselves. Then, on the same Airflow, a burst of 50 objects written at once is ingested and
curated once each.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from conftest import gcp_config, pubsub_subscription
from gcp_recorder import GcsRecorder, PubSubRecorder
from iam_scope import Deployment
from intake_bursts import Burst, burst_files, intake_only
from vertex_containers import ModelContainers, TrainingContainers
from vertex_fake import VertexFake

from mlfactory import storage

from mlfactory.data import sample_data
from mlfactory.config import load_config
from mlfactory.backends.local.local_airflow import LocalAirflow
from mlfactory.backends.local.mlflow_server import LocalMlflow
from mlfactory.backends.local.processes import free_port

pytestmark = [pytest.mark.scheduler, pytest.mark.gcp]

BUCKET = "mlf-gcp-lifecycle"
STAGES = ["ml_ingest", "ml_validate", "ml_train", "ml_promote", "ml_deploy", "ml_batch_score"]


def test_an_object_written_to_gcs_runs_the_lifecycle_on_vertex_ai(tmp_path, gcp_emulators, monkeypatch,
                                                                   airflow_db_template):
    from mlflow import MlflowClient

    from mlfactory.serving.deployment import read_endpoint_state
    from mlfactory.registry import CHAMPION, Registry

    subscription = pubsub_subscription(gcp_emulators, "lifecycle-sub")  # skips where there is no emulator
    training = TrainingContainers(tmp_path / "vertex-training")
    serving = ModelContainers(tmp_path / "vertex-serving")
    vertex = VertexFake(run_job=training, serve=serving).start()
    path = tmp_path / "pipeline.yaml"
    raw = gcp_config(BUCKET, path, monkeypatch, pubsub_subscription=subscription, api_endpoint=vertex.url,
                     poll_interval_s=2, budget_usd=50,
                     serving={"endpoint_name": "churn-lifecycle", "canary_wait_s": 0, "canary_requests": 20})
    mlflow_server = LocalMlflow(tmp_path / "mlflow", f"gs://{BUCKET}/mlflow", port=free_port()).launch()
    raw["training"].update(epochs=2, trials=1, processes=1, search_space={})
    raw["promotion"].update(floor=0.6)
    raw["mlflow"].update(tracking_uri=mlflow_server.url, experiment="gcp-lifecycle", model_name="churn_gcp")
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config()
    # Airflow's own calls to Cloud Storage and Pub/Sub go through recording proxies (least privilege, below)
    gcs, pubsub = GcsRecorder(gcp_emulators.gcs), PubSubRecorder(gcp_emulators.pubsub)
    airflow = LocalAirflow(tmp_path / "airflow", api_port=free_port(), env_overrides={
        "MLFACTORY_CONFIG": cfg.source, "STORAGE_EMULATOR_HOST": gcs.url, "PUBSUB_EMULATOR_HOST": pubsub.host},
        db_template=airflow_db_template)  # inherits the emulators' connection
    try:
        airflow.start()
        mlflow_server.wait_ready()
        airflow.wait_for_dags(STAGES)  # raises on any DAG import error (the gcp branches of every DAG)

        # An object written to GCS -> a notification on Pub/Sub -> the AssetWatcher -> ml_ingest.
        local = sample_data.write(sample_data.generate(3000, seed=41), tmp_path / "june batch.csv")
        storage.write_bytes(f"gs://{BUCKET}/landing/june batch.csv", local.read_bytes())
        ingest = airflow.wait_for_run("ml_ingest", 1, timeout=180, run_type="asset_triggered")
        assert ingest["state"] == "success"
        validate = airflow.wait_for_run("ml_validate", 1, timeout=240, run_type="asset_triggered")
        assert validate["state"] == "success"
        parts = [o for o in storage.list_objects(cfg.storage.curated_uri) if o.key.endswith(".parquet")]
        assert len(parts) == 1

        # `curated` -> ml_train: one CustomJob, the entrypoint run with Vertex's environment.
        train = airflow.wait_for_run("ml_train", 1, timeout=600, run_type="asset_triggered")
        assert train["state"] == "success", airflow.task_log("ml_train", train["dag_run_id"], "train", map_index=0)
        (job,) = vertex.custom_jobs.values()
        assert job.job_spec.scheduling.strategy.name == "SPOT"
        assert job.job_spec.worker_pool_specs[0].container_spec.image_uri == raw["gcp"]["image_uri"]
        (run,) = training.runs
        assert run["env"]["AIP_TRAINING_DATA_URI"].startswith(f"gs://{BUCKET}/models/training_sets/")
        assert json.loads(run["env"]["CLUSTER_SPEC"])["task"] == {"type": "workerpool0", "index": 0}
        candidate = airflow.xcom("ml_train", train["dag_run_id"], "select_best")
        assert candidate["model_bundle_uri"].startswith(f"gs://{BUCKET}/models/runs/")
        console, project = "https://console.cloud.google.com/vertex-ai/locations/us-central1", "?project=mlfactory-test"
        assert airflow.links("ml_train", train["dag_run_id"], "train", 0) == {
            "Job in the console": f"{console}/training/{job.name.rsplit('/', 1)[1]}/cpu{project}"}

        # `candidate` -> ml_promote: the registry stays MLflow; the model's files are in GCS.
        promote = airflow.wait_for_run("ml_promote", 1, timeout=300)
        assert promote["state"] == "success"
        champion = Registry(cfg).alias_version(CHAMPION)
        model_uri = Registry(cfg).model_storage_uri(champion)
        assert model_uri.startswith(f"gs://{BUCKET}/mlflow/")

        # `champion` -> ml_deploy: uploaded, endpoint created, deployed with autoscaling, canary checked.
        deploy = airflow.wait_for_run("ml_deploy", 1, timeout=420)
        assert deploy["state"] == "success", airflow.task_log("ml_deploy", deploy["dag_run_id"], "deploy.canary")
        (model,) = vertex.models.values()
        assert model.artifact_uri == model_uri and model.name.endswith(f"/models/churn-gcp-v{champion}")
        endpoint = vertex.endpoints["projects/mlfactory-test/locations/us-central1/endpoints/churn-lifecycle"]
        (deployed,) = endpoint.deployed_models
        assert dict(endpoint.traffic_split) == {deployed.id: 100}
        assert deployed.dedicated_resources.max_replica_count == cfg.serving.max_replicas
        assert vertex.predictions[deployed.id] >= 20  # the canary's requests reached the model server
        state = read_endpoint_state(cfg)
        assert state["served_version"] == champion and state["deployed_model_id"] == deployed.id
        assert MlflowClient(mlflow_server.url).get_model_version("churn_gcp", champion).tags[
            "mlfactory.deployment"] == "serving"
        assert airflow.links("ml_deploy", deploy["dag_run_id"], "deploy.full_traffic") == {
            "Endpoint in the console": f"{console}/endpoints/churn-lifecycle{project}"}

        # `champion` -> ml_batch_score: a batch prediction job over the unscored curated snapshot.
        batch = airflow.wait_for_run("ml_batch_score", 1, timeout=300, run_type="asset_triggered")
        assert batch["state"] == "success"
        scored = airflow.xcom("ml_batch_score", batch["dag_run_id"], "score")
        assert scored["rows"] == 3000 and len(scored["snapshots"]) == 1
        (batch_job,) = vertex.batch_jobs.values()
        assert batch_job.model == model.name
        assert airflow.links("ml_batch_score", batch["dag_run_id"], "score") == {
            "Job in the console": f"{console}/batch-predictions/{batch_job.name.rsplit('/', 1)[1]}{project}"}
        assert not vertex.refused, vertex.refused
        # least privilege, from the calls Airflow actually made: each one's permission is in its role
        assert vertex.ungranted() == {}
        assert {"aiplatform.customJobs.create", "aiplatform.endpoints.deploy", "aiplatform.endpoints.predict",
                "aiplatform.batchPredictionJobs.create"} <= set(vertex.permissions())
        # ... and each Cloud Storage and Pub/Sub request Airflow sent, on this pipeline's bucket and subscription
        role = Deployment("gcp").granted("airflow")  # every binding of Airflow's service account
        sent = {**gcs.permissions(), **pubsub.permissions()}
        print(f"Airflow's Cloud Storage and Pub/Sub permissions: { {k: sorted(v) for k, v in sent.items()} }")
        assert {p: sorted(r) for p, r in sent.items() if p not in role} == {}
        assert {"storage.objects.create", "storage.objects.get", "storage.objects.list",
                "pubsub.subscriptions.consume"} <= set(sent), sent
        assert set().union(*gcs.permissions().values()) <= {BUCKET, "(resumable session)"}
        assert pubsub.permissions()["pubsub.subscriptions.consume"] == {
            f"projects/{gcp_emulators.project}/subscriptions/{subscription}"}

        # Then the intake alone, on the same Airflow: 50 objects written at once, each announced by its own
        # OBJECT_FINALIZE notification; every object ingested and curated once, from GCS.
        intake_only(airflow)
        burst, bodies = Burst(cfg), burst_files(tmp_path / "burst", 50)
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda item: storage.write_bytes(storage.join(cfg.storage.landing_uri, item[0]), item[1]),
                          bodies.items()))
        elapsed = burst.wait_each_curated_once(airflow, [f"{cfg.storage.landing_uri}/{name}" for name in bodies]) - started
        print(f"gcp: 50 objects written at once -> last curated in {elapsed:.1f} s; stranded: 0")
    finally:
        airflow.stop()
        gcs.stop()
        pubsub.stop()
        mlflow_server.stop()
        serving.stop()
        vertex.stop()
