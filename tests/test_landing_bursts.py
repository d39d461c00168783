"""Nothing stranded, nothing doubled, under a REAL Airflow 3 (scheduler, DAG processor, triggerer, API
server), all on one Airflow: bursts of 1, 10 and 50 files landed at once (the API server dying of SIGSEGV in
the middle of one), then kill -9 of the scheduler, of the triggerer, of a task process and of the whole of
Airflow in the middle of the work. Each time every landed
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
from intake_bursts import INTAKE, OTHERS, curated_objects, intake_only, ledger

from mlfactory import storage

from mlfactory.data import sample_data
from mlfactory.config import DEFAULT_CONFIG, load_config
from mlfactory.data.etl import CURATED_FILE, pending_snapshots
from mlfactory.data.ingest import pending_objects
from mlfactory.backends.local.local_airflow import LocalAirflow
from mlfactory.backends.local.processes import free_port

pytestmark = pytest.mark.scheduler

BIG = 10_000  # rows of a file whose curation (10 validation batches, several seconds) a kill lands in the middle of


def intake_config(tmp_path: Path, monkeypatch, bucket: str) -> object:
    """The sample config on ``bucket`` with quick polling, no sweep schedule and small validation chunks, written
    to tmp_path/pipeline.yaml (MLFACTORY_CONFIG); the loaded config."""
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["storage"]["bucket"] = bucket
    raw["ingest"].update(poll_interval_s=0.5, settle_s=0.5, sweep_schedule=None)
    raw["validation"].update(chunk_rows=1000)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MLFACTORY_CONFIG", str(path))
    return load_config(path)


def start_intake(tmp_path: Path, cfg, airflow_db_template, **env) -> LocalAirflow:
    airflow = LocalAirflow(tmp_path / "airflow", api_port=free_port(), db_template=airflow_db_template,
                           env_overrides={"MLFACTORY_CONFIG": cfg.source, **env})
    airflow.start()
    airflow.wait_for_dags(INTAKE + OTHERS)
    intake_only(airflow)
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
        airflow.wait_until(lambda: len(curated_objects(self.cfg)) >= len(self.rows) and not pending_snapshots(self.cfg),
                           timeout, f"{len(self.rows)} curated snapshots")

    def assert_exactly_once(self) -> None:
        cfg = self.cfg
        outcomes = {}
        for entry in ledger(cfg):
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


def running_task(airflow: LocalAirflow, dag_id: str, task_id: str) -> dict | None:
    for run in airflow.dag_runs(dag_id):
        if run["state"] == "running":
            for ti in airflow.task_instances(dag_id, run["dag_run_id"]):
                if ti["task_id"] == task_id and ti["state"] == "running" and ti.get("pid"):
                    return ti
    return None


# 884 s of the suite's 900 s timeout beside a busy core (523-595 s in a plain run): its waits are each bounded by
# readiness, so the whole gets more room than the suite's default
@pytest.mark.timeout(1800)
def test_bursts_then_kill_9_of_each_component_lose_and_double_nothing(tmp_path, monkeypatch, airflow_db_template):
    """One Airflow: bursts of 1, 10 and 50 files, then kill -9 of each component in the middle of the work."""
    bucket = tmp_path / "bucket"
    cfg = intake_config(tmp_path, monkeypatch, bucket.as_uri())
    landed = Landed(cfg, bucket / "landing")
    airflow = start_intake(tmp_path, cfg, airflow_db_template,
                           AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL="10",  # a dead scheduler's tasks are
                           AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD="10")  # taken over within ~20 s
    try:
        bursts(airflow, landed)
        crashes(airflow, landed)
    finally:
        airflow.stop()
    # every process Airflow ran here is gone, the crashed schedulers' orphaned executor workers too (SIGKILLed:
    # give the kernel a moment to take them down)
    deadline = time.monotonic() + 15
    while running_in(airflow.home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running_in(airflow.home) == []


def bursts(airflow: LocalAirflow, landed: Landed) -> None:
    """Bursts of 1, 10 and 50 files, each ingested and curated once. The API server dies of SIGSEGV in the middle
    of the burst of 10: it is started again, leaves its Python stack in its log, and fails no run (the tasks'
    calls wait for it)."""
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
    # the 50-file figure is reported, not bounded here: the wait above is from readiness (240 s at most), and a wall
    # clock bound fails whenever the machine is busier than this one (issue 13's goal, 60 s, is for a quiet machine)
    assert airflow.restarts == {"api-server": 1}
    assert "Fatal Python error: Segmentation fault" in (airflow.home / "logs" / "api-server.log").read_text()


def crashes(airflow: LocalAirflow, landed: Landed) -> None:
    """kill -9 of the scheduler, of the triggerer, of a task process and of the whole of Airflow, each in the middle
    of ingesting or curating; every landed file still ends ingested and curated once."""
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
    landed.burst(2, rows=BIG, prefix="scheduler-curating")
    airflow.wait_until(lambda: running_task(airflow, "ml_validate", "curate"), 180, "a curate task to run")
    crash(airflow, "scheduler")
    time.sleep(2)
    airflow.relaunch("scheduler")
    landed.wait_all_curated(airflow, timeout=300)
    landed.assert_exactly_once()

    # From the next start on, tasks die with their workers: one whose process died is failed (and retried) 12 s after its last
    # heartbeat, not a minute. (Not before: the heartbeats go through the API server, and a task that ran while it
    # was being started again, ~20-30 s on a busy machine, was failed and its DAG held back until the next parse.)
    airflow.env_overrides["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"] = "12"

    # The whole of Airflow, while ml_ingest runs.
    landed.burst(10, prefix="power-ingesting")
    airflow.wait_until(lambda: any(r["state"] == "running" for r in airflow.dag_runs("ml_ingest")), 120,
                       "an ml_ingest run")
    crash_all(airflow)
    airflow.start()
    landed.wait_all_curated(airflow, timeout=300)
    landed.assert_exactly_once()

    # One task process, in the middle of curating a big snapshot: the retry curates it whole.
    landed.burst(2, rows=BIG, prefix="task")
    ti = airflow.wait_until(lambda: running_task(airflow, "ml_validate", "curate"), 180, "a curate task to run")
    time.sleep(1)
    os.kill(ti["pid"], signal.SIGKILL)
    landed.wait_all_curated(airflow, timeout=300)
    landed.assert_exactly_once()

    # The whole of Airflow, in the middle of curating: restarted, it finishes the work.
    landed.burst(2, rows=BIG, prefix="power-curating")
    airflow.wait_until(lambda: running_task(airflow, "ml_validate", "curate"), 180, "a curate task to run")
    time.sleep(1)
    crash_all(airflow)
    airflow.start()
    landed.wait_all_curated(airflow, timeout=300)
    landed.assert_exactly_once()


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
