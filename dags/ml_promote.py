"""ml_promote: Asset `candidate` → MLflow registry → promotion gate → Asset `champion`.

Registers the candidate as a new model version with alias `challenger`, scores it and the current
`champion` on the frozen holdout, and moves `champion` only when the challenger reaches
``promotion.floor`` and beats the champion by ``promotion.margin``; the replaced champion keeps alias
`previous` for rollback. The decision, both scores and the reason are tags on the model version.
With ``promotion.require_approval`` a person approves in the Airflow UI before the alias moves.
"""

from __future__ import annotations


from airflow.sdk import DAG, Param, chain, task

from mlfactory.config import load_config
from mlfactory.specs import HAND_MODEL_URI
from mlfactory_airflow.assets import pipeline_assets

cfg = load_config()
assets = pipeline_assets(cfg)

with DAG(
    dag_id="ml_promote",
    description="Register the candidate model and promote it to champion when it beats the current one",
    schedule=[assets.candidate],
    catchup=False,
    max_active_runs=1,  # one alias move at a time
    tags=["mlfactory", "promote"],
    doc_md=__doc__,
    params={
        "model_uri": Param(None, type=["null", "string"], title="Model to register",
                           description=f"Leave empty for event-started runs. Or a model logged in experiment "
                                       f"{cfg.mlflow.experiment!r}: models:/m-<id> or runs:/<run id>/model",
                           pattern=f"^({HAND_MODEL_URI})$"),
    },
):

    @task
    def register(params: dict, triggering_asset_events=None) -> dict:
        """Register the candidate (from the `candidate` event, or the form) with alias `challenger`."""
        from mlfactory.registry import Registry, candidate_from, register_candidate

        events = triggering_asset_events[assets.candidate] if triggering_asset_events else []
        if params.get("model_uri"):
            Registry(cfg).check_own_model(params["model_uri"])
        return register_candidate(cfg, candidate_from(params.get("model_uri"), [e.extra for e in events]))

    @task
    def evaluate(candidate: dict) -> dict:
        """Challenger vs champion on the frozen holdout and the recent window; the decision is tagged on the version."""
        from mlfactory.registry import evaluate_challenger

        return evaluate_challenger(cfg, candidate["version"], (candidate.get("training_set") or {}).get("recent"))

    @task.short_circuit
    def gate(decision: dict) -> bool:
        """Stop here (skipping the alias move) when the challenger did not pass."""
        return decision["promote"]

    @task(outlets=[assets.champion])
    def promote(decision: dict, outlet_events=None) -> dict:
        from mlfactory.registry import Registry

        moved = Registry(cfg).promote(decision["version"], decision["holdout_uri"], decision["holdout_sha256"])
        outlet_events[assets.champion].extra = {**moved, "metric": decision["metric"], "value": decision["challenger"]}
        return moved

    decision = evaluate(register())
    steps = [gate(decision)]
    if cfg.promotion.require_approval:
        from airflow.providers.standard.operators.hitl import ApprovalOperator

        steps.append(
            ApprovalOperator(
                task_id="approve",
                subject=f"Promote {cfg.model_name} to champion?",
                body="{{ ti.xcom_pull(task_ids='evaluate')['reason'] }}",
            )
        )
    chain(*steps, promote(decision))
