"""ml_validate: raw snapshots → ETL + Great Expectations validation → curated Parquet → Asset `curated`.

Scheduled on Asset `raw` and on the ``ingest.sweep_schedule`` sweep, or started by hand from the
trigger form with a raw snapshot URI. A run takes every raw snapshot not curated yet (its validation
summary, written last, is missing), not only those its events carry, one run at a time, shared among
up to ``ingest.parallel_tasks`` `curate` tasks. Rows that fail a check go to quarantine with the
failed expectation; a snapshot whose quarantined share passes the configured limit is not curated,
and `report` fails the run naming the expectation, column and count; the other snapshots go on.
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
    dag_id="ml_validate",
    description="ETL raw snapshots to curated Parquet and validate them with Great Expectations",
    schedule=events_or_sweep(cfg, assets.raw),
    catchup=False,
    max_active_runs=1,
    tags=["mlfactory", "validate"],
    doc_md=__doc__,
    params={
        "snapshot_uri": Param(
            None,
            type=["null", "string"],
            title="Raw snapshot to validate",
            description="Empty: every raw snapshot not curated yet. Or one snapshot, curated again (its curated "
                        f"partition is replaced). Example: {cfg.storage.raw_uri}/<sha256>/data.csv",
            pattern=prefix_pattern(cfg.storage.raw_uri),
        ),
    },
):

    @task
    def snapshots(params: dict) -> list[list[str]]:
        """The snapshot named in the form, or every raw snapshot not curated yet, in shares (none: `curate`
        is skipped)."""
        from mlfactory.data.etl import pending_snapshots
        from mlfactory.data.ingest import read_manifest, spread
        from mlfactory_airflow.outcomes import task_outcome

        from mlfactory import storage

        with task_outcome():
            if params.get("snapshot_uri"):
                given = storage.under(params["snapshot_uri"], cfg.storage.raw_uri, "the form's snapshot_uri")
                return [[read_manifest(given).snapshot_uri]]  # a clear error if there is none
        pending = pending_snapshots(cfg)
        return spread([(o.uri, o.size) for o in pending], cfg.ingest.parallel_tasks)

    @task(outlets=[assets.curated], map_index_template="{{ task.op_kwargs['uris'][0] if task.op_kwargs else '' }}",
          execution_timeout=timedelta(seconds=cfg.validation.task_timeout_s),
          retries=2, retry_delay=timedelta(seconds=10))  # a lost worker or a storage error; bad data is no error here
    def curate(uris: list[str], outlet_events=None) -> dict:
        """Each snapshot in turn → curated Parquet; failed ones are reported by `report`. Skipped (no
        `curated` event) when none of its share passed."""
        from mlfactory import NothingToDo
        from mlfactory.data.etl import curate_snapshots
        from mlfactory_airflow.outcomes import task_outcome

        outcome = curate_snapshots(cfg, uris)
        with task_outcome():
            if not outcome["curated"]:
                raise NothingToDo(f"no snapshot of this share passed validation: {sorted(outcome['failed'])}")
        outlet_events[assets.curated].extra = {"snapshots": outcome["curated"],
                                               "curated_rows": sum(c["curated_rows"] for c in outcome["curated"])}
        return outcome

    @task(trigger_rule="none_failed")  # also after `curate` was skipped: none passed, or nothing waited
    def report(batches: list[list[str]]) -> dict:
        """Fails the run when a snapshot failed validation (naming the expectation) or was not curated;
        reads each snapshot's validation summary, the record of its last curation."""
        from mlfactory.data.etl import curation_summary
        from mlfactory_airflow.outcomes import report_outcomes

        summaries = {uri: curation_summary(cfg, uri) for batch in batches for uri in batch}
        failed = {uri: s["reason"] for uri, s in summaries.items() if s is not None and not s["success"]}
        unfinished = [uri for uri, s in summaries.items() if s is None]
        return report_outcomes("raw snapshot", len(summaries), failed, unfinished)

    batches = snapshots()
    curate.expand(uris=batches) >> report(batches)
