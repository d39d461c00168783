"""The lifecycle under a REAL Airflow 3 (scheduler, DAG processor, triggerer, API server) and a real
MLflow server.

No dag.test(): a file dropped in the landing folder must start ml_ingest through the AssetWatcher,
Asset `raw` must start ml_validate, `curated` ml_train, `candidate` ml_promote, `champion` ml_deploy
and ml_batch_score, by themselves, and end in a served champion; then a drifted batch must start
ml_monitor, whose `drift_detected` starts a retraining, with no person involved.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import yaml

from mlfactory import storage

from mlfactory.data import sample_data
from mlfactory.config import DEFAULT_CONFIG, load_config
from mlfactory.backends.local.endpoint import LocalEndpoint
from mlfactory.serving.deployment import holdout_requests
from mlfactory.data.etl import read_quarantine
from mlfactory.backends.local.local_airflow import LocalAirflow
from mlfactory.backends.local.processes import free_port, stop_group

pytestmark = pytest.mark.scheduler


STAGES = ["ml_ingest", "ml_validate", "ml_train", "ml_promote", "ml_deploy", "ml_batch_score", "ml_monitor"]


def small_training_config(tmp_path, monkeypatch, mlflow_url: str):
    """The sample config with a short search (2 trials x 3 epochs, 2 DDP processes) and this test's MLflow."""
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["training"].update(epochs=3, trials=2, processes=2, search_space={"learning_rate": [0.003, 0.001]})
    raw["promotion"].update(floor=0.6)
    raw["mlflow"].update(tracking_uri=mlflow_url, experiment="scheduler-test", model_name="churn_scheduler")
    raw["serving"].update(canary_requests=20)
    raw["ingest"].update(sweep_schedule=None)  # events alone: a sweep run would change the counts below
    raw["local"] = {"port": free_port()}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MLFACTORY_CONFIG", str(path))
    return load_config()


def post_error(airflow: LocalAirflow, path: str, body: dict) -> tuple[int, str]:
    """What the API answers a POST. A 500 is asked again, twice: on SQLite, a request whose audit-log write
    waited out the 30 s lock timeout answers 500 whatever it asked (seen once in CI, while every Airflow
    component stalled on the lock for 30 s as ml_deploy and ml_batch_score started)."""
    for attempt in range(3):
        try:
            airflow.api(path, method="POST", body=body)
        except urllib.error.HTTPError as err:
            if err.code >= 500 and attempt < 2:
                time.sleep(2)
                continue
            return err.code, err.read().decode()
        return 200, ""
    raise AssertionError("unreachable")


def test_landing_runs_the_lifecycle_to_a_champion_by_itself(tmp_path, bucket, monkeypatch, mlflow_server,
                                                            airflow_db_template):
    from mlflow import MlflowClient

    cfg = small_training_config(tmp_path, monkeypatch, mlflow_server.url)
    airflow = LocalAirflow(tmp_path / "airflow", api_port=free_port(), env_overrides={"MLFACTORY_CONFIG": cfg.source},
                           db_template=airflow_db_template)
    airflow.start()
    try:
        airflow.wait_for_dags(STAGES)  # raises on any DAG import error
        # every client is an admin on loopback: only requests addressed to loopback by name are answered (a page
        # whose DNS name was rebound to 127.0.0.1 gets a 400, not the API)
        for host, status in (("127.0.0.1", 200), ("localhost", 200), ("rebound.example.com", 400)):
            request = urllib.request.Request(f"{airflow.url}/api/v2/dags?limit=1", headers={"Host": host})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    assert response.status == status, host
            except urllib.error.HTTPError as err:
                assert err.code == status, (host, err.code)

        # A good file: ingest, then validate, then curated Parquet.
        sample_data.write(sample_data.generate(2000, seed=21), bucket / "landing" / "good.csv")
        ingest = airflow.wait_for_run("ml_ingest", 1, timeout=120, run_type="asset_triggered")
        assert ingest["state"] == "success" and ingest["run_type"] == "asset_triggered"
        validate = airflow.wait_for_run("ml_validate", 1, timeout=180, run_type="asset_triggered")
        assert validate["state"] == "success" and validate["run_type"] == "asset_triggered"
        parts = [o for o in storage.list_objects(cfg.storage.curated_uri) if o.key.endswith(".parquet")]
        assert len(parts) == 1 and pq.read_metadata(storage.local_path(parts[0].uri)).num_rows == 2000
        events = airflow.asset_events()
        curated_events = [e for e in events if e["uri"] == cfg.storage.curated_uri]
        assert curated_events and curated_events[-1]["extra"]["curated_rows"] == 2000

        # Asset `curated` -> ml_train: a 2-trial search, one mapped torchrun job per trial, in the pool.
        train = airflow.wait_for_run("ml_train", 1, timeout=600, run_type="asset_triggered")
        assert train["state"] == "success" and train["run_type"] == "asset_triggered"
        tis = {(t["task_id"], t["map_index"]): t["state"] for t in airflow.task_instances("ml_train", train["dag_run_id"])}
        assert tis[("train", 0)] == tis[("train", 1)] == "success" and tis[("select_best", -1)] == "success"
        log = airflow.task_log("ml_train", train["dag_run_id"], "train", map_index=0)
        assert "--nproc-per-node=2" in log and "epoch 3/3" in log  # torchrun's output, streamed into the task log

        # Asset `candidate` -> ml_promote -> a champion in the MLflow registry.
        promote = airflow.wait_for_run("ml_promote", 1, timeout=300)
        assert promote["state"] == "success" and promote["run_type"] == "asset_triggered"
        client = MlflowClient(mlflow_server.url)
        champion = client.get_model_version_by_alias("churn_scheduler", "champion")
        assert champion.tags["mlfactory.decision"] == "promoted" and float(champion.tags["mlfactory.holdout_roc_auc"]) >= 0.6
        events = airflow.asset_events()
        champion_events = [e for e in events if e["uri"].endswith("/models/champion")]
        assert champion_events and champion_events[-1]["extra"]["version"] == champion.version

        # The trigger form's checks hold on the REST API too: a bad value is refused, naming the param.
        code, body = post_error(airflow, "/api/v2/dags/ml_train/dagRuns", {"logical_date": None, "conf": {"epochs": 0}})
        assert code == 400 and "epochs" in body

        # Asset `champion` -> ml_deploy (a served endpoint) and ml_batch_score (a predictions table).
        deploy = airflow.wait_for_run("ml_deploy", 1, timeout=300)
        assert deploy["state"] == "success" and deploy["run_type"] == "asset_triggered"
        endpoint = LocalEndpoint(cfg)
        assert endpoint.state()["served_version"] == champion.version
        rows = holdout_requests(cfg, 5)
        status, reply = endpoint.predict(rows)
        assert status == 200 and len(reply["predictions"]) == 5
        batch = airflow.wait_for_run("ml_batch_score", 1, timeout=300, run_type="asset_triggered")
        assert batch["state"] == "success"
        scored = airflow.xcom("ml_batch_score", batch["dag_run_id"], "score")
        assert scored["rows"] == 2000 and scored["version"] == champion.version

        # A drifted batch: ml_monitor (on `curated`) sees it and announces `drift_detected`, which
        # starts ml_train by itself; its MLflow runs record which features drifted.
        monitors = {r["dag_run_id"] for r in airflow.dag_runs("ml_monitor")}
        sample_data.write(sample_data.generate(2000, seed=23, drift=1.0, id_offset=10**9), bucket / "landing" / "drifted.csv")
        assert airflow.wait_for_run("ml_validate", 2, timeout=180, run_type="asset_triggered")["state"] == "success"

        def drift_check():
            for run in airflow.dag_runs("ml_monitor"):
                if run["dag_run_id"] not in monitors and run["state"] in ("success", "failed"):
                    return run
            return None

        monitor = airflow.wait_until(drift_check, 300, "ml_monitor to check the drifted batch")
        assert monitor["state"] == "success" and monitor["run_type"] == "asset_triggered"
        verdict = airflow.xcom("ml_monitor", monitor["dag_run_id"], "check_drift")
        assert verdict["drift"] and "curated" in verdict["drifted_sources"], verdict
        assert {"age", "income"} <= set(verdict["drifted_features"])
        report = verdict["sources"]["curated"]["report"]
        assert storage.exists(report) and "<svg" in storage.read_bytes(report).decode()
        assert "report: " + report in airflow.task_log("ml_monitor", monitor["dag_run_id"], "check_drift")

        experiment = client.get_experiment_by_name("scheduler-test").experiment_id

        def drift_retrain():
            runs = client.search_runs([experiment], filter_string="tags.`mlfactory.started_by` = 'drift'")
            return runs if len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs) else None

        runs = airflow.wait_until(drift_retrain, 900, "the drift-started training runs")
        assert {r.data.tags["mlfactory.drifted_features"] for r in runs} == {",".join(verdict["drifted_features"])}
        retrain_id = runs[0].data.tags["mlfactory.airflow_run_id"]
        # The drifted batch's own `curated` event did not train again: a champion exists, and ml_monitor judged it.
        assert len(client.search_runs([experiment], filter_string="tags.`mlfactory.started_by` = 'curated'")) == 2
        airflow.wait_until(lambda: next((r for r in airflow.dag_runs("ml_train") if r["dag_run_id"] == retrain_id
                                         and r["state"] == "success"), None), 300, "the retraining run")
        retrain = next(r for r in airflow.dag_runs("ml_train") if r["dag_run_id"] == retrain_id)

        def promote_of_retrain():
            return next((r for r in airflow.dag_runs("ml_promote") if (r["queued_at"] or "") > retrain["start_date"]
                         and r["state"] in ("success", "failed")), None)

        assert airflow.wait_until(promote_of_retrain, 600, "ml_promote of the retrained model")["state"] == "success"

        # The watermark survives a restart of the triggerer that runs the watcher (the kill -9 test restarts
        # each component): it comes back knowing the two landed files, lists the folder again, and announces nothing.
        triggerer_log = airflow.home / "logs" / "triggerer.log"
        before = triggerer_log.read_text()
        stop_group(airflow.processes["triggerer"])
        airflow.relaunch("triggerer")
        airflow.wait_until(lambda: "polling every" in triggerer_log.read_text()[len(before):], 120,
                           "the landing watcher to run again")
        restarted = triggerer_log.read_text()[len(before):]
        assert "(2 objects already announced)" in restarted.split("polling every", 1)[1].splitlines()[0]
        assert len(airflow.dag_runs("ml_ingest")) == 2
        raw_before = {o.key.split("/")[0] for o in storage.list_objects(cfg.storage.raw_uri) if o.key.endswith("data.csv")}

        # A bad file: ml_validate fails naming the expectation, quarantines rows, keeps the raw snapshot.
        bad = sample_data.generate(1000, seed=22).to_pandas()
        bad.loc[bad.index[::10], "age"] = 150  # 10% out of range, over the 5% limit
        sample_data.write(pa.Table.from_pandas(bad, preserve_index=False), bucket / "landing" / "bad.csv")
        assert airflow.wait_for_run("ml_ingest", 3, timeout=120, run_type="asset_triggered")["state"] == "success"
        # the listings since the restart found the new file, and announced none of the two from before it
        announced = [line for line in triggerer_log.read_text()[len(before):].splitlines() if "new object" in line]
        assert len(announced) == 1 and "bad.csv" in announced[0], announced
        assert len(airflow.dag_runs("ml_ingest")) == 3
        failed = airflow.wait_for_run("ml_validate", 3, timeout=180, run_type="asset_triggered")
        assert failed["state"] == "failed"
        tis = {t["task_id"]: t["state"] for t in airflow.task_instances("ml_validate", failed["dag_run_id"])}
        assert tis == {"snapshots": "success", "curate": "skipped", "report": "failed"}  # no `curated` event
        log = airflow.task_log("ml_validate", failed["dag_run_id"], "report")
        assert "expect_column_values_to_be_between failed on column 'age' for 100 of 1000 rows" in log
        snapshots = [o for o in storage.list_objects(cfg.storage.raw_uri) if o.key.endswith("data.csv")]
        assert len(snapshots) == 3  # every raw snapshot kept
        bad_sid = next(s.key.split("/")[0][:16] for s in snapshots if s.key.split("/")[0] not in raw_before)
        quarantined = read_quarantine(f"{cfg.storage.quarantine_uri}/snapshot={bad_sid}")
        assert quarantined.num_rows == 100
        assert set(quarantined.column("_failed_expectation").to_pylist()) == {"expect_column_values_to_be_between"}
    finally:
        airflow.stop()
        LocalEndpoint(cfg).stop()
