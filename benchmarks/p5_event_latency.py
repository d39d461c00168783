"""P5 (part): latency of the event-driven chain under a real Airflow 3 on this machine.

  landing -> ml_ingest running : a file appears in the landing folder until ml_ingest's run starts
  raw     -> ml_validate running: Asset `raw`'s event is recorded until ml_validate's run starts

    .venv/bin/python benchmarks/p5_event_latency.py [--files 3]

Prints one line per file and a final JSON line (goals: <= 10 s and <= 5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlfactory-p5-"))
    os.environ["MLFACTORY_BUCKET"] = str(work / "bucket")

    from mlfactory.data import sample_data
    from mlfactory.config import load_config
    from mlfactory.backends.local.local_airflow import LocalAirflow
    from mlfactory.backends.local.processes import free_port

    cfg = load_config()
    airflow = LocalAirflow(work / "airflow", api_port=free_port())
    airflow.start()
    to_ingest, to_validate = [], []
    try:
        airflow.wait_for_dags(["ml_ingest", "ml_validate"])
        time.sleep(5)  # let the triggerer pick up the watcher
        for i in range(args.files):
            sample_data.write(sample_data.generate(2000, seed=100 + i), work / "bucket" / "landing" / f"f{i}.csv")
            landed = time.time()
            ingest = airflow.wait_for_run("ml_ingest", i + 1, timeout=120)
            validate = airflow.wait_for_run("ml_validate", i + 1, timeout=180)
            raw_event = next(e for e in reversed(airflow.asset_events()) if e["uri"] == cfg.storage.raw_uri)
            to_ingest.append(ts(ingest["start_date"]) - landed)
            to_validate.append(ts(validate["start_date"]) - ts(raw_event["timestamp"]))
            print(f"file {i}: landing -> ml_ingest running {to_ingest[-1]:.1f}s, raw -> ml_validate running {to_validate[-1]:.1f}s", flush=True)
    finally:
        airflow.stop()
    print(
        json.dumps(
            {
                "benchmark": "P5",
                "files": args.files,
                "landing_to_ingest_running_s": {"median": round(statistics.median(to_ingest), 2), "max": round(max(to_ingest), 2)},
                "raw_to_validate_running_s": {"median": round(statistics.median(to_validate), 2), "max": round(max(to_validate), 2)},
                "goals_s": {"landing_to_ingest": 10, "raw_to_validate": 5},
            }
        )
    )


if __name__ == "__main__":
    main()
