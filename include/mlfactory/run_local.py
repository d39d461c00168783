"""`make run`: the lifecycle on the embedded `local` backend.

Starts the MLflow server (SQLite, artifacts in the bucket) and Airflow (scheduler, DAG processor,
triggerer, API server) on 127.0.0.1, lands a sample dataset in the local bucket's landing folder,
and follows the runs that the landing starts by itself: ml_ingest → ml_validate → ml_train →
ml_promote, ending with a `champion` model version in the MLflow registry. Both keep running
(Airflow UI on http://127.0.0.1:8080, MLflow on http://127.0.0.1:5000) until Ctrl-C; drop more files
into the landing folder to see them flow through.

    MLFACTORY_CONFIG   pipeline config (default include/pipeline.yaml)
    MLFACTORY_ROWS     rows of sample data to land (default 50000)
    MLFACTORY_PORT     Airflow API/UI port (default 8080)
    MLFLOW_PORT        MLflow port (default 5000; the config's mlflow.tracking_uri must point at it)
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from mlfactory import sample_data, storage
from mlfactory.config import load_config
from mlfactory.local_airflow import PROJECT, LocalAirflow
from mlfactory.mlflow_server import LocalMlflow

STAGES = ("ml_ingest", "ml_validate", "ml_train", "ml_promote")
TIMEOUTS = {"ml_ingest": 300, "ml_validate": 300, "ml_train": 3600, "ml_promote": 600}


def main() -> int:
    cfg = load_config()
    if cfg.backend != "local" or not storage.is_local(cfg.storage.bucket):
        print(f"make run drives the local backend; {cfg.source} says backend {cfg.backend} bucket {cfg.storage.bucket}")
        return 2
    mlflow = LocalMlflow(PROJECT / ".mlflow", storage.join(cfg.storage.bucket, "mlflow"),
                         port=int(os.environ.get("MLFLOW_PORT", "5000")))
    if mlflow.url != cfg.mlflow.tracking_uri.rstrip("/"):
        print(f"mlflow.tracking_uri in {cfg.source} is {cfg.mlflow.tracking_uri}; make run serves MLflow at {mlflow.url}")
        return 2
    airflow = LocalAirflow(PROJECT / ".airflow", api_port=int(os.environ.get("MLFACTORY_PORT", "8080")),
                           training_slots=cfg.training.concurrent_jobs)
    print(f"starting MLflow in {mlflow.home} and Airflow in {airflow.home} (logs in {airflow.home}/logs) ...", flush=True)
    mlflow.start()
    try:
        airflow.start()
        print(f"Airflow UI: {airflow.url}", flush=True)
        airflow.wait_for_dags(STAGES)
        before = {dag: sum(r["run_type"] == "asset_triggered" for r in airflow.dag_runs(dag)) for dag in STAGES}
        landing = Path(storage.local_path(cfg.storage.landing_uri))
        rows = int(os.environ.get("MLFACTORY_ROWS", "50000"))
        target = landing / f"customers-{time.strftime('%Y%m%d-%H%M%S')}.csv"
        sample_data.write(sample_data.generate(rows, seed=int(time.time()) % 1000), target)
        print(f"landed {rows} sample rows at {target}; waiting for the pipeline to start by itself ...", flush=True)
        for dag in STAGES:
            last = airflow.wait_for_run(dag, before[dag] + 1, timeout=TIMEOUTS[dag], run_type="asset_triggered")
            print(f"  {dag}: {last['state']} ({last['dag_run_id']})", flush=True)
            if last["state"] != "success":
                print(f"{dag} failed: see {airflow.url}/dags/{dag}")
                break
        else:
            print(f"curated data: {cfg.storage.curated_uri}\nvalidation reports: {cfg.storage.reports_uri}/validation/")
            print(f"MLflow: {mlflow.url}/#/models/{cfg.model_name} — {_champion(cfg)}")
        print(f"\nAirflow is running at {airflow.url}. Drop files into {landing} to ingest them. Ctrl-C stops.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping Airflow and MLflow ...", flush=True)
        airflow.stop()
        mlflow.stop()
    return 0


def _champion(cfg) -> str:
    from mlfactory.registry import CHAMPION, Registry

    version = Registry(cfg).alias_version(CHAMPION)
    return f"champion: {cfg.model_name} v{version}" if version else "no champion (the model did not pass the gate)"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
