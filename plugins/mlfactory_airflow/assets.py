"""The Asset chain of the lifecycle (see DESIGN.md), built from the pipeline config.

Every DAG file builds its Assets here, so producer and consumer always agree on names and URIs.
The landing Asset is watched by the configured backend's event trigger.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from airflow.sdk import Asset, AssetOrTimeSchedule, AssetWatcher, CronTriggerTimetable

from mlfactory.config import PipelineConfig


@dataclass(frozen=True)
class PipelineAssets:
    landing: Asset  # watched: a new object under the landing prefix
    raw: Asset  # an immutable raw snapshot was ingested
    curated: Asset  # a snapshot passed ETL and validation
    drift_detected: Asset  # monitoring saw drift over the threshold (extra: the drifted features)
    candidate: Asset  # ml_train's best trial (extra: MLflow run and model URI)
    champion: Asset  # ml_promote moved alias `champion` (extra: model name and version)
    predictions: Asset  # ml_batch_score wrote a predictions table (extra: its URI, rows, model version)


def pipeline_assets(cfg: PipelineConfig) -> PipelineAssets:
    from mlfactory_airflow.backends import backend_for

    return PipelineAssets(
        landing=Asset(
            name="mlfactory.landing",
            uri=cfg.storage.landing_uri,
            watchers=[AssetWatcher(name="mlfactory_landing_watcher", trigger=backend_for(cfg).landing_trigger())],
        ),
        raw=Asset(name="mlfactory.raw", uri=cfg.storage.raw_uri),
        curated=Asset(name="mlfactory.curated", uri=cfg.storage.curated_uri),
        drift_detected=Asset(name="mlfactory.drift_detected", uri=cfg.storage.uri("reports_prefix", "drift")),
        candidate=Asset(name="mlfactory.candidate", uri=cfg.storage.uri("models_prefix", "candidates")),
        champion=Asset(name="mlfactory.champion", uri=cfg.storage.uri("models_prefix", "champion")),
        predictions=Asset(name="mlfactory.predictions", uri=cfg.storage.uri("predictions_prefix", "batch")),
    )


def cron_or(expression: str, assets) -> AssetOrTimeSchedule:
    """``assets``' events, or the UTC cron ``expression``. Its first run is its next tick: left to Airflow, a DAG
    that first appears within a tenth of the cron's period after a tick (16 hours of a weekly one) runs that past
    tick at once, with nothing to do yet."""
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(expression, timezone="UTC", run_immediately=timedelta(0)),
                               assets=assets)


def events_or_sweep(cfg: PipelineConfig, asset: Asset):
    """The schedule of a DAG that takes every item not done yet (ml_ingest, ml_validate): ``asset``'s
    events, and the ``ingest.sweep_schedule`` sweep as the safety net under them."""
    if cfg.ingest.sweep_schedule is None:
        return [asset]
    return cron_or(cfg.ingest.sweep_schedule, asset)
