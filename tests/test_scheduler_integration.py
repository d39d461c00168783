"""The first two stages under a REAL Airflow 3: scheduler, DAG processor, triggerer and API server.

No dag.test(): a file dropped in the landing folder must start ml_ingest through the AssetWatcher,
and Asset `raw` must start ml_validate, by themselves.
"""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlfactory import sample_data, storage
from mlfactory.etl import read_quarantine
from mlfactory.local_airflow import LocalAirflow
from mlfactory.processes import free_port

pytestmark = pytest.mark.scheduler


def test_landing_starts_ingest_then_validate_by_themselves(tmp_path, bucket, cfg):
    airflow = LocalAirflow(tmp_path / "airflow", api_port=free_port())
    airflow.start()
    try:
        airflow.wait_for_dags(["ml_ingest", "ml_validate"])  # raises on any DAG import error

        # A good file: ingest, then validate, then curated Parquet.
        sample_data.write(sample_data.generate(2000, seed=21), bucket / "landing" / "good.csv")
        ingest = airflow.wait_for_run("ml_ingest", 1, timeout=120)
        assert ingest["state"] == "success" and ingest["run_type"] == "asset_triggered"
        validate = airflow.wait_for_run("ml_validate", 1, timeout=180)
        assert validate["state"] == "success" and validate["run_type"] == "asset_triggered"
        parts = [o for o in storage.list_objects(cfg.storage.curated_uri) if o.key.endswith(".parquet")]
        assert len(parts) == 1 and pq.read_metadata(storage.local_path(parts[0].uri)).num_rows == 2000
        events = airflow.api("/api/v2/assets/events?order_by=timestamp&limit=50")["asset_events"]
        curated_events = [e for e in events if e["uri"] == cfg.storage.curated_uri]
        assert curated_events and curated_events[-1]["extra"]["curated_rows"] == 2000

        # The watermark survives a restart of every Airflow component: nothing fires again.
        airflow.stop()
        airflow.start()
        time.sleep(20)
        assert len(airflow.dag_runs("ml_ingest")) == 1

        # A bad file: ml_validate fails naming the expectation, quarantines rows, keeps the raw snapshot.
        bad = sample_data.generate(1000, seed=22).to_pandas()
        bad.loc[bad.index[::10], "age"] = 150  # 10% out of range, over the 5% limit
        sample_data.write(pa.Table.from_pandas(bad, preserve_index=False), bucket / "landing" / "bad.csv")
        assert airflow.wait_for_run("ml_ingest", 2, timeout=120)["state"] == "success"
        failed = airflow.wait_for_run("ml_validate", 2, timeout=180)
        assert failed["state"] == "failed"
        tis = airflow.task_instances("ml_validate", failed["dag_run_id"])
        curate_ti = next(t for t in tis if t["task_id"] == "curate")
        assert curate_ti["state"] == "failed"
        log = airflow.task_log("ml_validate", failed["dag_run_id"], "curate", map_index=curate_ti["map_index"])
        assert "expect_column_values_to_be_between failed on column 'age' for 100 of 1000 rows" in log
        snapshots = [o for o in storage.list_objects(cfg.storage.raw_uri) if o.key.endswith("data.csv")]
        assert len(snapshots) == 2  # both raw snapshots kept
        bad_sid = next(s.key.split("/")[0][:16] for s in snapshots if s.key.split("/")[0][:16] not in parts[0].key)
        quarantined = read_quarantine(f"{cfg.storage.quarantine_uri}/snapshot={bad_sid}")
        assert quarantined.num_rows == 100
        assert set(quarantined.column("_failed_expectation").to_pylist()) == {"expect_column_values_to_be_between"}
    finally:
        airflow.stop()
