"""ml_train: curated data → hyperparameter search (one training job per trial) → Asset `candidate`.

Runs weekly (``training.schedule``), on new `curated` data, and on `drift_detected`, whichever comes
first. Once a champion exists, new curated data alone skips (ml_monitor judges it, and its
`drift_detected` retrains) unless ``training.retrain_on_new_data`` is set. Each run builds a training set from all curated data minus the frozen holdout, fans out one
training job per trial (dynamic task mapping, bounded by the ``mlfactory_training`` pool), picks the
best trial by its validation metric and announces it as Asset `candidate`. A run started by drift
tags its MLflow runs with the features that drifted. Every default below comes from the pipeline
config and can be changed per run in the trigger form.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable, Param, task

from mlfactory.config import SEARCHABLE, load_config
from mlfactory.local_airflow import TRAINING_POOL
from mlfactory_airflow.assets import pipeline_assets
from mlfactory_airflow.operators import training_operators

cfg = load_config()
assets = pipeline_assets(cfg)
defaults = cfg.training
operators = training_operators()

with DAG(
    dag_id="ml_train",
    description="Train the model with distributed PyTorch and a hyperparameter search; emit the best as a candidate",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(defaults.schedule, timezone="UTC"),
        assets=(assets.curated | assets.drift_detected),
    ),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["mlfactory", "train"],
    doc_md=__doc__,
    params={
        "backend": Param(cfg.backend, type="string", enum=sorted({*operators, cfg.backend}), title="Backend",
                         description="Where the training jobs run"),
        "epochs": Param(defaults.epochs, type="integer", minimum=1, maximum=1000, title="Epochs",
                        description="Passes over the training set per job"),
        "learning_rate": Param(defaults.learning_rate, type="number", exclusiveMinimum=0, maximum=1,
                               title="Learning rate", description="AdamW learning rate"),
        "batch_size": Param(defaults.batch_size, type="integer", minimum=8, maximum=65536,
                            title="Batch size", description="Rows per step and process"),
        "hidden_sizes": Param(defaults.hidden_sizes, type="array", minItems=1, maxItems=8,
                              items={"type": "integer", "minimum": 1, "maximum": 4096},
                              title="Hidden layer sizes", description="e.g. [128, 64]"),
        "processes": Param(defaults.processes, type="integer", minimum=1, maximum=64, title="Processes",
                           description="DDP processes per training job (torchrun --nproc-per-node)"),
        "trials": Param(defaults.trials, type="integer", minimum=1, maximum=64, title="Search trials",
                        description="Training jobs in the hyperparameter search (one mapped task each)"),
        "search": Param(defaults.search, type="string", enum=["grid", "random"], title="Search strategy",
                        description="grid: the first combinations of the space; random: a seeded sample of them"),
        "search_space": Param(
            defaults.search_space,
            type="object",
            propertyNames={"enum": list(SEARCHABLE)},
            additionalProperties={"type": "array", "minItems": 1},
            title="Search space",
            description=f"Hyperparameter -> candidate values, over {', '.join(SEARCHABLE)}; "
            'e.g. {"learning_rate": [0.003, 0.001], "hidden_sizes": [[128, 64], [256, 128]]}',
        ),
    },
):

    @task
    def prepare(params: dict, dag_run=None, triggering_asset_events=None) -> dict:
        """The training set (curated minus the frozen holdout), and why this run started."""
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        from mlfactory.training_data import NoTrainingData, prepare_training_set

        if params["backend"] not in operators:
            raise AirflowFailException(
                f"backend {params['backend']!r} has no training operator in this installation; "
                f"available: {sorted(operators)}"
            )
        if params["backend"] == "aws" and cfg.aws is None:
            raise AirflowFailException(f"backend 'aws' needs an 'aws' section in {cfg.source} (role_arn, image_uri, ...)")
        events = triggering_asset_events or {}
        drift_events = events[assets.drift_detected] if events else []
        drifted = sorted({f for e in drift_events for f in (e.extra or {}).get("drifted_features", [])})
        started_by = "drift" if drift_events else "curated" if events and events[assets.curated] else str(dag_run.run_type)
        if started_by == "curated" and not defaults.retrain_on_new_data:
            from mlfactory.registry import CHAMPION, Registry

            if Registry(cfg).alias_version(CHAMPION):
                raise AirflowSkipException("new curated data, and a champion exists: ml_monitor decides whether it "
                                           "drifted (training.retrain_on_new_data is false)")
        try:
            training_set = prepare_training_set(cfg)
        except NoTrainingData as err:
            raise AirflowSkipException(str(err)) from err
        return {"training_set": training_set.to_dict(), "started_by": started_by, "drifted_features": drifted}

    @task
    def plan(prepared: dict, params: dict, run_id=None) -> list[dict]:
        """One TrainingJobSpec per trial."""
        import re

        from mlfactory import storage
        from mlfactory.jobs import TrainingJobSpec, search_trials

        base = {k: params[k] for k in ("epochs", "learning_rate", "batch_size", "hidden_sizes")}
        base.update(dropout=defaults.dropout, weight_decay=defaults.weight_decay, seed=defaults.seed,
                    validation_fraction=defaults.validation_fraction)
        trials = search_trials(base, params["search_space"], params["trials"], params["search"], defaults.seed)
        run_key = re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-")[:40]
        training_set = prepared["training_set"]
        tags = {"mlfactory.started_by": prepared["started_by"], "mlfactory.airflow_run_id": run_id,
                "mlfactory.drifted_features": ",".join(prepared["drifted_features"])}
        specs = [
            TrainingJobSpec(
                name=f"{run_key}-t{i}"[:63],
                hyperparameters=hp,
                input_uri=training_set["uri"],
                output_uri=storage.join(cfg.storage.models_uri, "runs", run_key, f"trial-{i}"),
                checkpoint_uri=storage.join(cfg.storage.models_uri, "checkpoints", run_key, f"trial-{i}"),
                processes_per_node=params["processes"],
                max_runtime_s=defaults.max_runtime_s,
                environment={"MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri, "MLFLOW_EXPERIMENT_NAME": cfg.mlflow.experiment},
                tags={**tags, "mlfactory.trial": str(i)},
            ).model_dump()
            for i, hp in enumerate(trials)
        ]
        return specs

    @task.branch
    def choose_backend(params: dict) -> str:
        """The training jobs run on the backend chosen in the form; the other backends' tasks are skipped."""
        return f"train_{params['backend']}"

    @task(outlets=[assets.candidate], trigger_rule="none_failed_min_one_success")
    def select_best(prepared: dict, trials: dict, outlet_events=None) -> dict:
        """The trial with the best validation metric becomes the candidate."""
        done = [r for per_backend in trials.values() for r in (per_backend or []) if r and r.get("value") is not None]
        if not done:
            raise ValueError("no trial produced a model: see the train tasks' logs")
        best = max(done, key=lambda r: r["value"])
        for r in sorted(done, key=lambda r: -r["value"]):
            print(f"trial {r['hyperparameters']}: {r['metric']} {r['value']:.4f}{'  <- best' if r is best else ''}")
        candidate = {
            "mlflow_run_id": best.get("mlflow_run_id"),
            "model_uri": best.get("model_uri"),
            "model_bundle_uri": best["model_bundle_uri"],
            "metric": best["metric"],
            "value": best["value"],
            "hyperparameters": best["hyperparameters"],
            "training_set": prepared["training_set"],
            "trials": len(done),
        }
        outlet_events[assets.candidate].extra = candidate
        return candidate

    prepared = prepare()
    specs = plan(prepared)
    branch = choose_backend()
    specs >> branch
    trained = {
        backend: operator.partial(task_id=f"train_{backend}", pool=TRAINING_POOL).expand(spec=specs)
        for backend, operator in operators.items()
    }
    branch >> list(trained.values())
    select_best(prepared, {backend: op.output for backend, op in trained.items()})
