"""The `gcp` backend's Airflow side, on the google provider: GCS -> Pub/Sub (or GCS listing) landing
events, Vertex AI custom jobs, the endpoint rollout (``mlfactory.serving.rollout`` through ``VertexEndpointAdapter``, by
traffic split)
and batch prediction jobs."""

from __future__ import annotations

from mlfactory_airflow.backends import AirflowBackend
from mlfactory_airflow.backends.gcp.operators import VertexBatchPredictionOperator, VertexTrainingOperator


class GcpBackend(AirflowBackend):
    training_operator = VertexTrainingOperator
    batch_operator = VertexBatchPredictionOperator
    endpoint_adapter = "mlfactory_airflow.backends.gcp.hooks:VertexEndpointAdapter"
    deploy_doc = ("`stage` uploads the version to the Vertex Model Registry (its files stay in GCS; the container is the "
                  "project's model server), creates the endpoint if needed and deploys the version alone on the "
                  "endpoint's staging endpoint `<id>-staging` (on the endpoint itself when nothing serves yet): Vertex's "
                  "predict cannot be addressed to one deployed model; `health_check` waits for it; `smoke_test` sends "
                  "holdout rows to it alone; `canary` undeploys the staging copy, deploys the version beside the served "
                  "model with `serving.canary_percent` of the traffic and autoscaling (`serving.min_replicas`.."
                  "`max_replicas`, at `gcp.autoscaling_target_utilization`), waits `serving.canary_wait_s`, then sends "
                  "`serving.canary_requests` holdout rows through the endpoint (error rate under "
                  "`serving.max_error_rate`, latency under `serving.max_latency_ms` when set); `full_traffic` gives it "
                  "all the traffic and undeploys the old model. `rollback` restores the old traffic split and undeploys "
                  "the new model.")
    batch_doc = ("a Vertex batch prediction job on the version's Vertex model (the same model server) over JSON Lines "
                 "instances of the snapshots' rows; Vertex writes `prediction.results-*` files (each line the instance, "
                 "its keys and snapshot, and the prediction) under the run's output folder.")

    def landing_trigger(self):
        from urllib.parse import urlparse

        from mlfactory.data.ingest import ledger_uri

        from mlfactory_airflow.backends.gcp.triggers import GcsNotificationTrigger, GcsPrefixPollTrigger

        cfg, settings = self.cfg, self.cfg.backend
        landing = urlparse(cfg.storage.landing_uri)
        where = {"bucket": landing.netloc, "prefix": landing.path.strip("/") + "/", "gcp_conn_id": settings.conn_id,
                 "ledger_uri": ledger_uri(cfg)}
        if settings.pubsub_subscription:
            return GcsNotificationTrigger(subscription=settings.pubsub_subscription, project_id=settings.project, **where)
        return GcsPrefixPollTrigger(poll_interval=cfg.ingest.poll_interval_s, settle_seconds=cfg.ingest.settle_s, **where)
