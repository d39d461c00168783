"""`make run`: the whole lifecycle on the embedded `local` backend, by itself, end to end.

Starts the MLflow server (SQLite, artifacts in the bucket) and Airflow (scheduler, DAG processor,
triggerer, API server) on 127.0.0.1, then tells the story while the DAGs run by themselves:

1. lands a sample batch (or, with ``MLFACTORY_DATA``, the user's files) → ml_ingest → ml_validate →
   ml_train → ml_promote → ml_deploy: a served champion (and ml_batch_score writes its predictions table);
2. sends traffic to the endpoint;
3. (the sample only) lands a drifted batch → ml_monitor sees the drift → `drift_detected` → ml_train →
   ml_promote's decision → ml_deploy when the new model wins.

It prints where to look and keeps everything up until Ctrl-C. With ``MLFACTORY_EXIT_WHEN_DONE=1`` it
stops the services when the story is done and writes ``.mlfactory/run-summary.json`` (every DAG run
and its state, champion versions before and after, the endpoint's answer to a sample request, drift
verdicts, timings); the exit code is 0 only if every step succeeded.

    MLFACTORY_CONFIG         pipeline config (default include/pipeline.yaml, the sample's)
    MLFACTORY_DATA           your data files or folders (space-separated) to land instead of the sample;
                             the config must describe them (`mlfactory init` writes one)
    MLFACTORY_ROWS           rows of the first sample batch (default 100000; the drifted one has half)
    MLFACTORY_PORT           Airflow API/UI port (default 8080)
    MLFLOW_PORT              MLflow port (default 5000; the config's mlflow.tracking_uri must point at it)
    MLFACTORY_EXIT_WHEN_DONE 1: stop and exit when the story is done
    MLFACTORY_STATE_DIR      where .airflow, .mlflow and .mlfactory/run-summary.json go (default: the project)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from mlfactory import BadInput, storage

from mlfactory.data import sample_data
from mlfactory.backends.local import LocalSettings
from mlfactory.config import load_config
from mlfactory.backends.local.local_airflow import PROJECT, LocalAirflow
from mlfactory.backends.local.mlflow_server import LocalMlflow

STATE_DIR = Path(os.environ.get("MLFACTORY_STATE_DIR") or PROJECT)
SUMMARY = STATE_DIR / ".mlfactory" / "run-summary.json"
DAGS = ("ml_ingest", "ml_validate", "ml_train", "ml_promote", "ml_deploy", "ml_batch_score", "ml_monitor")
TIMEOUT = 3600


class Story:
    """Follows the DAG runs that the landed files start, and records them for the summary."""

    def __init__(self, airflow: LocalAirflow):
        self.airflow = airflow
        self.runs: list[dict] = []
        self.ok = True
        self.started = time.monotonic()

    def known(self, dag: str) -> set[str]:
        return {r["dag_run_id"] for r in self.airflow.dag_runs(dag)}

    def next_run(self, dag: str, seen: set[str], timeout: float = TIMEOUT, started_by: str | None = None,
                 after: str = "") -> dict:
        """Wait for a run of ``dag`` not in ``seen`` (and queued after ``after``) to finish; for ml_train,
        one whose ``prepare`` says it was started by ``started_by``."""

        def finished():
            for run in self.airflow.dag_runs(dag):
                if run["dag_run_id"] in seen or run["run_type"] not in ("asset_triggered", "manual"):
                    continue
                if (run.get("queued_at") or run.get("start_date") or "") < after:
                    continue
                if run["state"] not in ("success", "failed"):
                    continue
                if started_by:
                    prepared = self.airflow.xcom(dag, run["dag_run_id"], "prepare") or {}
                    if prepared.get("started_by") != started_by:
                        seen.add(run["dag_run_id"])
                        continue
                return run
            return None

        run = self.airflow.wait_until(finished, timeout, f"a new run of {dag}")
        seen.add(run["dag_run_id"])
        seconds = _seconds(run)
        self.runs.append({"dag": dag, "run_id": run["dag_run_id"], "state": run["state"], "run_type": run["run_type"],
                          "seconds": seconds})
        print(f"  {dag:<15} {run['state']:<8} {seconds:>6.0f}s  {run['dag_run_id']}", flush=True)
        return run

    def step(self, dag: str, seen: set[str], **kwargs) -> bool:
        run = self.next_run(dag, seen, **kwargs)
        if run["state"] != "success":
            self.ok = False
            print(f"    {dag} failed: see {self.airflow.url}/dags/{dag}/runs/{run['dag_run_id']}", flush=True)
        return run["state"] == "success"


def _seconds(run: dict) -> float:
    if not run.get("start_date") or not run.get("end_date"):
        return 0.0
    start, end = (datetime.fromisoformat(run[k].replace("Z", "+00:00")) for k in ("start_date", "end_date"))
    return round((end - start).total_seconds(), 1)


def check_data(cfg, data: str) -> list[str]:
    """The files ``MLFACTORY_DATA`` names, checked against the config before anything starts: a file of a
    format ingestion refuses, or whose columns are not the config's, is named now, not after an ml_validate
    failure. Without data, the config must be the sample's: the sample is never landed into another dataset."""
    import shlex

    from mlfactory.config import DEFAULT_CONFIG
    from mlfactory.data.schema_inference import data_files, read_sample

    if not data:
        if cfg.dataset != load_config(DEFAULT_CONFIG).dataset:
            raise BadInput(f"{cfg.source} describes dataset {cfg.dataset.name!r}, not the sample's: name your files, "
                           f"`make run DATA=<files or folder> CONFIG={cfg.source}`")
        return []
    files = data_files(shlex.split(data))
    expected = [c.name for c in cfg.dataset.columns]
    for path in files:
        found = list(read_sample([path], 1, cfg.dataset.csv_delimiter))
        missing, extra = [c for c in expected if c not in found], [c for c in found if c not in expected]
        if missing or extra:
            raise BadInput(f"{path} does not match dataset {cfg.dataset.name!r} of {cfg.source}: "
                           + "; ".join(part for part in (missing and f"missing column(s) {missing}",
                                                         extra and f"column(s) {extra} not in the config") if part)
                           + f". `mlfactory init {path} --target <column>` writes a config for it.")
    return files


def land_files(cfg, files: list[str]) -> None:
    """Copies the user's files into the landing folder, each published whole (a hidden name, then a rename)."""
    import shutil

    landing = Path(storage.local_path(cfg.storage.landing_uri))
    landing.mkdir(parents=True, exist_ok=True)
    names = [Path(path).name for path in files]
    for i, path in enumerate(files):  # two files of one name (from two folders) must not replace each other
        target = landing / (names[i] if names.count(names[i]) == 1 else f"{i:03d}-{names[i]}")
        tmp = landing / f".{target.name}.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
        print(f"\nlanded {path} ({target.stat().st_size:,} bytes) at {target}", flush=True)


def land(cfg, rows: int, seed: int, drift: float, name: str) -> Path:
    landing = Path(storage.local_path(cfg.storage.landing_uri))
    target = landing / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    sample_data.write(sample_data.generate(rows, seed=seed, drift=drift, id_offset=seed * 10**9), target)
    print(f"\nlanded {rows} {'drifted ' if drift else ''}sample rows at {target}", flush=True)
    return target


def tell(cfg, airflow: LocalAirflow, summary: dict, files: list[str]) -> bool:
    from mlfactory.backends.local.endpoint import LocalEndpoint
    from mlfactory.serving.deployment import holdout_requests
    from mlfactory.registry import CHAMPION, Registry

    story = Story(airflow)
    registry = Registry(cfg)
    endpoint = LocalEndpoint(cfg)
    summary["champion_before"] = registry.alias_version(CHAMPION)  # None also before the model is registered
    seen = {dag: story.known(dag) for dag in DAGS}
    rows = int(os.environ.get("MLFACTORY_ROWS", "100000"))
    seed = int(time.time()) % 1000

    # 1. A first batch (the user's files, or the sample's), to a served champion.
    t0 = time.monotonic()
    if files:
        land_files(cfg, files)
    else:
        land(cfg, rows, seed, 0.0, "customers")
    chain = ["ml_ingest", "ml_validate", "ml_train", "ml_promote"]
    if not all(story.step(dag, seen[dag]) for dag in chain):
        return _done(story, summary, registry)
    summary["first_decision"] = decision_of(airflow, story.runs[-1]["run_id"])
    champion = registry.alias_version(CHAMPION)
    if summary["champion_before"] != champion:
        story.step("ml_deploy", seen["ml_deploy"])
    summary["timings"] = {"landing_to_serving_s": round(time.monotonic() - t0, 1)}
    story.step("ml_batch_score", seen["ml_batch_score"])

    # 2. Traffic to the endpoint.
    state = endpoint.state()
    sample = holdout_requests(cfg, 3)
    status, answer = endpoint.predict(sample[:1])
    summary["endpoint"] = {"url": endpoint.url, "served_version": state.get("served_version"),
                           "token_file": str(endpoint.home / "token") if not cfg.backend.token else "(local.token)",
                           "sample_request": {"dataframe_records": sample[:1]}, "status": status, "answer": answer}
    print(f"\nendpoint {endpoint.url} serves v{state.get('served_version')}: {status} {json.dumps(answer)}", flush=True)
    if status != 200:
        story.ok = False
    rows_sent = 0
    for _ in range(100):
        status, _ = endpoint.predict(sample)
        rows_sent += len(sample) if status == 200 else 0
    print(f"sent {rows_sent} rows in 100 requests to {endpoint.url}/invocations", flush=True)
    if files:  # the drift act needs a drifted batch of the same data: the sample's generator makes one
        print(f"\nml_monitor judges each new batch you drop into {storage.local_path(cfg.storage.landing_uri)}",
              flush=True)
        return _done(story, summary, registry)

    # 3. A drifted batch: drift detected -> retrain -> promotion decision -> redeploy.
    seen = {dag: story.known(dag) for dag in DAGS}  # runs of the first batch (some may still run) are not this story's
    t1 = time.monotonic()
    land(cfg, max(rows // 2, 2000), seed + 1, 1.0, "customers-drifted")
    for dag in ("ml_ingest", "ml_validate"):
        if not story.step(dag, seen[dag]):
            return _done(story, summary, registry)
    monitor = story.next_run("ml_monitor", seen["ml_monitor"])
    verdict = airflow.xcom("ml_monitor", monitor["dag_run_id"], "check_drift") or {}
    summary["drift"] = verdict
    if monitor["state"] != "success" or not verdict.get("drift"):
        story.ok = False
        print(f"    ml_monitor saw no drift: {json.dumps(verdict.get('sources'))[:500]}", flush=True)
        return _done(story, summary, registry)
    print(f"    drift in {verdict['drifted_sources']}: {verdict['drifted_features']}", flush=True)
    for result in verdict["sources"].values():
        if result.get("report"):
            print(f"    report: {result['report']}", flush=True)
    retrain = story.next_run("ml_train", seen["ml_train"], started_by="drift")
    if retrain["state"] != "success":
        story.ok = False
        return _done(story, summary, registry)
    promote = story.next_run("ml_promote", seen["ml_promote"], after=retrain["start_date"])
    decision = summary["retrain_decision"] = decision_of(airflow, promote["dag_run_id"])
    print(f"    decision on v{decision.get('version')}: {'PROMOTE' if decision.get('promote') else 'keep the champion'}"
          f" — {decision.get('reason')}", flush=True)
    if promote["state"] != "success":
        story.ok = False
    elif decision.get("promote"):
        story.step("ml_deploy", seen["ml_deploy"], after=promote["start_date"])
    summary["timings"]["drift_to_decision_s"] = round(time.monotonic() - t1, 1)
    summary["endpoint"]["served_version_after"] = endpoint.state().get("served_version")
    return _done(story, summary, registry)


def decision_of(airflow: LocalAirflow, promote_run_id: str) -> dict:
    """ml_promote's decision: the version, promoted or not and why, the metric, challenger and champion on
    the frozen holdout."""
    decision = airflow.xcom("ml_promote", promote_run_id, "evaluate") or {}
    return {k: decision.get(k) for k in ("version", "promote", "reason", "metric", "challenger", "champion")}


def _done(story: Story, summary: dict, registry) -> bool:
    from mlfactory.registry import CHAMPION

    summary["runs"] = story.runs
    summary["ok"] = story.ok
    summary.setdefault("timings", {})["total_s"] = round(time.monotonic() - story.started, 1)
    try:
        summary["champion_after"] = registry.alias_version(CHAMPION)
    except Exception as err:  # noqa: BLE001 - the summary is still written
        summary["champion_after"] = f"unknown: {err}"
    return story.ok


def main() -> int:
    cfg = load_config()
    if not isinstance(cfg.backend, LocalSettings) or not storage.is_local(cfg.storage.bucket):
        print(f"make run drives the local backend; {cfg.source} says backend {cfg.backend.name} bucket {cfg.storage.bucket}")
        return 2
    mlflow = LocalMlflow(STATE_DIR / ".mlflow", cfg.storage.mlflow_artifacts_uri,
                         port=int(os.environ.get("MLFLOW_PORT", "5000")))
    if mlflow.url != cfg.mlflow.tracking_uri.rstrip("/"):
        print(f"mlflow.tracking_uri in {cfg.source} is {cfg.mlflow.tracking_uri}; make run serves MLflow at {mlflow.url}")
        return 2
    from mlfactory.backends.local.endpoint import LocalEndpoint

    # MLFACTORY_HOST=0.0.0.0 (or an address) serves the UI to other machines: then with a login (user admin,
    # its generated password in .airflow/passwords.json, mode 600)
    airflow = LocalAirflow(STATE_DIR / ".airflow", api_port=int(os.environ.get("MLFACTORY_PORT", "8080")),
                           host=os.environ.get("MLFACTORY_HOST", "127.0.0.1"))
    access = (f"user admin, password in {airflow.home / 'passwords.json'}" if airflow.login
              else "no login: it listens on 127.0.0.1 only")
    endpoint = LocalEndpoint(cfg)
    exit_when_done = os.environ.get("MLFACTORY_EXIT_WHEN_DONE", "") not in ("", "0", "false")
    summary: dict = {"started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": cfg.source,
                     "dataset": cfg.dataset.name}
    try:
        files = check_data(cfg, os.environ.get("MLFACTORY_DATA", ""))
    except BadInput as err:
        print(f"make run: {err}", flush=True)
        return 2
    summary["data"] = files or "the sample"
    ok = False
    print(f"starting MLflow in {mlflow.home} and Airflow in {airflow.home} (logs in {airflow.home}/logs) ...", flush=True)
    mlflow.launch()  # both take ~20 s to come up: side by side
    try:
        airflow.start()
        mlflow.wait_ready()
        print(f"Airflow UI: {airflow.url} ({access})   MLflow UI: {mlflow.url}", flush=True)
        airflow.wait_for_dags(DAGS)
        ok = tell(cfg, airflow, summary, files)
        print(f"""
{'the story is done' if ok else 'a step FAILED (see above)'}. Where to look:
  Airflow UI        {airflow.url}   (DAGs ml_*; {access})
  MLflow UI         {mlflow.url}/#/models/{cfg.model_name}   (champion v{summary.get('champion_after')})
  endpoint          {endpoint.url}/invocations   (client token in {endpoint.home / 'token'}; state in {endpoint.state_file})
  drift reports     {storage.join(cfg.storage.reports_uri, 'drift')}
  predictions       {cfg.storage.predictions_uri}
  landing folder    {storage.local_path(cfg.storage.landing_uri)}   (drop CSV, TSV, Parquet or JSON Lines files here, also .gz/.bz2/.zst)""", flush=True)
        if not exit_when_done:
            print("\nEverything keeps running. Ctrl-C stops it.", flush=True)
            while True:  # a component that dies meanwhile is started again (LocalAirflow.revive)
                airflow.revive()
                time.sleep(5)
    except KeyboardInterrupt:
        pass
    except Exception as err:  # noqa: BLE001 - recorded in the summary, then the services stop
        summary["error"] = f"{type(err).__name__}: {err}"
        print(f"make run failed: {summary['error']}", flush=True)
        ok = False
    finally:
        print("stopping the endpoint, Airflow and MLflow ...", flush=True)
        endpoint.stop()
        airflow.stop()
        mlflow.stop()
        summary["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        SUMMARY.parent.mkdir(parents=True, exist_ok=True)
        SUMMARY.write_text(json.dumps(summary, indent=2, default=str))
        print(f"summary: {SUMMARY}", flush=True)
    return 0 if ok else 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
