"""The `aws` backend's Airflow side, on the amazon provider: S3 -> SQS (or S3 listing) landing events,
SageMaker training jobs, endpoint rollouts (``mlfactory.serving.rollout`` through ``SageMakerEndpointAdapter``, by
production variant weights) and batch transform jobs."""

from __future__ import annotations

from mlfactory_airflow.backends import AirflowBackend
from mlfactory_airflow.backends.aws.operators import SageMakerTrainingOperator, SageMakerTransformOperator


class AwsBackend(AirflowBackend):
    training_operator = SageMakerTrainingOperator
    batch_operator = SageMakerTransformOperator
    endpoint_adapter = "mlfactory_airflow.backends.aws.hooks:SageMakerEndpointAdapter"
    deploy_doc = ("`stage` creates the version's SageMaker Model and updates the endpoint (blue/green) to a config where "
                  "the served variant keeps all the traffic and the new one (`v<version>`) stands beside it at weight 0 "
                  "(or creates the endpoint); `health_check` waits for the endpoint in service with the new variant; "
                  "`smoke_test` sends holdout rows to the new variant alone; `canary` gives it "
                  "`serving.canary_percent` of the traffic for `serving.canary_wait_s`, then sends "
                  "`serving.canary_requests` holdout rows through the endpoint (error rate under "
                  "`serving.max_error_rate`, latency under `serving.max_latency_ms` when set, no CloudWatch alarm of "
                  "`serving.rollback_alarms` firing); `full_traffic` gives it all the traffic, moves the endpoint to a "
                  "config with it alone and sets up autoscaling. `rollback` puts the weights back on the old variant and "
                  "the endpoint back on its old config.")
    batch_doc = ("a SageMaker batch transform job (the same model server, each curated file sent whole as Parquet) "
                 "over a manifest of the snapshots' files; answers land as `<file>.out` (JSON, in the file's row order).")

    def landing_trigger(self):
        from urllib.parse import urlparse

        from mlfactory.data.ingest import ledger_uri

        from mlfactory_airflow.backends.aws.triggers import S3EventQueueTrigger, S3PrefixPollTrigger

        cfg, settings = self.cfg, self.cfg.backend
        landing = urlparse(cfg.storage.landing_uri)
        where = {"bucket": landing.netloc, "prefix": landing.path.strip("/") + "/", "aws_conn_id": settings.conn_id,
                 "region_name": settings.region, "ledger_uri": ledger_uri(cfg)}
        if settings.sqs_queue_url:
            return S3EventQueueTrigger(queue_url=settings.sqs_queue_url, **where)
        return S3PrefixPollTrigger(poll_interval=cfg.ingest.poll_interval_s, settle_seconds=cfg.ingest.settle_s, **where)
