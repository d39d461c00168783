"""ml_train's and ml_promote's policy, without a scheduler: why a run trains, one job spec per trial, the
best trial, and which candidate ml_promote registers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlfactory import NothingToDo
from mlfactory.registry import candidate_from
from mlfactory.specs import TrainingJobSpec
from mlfactory.training.train import parse_args
from mlfactory.training.plan import plan, prepare, select_best, started_by

FORM = {"epochs": 4, "learning_rate": 0.003, "batch_size": 256, "hidden_sizes": [64, 32], "processes": 2, "trials": 3,
        "search": "grid", "search_space": {"learning_rate": [0.01, 0.001], "dropout": [0.0, 0.2]}}
ROOT = Path(__file__).resolve().parents[1]
PREPARED = {"training_set": {"uri": "file:///b/models/training_sets/abc", "rows": 10}, "started_by": "drift",
            "drifted_features": ["age", "income"]}


def test_why_a_run_started():
    drift = [{"drifted_features": ["income", "age"]}, {"drifted_features": ["age", "plan"]}, None]
    assert started_by(drift, 2, "asset_triggered") == ("drift", ["age", "income", "plan"])  # drift wins over new data
    assert started_by([], 1, "asset_triggered") == ("curated", [])
    assert started_by([], 0, "scheduled") == ("scheduled", [])


def test_no_curated_data_is_nothing_to_do(cfg):
    with pytest.raises(NothingToDo, match="no curated data"):
        prepare(cfg, "manual", [])


def test_one_job_spec_per_trial_stable_across_retries(cfg):
    run_id = "asset_triggered__2026-11-22T03:01:33.730254+00:00"
    specs = plan(cfg, PREPARED, FORM, run_id)
    assert specs == plan(cfg, PREPARED, FORM, run_id)  # a retried plan names the same jobs: they resume
    jobs = [TrainingJobSpec.model_validate(s) for s in specs]
    assert len(jobs) == 3 and len({j.name for j in jobs}) == 3
    assert [(j.hyperparameters.dropout, j.hyperparameters.learning_rate) for j in jobs] == [
        (0.0, 0.01), (0.0, 0.001), (0.2, 0.01)]  # the grid's first three, over the form's values
    assert all(j.hyperparameters.epochs == 4 and j.hyperparameters.hidden_sizes == [64, 32] for j in jobs)
    assert all(j.hyperparameters.model == "mlp" and j.hyperparameters.trees == 1000 for j in jobs)  # the config's
    assert all(parse_args(j.arguments(), env={}).hyperparameters == j.hyperparameters for j in jobs)  # the entrypoint's
    first = jobs[0]
    assert first.input_uri == PREPARED["training_set"]["uri"] and first.processes_per_node == 2
    assert first.output_uri.startswith(cfg.storage.models_uri + "/runs/") and first.output_uri.endswith("/trial-0")
    assert first.checkpoint_uri.startswith(cfg.storage.models_uri + "/checkpoints/")
    assert first.tags == {"mlfactory.started_by": "drift", "mlfactory.airflow_run_id": run_id,
                          "mlfactory.drifted_features": "age,income", "mlfactory.trial": "0"}
    assert first.environment["MLFLOW_TRACKING_URI"] == cfg.mlflow.tracking_uri
    assert first.max_runtime_s == cfg.training.max_runtime_s


def test_the_forms_boosted_trees_knobs_reach_every_job(cfg):
    form = {**FORM, "model": "gbdt", "trees": 300, "tree_leaves": 15, "tree_learning_rate": 0.05, "search_space": {}}
    jobs = [TrainingJobSpec.model_validate(s) for s in plan(cfg, PREPARED, form, "manual__1")]
    assert [(j.hyperparameters.model, j.hyperparameters.trees, j.hyperparameters.tree_leaves,
             j.hyperparameters.tree_learning_rate) for j in jobs] == [("gbdt", 300, 15, 0.05)]


def test_the_configured_hardware_and_placement_reach_every_job_and_the_train_task(cfg, monkeypatch):
    from conftest import with_section
    from mlfactory.config import TRAINING_POD_TEMPLATE_ENV, TRAINING_QUEUE_ENV, TrainingSpec

    gpu = with_section(cfg, "training", accelerator={"kind": "gpu", "model": "nvidia-a100", "count": 4}, nodes=2)
    jobs = [TrainingJobSpec.model_validate(s) for s in plan(gpu, PREPARED, FORM, "manual__1")]
    assert {(j.nodes, j.accelerator.kind, j.accelerator.model, j.accelerator.count) for j in jobs} == {
        (2, "gpu", "nvidia-a100", 4)}
    assert all(j.accelerator.kind == "cpu" and j.nodes == 1 for j in map(TrainingJobSpec.model_validate,
                                                                         plan(cfg, PREPARED, FORM, "manual__1")))
    # the queue (CeleryExecutor) and pod template (KubernetesExecutor) of the train task: set, or from the environment
    monkeypatch.delenv(TRAINING_QUEUE_ENV, raising=False)
    monkeypatch.delenv(TRAINING_POD_TEMPLATE_ENV, raising=False)
    assert TrainingSpec().queue == "default" and TrainingSpec().executor_config() == {}
    monkeypatch.setenv(TRAINING_QUEUE_ENV, "gpu")
    monkeypatch.setenv(TRAINING_POD_TEMPLATE_ENV, "/opt/airflow/pod_templates/gpu.yaml")
    assert TrainingSpec().queue == "gpu" and TrainingSpec(queue="a100").queue == "a100"
    assert TrainingSpec().executor_config() == {"pod_template_file": "/opt/airflow/pod_templates/gpu.yaml"}


def test_the_best_trial_becomes_the_candidate(cfg, capsys):
    trial = lambda v, lr: {"value": v, "metric": "val_roc_auc", "hyperparameters": {"learning_rate": lr},  # noqa: E731
                           "model_bundle_uri": f"file:///m/{lr}", "model_uri": f"models:/m-{lr}", "mlflow_run_id": str(lr)}
    candidate = select_best(cfg, PREPARED, [trial(0.80, 0.01), None, trial(0.83, 0.001), {"value": None}], "manual__1")
    assert (candidate["value"], candidate["model_uri"], candidate["trials"]) == (0.83, "models:/m-0.001", 2)
    assert candidate["training_set"] == PREPARED["training_set"]
    assert "<- best" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no trial produced a model"):
        select_best(cfg, PREPARED, [None, {"value": None}], "manual__1")


def test_the_candidate_comes_from_the_form_or_the_latest_event():
    assert candidate_from("runs:/abc/model", [{"model_uri": "models:/m-1"}]) == {"model_uri": "runs:/abc/model",
                                                                                  "mlflow_run_id": None}
    assert candidate_from(None, [{"model_uri": "models:/m-1"}, {"model_uri": "models:/m-2"}])["model_uri"] == "models:/m-2"
    with pytest.raises(ValueError, match="no `candidate` event started this run; set 'model_uri'"):
        candidate_from(None, [])
    with pytest.raises(ValueError, match="has no MLflow model URI"):
        candidate_from(None, [{"model_uri": None}])


SPACE = {"learning_rate": [0.1, 0.01, 0.001, 0.0001], "dropout": [0.0, 0.1, 0.2, 0.3]}


def test_bayes_draws_its_next_batch_where_the_earlier_trials_scored_best():
    """search: bayes (Optuna TPE): the first batch is a seeded random draw; a later batch, rebuilt from the
    earlier results alone, concentrates on the candidate value that scored best."""
    from mlfactory.training.plan import bayes_trials

    first = bayes_trials({"epochs": 3}, SPACE, 8, seed=42, history=[])
    assert first == bayes_trials({"epochs": 3}, SPACE, 8, seed=42, history=[])  # a retried plan asks the same
    assert all(t["epochs"] == 3 and t["learning_rate"] in SPACE["learning_rate"] for t in first)
    assert len({t["learning_rate"] for t in first}) > 1  # a spread, not one point
    history = [{"hyperparameters": t, "value": 0.9 if t["learning_rate"] == 0.01 else 0.6 - t["dropout"]}
               for t in first] + [{"hyperparameters": {**first[0], "learning_rate": 0.01}, "value": 0.9}, None]
    history = [h for h in history if h]
    second = bayes_trials({"epochs": 3}, SPACE, 8, seed=42, history=history)
    picked = [t["learning_rate"] for t in second]
    assert picked.count(0.01) >= 5, picked  # random would give about 2 of 8


def test_a_later_batch_takes_the_next_trials_with_their_own_names(cfg):
    specs = [TrainingJobSpec.model_validate(s) for s in plan(cfg, PREPARED, {**FORM, "trials": 2}, "manual__1", batch=1)]
    assert [(j.hyperparameters.dropout, j.hyperparameters.learning_rate) for j in specs] == [
        (0.2, 0.01), (0.2, 0.001)]  # the grid's third and fourth
    assert [j.tags["mlfactory.trial"] for j in specs] == ["2", "3"] and specs[0].output_uri.endswith("/trial-2")
    bayes = plan(cfg, PREPARED, {**FORM, "search": "bayes", "trials": 3}, "manual__1", batch=1, history=[
        {"hyperparameters": {"learning_rate": 0.01, "dropout": 0.2}, "value": 0.8}, None])
    assert len(bayes) == 3 and {s["tags"]["mlfactory.trial"] for s in bayes} == {"3", "4", "5"}


def test_bayes_batches_chain_plan_and_train_tasks_in_the_dag(tmp_path):
    """search_batches: 3 -> plan >> train >> plan_2 >> train_2 >> plan_3 >> train_3 >> select_best."""
    import json
    import subprocess
    import sys

    import yaml

    from mlfactory.config import DEFAULT_CONFIG

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["training"].update(search="bayes", search_batches=3)
    raw["storage"]["bucket"] = str(tmp_path / "bucket")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    probe = ("import json; from airflow.dag_processing.dagbag import DagBag; "
             "dag = DagBag(dag_folder='dags/ml_train.py').dags['ml_train']; "
             "print(json.dumps({t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "MLFACTORY_CONFIG": str(tmp_path / "p.yaml")}, cwd=ROOT)
    upstream = json.loads(out.stdout.strip().splitlines()[-1])
    assert upstream["plan"] == ["prepare"] and upstream["train"] == ["plan"]
    assert upstream["plan_2"] == ["prepare", "train"] and upstream["train_2"] == ["plan_2"]
    assert upstream["plan_3"] == ["prepare", "train", "train_2"] and upstream["train_3"] == ["plan_3"]
    assert upstream["select_best"] == ["prepare", "train", "train_2", "train_3"]
