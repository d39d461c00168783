"""The `local` backend's Airflow side: a folder watcher, torchrun training, the local endpoint's blue/green
rollout (stage -> health_check -> smoke_test -> canary -> full_traffic) and batch scoring in the task.
"""

from __future__ import annotations

from mlfactory_airflow.backends import AirflowBackend
from mlfactory_airflow.backends.local.operators import LocalBatchScoreOperator, LocalTrainingOperator


class LocalBackend(AirflowBackend):
    training_operator = LocalTrainingOperator
    batch_operator = LocalBatchScoreOperator
    endpoint_adapter = "mlfactory.backends.local.rollout:LocalEndpointAdapter"
    deploy_doc = ("`stage` loads the version as the idle colour next to the served one on the local model server; "
                  "`health_check` asks it whether it is ready; `smoke_test` sends holdout rows to it alone; `canary` gives "
                  "it `serving.canary_percent` of the traffic and sends `serving.canary_requests` holdout rows through "
                  "the endpoint (error rate under `serving.max_error_rate`, latency under `serving.max_latency_ms` when "
                  "set; no wait, no alarms here); `full_traffic` unloads the old colour. `rollback` returns the traffic "
                  "to the old colour.")
    batch_doc = ("chunks of `batch_scoring.chunk_rows` rows scored in the task, written as Parquet parts (key columns, "
                 "outputs, model version, snapshot, time).")

    def landing_trigger(self):
        from mlfactory.data.ingest import ledger_uri

        from mlfactory_airflow.triggers.storage import StoragePrefixPollTrigger

        cfg = self.cfg
        return StoragePrefixPollTrigger(prefix_uri=cfg.storage.landing_uri, poll_interval=cfg.ingest.poll_interval_s,
                                        settle_seconds=cfg.ingest.settle_s, ledger_uri=ledger_uri(cfg))

