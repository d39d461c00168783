"""The `azure` backend's Airflow side: BlobCreated events from a Storage Queue (or blob listing), Azure ML
command jobs, the online endpoint rollout (stage -> canary -> full_traffic, by traffic) and batch endpoints."""

from __future__ import annotations

from mlfactory_airflow.backends import AirflowBackend
from mlfactory_airflow.backends.azure.azureml import (AzureMLBatchOperator, AzureMLCanaryOperator,
                                                      AzureMLFullTrafficOperator, AzureMLStageOperator,
                                                      AzureMLTrainingOperator)


class AzureBackend(AirflowBackend):
    training_operator = AzureMLTrainingOperator
    batch_operator = AzureMLBatchOperator
    deploy_doc = ("`stage` registers the version as an Azure ML model (its files stay in the bucket) and creates the "
                  "managed online endpoint if needed; `canary` creates the version's deployment beside the served one "
                  "(the project's model server, `/score`), its Azure Monitor autoscale (`serving.min_replicas`.."
                  "`max_replicas` at `azure.autoscale_target_cpu`), gives it `serving.canary_percent` of the traffic, "
                  "waits `serving.canary_wait_s`, then sends `serving.canary_requests` holdout rows to it (error rate "
                  "under `serving.max_error_rate`); `full_traffic` gives it all the traffic and deletes the old "
                  "deployment. `rollback` restores the old traffic and deletes the new deployment.")
    batch_doc = ("the version's deployment on the model's batch endpoint (the project's batch driver on its image, "
                 "`azure.batch_compute`) over one manifest per snapshot; Parquet predictions land under the run's "
                 "output folder, one `source=<snapshot>` folder each.")

    def landing_trigger(self):
        from urllib.parse import urlparse

        from mlfactory.ingest import ledger_uri

        cfg, settings = self.cfg, self.cfg.backend
        if not settings.event_queue:
            from mlfactory_airflow.backends.local.triggers import LocalBucketChangeTrigger

            return LocalBucketChangeTrigger(prefix_uri=cfg.storage.landing_uri, poll_interval=cfg.ingest.poll_interval_s,
                                            settle_seconds=cfg.ingest.settle_s, ledger_uri=ledger_uri(cfg))
        from mlfactory_airflow.backends.azure.triggers import BlobQueueEventTrigger

        landing = urlparse(cfg.storage.landing_uri)
        return BlobQueueEventTrigger(queue=settings.event_queue, storage_conn_id=settings.storage_conn_id,
                                     account=settings.storage_account, scheme=landing.scheme,
                                     container=landing.netloc.split("@")[0], prefix=landing.path.strip("/") + "/",
                                     ledger_uri=ledger_uri(cfg))

    def deploy_steps(self, spec) -> list:
        stage = AzureMLStageOperator(task_id="stage", spec=spec)
        canary = AzureMLCanaryOperator(task_id="canary", spec=spec, plan=stage.output)
        full = AzureMLFullTrafficOperator(task_id="full_traffic", spec=spec, plan=stage.output, canary=canary.output)
        return [stage, canary, full]

    def restore_traffic(self, state: dict) -> None:
        """The traffic of before the rollout, and the new deployment deleted (not waited for)."""
        import logging

        from mlfactory_airflow.backends.azure.hooks import AzureMLHook, not_found

        plan = state.get("rollout") or {}
        if not plan.get("endpoint") or plan.get("already_served"):
            return
        log = logging.getLogger(__name__)
        ml = AzureMLHook.of(self.cfg.backend).get_conn()
        endpoint = ml.online_endpoints.get(plan["endpoint"])
        before = plan["serving"]  # {} when nothing was served: the new deployment must lose its traffic to go
        if {k: int(v) for k, v in (endpoint.traffic or {}).items() if v} != before:
            endpoint.traffic = before or {plan["deployment"]: 0}
            ml.online_endpoints.begin_create_or_update(endpoint).result()
            log.info("traffic of %s back to %s", plan["endpoint"], before or "none")
        if not_found(ml.online_deployments.get, plan["deployment"], plan["endpoint"]) is not None:
            ml.online_deployments.begin_delete(plan["deployment"], plan["endpoint"])
            log.info("deleting the new deployment %s", plan["deployment"])
