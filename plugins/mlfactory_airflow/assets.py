"""The Asset chain of the lifecycle (see DESIGN.md), built from the pipeline config.

Every DAG file builds its Assets here, so producer and consumer always agree on names and URIs.
"""

from __future__ import annotations

from dataclasses import dataclass

from airflow.sdk import Asset, AssetWatcher

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


def bucket_change_trigger(cfg: PipelineConfig):
    """The event trigger that watches the landing prefix on the configured backend."""
    if cfg.backend == "local":
        from mlfactory_airflow.triggers.local_bucket import LocalBucketChangeTrigger

        return LocalBucketChangeTrigger(
            prefix_uri=cfg.storage.landing_uri,
            poll_interval=cfg.ingest.poll_interval_s,
            settle_seconds=cfg.ingest.settle_s,
        )
    if cfg.backend == "aws":
        from urllib.parse import urlparse

        from mlfactory_airflow.triggers.s3_events import S3EventQueueTrigger, S3PrefixPollTrigger

        landing = urlparse(cfg.storage.landing_uri)
        where = {"bucket": landing.netloc, "prefix": landing.path.strip("/") + "/", "aws_conn_id": cfg.aws.conn_id,
                 "region_name": cfg.aws.region}
        if cfg.aws.sqs_queue_url:
            return S3EventQueueTrigger(queue_url=cfg.aws.sqs_queue_url, **where)
        return S3PrefixPollTrigger(poll_interval=cfg.ingest.poll_interval_s, settle_seconds=cfg.ingest.settle_s, **where)
    raise NotImplementedError(f"backend {cfg.backend!r} has no bucket-change trigger yet; see {cfg.source}")


def pipeline_assets(cfg: PipelineConfig) -> PipelineAssets:
    return PipelineAssets(
        landing=Asset(
            name="mlfactory.landing",
            uri=cfg.storage.landing_uri,
            watchers=[AssetWatcher(name="mlfactory_landing_watcher", trigger=bucket_change_trigger(cfg))],
        ),
        raw=Asset(name="mlfactory.raw", uri=cfg.storage.raw_uri),
        curated=Asset(name="mlfactory.curated", uri=cfg.storage.curated_uri),
        drift_detected=Asset(name="mlfactory.drift_detected", uri=cfg.storage.uri("reports_prefix", "drift")),
        candidate=Asset(name="mlfactory.candidate", uri=cfg.storage.uri("models_prefix", "candidates")),
        champion=Asset(name="mlfactory.champion", uri=cfg.storage.uri("models_prefix", "champion")),
        predictions=Asset(name="mlfactory.predictions", uri=cfg.storage.uri("predictions_prefix", "batch")),
    )
