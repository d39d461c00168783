"""The `azure` backend's Airflow side: BlobCreated events from a Storage Queue (or blob listing), Azure ML
command jobs, the online endpoint rollout (``mlfactory.serving.rollout`` through ``AzureMLEndpointAdapter``, by traffic)
and batch endpoints."""

from __future__ import annotations

from mlfactory_airflow.backends import AirflowBackend
from mlfactory_airflow.backends.azure.operators import AzureMLBatchOperator, AzureMLTrainingOperator


class AzureBackend(AirflowBackend):
    training_operator = AzureMLTrainingOperator
    batch_operator = AzureMLBatchOperator
    endpoint_adapter = "mlfactory_airflow.backends.azure.hooks:AzureMLEndpointAdapter"
    deploy_doc = ("`stage` registers the version as an Azure ML model (its files stay in the bucket), creates the managed "
                  "online endpoint if needed and the version's deployment beside the served one with no traffic (the "
                  "project's model server, `/score`) and its Azure Monitor autoscale (`serving.min_replicas`.."
                  "`max_replicas` at `azure.autoscale_target_cpu`); `health_check` waits for it to be provisioned; "
                  "`smoke_test` sends holdout rows to it alone; `canary` gives it `serving.canary_percent` of the "
                  "traffic, waits `serving.canary_wait_s`, then sends `serving.canary_requests` holdout rows through the "
                  "endpoint (error rate under `serving.max_error_rate`, latency under `serving.max_latency_ms` when "
                  "set); `full_traffic` gives it all the traffic and deletes the old deployment. `rollback` restores the "
                  "old traffic and deletes the new deployment.")
    batch_doc = ("the version's deployment on the model's batch endpoint (the project's batch driver on its image, "
                 "`azure.batch_compute`) over one manifest per snapshot; Parquet predictions land under the run's "
                 "output folder, one `source=<snapshot>` folder each.")

    def landing_trigger(self):
        from urllib.parse import urlparse

        from mlfactory.data.ingest import ledger_uri

        cfg, settings = self.cfg, self.cfg.backend
        if not settings.event_queue:
            from mlfactory_airflow.triggers.storage import StoragePrefixPollTrigger

            return StoragePrefixPollTrigger(prefix_uri=cfg.storage.landing_uri, poll_interval=cfg.ingest.poll_interval_s,
                                            settle_seconds=cfg.ingest.settle_s, ledger_uri=ledger_uri(cfg))
        from mlfactory_airflow.backends.azure.triggers import BlobQueueEventTrigger

        landing = urlparse(cfg.storage.landing_uri)
        return BlobQueueEventTrigger(queue=settings.event_queue, storage_conn_id=settings.storage_conn_id,
                                     account=settings.storage_account, scheme=landing.scheme,
                                     container=landing.netloc.split("@")[0], prefix=landing.path.strip("/") + "/",
                                     ledger_uri=ledger_uri(cfg))
