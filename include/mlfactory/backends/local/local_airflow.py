"""Airflow 3 on this machine: the scheduler, DAG processor, triggerer and API server, for ``make run`` and
the integration tests (whichever backend the pipeline config names).

``make run`` and the integration tests start Airflow through this one class, so what the tests
exercise is what a user runs. Every process binds 127.0.0.1, runs in its own process group (the
scheduler's workers ignore SIGTERM sent to the parent alone) and is stopped with its children. One that
dies once Airflow is up is started again (``revive``), a few times, with the end of its log on stderr. The
pool that training jobs run in is created from the pipeline config (``training.pool``, sized
``training.concurrent_jobs``).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from mlfactory.backends.local.processes import log_tail, signal_group, stop_group
from mlfactory.config import PROJECT
from mlfactory.storage import private_file

SQLITE_CONNECT_ARGS = {"timeout": 30}  # Airflow's metadata database: seconds a writer waits for the lock
# What the tasks import. The scheduler imports them once, before its LocalExecutor forks the workers that
# fork each task, so a task starts with them loaded instead of importing them again (about 3-10 s per task,
# measured: Great Expectations 4.9 s, torch 2.7 s, MLflow 1.6 s, pandas/pyarrow 1.0 s); none starts a thread.
# torch._dynamo: torch imports it at a process's first optimizer (1.4 CPU-s), in every training job forked from a task.
TASK_LIBRARIES = ("pandas", "pyarrow.parquet", "pyarrow.dataset", "fsspec", "mlflow.pyfunc", "great_expectations",
                  "torch", "torch._dynamo", "sklearn.metrics", "mlfactory.data.etl", "mlfactory.registry",
                  "mlfactory.training.data", "mlfactory.monitoring.monitor", "mlfactory.serving.deployment")
LOCAL_SETTINGS = f'''"""Written by {__name__} on every start: the process that forks the tasks (the scheduler's
LocalExecutor, a Celery worker) preloads what they import."""
import sys

if sys.argv[1:2] == ["scheduler"] or sys.argv[1:3] == ["celery", "worker"]:
    import importlib

    for name in {TASK_LIBRARIES!r}:
        importlib.import_module(name)
'''
# The scheduler and triggerer would also start log servers on every interface; on one machine the
# API server reads the log files directly, so they are not started and nothing listens beyond loopback.
COMPONENTS = {
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
    "api-server": ["api-server"],
}
HOSTNAME_ENV = "MLFACTORY_HOSTNAME"
# A component that dies once Airflow is up (a crash, the OOM killer) is started again, as a process supervisor
# would (systemd's Restart=on-failure, a container's restart policy), this many times; then its death is an error.
MAX_RESTARTS = 3


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: it may resolve anywhere
        return False


def hostname() -> str:
    """``[core] hostname_callable``: the name a task instance records as where it ran. Several Celery workers
    on one machine each set their own (``MLFACTORY_HOSTNAME``); elsewhere the machine's name, as Airflow's default."""
    import socket

    return os.environ.get(HOSTNAME_ENV) or socket.getfqdn()


def _fernet_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


@dataclass
class LocalAirflow:
    home: Path
    api_port: int = 8080
    # The API server's (and UI's) interface. Anything but loopback turns ``login`` on: no process reachable
    # from another machine hands out admin without a password.
    host: str = "127.0.0.1"
    env_overrides: dict[str, str] = field(default_factory=dict)
    # A migrated metadata database to start from (copied): migrating a new SQLite file costs ~10 s. When the
    # file does not exist yet, this instance migrates its own database and leaves a copy there.
    db_template: Path | None = None
    # A metadata database other than this home's SQLite file (a SQLAlchemy URL: PostgreSQL for the CeleryExecutor)
    database_url: str | None = None
    # CeleryExecutor: {worker name: its queues, comma-separated}, one `airflow celery worker` each, with its
    # name as the hostname its task instances record; the broker at broker_url. Empty: the LocalExecutor.
    workers: dict[str, str] = field(default_factory=dict)
    broker_url: str | None = None
    # A login for the UI and the REST API (the Simple Auth Manager's `admin`, with a generated password kept
    # beside the database, mode 600) instead of every client an admin without one.
    login: bool = False
    _jwt: str = field(default="", repr=False)
    _token_at: float = field(default=-1e9, repr=False)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    # components killed without their children (the tests' kill -9): their orphans live on in their process groups
    crashed: list[subprocess.Popen] = field(default_factory=list)
    migrated: bool = False
    restarts: dict[str, int] = field(default_factory=dict)  # component -> times it died and was started again
    up: bool = False  # started: from here on a component that dies is started again (``revive``)

    def __post_init__(self):
        bound = self.env_overrides.get("AIRFLOW__API__HOST", self.host)
        if not is_loopback(bound):
            self.login = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict[str, str]:
        self.home.mkdir(parents=True, exist_ok=True)
        jwt_secret = private_file(self.home / "jwt_secret", lambda: secrets.token_hex(64))
        # One Fernet key for every process, written before any of them starts: left to Airflow, each process
        # that finds no airflow.cfg writes one with a key of its own, and a trigger encrypted by the DAG
        # processor cannot be read by the triggerer.
        private_file(self.home / "airflow.cfg", lambda: f"[core]\nfernet_key = {_fernet_key()}\n")
        bin_dir = str(Path(sys.executable).parent)
        env = {
            # not the MLflow run or experiment of the process that starts Airflow (mlflow.set_experiment exports
            # MLFLOW_EXPERIMENT_ID for subprocesses): tasks and their training jobs name their own
            **{k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")},
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor" if self.workers else "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",  # each LocalExecutor worker costs ~40 MB; 2 cores here
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": f"{__name__}.hostname",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.database_url or f"sqlite:///{self.home / 'airflow.db'}",
            "AIRFLOW__API__HOST": self.host,
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": jwt_secret,
            # The UI and API on loopback need no login on a developer's own machine, unless asked for.
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": str(not self.login),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            # An idle scheduler loop sleeps this long (1 s by default): each task of a run and each run an asset
            # event starts waits for the next loop, ~20 times from landing to a served champion.
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            # A task's calls to the API server: on 2 busy cores (Airflow starting, training running) the
            # default 5 s timeout was seen to fail a task at startup.
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
            # ... and how often it retries one that found no API server, waiting ~1, 2, 4 ... s at random: 5 tries
            # (the default) give up within ~10 s, before an API server that died is up again (~20 s, ``revive``)
            "AIRFLOW__WORKERS__EXECUTION_API_RETRIES": "10",
            # A task's worker notices its exit at the next heartbeat check when the process is still tearing
            # down (the preloaded libraries take ~1-2 s) after closing its sockets: 5 s (the default) on every
            # task, and a deferring try reported seconds after its trigger fired.
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
            # A task whose process died (kill -9, out of memory) is failed, and retried, this long after its last
            # heartbeat instead of 5 minutes: the heartbeat comes every second.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
            # After a crash of the whole of Airflow, the restarted scheduler takes over the dead one's tasks
            # (and runs them again) within a minute instead of five.
            "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "60",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "GX_ANALYTICS_ENABLED": "False",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",  # tasks and training jobs send MLflow's usage reports nowhere
            "NO_PROXY": "127.0.0.1,localhost",
            "PYTHONFAULTHANDLER": "1",  # a process that crashes in C code (SIGSEGV) leaves its Python stack in its log
        }
        if self.login:
            env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] = "admin:admin"
            env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] = str(self._passwords_file())
        if not self.database_url:
            # SQLite has one writer at a time: a write waits this long for the lock (sqlite3's default, 5 s, was
            # seen to fail an API request with "database is locked" while the scheduler was busy)
            env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"] = f"{__name__}.SQLITE_CONNECT_ARGS"
        if self.workers:
            if not (self.database_url and self.broker_url):
                raise ValueError("the CeleryExecutor (workers) needs a database_url (PostgreSQL) and a broker_url (Redis)")
            env.update({
                "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
                "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.database_url.replace("+psycopg2", ""),
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
                # a task queued to a worker that died before it started is queued again after this, not 10 min
                "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "90",
            })
        env.update(self.env_overrides)
        return env

    def _passwords_file(self) -> Path:
        path = self.home / "passwords.json"
        private_file(path, lambda: json.dumps({"admin": secrets.token_urlsafe(16)}))
        return path

    @property
    def admin_password(self) -> str:
        """The password of user `admin` (``login``)."""
        return json.loads(self._passwords_file().read_text())["admin"]

    def components(self) -> dict[str, list[str]]:
        """Each process to start: the four of every Airflow, and one Celery worker per entry of ``workers``."""
        workers = {
            f"worker-{name}": ["celery", "worker", "--queues", queues, "--celery-hostname", f"{name}@%h",
                               "--skip-serve-logs"]  # the API server reads the task logs from this machine's disk
            for name, queues in self.workers.items()
        }
        return {**COMPONENTS, **workers}

    def start(self, timeout: float = 120) -> LocalAirflow:
        self.up = False  # a component that dies while starting is an error at once, not restarted
        env = self.env()
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        (self.home / "config").mkdir(exist_ok=True)  # on every Airflow process's path: airflow_local_settings
        (self.home / "config" / "airflow_local_settings.py").write_text(LOCAL_SETTINGS)
        self._migrate(env)
        for name in self.components():
            self._launch(name, env)
        try:
            self.wait_until(lambda: self._get("/api/v2/version") is not None, timeout, "the API server to answer")
            self._training_pool(env)
            # the Task Execution API builds its routes on its first request (~4 s): made here, while the DAG
            # processor parses, not by the first task of the first run
            self.wait_until(lambda: self._get("/execution/health") is not None, timeout, "the Task Execution API")
        except BaseException:
            self.stop()  # a component that died at start must not leave the others running
            raise
        self.up = True
        return self

    def _launch(self, name: str, env: dict[str, str]) -> None:
        if name.startswith("worker-"):
            env = {**env, HOSTNAME_ENV: name.removeprefix("worker-")}
        with open(self.home / "logs" / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "airflow", *self.components()[name]],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own group, so stop() reaches the workers too
                cwd=self.home,
            )

    def relaunch(self, name: str) -> None:
        """Start one component again (after it died)."""
        self._launch(name, self.env())

    def revive(self) -> None:
        """Start again each component that died. Before Airflow is up, or after a component's MAX_RESTARTS, a
        death is a RuntimeError naming the component, its exit status and the end of its log."""
        for name, proc in list(self.processes.items()):
            if proc.poll() is None:
                continue
            log = self.home / "logs" / f"{name}.log"
            died = f"airflow {name} exited with {proc.returncode}" + log_tail(log)
            restarts = self.restarts.get(name, 0) + 1
            if not self.up or restarts > MAX_RESTARTS:
                raise RuntimeError(died)
            self.restarts[name] = restarts
            print(f"{died}\n-- started again ({restarts} of {MAX_RESTARTS})", file=sys.stderr, flush=True)
            self.crashed.append(proc)  # what it left running (a scheduler's executor workers) is stopped with the rest
            self.relaunch(name)

    def _migrate(self, env: dict[str, str]) -> None:
        database = self.home / "airflow.db"
        if self.migrated:  # a restart of this instance: its database is current
            return
        template = None if self.database_url else self.db_template  # a SQLite file to copy, or to leave a copy of
        if template is not None and template.exists() and not database.exists():
            shutil.copyfile(template, database)
        else:
            subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True)
            if template is not None and not template.exists():
                shutil.copyfile(database, template)
        if not self.database_url:
            # Write-ahead logging: readers never block the writer, nor the writer the readers. In SQLite's default
            # rollback journal a commit waits for every reader, and the writes of a restart (tasks starting, the
            # pool, the scheduler) were seen to hold one another up for the whole lock timeout.
            with closing(sqlite3.connect(database)) as db:
                db.execute("PRAGMA journal_mode=WAL")
        self.migrated = True

    def _training_pool(self, env: dict[str, str]) -> None:
        """The pool of the training jobs, as the pipeline config this Airflow runs with says."""
        from mlfactory.config import CONFIG_ENV, load_config

        training = load_config(env.get(CONFIG_ENV)).training
        pool = {"name": training.pool, "slots": training.concurrent_jobs,
                "description": "training jobs running at once (training.concurrent_jobs; locally, the stand-in for a GPU quota)",
                "include_deferred": True}  # a deferred cloud job still holds its GPUs
        try:
            self.api("/api/v2/pools", method="POST", body=pool)
        except urllib.error.HTTPError as err:
            if err.code != 409:
                raise
            self.api(f"/api/v2/pools/{training.pool}", method="PATCH", body=pool)

    def stop(self, grace: float = 15) -> None:
        for proc in self.processes.values():
            signal_group(proc, signal.SIGTERM)  # all at once, then wait: each gets the same grace
        deadline = time.monotonic() + grace
        for proc in self.processes.values():
            stop_group(proc, max(deadline - time.monotonic(), 0.1))  # the group: scheduler workers outlive their parent
        self.processes.clear()
        for proc in self.crashed:  # what a crashed component left running (a scheduler's executor workers)
            signal_group(proc, signal.SIGKILL)
        self.crashed.clear()

    def __enter__(self) -> LocalAirflow:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- the REST API -------------------------------------------------------------------------

    def _get(self, path: str) -> dict | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def _token(self) -> str:
        """`admin`'s JWT for the REST API (``login``), fetched once an hour."""
        if time.monotonic() - self._token_at > 3600:
            body = json.dumps({"username": "admin", "password": self.admin_password}).encode()
            request = urllib.request.Request(self.url + "/auth/token", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                self._jwt, self._token_at = json.loads(response.read())["access_token"], time.monotonic()
        return self._jwt

    def api(self, path: str, method: str = "GET", body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.login:
            headers["Authorization"] = f"Bearer {self._token()}"
        request = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers=headers,
        )
        # longer than the API server's own wait for SQLite's write lock (SQLITE_CONNECT_ARGS, 30 s): a busy
        # database answers late, or with its error, but never as a client-side timeout
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read() or b"{}")

    def listing(self, path: str, key: str) -> list[dict]:
        """Every entry of an API collection (``key`` of its answers), a page at a time: the API answers 100 at most."""
        entries: list[dict] = []
        separator = "&" if "?" in path else "?"
        while True:
            page = self.api(f"{path}{separator}limit=100&offset={len(entries)}")
            entries += page.get(key, [])
            if not page.get(key) or len(entries) >= page.get("total_entries", 0):
                return entries

    def dag_runs(self, dag_id: str) -> list[dict]:
        return self.listing(f"/api/v2/dags/{dag_id}/dagRuns?order_by=start_date", "dag_runs")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        quoted = urllib.request.quote(run_id, safe="")
        return self.listing(f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances", "task_instances")

    def task_log(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1, try_number: int = 1) -> str:
        quoted = urllib.request.quote(run_id, safe="")
        path = f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances/{task_id}/logs/{try_number}?map_index={map_index}"
        content = self.api(path).get("content", [])
        return "\n".join(json.dumps(c) if not isinstance(c, str) else c for c in content)

    def links(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, str | None]:
        """A task's extra links (``operator_extra_links``): name -> URL."""
        quoted = urllib.request.quote(run_id, safe="")
        path = f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances/{task_id}/links?map_index={map_index}"
        return self.api(path)["extra_links"]

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value"):
        """A task's XCom value, or None when it has none (skipped, failed, not run yet)."""
        quoted = urllib.request.quote(run_id, safe="")
        try:
            return self.api(f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances/{task_id}/xcomEntries/{key}?deserialize=true")["value"]
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise

    def asset_events(self, timeout: float = 120) -> list[dict]:
        """Every asset event, oldest first. Airflow 3.3.2 answers 500 while an event's queued run has no
        start_date yet (AssetEventResponse.created_dagruns.start_date is not optional): retry until it has."""

        def fetch():
            try:
                return self.listing("/api/v2/assets/events?order_by=timestamp", "asset_events")
            except urllib.error.HTTPError as err:
                if err.code != 500:
                    raise
                return None

        return self.wait_until(fetch, timeout, "the asset events listing")

    def wait_until(self, condition, timeout: float, what: str, interval: float = 1.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.revive()
            value = condition()
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; logs in {self.home}/logs")

    def wait_for_dags(self, dag_ids, timeout: float = 120) -> None:
        """Wait until every DAG in ``dag_ids`` is parsed; a DAG import error fails at once, with its trace."""

        def parsed() -> bool:
            errors = self.api("/api/v2/importErrors").get("import_errors", [])
            if errors:
                raise RuntimeError("DAG import errors:\n" + "\n".join(e["stack_trace"] for e in errors))
            return set(dag_ids) <= {d["dag_id"] for d in self.listing("/api/v2/dags", "dags")}

        self.wait_until(parsed, timeout, f"DAGs {sorted(dag_ids)} to be parsed")

    def wait_for_run(self, dag_id: str, count: int, timeout: float = 120, run_type: str | None = None) -> dict:
        """Wait until ``dag_id`` has at least ``count`` finished runs (of ``run_type``, when given);
        returns the latest started one of them."""

        def finished():
            runs = [r for r in self.dag_runs(dag_id) if run_type is None or r["run_type"] == run_type]
            done = [r for r in runs if r["state"] in ("success", "failed")]
            # the latest started of the FINISHED runs: a later run may already be going (a second event's; it
            # finds nothing left to do), and a test must not read that one's state as the result
            return max(done, key=lambda r: r["start_date"] or "") if len(done) >= count else None

        run = self.wait_until(finished, timeout, f"{count} finished {run_type or ''} run(s) of {dag_id}")
        if run["state"] == "failed":
            print(self.failure_report(dag_id, run))  # shown with the test's failure: the reason, not only "failed"
        return run

    def failure_report(self, dag_id: str, run: dict, lines: int = 60) -> str:
        """The last lines of the log of each failed task instance of a run."""
        report = [f"{dag_id} run {run['dag_run_id']} {run['state']}"]
        for ti in self.task_instances(dag_id, run["dag_run_id"]):
            if ti["state"] not in ("failed", "upstream_failed"):
                continue
            report.append(f"--- {ti['task_id']}[{ti['map_index']}] {ti['state']} (try {ti['try_number']}, {ti.get('hostname')})")
            if ti["state"] == "failed":
                log = self.task_log(dag_id, run["dag_run_id"], ti["task_id"], ti["map_index"], max(ti["try_number"], 1))
                report.extend(log.splitlines()[-lines:])
        return "\n".join(report)
