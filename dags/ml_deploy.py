"""ml_deploy: Asset `champion` → the real-time endpoint, blue/green behind a canary, with automatic rollback.

`resolve` turns the new champion (or the version from the form) into an ``EndpointSpec``: the
version and its files, and the endpoint's sizing and guards from ``serving`` (replicas, target load,
canary share and duration, rollback conditions). Task group `deploy` rolls it out the same way on
every backend (``mlfactory.serving.rollout``): `deploy.stage` (the version beside the served one, no traffic
yet), `deploy.health_check`, `deploy.smoke_test` (holdout rows to it alone), `deploy.canary` (a share of
the traffic; error rate, latency and the platform's alarms checked) and `deploy.full_traffic`, whose
XCom is the endpoint state (also in ``<bucket>/_mlfactory/endpoint/endpoint.json``); how each step
speaks to the endpoint is the backend's (see below). If any step fails, `rollback` puts the traffic back
on the served version (where the platform has not already) and moves alias `champion` back to it;
the run ends failed.
"""

from __future__ import annotations


from airflow.sdk import DAG, Param, TaskGroup, chain, task

from mlfactory.config import load_config
from mlfactory_airflow.assets import pipeline_assets
from mlfactory_airflow.backends import backend_for

cfg = load_config()
assets = pipeline_assets(cfg)
backend = backend_for(cfg)

with DAG(
    dag_id="ml_deploy",
    description="Roll the champion out to the real-time endpoint: health check, smoke test, canary, full traffic",
    schedule=[assets.champion],
    catchup=False,
    max_active_runs=1,  # one rollout at a time
    tags=["mlfactory", "deploy"],
    doc_md=f"{__doc__}\n**This pipeline's backend, `{cfg.backend.name}`:** {backend.deploy_doc}",
    params={
        "version": Param(None, type=["null", "string"], title="Model version",
                         description="Leave empty to deploy the version of the `champion` event (or the current champion)"),
    },
):

    @task
    def resolve(params: dict, triggering_asset_events=None) -> dict:
        """The EndpointSpec: the version to deploy (the form's, else the `champion` event's) and its files."""
        from mlfactory.serving.deployment import endpoint_spec, version_to_deploy

        events = triggering_asset_events[assets.champion] if triggering_asset_events else []
        version = version_to_deploy(cfg, params.get("version"), events[-1].extra.get("version") if events else None)
        return endpoint_spec(cfg, version).model_dump()

    @task(trigger_rule="one_failed")
    def rollback(ti=None) -> None:
        """Runs only when a step failed: traffic and alias `champion` go back to the served version. Then it fails,
        naming the version and why, so that the run (whose only leaf this is) ends failed."""
        from airflow.sdk.exceptions import AirflowFailException

        spec = ti.xcom_pull(task_ids="resolve") or {}
        outcome = backend.rollback((spec.get("model") or {}).get("version"))
        raise AirflowFailException(f"v{outcome['rolled_back']} rolled back, v{outcome['serving']} serves: "
                                   f"{outcome['reason']}")

    spec = resolve()
    with TaskGroup("deploy", tooltip="the backend's rollout of the EndpointSpec"):
        steps = backend.deploy_steps(spec)
    chain(spec, *steps)
    [spec, *steps] >> rollback()
