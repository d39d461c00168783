"""ml_deploy: Asset `champion` → the real-time endpoint, blue/green with a canary and automatic rollback.

On `local`, the new champion version is loaded next to the served one as the idle colour, health-checked,
smoke-tested with holdout rows sent to it alone, given ``serving.canary_percent`` of the traffic for
``serving.canary_requests`` requests (its error rate must stay under ``serving.max_error_rate``),
then all of it; the old colour is unloaded. If any step fails, `rollback` returns the traffic to the
served version and moves alias `champion` back to it, and the run ends failed. The endpoint's URL
and served version are in ``<bucket>/_mlfactory/endpoint/endpoint.json`` and in this run's XCom.

On `aws`, `deploy_sagemaker` creates the version's SageMaker Model and a new EndpointConfig, then
creates the endpoint or updates it blue/green: SageMaker runs the canary (``serving.canary_percent``
of the capacity for ``aws.canary_wait_s``) and rolls back on the alarms in ``aws.rollback_alarms``.
In service, the variant gets its autoscaling target and policy. If SageMaker rolled the update back
or the endpoint failed, `rollback` moves alias `champion` back to the served version.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param, chain, task

from mlfactory.config import load_config
from mlfactory_airflow.assets import pipeline_assets

cfg = load_config()
assets = pipeline_assets(cfg)

with DAG(
    dag_id="ml_deploy",
    description="Roll the champion out to the real-time endpoint: health check, smoke test, canary, full traffic",
    schedule=[assets.champion],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # one rollout at a time
    tags=["mlfactory", "deploy"],
    doc_md=__doc__,
    params={
        "version": Param(None, type=["null", "string"], title="Model version",
                         description="Leave empty to deploy the version of the `champion` event (or the current champion)"),
    },
):

    def champion_events(triggering_asset_events) -> list:
        return triggering_asset_events[assets.champion] if triggering_asset_events else []

    if cfg.backend == "aws":
        from mlfactory_airflow.operators.sagemaker import SageMakerEndpointOperator

        @task
        def resolve(params: dict, triggering_asset_events=None) -> dict:
            """The version to deploy and where its files are in S3 (what the SageMaker Model loads)."""
            from mlfactory.deployment import cloud_target, version_to_deploy

            return cloud_target(cfg, version_to_deploy(cfg, params.get("version"), champion_events(triggering_asset_events)))

        @task(trigger_rule="one_failed")
        def rollback(ti=None) -> dict:
            """Runs only when a step failed: alias `champion` goes back to the version the endpoint serves."""
            from mlfactory.deployment import read_endpoint_state, restore_after_failure

            target, state = ti.xcom_pull(task_ids="resolve") or {}, read_endpoint_state(cfg)
            reason = (state.get("last_failure") or {}).get("reason", "the SageMaker deployment failed")
            return restore_after_failure(cfg, target.get("version"), state.get("served_version"), reason)

        target = resolve()
        deploy = SageMakerEndpointOperator(task_id="deploy_sagemaker", target=target)
        [target, deploy] >> rollback()
    else:

        @task
        def stage(params: dict, triggering_asset_events=None) -> dict:
            """Start the endpoint if needed; load the version as the idle colour, with no traffic yet."""
            from mlfactory.deployment import Rollout, version_to_deploy

            return Rollout(cfg).stage(version_to_deploy(cfg, params.get("version"), champion_events(triggering_asset_events)))

        @task
        def health_check(plan: dict) -> None:
            from mlfactory.deployment import Rollout

            Rollout(cfg).health_check(plan)

        @task
        def smoke_test(plan: dict) -> None:
            """Holdout rows sent to the new version alone must get sane predictions."""
            from mlfactory.deployment import Rollout

            Rollout(cfg).smoke_test(plan)

        @task
        def canary(plan: dict) -> dict:
            from mlfactory.deployment import Rollout

            return Rollout(cfg).canary(plan)

        @task
        def full_traffic(plan: dict) -> dict:
            """All traffic to the new version; the old one is unloaded; the endpoint state is written."""
            from mlfactory.deployment import Rollout

            return Rollout(cfg).complete(plan)

        @task(trigger_rule="one_failed")
        def rollback(params: dict, ti=None, triggering_asset_events=None) -> dict:
            """Runs only when a step failed: traffic and alias `champion` go back to the served version."""
            from mlfactory.deployment import Rollout

            plan = ti.xcom_pull(task_ids="stage")
            events = champion_events(triggering_asset_events)
            version = (plan or {}).get("version") or params.get("version") or (events[-1].extra.get("version") if events else None)
            return Rollout(cfg).rollback(plan, version)

        plan = stage()
        steps = [health_check(plan), smoke_test(plan), canary(plan), full_traffic(plan)]
        chain(*steps)
        [plan, *steps] >> rollback()
