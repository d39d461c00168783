"""ml_ingest: a new object under the landing prefix → an immutable raw snapshot → Asset `raw`.

Started by the bucket-change AssetWatcher on Asset `landing` (one event per new or changed object),
or by hand from the trigger form with the URI of an object to ingest.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param, task

from mlfactory.config import load_config
from mlfactory_airflow.assets import pipeline_assets

cfg = load_config()
assets = pipeline_assets(cfg)

with DAG(
    dag_id="ml_ingest",
    description="Snapshot newly landed objects into the raw zone, addressed by content hash",
    schedule=[assets.landing],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=4,
    tags=["mlfactory", "ingest"],
    doc_md=__doc__,
    params={
        "uri": Param(
            None,
            type=["null", "string"],
            title="Object to ingest",
            description=f"Leave empty for event-started runs. Example: {cfg.storage.landing_uri}/customers.csv",
        ),
    },
):

    @task
    def landed_objects(params: dict, triggering_asset_events=None) -> list[str]:
        """The objects this run ingests: the one named in the form, or those the landing events announced."""
        if params.get("uri"):
            return [params["uri"]]
        # A watcher's event carries the trigger's payload under extra["payload"].
        payloads = [event.extra.get("payload") or {} for event in triggering_asset_events[assets.landing]]
        uris = [payload["uri"] for payload in payloads if "uri" in payload]
        if not uris:
            raise ValueError("nothing to ingest: no landing event started this run; set 'uri' in the trigger form")
        return list(dict.fromkeys(uris))

    @task(outlets=[assets.raw], map_index_template="{{ task.op_kwargs['uri'] if task.op_kwargs else '' }}")
    def ingest(uri: str, outlet_events=None) -> dict:
        from mlfactory import NothingToDo
        from mlfactory.ingest import ingest_object
        from mlfactory_airflow.outcomes import task_outcome

        with task_outcome():  # bad input fails at once: retrying will not help
            manifest, created = ingest_object(cfg, uri)
            if not created:
                raise NothingToDo(f"{uri} has the same bytes as snapshot {manifest.snapshot_uri}: ingested already")
        outlet_events[assets.raw].extra = manifest.to_dict()
        return manifest.to_dict()

    ingest.expand(uri=landed_objects())
