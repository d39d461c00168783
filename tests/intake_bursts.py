"""Bursts of landed objects under a real Airflow, and the check that each was ingested and curated exactly
once: for the local backend's burst and kill -9 tests, and the burst each cloud's lifecycle test lands on
the same Airflow once its lifecycle is done (one Airflow started per backend, not two)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq

from mlfactory import storage
from mlfactory.backends.local.local_airflow import LocalAirflow
from mlfactory.data import sample_data
from mlfactory.data.etl import CURATED_FILE, pending_snapshots
from mlfactory.data.ingest import ledger_uri, pending_objects

INTAKE = ["ml_ingest", "ml_validate"]
OTHERS = ["ml_train", "ml_promote", "ml_deploy", "ml_batch_score", "ml_monitor"]


def intake_only(airflow: LocalAirflow) -> None:
    """Pauses every DAG after ml_validate: what lands from here is ingested and curated, and goes no further."""
    for dag_id in OTHERS:
        airflow.api(f"/api/v2/dags/{dag_id}", method="PATCH", body={"is_paused": True})


def burst_files(folder: Path, count: int) -> dict[str, bytes]:
    """``count`` sample CSV files of 300 rows each (written under ``folder``), with names that need quoting in
    a URL: name -> bytes."""
    return {f"part {i:02d}.csv": sample_data.write(sample_data.generate(300, seed=i, id_offset=i * 10**6),
                                                   folder / f"part {i:02d}.csv").read_bytes() for i in range(count)}


def curated_objects(cfg) -> dict[str, str]:
    """Key -> URI of every curated file in the bucket (any store): a listing, no file opened."""
    return {obj.key: obj.uri for obj in storage.list_objects(cfg.storage.curated_uri)}


def ledger_entries(cfg) -> set[str]:
    return {obj.uri for obj in storage.list_objects(ledger_uri(cfg))}


def ledger(cfg, leaving_out: set[str] = frozenset()) -> list[dict]:
    """Ingestion's ledger: one entry (uri, outcome, ...) per object taken in, but those at ``leaving_out``."""
    return [json.loads(storage.read_bytes(uri)) for uri in ledger_entries(cfg) - leaving_out]


class Burst:
    """What the bucket held before a burst, to check the burst's objects alone."""

    def __init__(self, cfg) -> None:
        self.cfg, self.curated_before, self.ledger_before = cfg, set(curated_objects(cfg)), ledger_entries(cfg)

    def new_curated(self) -> dict[str, str]:
        return {k: uri for k, uri in curated_objects(self.cfg).items() if k not in self.curated_before}

    def wait_each_curated_once(self, airflow: LocalAirflow, landed: list[str], timeout: float = 300) -> float:
        """Waits until the objects ``landed`` (URIs, 300 rows each) are all curated, then checks that each was
        ingested and curated exactly once, by one whole file, and nothing waits; returns when (monotonic)."""
        cfg = self.cfg
        airflow.wait_until(lambda: len(self.new_curated()) >= len(landed) and not pending_snapshots(cfg), timeout,
                           f"{len(landed)} curated snapshots")
        done = time.monotonic()
        files = {}
        for key, uri in self.new_curated().items():
            with storage.open_uri(uri) as f:
                files[key] = pq.read_metadata(f).num_rows
        assert len(files) == len(landed) and set(files.values()) == {300}, files
        assert {key.rsplit("/", 1)[1] for key in files} == {CURATED_FILE}
        entries = ledger(cfg, leaving_out=self.ledger_before)
        assert sorted(e["uri"] for e in entries) == sorted(landed)
        assert {e["outcome"] for e in entries} == {"ingested"} and pending_objects(cfg, now=time.time() + 60) == []
        return done
