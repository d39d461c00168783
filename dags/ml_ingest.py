"""ml_ingest: newly landed objects → immutable raw snapshots → Asset `raw`.

Started by the bucket-change AssetWatcher on Asset `landing`, by the ``ingest.sweep_schedule``
sweep, or by hand from the trigger form with the URI of an object to ingest.

A run takes every landed object not ingested (or refused) yet, not only those its events announced:
events a few milliseconds apart can share one run, or reach Airflow while a run is being created and
start none, and each object must still be ingested now, not at the next event. One run at a time,
so two runs never take the same object. The objects are shared among up to ``ingest.parallel_tasks``
`ingest` tasks; a refused object does not stop the others, and `report` fails the run naming it.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, Param, task

from mlfactory.config import load_config
from mlfactory.storage import prefix_pattern
from mlfactory_airflow.assets import events_or_sweep, pipeline_assets

cfg = load_config()
assets = pipeline_assets(cfg)

with DAG(
    dag_id="ml_ingest",
    description="Snapshot newly landed objects into the raw zone, addressed by content hash",
    schedule=events_or_sweep(cfg, assets.landing),
    catchup=False,
    max_active_runs=1,
    tags=["mlfactory", "ingest"],
    doc_md=__doc__,
    params={
        "uri": Param(
            None,
            type=["null", "string"],
            title="Object to ingest",
            description="Empty: every landed object not ingested yet. Or one object under the landing prefix, tried "
                        f"now even if it was refused before. Example: {cfg.storage.landing_uri}/customers.csv",
            pattern=prefix_pattern(cfg.storage.landing_uri),
        ),
    },
):

    @task
    def landed_objects(params: dict, triggering_asset_events=None) -> list[list[str]]:
        """The object named in the form, or every landed object not ingested or refused yet, in shares
        (none: `ingest` is skipped)."""
        import logging

        from mlfactory import storage
        from mlfactory.data.ingest import pending_objects, spread
        from mlfactory_airflow.outcomes import task_outcome

        if params.get("uri"):
            with task_outcome():
                return [[storage.under(params["uri"], cfg.storage.landing_uri, "the form's uri")]]
        pending = pending_objects(cfg)
        # A watcher's event carries the trigger's payload under extra["payload"].
        events = triggering_asset_events.get(assets.landing, []) if triggering_asset_events else []
        announced = {(e.extra.get("payload") or {}).get("uri") for e in events} - {None}
        logging.getLogger(__name__).info(
            "%d landed object(s) not ingested yet; this run's events announced %d, %d of them among those",
            len(pending), len(announced), len(announced & {o.uri for o in pending}))
        return spread([(o.uri, o.size) for o in pending], cfg.ingest.parallel_tasks)

    @task(outlets=[assets.raw], map_index_template="{{ task.op_kwargs['uris'][0] if task.op_kwargs else '' }}",
          execution_timeout=timedelta(seconds=cfg.ingest.task_timeout_s),
          retries=2, retry_delay=timedelta(seconds=10))  # a lost worker or a storage error; bad input is no error here
    def ingest(uris: list[str], params: dict, outlet_events=None) -> dict:
        """Each object in turn → a raw snapshot; refused ones are recorded and reported by `report`."""
        from mlfactory.data.ingest import ingest_objects

        outcome = ingest_objects(cfg, uris, retry_refused=bool(params.get("uri")))
        outlet_events[assets.raw].extra = {"snapshots": [m["snapshot_uri"] for m in outcome["ingested"]]}
        return outcome

    @task(trigger_rule="none_failed")  # also after `ingest` was skipped: nothing waited
    def report(batches: list[list[str]], outcomes: list[dict]) -> dict:
        """Fails the run when an object was refused, naming it and why; skipped when nothing waited."""
        from mlfactory_airflow.outcomes import report_outcomes

        outcomes = list(outcomes or [])
        refused = {uri: why for outcome in outcomes for uri, why in outcome["refused"].items()}
        done = {m["source_uri"] for outcome in outcomes for m in outcome["ingested"]} | set(refused)
        done |= {uri for outcome in outcomes for uri in outcome["duplicates"]}
        unfinished = [uri for batch in batches for uri in batch if uri not in done]
        return report_outcomes("landed object", sum(map(len, batches)), refused, unfinished)

    batches = landed_objects()
    report(batches, ingest.expand(uris=batches))
