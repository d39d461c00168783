"""The `gcp` backend's Airflow side, on the google provider: GCS -> Pub/Sub (or GCS listing) landing
events, Vertex AI custom jobs, the endpoint rollout (stage -> canary -> full_traffic, by traffic split)
and batch prediction jobs."""

from __future__ import annotations

from mlfactory_airflow.backends import AirflowBackend
from mlfactory_airflow.backends.gcp.vertex import (VertexBatchPredictionOperator, VertexCanaryOperator,
                                                   VertexFullTrafficOperator, VertexStageOperator, VertexTrainingOperator)


class GcpBackend(AirflowBackend):
    training_operator = VertexTrainingOperator
    batch_operator = VertexBatchPredictionOperator
    deploy_doc = ("`stage` uploads the version to the Vertex Model Registry (its files stay in GCS; the container is the "
                  "project's model server) and creates the endpoint if needed; `canary` deploys it beside the served "
                  "model with `serving.canary_percent` of the traffic and autoscaling (`serving.min_replicas`.."
                  "`max_replicas`, at `gcp.autoscaling_target_utilization`), waits `serving.canary_wait_s`, then sends "
                  "`serving.canary_requests` holdout rows through the endpoint (error rate under "
                  "`serving.max_error_rate`); `full_traffic` gives it all the traffic and undeploys the old model. "
                  "`rollback` restores the old traffic split and undeploys the new model.")
    batch_doc = ("a Vertex batch prediction job on the version's Vertex model (the same model server) over JSON Lines "
                 "instances of the snapshots' rows; Vertex writes `prediction.results-*` files (each line the instance, "
                 "its keys and snapshot, and the prediction) under the run's output folder.")

    def landing_trigger(self):
        from urllib.parse import urlparse

        from mlfactory.ingest import ledger_uri
        from mlfactory_airflow.backends.gcp.triggers import GcsNotificationTrigger, GcsPrefixPollTrigger

        cfg, settings = self.cfg, self.cfg.backend
        landing = urlparse(cfg.storage.landing_uri)
        where = {"bucket": landing.netloc, "prefix": landing.path.strip("/") + "/", "gcp_conn_id": settings.conn_id,
                 "ledger_uri": ledger_uri(cfg)}
        if settings.pubsub_subscription:
            return GcsNotificationTrigger(subscription=settings.pubsub_subscription, project_id=settings.project, **where)
        return GcsPrefixPollTrigger(poll_interval=cfg.ingest.poll_interval_s, settle_seconds=cfg.ingest.settle_s, **where)

    def deploy_steps(self, spec) -> list:
        stage = VertexStageOperator(task_id="stage", spec=spec)
        canary = VertexCanaryOperator(task_id="canary", spec=spec, plan=stage.output)
        full = VertexFullTrafficOperator(task_id="full_traffic", spec=spec, plan=stage.output, canary=canary.output)
        return [stage, canary, full]

    def restore_traffic(self, state: dict) -> None:
        """The traffic split of before the rollout, and the new deployed model undeployed (not waited for)."""
        import logging

        from mlfactory.backends.gcp.vertex import update_endpoint_request
        from mlfactory_airflow.backends.gcp.clients import VertexConnection

        plan = state.get("rollout") or {}
        if not plan.get("endpoint") or plan.get("already_served"):
            return
        log = logging.getLogger(__name__)
        client = VertexConnection.of(self.cfg.backend).client("endpoint")
        endpoint = client.get_endpoint(name=plan["endpoint"])
        deployed = {d.id for d in endpoint.deployed_models}
        before = {k: v for k, v in plan["serving"].items() if k in deployed}
        if before and dict(endpoint.traffic_split) != before:
            client.update_endpoint(request=update_endpoint_request(endpoint, before))
            log.info("traffic of %s back to %s", plan["endpoint"], before)
        if plan.get("new") in deployed:
            operation = client.undeploy_model(endpoint=plan["endpoint"], deployed_model_id=plan["new"],
                                              traffic_split=before)
            log.info("undeploying the new deployed model %s (operation %s)", plan["new"], operation.operation.name)
