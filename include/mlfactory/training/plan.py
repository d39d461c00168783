"""ml_train's policy, on every backend: why a run started and whether it trains, one ``TrainingJobSpec``
per trial of the hyperparameter search, and which trial becomes the candidate.

- ``prepare``: a run started by new curated data trains only until the first champion exists
  (then ml_monitor judges new data, and its `drift_detected` retrains), unless
  ``training.retrain_on_new_data``; a run with no curated data to train on has nothing to do. The
  training set is curated data minus the frozen holdout.
- ``plan``: the trials (grid order, a seeded random sample of the search space, or Bayesian: Optuna's
  TPE, batch after batch, each batch drawn from the results of the ones before), each a job spec
  with a name that is stable across retries, its own output and checkpoint folders, and MLflow tags
  that say why the run started.
- ``select_best``: the trial with the best validation metric, or the blend of the best trial of each
  model family when that scores better on the same validation rows (``mlfactory.training.blend``).
"""

from __future__ import annotations

import itertools
import random
import re

from mlfactory import NothingToDo, storage
from mlfactory.config import PipelineConfig
from mlfactory.hyperparameters import Hyperparameters, check_search_space
from mlfactory.specs import TrainingJobSpec


def started_by(drift_events: list[dict], curated_events: int, run_type: str) -> tuple[str, list[str]]:
    """Why a run started ("drift", "curated", or the run type: scheduled, manual) and the drifted features
    that the `drift_detected` events (their extras) name."""
    drifted = sorted({f for extra in drift_events for f in (extra or {}).get("drifted_features", [])})
    return ("drift" if drift_events else "curated" if curated_events else run_type), drifted


def prepare(cfg: PipelineConfig, reason: str, drifted_features: list[str]) -> dict:
    """The training set of this run, or ``NothingToDo``."""
    from mlfactory.registry import CHAMPION, TRAINING_SET_TAG, Registry
    from mlfactory.training.data import NoTrainingData, prepare_training_set, require_curated

    try:
        require_curated(cfg)
        registry = Registry(cfg)
        champion = registry.alias_version(CHAMPION)
        if reason == "curated" and not cfg.training.retrain_on_new_data and champion:
            raise NothingToDo("new curated data, and a champion exists: ml_monitor decides whether it drifted "
                              "(training.retrain_on_new_data is false)")
        # the champion's training data: the rows new since then give the recent window
        seen = registry.client.get_model_version(cfg.model_name, champion).tags.get(TRAINING_SET_TAG) if champion else None
        training_set = prepare_training_set(cfg, seen)
    except NoTrainingData as err:
        raise NothingToDo(str(err)) from err
    return {"training_set": training_set.to_dict(), "started_by": reason, "drifted_features": drifted_features}


def search_trials(base: dict, space: dict[str, list], trials: int, mode: str, seed: int) -> list[dict]:
    """Hyperparameters of each trial: ``base`` with values from ``space`` (grid order or a seeded sample).

    Grid takes the first ``trials`` combinations of the cartesian product; random draws ``trials``
    distinct combinations. Fewer combinations than trials gives one trial per combination.
    """
    keys = sorted(check_search_space(space))
    combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(space[k] for k in keys))] or [{}]
    if mode == "random":
        combos = random.Random(seed).sample(combos, min(trials, len(combos)))
    elif mode != "grid":
        raise ValueError(f"search must be 'grid', 'random' or 'bayes', got {mode!r}")
    return [{**base, **combo} for combo in combos[:trials]]


def bayes_trials(base: dict, space: dict[str, list], trials: int, seed: int, history: list[dict]) -> list[dict]:
    """The next ``trials`` hyperparameter sets from Optuna's TPE over ``space`` (each key's candidate values
    as categories), given the ``history`` of earlier trials ({hyperparameters, value}; higher is better).
    With no history (the first batch) TPE draws a seeded random sample; then it draws where earlier trials
    scored best. Stateless: the study is rebuilt from the history each time, so a retried plan asks the same."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    keys = sorted(check_search_space(space))
    distributions = {k: CategoricalDistribution(list(range(len(space[k])))) for k in keys}  # lists are not choices
    sampler = optuna.samplers.TPESampler(seed=seed + len(history), n_startup_trials=trials, constant_liar=True)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for result in history:
        chosen = result.get("hyperparameters") or {}
        params = {k: space[k].index(chosen[k]) for k in keys if chosen.get(k) in space[k]}
        if len(params) == len(keys) and result.get("value") is not None:
            study.add_trial(optuna.trial.create_trial(value=result["value"], params=params, distributions=distributions))
    asked = [study.ask(distributions) for _ in range(trials)]
    return [{**base, **{k: space[k][trial.params[k]] for k in keys}} for trial in asked]


def plan(cfg: PipelineConfig, prepared: dict, params: dict, run_id: str, batch: int = 0,
         history: list[dict] | None = None) -> list[dict]:
    """One TrainingJobSpec (as JSON) per trial of search batch ``batch`` (``training.search_batches``);
    ``params`` are the trigger form's values (its hyperparameters over the config's), ``history`` the results
    of the earlier batches."""
    defaults = cfg.training
    fields = Hyperparameters.model_fields
    base = {**defaults.model_dump(include=set(fields)), **{k: v for k, v in params.items() if k in fields}}
    n = params["trials"]
    if params["search"] == "bayes":
        trials = bayes_trials(base, params["search_space"], n, defaults.seed, [r for r in history or [] if r])
    else:  # a later batch takes the next combinations of the grid, or of the seeded sample
        trials = search_trials(base, params["search_space"], n * (batch + 1), params["search"], defaults.seed)[batch * n:]
    key = run_key(run_id)
    runs = run_folder(cfg, run_id)
    tags = {"mlfactory.started_by": prepared["started_by"], "mlfactory.airflow_run_id": run_id,
            "mlfactory.drifted_features": ",".join(prepared["drifted_features"])}
    return [
        TrainingJobSpec(
            name=f"{key}-t{i}"[:63],
            hyperparameters=hyperparameters,
            input_uri=prepared["training_set"]["uri"],
            output_uri=storage.join(runs, f"trial-{i}"),
            checkpoint_uri=storage.join(cfg.storage.models_uri, "checkpoints", key, f"trial-{i}"),
            processes_per_node=params["processes"],
            nodes=defaults.nodes,
            accelerator=defaults.accelerator,
            max_runtime_s=defaults.max_runtime_s,
            environment={"MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri, "MLFLOW_EXPERIMENT_NAME": cfg.mlflow.experiment},
            tags={**tags, "mlfactory.trial": str(i)},
        ).model_dump()
        for i, hyperparameters in enumerate(trials, start=batch * n)
    ]


def run_key(run_id: str) -> str:
    """An Airflow run's id as a folder name and job name prefix."""
    return re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-")[:40]


def run_folder(cfg: PipelineConfig, run_id: str) -> str:
    """Where an Airflow run's models go: ``models/runs/<key>/trial-<i>``, and its blend's ``.../blend``."""
    return storage.join(cfg.storage.models_uri, "runs", run_key(run_id))


def select_best(cfg: PipelineConfig, prepared: dict, results: list[dict | None], run_id: str) -> dict:
    """The candidate: the trial whose validation metric is best (higher is better), or with
    ``training.blend`` the blend of the best trial of each family when it is better still; the ranking
    is printed."""
    from mlfactory.training.blend import blend

    done = [r for r in results if r and r.get("value") is not None]
    if not done:
        raise ValueError("no trial produced a model: see the train tasks' logs")
    best = max(done, key=lambda r: r["value"])
    for r in sorted(done, key=lambda r: -r["value"]):
        print(f"trial {r['hyperparameters']}: {r['metric']} {r['value']:.4f}{'  <- best' if r is best else ''}")
    if cfg.training.blend:
        best = blend(cfg, prepared, done, best, storage.join(run_folder(cfg, run_id), "blend")) or best
    return {
        "mlflow_run_id": best.get("mlflow_run_id"),
        "model_uri": best.get("model_uri"),
        "model_bundle_uri": best["model_bundle_uri"],
        "metric": best["metric"],
        "value": best["value"],
        "hyperparameters": best["hyperparameters"],
        "training_set": prepared["training_set"],
        "trials": len(done),
    }
