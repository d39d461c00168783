"""A third backend, added by registration alone.

``tests/backend_plugin`` is a test-only distribution, as a plug-in shipped on PyPI would be: a package
(``toy_backend``: its settings model, landing trigger, training operator, deploy and batch steps, all
running on this machine) and the ``.dist-info`` whose entry point (group ``mlfactory.backends``)
registers it. Nothing in the project is edited: with that folder on the path, a config saying
``backend: toy`` is validated by the toy's own settings model, and the unchanged DAGs parse and run on
it, under the real scheduler, from a landed file to a deployed champion.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from mlfactory import storage

from mlfactory.data import sample_data
from mlfactory.config import DEFAULT_CONFIG, ConfigError, load_config
from mlfactory.backends.local.local_airflow import LocalAirflow
from mlfactory.backends.local.processes import free_port
from mlfactory.serving.rollout import STEPS

PLUGIN = Path(__file__).resolve().parent / "backend_plugin"


@pytest.fixture
def toy(monkeypatch, tmp_path, bucket):
    """The plug-in on the path (as `pip install` would put it) and a config for it; yields the raw config."""
    from mlfactory import backend_registry

    monkeypatch.syspath_prepend(str(PLUGIN))
    backend_registry._entry_points.cache_clear()
    backend_registry.get.cache_clear()
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw.update(backend="toy", toy={"region": "eu-toy-1", "epochs_cap": 1})
    yield raw
    backend_registry._entry_points.cache_clear()
    backend_registry.get.cache_clear()


def write(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_plugin_is_registered_by_its_entry_point_and_validates_its_own_section(toy, tmp_path):
    from mlfactory.backend_registry import names

    assert names() == ["aws", "azure", "gcp", "local", "toy"]
    cfg = load_config(write(toy, tmp_path / "pipeline.yaml"))
    assert type(cfg.backend).__name__ == "ToySettings" and cfg.backend.region == "eu-toy-1"
    with pytest.raises(ConfigError, match="backend toy needs its section 'toy:' \\(region at least\\)"):
        load_config(write({**toy, "toy": None}, tmp_path / "no-section.yaml"))
    with pytest.raises(ConfigError, match="toy.epochs_cap: Input should be greater than or equal to 1"):
        load_config(write({**toy, "toy": {"region": "x", "epochs_cap": 0}}, tmp_path / "bad.yaml"))


def test_without_the_plugin_installed_the_backend_is_unknown(tmp_path, bucket):
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw.update(backend="toy", toy={"region": "eu-toy-1"})
    with pytest.raises(ConfigError, match="backend: 'toy' is not a registered backend; registered: aws, azure, gcp, local"):
        load_config(write(raw, tmp_path / "pipeline.yaml"))


def test_the_unchanged_dags_are_built_from_the_plugin(toy, tmp_path, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("MLFACTORY_CONFIG", str(write(toy, tmp_path / "pipeline.yaml")))
    bag = DagBag(dag_folder=str(Path(__file__).resolve().parents[1] / "dags"))
    assert bag.import_errors == {}
    assert bag.dags["ml_train"].get_task("train").task_type == "ToyTrainingOperator"
    assert bag.dags["ml_deploy"].task_ids == ["resolve", "deploy.stage", "deploy.health_check", "deploy.smoke_test",
                                              "deploy.canary", "deploy.full_traffic", "rollback"]
    assert bag.dags["ml_batch_score"].get_task("score").task_type == "ToyBatchOperator"
    assert "toy://" in bag.dags["ml_deploy"].doc_md
    from mlfactory_airflow.assets import pipeline_assets

    trigger = pipeline_assets(load_config()).landing.watchers[0].trigger
    assert trigger.serialize()[0] == "toy_backend.airflow.ToyLandingTrigger"


@pytest.mark.scheduler
def test_a_landed_file_runs_to_a_deployed_champion_on_the_plugin_backend(toy, tmp_path, bucket, mlflow_server,
                                                                        airflow_db_template):
    from mlflow import MlflowClient

    from mlfactory.serving.deployment import read_endpoint_state

    toy["training"].update(trials=1, processes=1, search_space={})
    toy["promotion"].update(floor=0.5)
    toy["mlflow"].update(tracking_uri=mlflow_server.url, experiment="toy-backend", model_name="churn_toy")
    cfg = load_config(write(toy, tmp_path / "pipeline.yaml"))
    path = os.pathsep.join(filter(None, [str(PLUGIN), os.environ.get("PYTHONPATH")]))
    airflow = LocalAirflow(tmp_path / "airflow", api_port=free_port(),
                           env_overrides={"MLFACTORY_CONFIG": cfg.source, "PYTHONPATH": path},
                           db_template=airflow_db_template)
    airflow.start()
    try:
        airflow.wait_for_dags(["ml_ingest", "ml_validate", "ml_train", "ml_promote", "ml_deploy", "ml_batch_score"])
        sample_data.write(sample_data.generate(3000, seed=51), bucket / "landing" / "toy.csv")

        # the toy's own watcher announces the file; ingest and validate are every backend's
        ingest = airflow.wait_for_run("ml_ingest", 1, timeout=180, run_type="asset_triggered")
        assert ingest["state"] == "success" and ingest["run_type"] == "asset_triggered"
        landing = [e for e in airflow.asset_events() if e["uri"] == cfg.storage.landing_uri]
        assert landing and landing[0]["extra"]["payload"]["toy"] is True
        assert airflow.wait_for_run("ml_validate", 1, timeout=180, run_type="asset_triggered")["state"] == "success"

        train = airflow.wait_for_run("ml_train", 1, timeout=300, run_type="asset_triggered")
        assert train["state"] == "success"
        tis = {t["task_id"]: t["state"] for t in airflow.task_instances("ml_train", train["dag_run_id"])}
        assert tis == {"prepare": "success", "plan": "success", "train": "success", "select_best": "success"}
        assert "toy job" in airflow.task_log("ml_train", train["dag_run_id"], "train", map_index=0)
        assert "in region eu-toy-1" in airflow.task_log("ml_train", train["dag_run_id"], "train", map_index=0)

        assert airflow.wait_for_run("ml_promote", 1, timeout=300)["state"] == "success"
        champion = MlflowClient(mlflow_server.url).get_model_version_by_alias("churn_toy", "champion").version
        # trained on the toy's 2 "nodes", each told its place through the toy's own conventions (toy_backend.runtime)
        client = MlflowClient(mlflow_server.url)
        run = client.get_run(client.get_model_version("churn_toy", champion).run_id)
        assert (run.data.params["world_size"], run.data.tags["mlfactory.platform"]) == ("2", "toy")

        deploy = airflow.wait_for_run("ml_deploy", 1, timeout=300)
        assert deploy["state"] == "success"
        tis = {t["task_id"]: t["state"] for t in airflow.task_instances("ml_deploy", deploy["dag_run_id"])}
        assert tis == {"resolve": "success", **{f"deploy.{step}": "success" for step in STEPS}, "rollback": "skipped"}
        state = read_endpoint_state(cfg)
        assert (state["served_version"], state["endpoint"], state["toy_staged"]) == \
            (champion, "toy://eu-toy-1/churn_toy", champion)
        assert airflow.xcom("ml_deploy", deploy["dag_run_id"], "deploy.full_traffic")["endpoint"] == state["endpoint"]
        tags = MlflowClient(mlflow_server.url).get_model_version("churn_toy", champion).tags
        assert tags["mlfactory.deployment"] == "serving" and tags["mlfactory.endpoint"] == "toy://eu-toy-1/churn_toy"

        batch = airflow.wait_for_run("ml_batch_score", 1, timeout=300, run_type="asset_triggered")
        assert batch["state"] == "success"
        scored = airflow.xcom("ml_batch_score", batch["dag_run_id"], "score")
        assert scored["version"] == champion and len(scored["snapshots"]) == 1
        assert storage.exists(storage.join(scored["uri"], "toy.json"))
    finally:
        airflow.stop()
