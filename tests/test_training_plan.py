"""ml_train's and ml_promote's policy, without a scheduler: why a run trains, one job spec per trial, the
best trial, and which candidate ml_promote registers."""

from __future__ import annotations

import pytest

from mlfactory import NothingToDo
from mlfactory.registry import candidate_from
from mlfactory.specs import TrainingJobSpec
from mlfactory.training_plan import plan, prepare, select_best, started_by

FORM = {"epochs": 4, "learning_rate": 0.003, "batch_size": 256, "hidden_sizes": [64, 32], "processes": 2, "trials": 3,
        "search": "grid", "search_space": {"learning_rate": [0.01, 0.001], "dropout": [0.0, 0.2]}}
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
    assert [(j.hyperparameters["dropout"], j.hyperparameters["learning_rate"]) for j in jobs] == [
        (0.0, 0.01), (0.0, 0.001), (0.2, 0.01)]  # the grid's first three, over the form's values
    assert all(j.hyperparameters["epochs"] == 4 and j.hyperparameters["hidden_sizes"] == [64, 32] for j in jobs)
    assert all(j.hyperparameters["model"] == "mlp" and j.hyperparameters["trees"] == 1000 for j in jobs)
    assert "--model mlp" in " ".join(jobs[0].hyperparameter_arguments())  # what the entrypoint is given
    first = jobs[0]
    assert first.input_uri == PREPARED["training_set"]["uri"] and first.processes_per_node == 2
    assert first.output_uri.startswith(cfg.storage.models_uri + "/runs/") and first.output_uri.endswith("/trial-0")
    assert first.checkpoint_uri.startswith(cfg.storage.models_uri + "/checkpoints/")
    assert first.tags == {"mlfactory.started_by": "drift", "mlfactory.airflow_run_id": run_id,
                          "mlfactory.drifted_features": "age,income", "mlfactory.trial": "0"}
    assert first.environment["MLFLOW_TRACKING_URI"] == cfg.mlflow.tracking_uri
    assert first.max_runtime_s == cfg.training.max_runtime_s


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


def test_the_best_trial_becomes_the_candidate(capsys):
    trial = lambda v, lr: {"value": v, "metric": "val_roc_auc", "hyperparameters": {"learning_rate": lr},  # noqa: E731
                           "model_bundle_uri": f"file:///m/{lr}", "model_uri": f"models:/m-{lr}", "mlflow_run_id": str(lr)}
    candidate = select_best(PREPARED, [trial(0.80, 0.01), None, trial(0.83, 0.001), {"value": None}])
    assert (candidate["value"], candidate["model_uri"], candidate["trials"]) == (0.83, "models:/m-0.001", 2)
    assert candidate["training_set"] == PREPARED["training_set"]
    assert "<- best" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no trial produced a model"):
        select_best(PREPARED, [None, {"value": None}])


def test_the_candidate_comes_from_the_form_or_the_latest_event():
    assert candidate_from("runs:/abc/model", [{"model_uri": "models:/m-1"}]) == {"model_uri": "runs:/abc/model",
                                                                                  "mlflow_run_id": None}
    assert candidate_from(None, [{"model_uri": "models:/m-1"}, {"model_uri": "models:/m-2"}])["model_uri"] == "models:/m-2"
    with pytest.raises(ValueError, match="no `candidate` event started this run; set 'model_uri'"):
        candidate_from(None, [])
    with pytest.raises(ValueError, match="has no MLflow model URI"):
        candidate_from(None, [{"model_uri": None}])
