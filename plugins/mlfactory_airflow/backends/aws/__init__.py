"""The `aws` backend's Airflow side, on the amazon provider: S3 -> SQS (or S3 listing) landing events,
SageMaker training jobs, endpoint rollouts (stage -> full_traffic, SageMaker running the canary and
the rollback alarms) and batch transform jobs."""

from __future__ import annotations

from mlfactory_airflow.backends import AirflowBackend
from mlfactory_airflow.backends.aws.sagemaker import (SageMakerEndpointOperator, SageMakerEndpointStageOperator,
                                                      SageMakerTransformOperator)
from mlfactory_airflow.backends.aws.training import SageMakerTrainingOperator


class AwsBackend(AirflowBackend):
    training_operator = SageMakerTrainingOperator
    batch_operator = SageMakerTransformOperator
    deploy_doc = ("`stage` creates the version's SageMaker Model and a new EndpointConfig; `full_traffic` creates the "
                  "endpoint or updates it blue/green (SageMaker's canary of `serving.canary_percent` of the capacity "
                  "for `serving.canary_wait_s`, rolled back by the alarms in `serving.rollback_alarms`), then sets up "
                  "autoscaling. SageMaker restores the traffic itself after a failed update.")
    batch_doc = ("a SageMaker batch transform job (the same model server, each curated file sent whole as Parquet) "
                 "over a manifest of the snapshots' files; answers land as `<file>.out` (JSON, in the file's row order).")

    def landing_trigger(self):
        from urllib.parse import urlparse

        from mlfactory.ingest import ledger_uri
        from mlfactory_airflow.backends.aws.triggers import S3EventQueueTrigger, S3PrefixPollTrigger

        cfg, settings = self.cfg, self.cfg.backend
        landing = urlparse(cfg.storage.landing_uri)
        where = {"bucket": landing.netloc, "prefix": landing.path.strip("/") + "/", "aws_conn_id": settings.conn_id,
                 "region_name": settings.region, "ledger_uri": ledger_uri(cfg)}
        if settings.sqs_queue_url:
            return S3EventQueueTrigger(queue_url=settings.sqs_queue_url, **where)
        return S3PrefixPollTrigger(poll_interval=cfg.ingest.poll_interval_s, settle_seconds=cfg.ingest.settle_s, **where)

    def deploy_steps(self, spec) -> list:
        stage = SageMakerEndpointStageOperator(task_id="stage", spec=spec)
        return [stage, SageMakerEndpointOperator(task_id="full_traffic", spec=spec, staged=stage.output)]
