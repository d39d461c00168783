"""`make run`: the lifecycle on the embedded `local` backend.

Starts Airflow (scheduler, DAG processor, triggerer, API server) on 127.0.0.1, lands a sample
dataset in the local bucket's landing folder, and follows the runs that the landing starts by
itself: ml_ingest, then ml_validate. Airflow keeps running (UI on http://127.0.0.1:8080) until
Ctrl-C; drop more files into the landing folder to see them ingested.

    MLFACTORY_CONFIG   pipeline config (default include/pipeline.yaml)
    MLFACTORY_ROWS     rows of sample data to land (default 50000)
    MLFACTORY_PORT     API/UI port (default 8080)
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

STAGES = ("ml_ingest", "ml_validate")


def main() -> int:
    cfg = load_config()
    if cfg.backend != "local" or not storage.is_local(cfg.storage.bucket):
        print(f"make run drives the local backend; {cfg.source} says backend {cfg.backend} bucket {cfg.storage.bucket}")
        return 2
    airflow = LocalAirflow(PROJECT / ".airflow", api_port=int(os.environ.get("MLFACTORY_PORT", "8080")))
    print(f"starting Airflow in {airflow.home} (logs in {airflow.home}/logs) ...", flush=True)
    airflow.start()
    try:
        print(f"Airflow UI: {airflow.url}", flush=True)
        airflow.wait_for_dags(STAGES)
        before = {dag: len(airflow.dag_runs(dag)) for dag in STAGES}
        landing = Path(storage.local_path(cfg.storage.landing_uri))
        rows = int(os.environ.get("MLFACTORY_ROWS", "50000"))
        target = landing / f"customers-{time.strftime('%Y%m%d-%H%M%S')}.csv"
        sample_data.write(sample_data.generate(rows, seed=int(time.time()) % 1000), target)
        print(f"landed {rows} sample rows at {target}; waiting for the pipeline to start by itself ...", flush=True)
        for dag in STAGES:
            last = airflow.wait_for_run(dag, before[dag] + 1, timeout=300)
            print(f"  {dag}: {last['state']} ({last['dag_run_id']})", flush=True)
            if last["state"] != "success":
                print(f"{dag} failed: see {airflow.url}/dags/{dag}")
                break
        else:
            print(f"curated data: {cfg.storage.curated_uri}\nvalidation reports: {cfg.storage.reports_uri}/validation/")
        print(f"\nAirflow is running at {airflow.url}. Drop files into {landing} to ingest them. Ctrl-C stops.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping Airflow ...", flush=True)
        airflow.stop()
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
