"""The `local` backend's Airflow side: a folder watcher, torchrun training, the local endpoint's blue/green
rollout (stage -> health_check -> smoke_test -> canary -> full_traffic) and batch scoring in the task."""

from __future__ import annotations

from airflow.sdk import task

from mlfactory_airflow.backends import AirflowBackend, SpecOperator
from mlfactory_airflow.backends.local.training import LocalTrainingOperator


class LocalBatchScoreOperator(SpecOperator):
    """Scores a ``BatchJobSpec`` in this task, in chunks (``mlfactory.backends.local.scoring``)."""

    ui_color = "#e3f1dc"

    def execute(self, context) -> dict:
        from mlfactory.backends.local.scoring import score
        from mlfactory.config import load_config
        from mlfactory.specs import BatchJobSpec
        from mlfactory_airflow.outcomes import task_outcome

        with task_outcome():
            return score(load_config(), BatchJobSpec.model_validate(self.spec))


class LocalBackend(AirflowBackend):
    training_operator = LocalTrainingOperator
    batch_operator = LocalBatchScoreOperator
    deploy_doc = ("`stage` loads the version as the idle colour next to the served one on the local model server, "
                  "`health_check`, `smoke_test` (holdout rows sent to it alone), `canary` (`serving.canary_percent` of "
                  "the traffic for `serving.canary_requests` requests, error rate under `serving.max_error_rate`), then "
                  "`full_traffic`, which unloads the old colour. `rollback` returns the traffic to the old colour.")
    batch_doc = ("chunks of `batch_scoring.chunk_rows` rows scored in the task, written as Parquet parts (key columns, "
                 "outputs, model version, snapshot, time).")

    def landing_trigger(self):
        from mlfactory.ingest import ledger_uri
        from mlfactory_airflow.backends.local.triggers import LocalBucketChangeTrigger

        cfg = self.cfg
        return LocalBucketChangeTrigger(prefix_uri=cfg.storage.landing_uri, poll_interval=cfg.ingest.poll_interval_s,
                                        settle_seconds=cfg.ingest.settle_s, ledger_uri=ledger_uri(cfg))

    def deploy_steps(self, spec) -> list:
        cfg = self.cfg

        def rollout(spec: dict):
            from mlfactory.backends.local.rollout import Rollout
            from mlfactory.specs import EndpointSpec

            return Rollout(cfg, EndpointSpec.model_validate(spec))

        @task
        def stage(spec: dict) -> dict:
            """Start the endpoint if needed; load the version as the idle colour, with no traffic yet."""
            return rollout(spec).stage()

        @task
        def health_check(spec: dict, plan: dict) -> None:
            rollout(spec).health_check(plan)

        @task
        def smoke_test(spec: dict, plan: dict) -> None:
            """Holdout rows sent to the new version alone must get sane predictions."""
            rollout(spec).smoke_test(plan)

        @task
        def canary(spec: dict, plan: dict) -> dict:
            """A share of the traffic on the new version; its error rate must stay under the limit."""
            return rollout(spec).canary(plan)

        @task
        def full_traffic(spec: dict, plan: dict) -> dict:
            """All traffic to the new version; the old one is unloaded; the endpoint state is written."""
            return rollout(spec).complete(plan)

        plan = stage(spec)
        return [plan, health_check(spec, plan), smoke_test(spec, plan), canary(spec, plan), full_traffic(spec, plan)]

    def restore_traffic(self, state: dict) -> None:
        from mlfactory.backends.local.endpoint import LocalEndpoint

        LocalEndpoint(self.cfg).restore(state.get("rollout"))
