"""The `aws` backend's Airflow side, on the amazon provider: S3 -> SQS (or S3 listing) landing events,
SageMaker training jobs, endpoint rollouts (stage -> smoke_test -> canary -> full_traffic, by production
variant weights) and batch transform jobs."""

from __future__ import annotations

from mlfactory_airflow.backends import AirflowBackend
from mlfactory_airflow.backends.aws.sagemaker import (SageMakerCanaryOperator, SageMakerEndpointOperator,
                                                      SageMakerEndpointStageOperator, SageMakerSmokeTestOperator,
                                                      SageMakerTransformOperator)
from mlfactory_airflow.backends.aws.training import SageMakerTrainingOperator


class AwsBackend(AirflowBackend):
    training_operator = SageMakerTrainingOperator
    batch_operator = SageMakerTransformOperator
    deploy_doc = ("`stage` creates the version's SageMaker Model and updates the endpoint (blue/green) to a config where "
                  "the served variant keeps all the traffic and the new one (`v<version>`) stands beside it at weight 0 "
                  "(or creates the endpoint); `smoke_test` sends holdout rows to the new variant alone; `canary` gives it "
                  "`serving.canary_percent` of the traffic for `serving.canary_wait_s`, then sends "
                  "`serving.canary_requests` holdout rows (error rate under `serving.max_error_rate`, no alarm of "
                  "`serving.rollback_alarms` firing); `full_traffic` gives it all the traffic, moves the endpoint to a "
                  "config with it alone and sets up autoscaling. `rollback` puts the weights back on the old variant and "
                  "the endpoint back on its old config.")
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
        return [stage, *(step(task_id=task_id, spec=spec, plan=stage.output) for task_id, step in (
            ("smoke_test", SageMakerSmokeTestOperator), ("canary", SageMakerCanaryOperator),
            ("full_traffic", SageMakerEndpointOperator)))]

    def restore_traffic(self, state: dict) -> None:
        """The weights back on the old variant, and the endpoint back (blue/green, not waited for) on the config
        that served it alone. After a failed first deployment there is nothing to go back to: the endpoint stays."""
        import logging

        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from mlfactory.backends.aws.sagemaker import update_endpoint_request, weights_request

        log = logging.getLogger(__name__)
        plan = state.get("rollout") or {}
        if plan.get("already_served") or not plan.get("endpoint"):
            return
        if not plan.get("old"):
            log.warning("v%s was the first version on %s: no earlier one to return to; the endpoint stays until a "
                        "version passes its rollout", plan.get("version"), plan["endpoint"])
            return
        sagemaker = SageMakerHook(aws_conn_id=self.cfg.backend.conn_id, region_name=self.cfg.backend.region).conn
        described = sagemaker.describe_endpoint(EndpointName=plan["endpoint"])
        if described["EndpointStatus"] != "InService":
            log.warning("endpoint %s is %s: SageMaker finishes (or rolls back) that update first; the traffic is left "
                        "to it", plan["endpoint"], described["EndpointStatus"])
            return
        names = {v["VariantName"] for v in described.get("ProductionVariants", [])}
        if {plan["old"], plan["new"]} <= names:
            sagemaker.update_endpoint_weights_and_capacities(**weights_request(plan["endpoint"], {plan["old"]: 100,
                                                                                                  plan["new"]: 0}))
            log.info("traffic of %s back on %s", plan["endpoint"], plan["old"])
        if plan.get("previous_config") and described["EndpointConfigName"] != plan["previous_config"]:
            sagemaker.update_endpoint(**update_endpoint_request(plan["endpoint"], plan["previous_config"],
                                                                self.cfg.serving.rollback_alarms))
            log.info("endpoint %s going back to %s (blue/green)", plan["endpoint"], plan["previous_config"])
