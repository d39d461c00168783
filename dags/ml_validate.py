"""ml_validate: Asset `raw` → ETL + Great Expectations validation → curated Parquet → Asset `curated`.

Scheduled on Asset `raw`, or started by hand from the trigger form with a raw snapshot URI.
Rows that fail a check go to quarantine with the failed expectation; a snapshot whose quarantined
share passes the configured limit fails here, naming the expectation, column and count.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param, task

from mlfactory.config import load_config
from mlfactory_airflow.assets import pipeline_assets

cfg = load_config()
assets = pipeline_assets(cfg)

with DAG(
    dag_id="ml_validate",
    description="ETL raw snapshots to curated Parquet and validate them with Great Expectations",
    schedule=[assets.raw],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=2,
    tags=["mlfactory", "validate"],
    doc_md=__doc__,
    params={
        "snapshot_uri": Param(
            None,
            type=["null", "string"],
            title="Raw snapshot to validate",
            description=f"Leave empty for event-started runs. Example: {cfg.storage.raw_uri}/<sha256>/data.csv",
        ),
    },
):

    @task
    def snapshots(params: dict, triggering_asset_events=None) -> list[str]:
        """The snapshots this run validates: the one named in the form, or those the `raw` events carry."""
        if params.get("snapshot_uri"):
            return [params["snapshot_uri"]]
        uris = [e.extra["snapshot_uri"] for e in triggering_asset_events[assets.raw] if "snapshot_uri" in e.extra]
        if not uris:
            raise ValueError("nothing to validate: no `raw` event started this run; set 'snapshot_uri' in the form")
        return list(dict.fromkeys(uris))

    @task(outlets=[assets.curated])
    def curate(snapshot_uri: str, outlet_events=None) -> dict:
        from mlfactory.etl import curate_snapshot
        from mlfactory_airflow.outcomes import task_outcome

        with task_outcome():  # the data is wrong: a retry would fail the same way
            result = curate_snapshot(cfg, snapshot_uri)
        outlet_events[assets.curated].extra = result.to_extra()
        return result.to_extra()

    curate.expand(snapshot_uri=snapshots())
