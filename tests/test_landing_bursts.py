"""Nothing stranded, nothing doubled, under a REAL Airflow 3 (scheduler, DAG processor, triggerer, API
server): bursts of 1, 10 and 50 files landed at once, then kill -9 of the scheduler, of the triggerer,
of a task process and of the whole of Airflow in the middle of the work. Each time every landed
object must end ingested and curated exactly once, with no later event and no sweep (the sweep
schedule is off here), and no partial file anywhere.

ml_ingest and ml_validate alone run (the other DAGs are paused): this is about the intake.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from airflow_faults import crash, crash_all

from mlfactory import storage

from mlfactory.data import sample_data
from mlfactory.config import DEFAULT_CONFIG, load_config
from mlfactory.data.etl import CURATED_FILE, pending_snapshots
from mlfactory.data.ingest import ledger_uri, pending_objects
from mlfactory.backends.local.local_airflow import LocalAirflow
from mlfactory.backends.local.processes import free_port

pytestmark = pytest.mark.scheduler

INTAKE = ["ml_ingest", "ml_validate"]
OTHERS = ["ml_train", "ml_promote", "ml_deploy", "ml_batch_score", "ml_monitor"]


def tuned_for_intake(raw: dict, path: Path, **ingest) -> object:
    """``raw`` with quick polling, no sweep schedule and small validation chunks, written to ``path``
    (MLFACTORY_CONFIG); the loaded config."""
    raw["ingest"].update(poll_interval_s=0.5, settle_s=0.5, sweep_schedule=None, **ingest)
    raw["validation"].update(chunk_rows=1000)
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def intake_config(tmp_path: Path, monkeypatch, bucket: str, **ingest) -> object:
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["storage"]["bucket"] = bucket
    monkeypatch.setenv("MLFACTORY_CONFIG", str(tmp_path / "pipeline.yaml"))
    return tuned_for_intake(raw, tmp_path / "pipeline.yaml", **ingest)


def start_intake(tmp_path: Path, cfg, airflow_db_template, **env) -> LocalAirflow:
    airflow = LocalAirflow(tmp_path / "airflow", api_port=free_port(), db_template=airflow_db_template,
                           env_overrides={"MLFACTORY_CONFIG": cfg.source, **env})
    airflow.start()
    airflow.wait_for_dags(INTAKE + OTHERS)
    for dag_id in OTHERS:
        airflow.api(f"/api/v2/dags/{dag_id}", method="PATCH", body={"is_paused": True})
    return airflow


class Landed:
    """What the test landed (file name -> data rows), and the checks of exactly-once intake."""

    def __init__(self, cfg, folder: Path) -> None:
        self.cfg, self.folder, self.rows = cfg, folder, {}
        folder.mkdir(parents=True, exist_ok=True)

    def burst(self, count: int, rows: int = 300, prefix: str = "burst") -> float:
        """``count`` new files appear in the landing folder at once (written aside, then renamed in)."""
        aside = self.folder.parent / "_aside"
        aside.mkdir(exist_ok=True)
        names = [f"{prefix}-{len(self.rows) + i:03d}.csv" for i in range(count)]
        for i, name in enumerate(names):
            sample_data.write(sample_data.generate(rows, seed=len(self.rows) + i, id_offset=(len(self.rows) + i) * 10**6),
                              aside / name)
        landed_at = time.monotonic()
        for name in names:
            os.replace(aside / name, self.folder / name)
            self.rows[name] = rows
        return landed_at

    def curated(self) -> dict[str, int]:
        """Snapshot id -> rows of every published curated file."""
        found = {}
        for obj in storage.list_objects(self.cfg.storage.curated_uri):
            found[obj.key.split("/")[-2]] = pq.read_metadata(storage.local_path(obj.uri)).num_rows
        return found

    def wait_all_curated(self, airflow: LocalAirflow, timeout: float) -> None:
        airflow.wait_until(lambda: len(self.curated()) >= len(self.rows) and not pending_snapshots(self.cfg), timeout,
                           f"{len(self.rows)} curated snapshots")

    def assert_exactly_once(self) -> None:
        cfg = self.cfg
        ledger = [json.loads(storage.read_bytes(o.uri)) for o in storage.list_objects(ledger_uri(cfg))]
        outcomes = {}
        for entry in ledger:
            outcomes.setdefault(entry["uri"].rsplit("/", 1)[1], []).append(entry["outcome"])
        assert outcomes == {name: ["ingested"] for name in self.rows}, "every object ingested once, none refused"
        manifests = [o for o in storage.list_objects(cfg.storage.raw_uri) if o.key.endswith("/manifest.json")]
        assert len(manifests) == len(self.rows)
        curated = self.curated()
        assert sorted(curated.values()) == sorted(self.rows.values()) and len(curated) == len(self.rows)
        files = [o.key.rsplit("/", 1)[1] for o in storage.list_objects(cfg.storage.curated_uri)]
        assert set(files) == {CURATED_FILE}, "one whole file per snapshot: no stale part, no partial file"
        summaries = [json.loads(storage.read_bytes(o.uri)) for o in
                     storage.list_objects(storage.join(cfg.storage.reports_uri, "validation")) if o.key.endswith("summary.json")]
        assert len(summaries) == len(self.rows) and all(s["success"] for s in summaries)
        assert all(s["raw_rows"] == s["curated_rows"] + s["quarantined_rows"] for s in summaries)
        # A killed writer may leave its hidden temporary file (removed by a later curation once it is older
        # than a task can run); no reader ever lists one, and every file a reader sees is whole.
        for prefix in (cfg.storage.curated_uri, cfg.storage.quarantine_uri):
            for obj in storage.list_objects(prefix):
                assert not obj.key.endswith(".tmp") and pq.read_metadata(storage.local_path(obj.uri)).num_rows >= 0
        assert pending_objects(cfg, now=time.time() + 60) == [] and pending_snapshots(cfg) == []


def curated_files(cfg) -> dict[str, int]:
    """Key -> rows of every curated file in the bucket (any store)."""
    found = {}
    for obj in storage.list_objects(cfg.storage.curated_uri):
        with storage.open_uri(obj.uri) as f:
            found[obj.key] = pq.read_metadata(f).num_rows
    return found


def burst_files(folder: Path, count: int) -> dict[str, bytes]:
    """``count`` sample CSV files of 300 rows each (written under ``folder``), with names that need quoting in
    a URL: name -> bytes."""
    return {f"part {i:02d}.csv": sample_data.write(sample_data.generate(300, seed=i, id_offset=i * 10**6),
                                                   folder / f"part {i:02d}.csv").read_bytes() for i in range(count)}


def wait_each_curated_once(airflow: LocalAirflow, cfg, landed: list[str]) -> float:
    """Waits until the objects ``landed`` (URIs, 300 rows each) are all curated, then checks that each was
    ingested and curated exactly once, by one whole file, and nothing waits; returns when (monotonic)."""
    airflow.wait_until(lambda: len(curated_files(cfg)) >= len(landed) and not pending_snapshots(cfg), 300,
                       f"{len(landed)} curated snapshots")
    done = time.monotonic()
    files = curated_files(cfg)
    assert len(files) == len(landed) and set(files.values()) == {300}
    assert {key.rsplit("/", 1)[1] for key in files} == {CURATED_FILE}
    ledger = [json.loads(storage.read_bytes(o.uri)) for o in storage.list_objects(ledger_uri(cfg))]
    assert sorted(e["uri"] for e in ledger) == sorted(landed)
    assert {e["outcome"] for e in ledger} == {"ingested"} and pending_objects(cfg, now=time.time() + 60) == []
    return done


def running_task(airflow: LocalAirflow, dag_id: str, task_id: str) -> dict | None:
    for run in airflow.dag_runs(dag_id):
        if run["state"] == "running":
            for ti in airflow.task_instances(dag_id, run["dag_run_id"]):
                if ti["task_id"] == task_id and ti["state"] == "running" and ti.get("pid"):
                    return ti
    return None


def test_bursts_of_1_10_and_50_files_are_each_ingested_and_curated_once(tmp_path, monkeypatch, airflow_db_template):
    """An API server that dies of SIGSEGV in the middle of the burst of 10 is started again, leaves its Python stack
    in its log, and fails no run: the tasks' calls wait for it."""
    bucket = tmp_path / "bucket"
    cfg = intake_config(tmp_path, monkeypatch, bucket.as_uri())
    landed = Landed(cfg, bucket / "landing")
    airflow = start_intake(tmp_path, cfg, airflow_db_template)
    try:
        figures = {}
        for count in (1, 10, 50):
            started = landed.burst(count)
            if count == 10:  # the API server crashes in C code with the burst in flight: started again, it serves on
                os.kill(airflow.processes["api-server"].pid, signal.SIGSEGV)
            landed.wait_all_curated(airflow, timeout=240)
            figures[count] = time.monotonic() - started
            landed.assert_exactly_once()
        runs = {dag_id: [r for r in airflow.dag_runs(dag_id) if r["run_type"] != "scheduled"] for dag_id in INTAKE}
        assert all(r["state"] == "success" for rs in runs.values() for r in rs if r["state"] != "running"), runs
        print(f"\nlanding -> last curated: {', '.join(f'{n} files {s:.1f} s' for n, s in figures.items())}; "
              f"runs: ml_ingest {len(runs['ml_ingest'])}, ml_validate {len(runs['ml_validate'])}; stranded: 0")
        assert figures[50] <= 90, figures  # the goal on this machine is 60 s; the bound leaves room for a busy CI
        assert airflow.restarts == {"api-server": 1}
        assert "Fatal Python error: Segmentation fault" in (airflow.home / "logs" / "api-server.log").read_text()
    finally:
        airflow.stop()


def test_kill_9_mid_ingest_and_mid_curation_loses_and_doubles_nothing(tmp_path, monkeypatch, airflow_db_template):
    bucket = tmp_path / "bucket"
    cfg = intake_config(tmp_path, monkeypatch, bucket.as_uri())
    landed = Landed(cfg, bucket / "landing")
    # a task whose process died is failed (and retried) 12 s after its last heartbeat;
    airflow = start_intake(tmp_path, cfg, airflow_db_template, AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT="12",
                           AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL="10",  # a dead scheduler's tasks are
                           AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD="10")  # taken over within ~20 s
    try:
        # The scheduler, while ml_ingest runs.
        landed.burst(10, prefix="scheduler")
        airflow.wait_until(lambda: any(r["state"] == "running" for r in airflow.dag_runs("ml_ingest")), 120,
                           "an ml_ingest run")
        crash(airflow, "scheduler")
        time.sleep(2)
        airflow.relaunch("scheduler")
        landed.wait_all_curated(airflow, timeout=240)
        landed.assert_exactly_once()

        # The triggerer, in the middle of announcing a burst.
        before = len(airflow.asset_events())
        landed.burst(10, prefix="triggerer")
        airflow.wait_until(lambda: len(airflow.asset_events()) > before, 60, "the first landing event")
        crash(airflow, "triggerer")
        time.sleep(2)
        airflow.relaunch("triggerer")
        landed.wait_all_curated(airflow, timeout=240)
        landed.assert_exactly_once()

        # The scheduler again, while ml_validate curates: its orphaned worker finishes the task.
        landed.burst(2, rows=16_000, prefix="scheduler-curating")
        airflow.wait_until(lambda: running_task(airflow, "ml_validate", "curate"), 180, "a curate task to run")
        crash(airflow, "scheduler")
        time.sleep(2)
        airflow.relaunch("scheduler")
        landed.wait_all_curated(airflow, timeout=300)
        landed.assert_exactly_once()

        # The whole of Airflow, while ml_ingest runs.
        landed.burst(10, prefix="power-ingesting")
        airflow.wait_until(lambda: any(r["state"] == "running" for r in airflow.dag_runs("ml_ingest")), 120,
                           "an ml_ingest run")
        crash_all(airflow)
        airflow.start()
        landed.wait_all_curated(airflow, timeout=300)
        landed.assert_exactly_once()

        # One task process, in the middle of curating a big snapshot: the retry curates it whole.
        landed.burst(2, rows=16_000, prefix="task")
        ti = airflow.wait_until(lambda: running_task(airflow, "ml_validate", "curate"), 180, "a curate task to run")
        time.sleep(1)
        os.kill(ti["pid"], signal.SIGKILL)
        landed.wait_all_curated(airflow, timeout=300)
        landed.assert_exactly_once()

        # The whole of Airflow, in the middle of curating: restarted, it finishes the work.
        landed.burst(2, rows=16_000, prefix="power-curating")
        airflow.wait_until(lambda: running_task(airflow, "ml_validate", "curate"), 180, "a curate task to run")
        time.sleep(1)
        crash_all(airflow)
        airflow.start()
        landed.wait_all_curated(airflow, timeout=300)
        landed.assert_exactly_once()
    finally:
        airflow.stop()
    # every process Airflow ran here is gone, the crashed schedulers' orphaned executor workers too (SIGKILLed:
    # give the kernel a moment to take them down)
    deadline = time.monotonic() + 15
    while running_in(airflow.home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running_in(airflow.home) == []


def test_50_objects_announced_in_one_sqs_batch_are_each_ingested_and_curated_once(tmp_path, moto_server, monkeypatch,
                                                                                  airflow_db_template):
    """The aws backend: 50 objects whose ObjectCreated records arrive in ONE message of the queue (one
    receive), on moto's S3 and SQS over HTTP; every object ingested and curated once, from S3."""
    import boto3
    from conftest import aws_config_on_moto

    bucket = "mlfactory-burst"
    path = tmp_path / "pipeline.yaml"
    raw = aws_config_on_moto(moto_server, bucket, path, monkeypatch, conn_id="aws_default")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)  # the storage layer (s3fs) of every Airflow process
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    sqs = boto3.client("sqs", endpoint_url=moto_server, region_name="us-east-1")
    queue = sqs.create_queue(QueueName="mlfactory-burst")["QueueUrl"]
    raw["aws"]["sqs_queue_url"] = queue
    cfg = tuned_for_intake(raw, path)
    airflow = start_intake(tmp_path, cfg, airflow_db_template)
    try:
        bodies, records = burst_files(tmp_path / "out", 50), []
        for name, body in bodies.items():
            key = f"landing/{name}"
            etag = s3.put_object(Bucket=bucket, Key=key, Body=body)["ETag"]
            records.append({"eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                            "s3": {"bucket": {"name": bucket}, "object": {"key": key.replace(" ", "+"),
                                                                           "size": len(body), "eTag": etag}}})
        started = time.monotonic()
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"Records": records}))

        landed = [f"s3://{bucket}/landing/{name}" for name in bodies]
        elapsed = wait_each_curated_once(airflow, cfg, landed) - started
        assert sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["ApproximateNumberOfMessages"])[
            "Attributes"]["ApproximateNumberOfMessages"] == "0"  # the message deleted once its 50 events were emitted
        print(f"\naws: 50 objects in one SQS message -> last curated in {elapsed:.1f} s; stranded: 0")
    finally:
        airflow.stop()


@pytest.mark.gcp
def test_50_objects_written_to_gcs_at_once_are_each_ingested_and_curated_once(tmp_path, gcp_emulators, monkeypatch,
                                                                              airflow_db_template):
    """The gcp backend: 50 objects written to fake-gcs-server at once, each announced by its own OBJECT_FINALIZE
    notification through the Pub/Sub emulator; every object ingested and curated once, from GCS."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import gcp_config, pubsub_subscription

    subscription = pubsub_subscription(gcp_emulators, "burst-landing")  # skips where there is no emulator
    path = tmp_path / "pipeline.yaml"
    raw = gcp_config("mlf-gcs-burst", path, monkeypatch, pubsub_subscription=subscription)
    cfg = tuned_for_intake(raw, path)
    airflow = start_intake(tmp_path, cfg, airflow_db_template)
    try:
        bodies = burst_files(tmp_path / "out", 50)
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda item: storage.write_bytes(storage.join(cfg.storage.landing_uri, item[0]), item[1]),
                          bodies.items()))

        landed = [f"{cfg.storage.landing_uri}/{name}" for name in bodies]
        elapsed = wait_each_curated_once(airflow, cfg, landed) - started
        print(f"\ngcp: 50 objects written at once -> last curated in {elapsed:.1f} s; stranded: 0")
    finally:
        airflow.stop()


@pytest.mark.azure
def test_50_blobs_written_at_once_are_each_ingested_and_curated_once(tmp_path, azurite, monkeypatch,
                                                                      airflow_db_template):
    """The azure backend: 50 blobs written to Azurite at once, each announced by its own BlobCreated event on
    the Storage Queue (as Event Grid delivers them, in any order, one twice); every blob ingested and curated
    once, from Blob Storage, and every message deleted."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import azure_blob_created, azure_config, azure_queue

    events = azure_queue(azurite, "burst-landing")
    path = tmp_path / "pipeline.yaml"
    raw = azure_config("mlf-azure-burst-intake", path, monkeypatch, "https://127.0.0.1:9", "", event_queue="burst-landing")
    cfg = tuned_for_intake(raw, path)
    airflow = start_intake(tmp_path, cfg, airflow_db_template)
    try:
        bodies = burst_files(tmp_path / "out", 50)
        container = raw["storage"]["bucket"].removeprefix("abfs://")
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            messages = list(pool.map(lambda item: azure_blob_created(azurite, container, f"landing/{item[0]}", item[1]),
                                     bodies.items()))
        for message in [*messages, messages[0]]:  # Event Grid delivers at least once
            events.send_message(message)

        landed = [f"{cfg.storage.landing_uri}/{name}" for name in bodies]
        elapsed = wait_each_curated_once(airflow, cfg, landed) - started
        airflow.wait_until(lambda: not events.peek_messages(), 30, "every queue message deleted")
        print(f"\nazure: 50 blobs written at once -> last curated in {elapsed:.1f} s; stranded: 0")
    finally:
        airflow.stop()


def running_in(folder: Path) -> list[str]:
    """The live processes whose working directory is under ``folder``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd").startswith(str(folder)):
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{pid} {command[:100]}")
        except OSError:  # gone meanwhile
            pass
    return found
