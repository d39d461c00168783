"""ml_train: curated data → hyperparameter search (one training job per trial) → Asset `candidate`.

Runs weekly (``training.schedule``), on new `curated` data, and on `drift_detected`, whichever comes
first. Once a champion exists, new curated data alone skips (ml_monitor judges it, and its
`drift_detected` retrains) unless ``training.retrain_on_new_data`` is set. Each run builds a training
set from all curated data minus the frozen holdout, fans out one training job per trial (`train`:
dynamic task mapping, on the configured backend, bounded by the ``training.pool`` pool), picks the
best trial by its validation metric (or the blend of the best trial of each model family, when that is
better still) and announces it as Asset `candidate`. A run started by drift
tags its MLflow runs with the features that drifted. Every default below comes from the pipeline
config and can be changed per run in the trigger form; the backend is the config's.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, Param, task

from mlfactory.config import load_config
from mlfactory.hyperparameters import CHOICES, SEARCHABLE, form_params
from mlfactory_airflow.assets import cron_or, pipeline_assets
from mlfactory_airflow.backends import backend_for

cfg = load_config()
assets = pipeline_assets(cfg)
backend = backend_for(cfg)
defaults = cfg.training

with DAG(
    dag_id="ml_train",
    description="Train the model with distributed PyTorch and a hyperparameter search; emit the best as a candidate",
    schedule=cron_or(defaults.schedule, assets.curated | assets.drift_detected),
    catchup=False,
    max_active_runs=1,
    tags=["mlfactory", "train"],
    doc_md=__doc__,
    params={
        # both model families' hyperparameters, a form section each: bounds and choices from mlfactory.hyperparameters
        **{name: Param(getattr(defaults, name), **schema) for name, schema in form_params().items()},
        "processes": Param(defaults.processes, type="integer", minimum=1, maximum=64, title="Processes",
                           description="DDP processes per training job (torchrun --nproc-per-node)"),
        "trials": Param(defaults.trials, type="integer", minimum=1, maximum=64, title="Search trials",
                        description="Training jobs in the hyperparameter search (one mapped task each)"),
        "search": Param(defaults.search, type="string", enum=["grid", "random", "bayes"], title="Search strategy",
                        description="grid: the first combinations of the space; random: a seeded sample of them; "
                        f"bayes: Optuna's TPE, {defaults.search_batches} batch(es) of the trials, each learning "
                        "from the ones before"),
        "search_space": Param(
            defaults.search_space,
            type="object",
            propertyNames={"enum": list(SEARCHABLE)},
            properties={key: {"type": "array", "minItems": 1, "items": {"enum": list(values)}}
                        for key, values in CHOICES.items()},
            additionalProperties={"type": "array", "minItems": 1},
            title="Search space",
            description=f"Hyperparameter -> candidate values, over {', '.join(SEARCHABLE)}; "
            'e.g. {"learning_rate": [0.003, 0.001], "hidden_sizes": [[128, 64], [256, 128]]}',
        ),
    },
):

    @task
    def prepare(dag_run=None, triggering_asset_events=None) -> dict:
        """The training set (curated minus the frozen holdout), and why this run started."""
        from mlfactory.training.plan import prepare, started_by
        from mlfactory_airflow.outcomes import task_outcome

        events = triggering_asset_events or {}
        drift = [e.extra for e in events[assets.drift_detected]] if events else []
        curated = len(events[assets.curated]) if events else 0
        with task_outcome():
            return prepare(cfg, *started_by(drift, curated, str(dag_run.run_type)))

    @task
    def plan(prepared: dict, batch: int, earlier: list, params: dict, run_id=None) -> list[dict]:
        """One TrainingJobSpec per trial of this batch of the search (``earlier``: the batches before)."""
        from mlfactory.training.plan import plan

        return plan(cfg, prepared, params, run_id, batch, [r for results in earlier for r in results])

    @task(outlets=[assets.candidate])
    def select_best(prepared: dict, batches: list, run_id=None, outlet_events=None) -> dict:
        """The trial with the best validation metric, of every batch (or the blend of the best of each model
        family, when it is better still), becomes the candidate."""
        from mlfactory.training.plan import select_best

        candidate = select_best(cfg, prepared, [result for results in batches for result in results], run_id)
        outlet_events[assets.candidate].extra = candidate
        return candidate

    prepared = prepare()
    batches: list = []  # each batch's results; batch 2 on are planned from those before (search: bayes)
    for batch in range(defaults.search_batches):
        suffix = f"_{batch + 1}" if batch else ""
        trials = backend.training_operator.partial(
            task_id=f"train{suffix}", pool=defaults.pool, queue=defaults.queue,
            executor_config=defaults.executor_config(), retries=defaults.retries, retry_delay=timedelta(seconds=10),
        ).expand(spec=plan.override(task_id=f"plan{suffix}")(prepared, batch, list(batches)))
        batches.append(trials.output)
    select_best(prepared, batches)
