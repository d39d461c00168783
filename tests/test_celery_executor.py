"""The lifecycle under Airflow's CeleryExecutor, as docker-compose.yaml runs it, on this machine without
containers: PostgreSQL 15 as the metadata database and Celery's result backend, Redis as the broker, the
four Airflow components and two Celery workers with their own hostnames: `default` on the default queue,
`gpu` on the `gpu` queue that training tasks are routed to (``training.queue``, from
``MLFACTORY_TRAINING_QUEUE`` as in docker-compose.yaml).

A landed file runs ml_ingest → ml_validate → ml_train → ml_promote → ml_deploy → ml_batch_score by
itself. While a training task runs, the `gpu` worker dies with everything under it (kill -9, as a node
or container lost); it comes back, the task is retried there from its checkpoint, and no task is lost.
"""

from __future__ import annotations

import pytest
import yaml

from airflow_faults import crash_tree
from celery_servers import postgres, redis
from mlfactory.data import sample_data
from mlfactory.backends.local.endpoint import LocalEndpoint
from mlfactory.config import DEFAULT_CONFIG, TRAINING_QUEUE_ENV, load_config
from mlfactory.backends.local.local_airflow import LocalAirflow
from mlfactory.backends.local.processes import free_port

pytestmark = pytest.mark.scheduler

STAGES = ["ml_ingest", "ml_validate", "ml_train", "ml_promote", "ml_deploy", "ml_batch_score"]


def test_the_lifecycle_runs_on_two_celery_workers_training_on_the_gpu_queue_and_survives_losing_one(
        tmp_path, bucket, monkeypatch, mlflow_server):
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    # long enough that the gpu worker dies mid-training (~0.1 s an epoch): 2 trials x 200 epochs, 1 process each
    raw["training"].update(epochs=200, trials=2, processes=1, search_space={"learning_rate": [0.003, 0.001]})
    raw["promotion"].update(floor=0.6)
    raw["mlflow"].update(tracking_uri=mlflow_server.url, experiment="celery-test", model_name="churn_celery")
    raw["serving"].update(canary_requests=20)
    raw["ingest"].update(sweep_schedule=None)
    raw["local"] = {"port": free_port()}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MLFACTORY_CONFIG", str(tmp_path / "pipeline.yaml"))
    monkeypatch.setenv(TRAINING_QUEUE_ENV, "gpu")
    cfg = load_config()
    assert cfg.training.queue == "gpu"

    with postgres() as database_url, redis(tmp_path) as broker_url:
        airflow = LocalAirflow(tmp_path / "airflow", api_port=free_port(), database_url=database_url,
                               broker_url=broker_url, workers={"default": "default", "gpu": "gpu"},
                               env_overrides={"MLFACTORY_CONFIG": cfg.source, TRAINING_QUEUE_ENV: "gpu",
                                              # the task the dead worker took with it is failed (and retried) 30 s
                                              # after its last heartbeat instead of a minute: a live task's come
                                              # every second, and no component here is down for long
                                              "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30"})
        airflow.start()
        try:
            airflow.wait_for_dags(STAGES)
            sample_data.write(sample_data.generate(3000, seed=23), bucket / "landing" / "first.csv")

            # The gpu worker dies while a training task runs on it, past its first checkpoint, and comes back.
            def training_checkpointed():
                runs = airflow.dag_runs("ml_train")
                return runs and any(
                    t["task_id"] == "train" and t["state"] == "running"
                    and "checkpoint: epoch" in airflow.task_log("ml_train", runs[-1]["dag_run_id"], "train", t["map_index"])
                    for t in airflow.task_instances("ml_train", runs[-1]["dag_run_id"]))

            airflow.wait_until(training_checkpointed, 300, "a training task on the gpu worker past its first checkpoint")
            crash_tree(airflow, "worker-gpu")
            airflow.relaunch("worker-gpu")

            for dag_id in STAGES:
                run = airflow.wait_for_run(dag_id, 1, timeout=600, run_type="asset_triggered")
                assert run["state"] == "success", dag_id

            # (each DAG's first scheduled run, when it appears, is not part of the story)
            runs = {dag_id: [r for r in airflow.dag_runs(dag_id) if r["run_type"] == "asset_triggered"] for dag_id in STAGES}
            assert all(len(r) == 1 for r in runs.values()), {d: len(r) for d, r in runs.items()}  # nothing ran twice
            placements = {}
            for dag_id, (run,) in runs.items():
                for ti in airflow.task_instances(dag_id, run["dag_run_id"]):
                    assert ti["state"] in ("success", "skipped"), (dag_id, ti["task_id"], ti["state"])
                    if ti["state"] == "success":
                        placements[(dag_id, ti["task_id"], ti["map_index"])] = (ti["hostname"], ti["queue"], ti["try_number"])
            training = {k: v for k, v in placements.items() if k[:2] == ("ml_train", "train")}
            others = {k: v for k, v in placements.items() if k[:2] != ("ml_train", "train")}
            assert len(training) == 2 and {(h, q) for h, q, _ in training.values()} == {("gpu", "gpu")}
            assert others and {(h, q) for h, q, _ in others.values()} == {("default", "default")}
            # the task the worker took with it ran again, resumed from its checkpoint; none other was retried
            assert max(t for _, _, t in training.values()) >= 2
            assert all(t == 1 for _, _, t in others.values())
            resumed = 0
            for (_, _, map_index), (_, _, tries) in training.items():
                if tries == 1:
                    continue
                run_id = runs["ml_train"][0]["dag_run_id"]
                first, last = (airflow.task_log("ml_train", run_id, "train", map_index, t) for t in (1, tries))
                if "checkpoint: epoch" in first:  # killed after a checkpoint: the retry resumes from it
                    assert "resuming from checkpoint" in last, last[-3000:]
                    resumed += 1
            assert resumed >= 1
            assert LocalEndpoint(cfg).state()["served_version"] == "1"
        finally:
            airflow.stop()
            LocalEndpoint(cfg).stop()
