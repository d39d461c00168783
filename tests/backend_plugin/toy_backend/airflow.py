"""The toy backend's Airflow side: a folder watcher of its own, training as one plain process, an endpoint that is
a record in the bucket whose model answers in the task (the rollout itself is every backend's), and a batch
step that writes what it scored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import TriggerEvent

from mlfactory.serving.rollout import EndpointAdapter

from mlfactory_airflow.backends import AirflowBackend, SpecOperator
from mlfactory_airflow.triggers.watermark import WatermarkedTrigger


class ToyLandingTrigger(WatermarkedTrigger):
    def __init__(self, prefix_uri: str, poll_interval: float = 1.0) -> None:
        super().__init__()
        self.prefix_uri, self.poll_interval = prefix_uri, poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{type(self).__module__}.{type(self).__qualname__}", {"prefix_uri": self.prefix_uri,
                                                                      "poll_interval": self.poll_interval}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from mlfactory import storage

        async for event in self.poll(lambda: storage.list_objects(self.prefix_uri),
                                     lambda obj: {"uri": obj.uri, "key": obj.key, "size": obj.size, "toy": True},
                                     self.poll_interval, 0):
            yield event


class ToyTrainingOperator(SpecOperator):
    def execute(self, context) -> dict:
        import json
        import os
        import subprocess
        import sys

        from mlfactory import storage
        from mlfactory.config import load_config
        from mlfactory.specs import METRICS_FILE, TrainingJobSpec

        from mlfactory.backends.local.processes import free_port
        from mlfactory.training.cluster import LOOPBACK_ENV
        from mlfactory.runtime import environment

        cfg = load_config()
        spec = TrainingJobSpec.model_validate(self.spec)
        epochs = min(spec.hyperparameters.epochs, cfg.backend.epochs_cap)
        job = spec.model_copy(update={"hyperparameters": spec.hyperparameters.model_copy(update={"epochs": epochs})})
        # each "node" is one process told its place and its data as the toy platform tells its containers:
        # the entrypoint finds them through toy_backend.runtime, and launches torchrun across the nodes itself
        place = {**environment("toy"), "TOY_NODES": str(cfg.backend.nodes), "TOY_MASTER_PORT": str(free_port()),
                 "TOY_JOB": job.name, "TOY_TRAIN": job.input_uri, "TOY_OUTPUT": job.output_uri,
                 "TOY_CHECKPOINTS": job.checkpoint_uri or ""}
        command = [sys.executable, "-m", "mlfactory.training.train", *job.hyperparameter_arguments(), "--device", "cpu",
                   "--threads", "1"]
        nodes = [subprocess.Popen(command, env={**os.environ, **LOOPBACK_ENV, **job.environment, **place,
                                                "TOY_NODE": str(rank)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in range(cfg.backend.nodes)]
        outputs = [node.communicate()[0] for node in nodes]
        self.log.info("toy job %s in region %s on %d nodes:\n%s", job.name, cfg.backend.region, len(nodes),
                      outputs[0][-3000:])
        failed = [(rank, node.returncode) for rank, node in enumerate(nodes) if node.returncode != 0]
        if failed:
            raise RuntimeError(f"toy training failed on node(s) {failed}: {outputs[failed[0][0]][-3000:]}")
        return {**json.loads(storage.read_bytes(storage.join(job.output_uri, METRICS_FILE))), "toy_region": cfg.backend.region,
                "toy_nodes": len(nodes)}


class ToyBatchOperator(SpecOperator):
    def execute(self, context) -> dict:
        import json

        from mlfactory import storage
        from mlfactory.serving.batch import complete
        from mlfactory.config import load_config
        from mlfactory.specs import BatchJobSpec

        spec = BatchJobSpec.model_validate(self.spec)
        storage.write_bytes(storage.join(spec.output_uri, "toy.json"), json.dumps(spec.model_dump()).encode())
        complete(load_config(), spec)
        return {"uri": spec.output_uri, "version": spec.model.version, "snapshots": spec.snapshots}


class ToyEndpoint(EndpointAdapter):
    """The toy's endpoint: a record in the bucket (``toy://<region>/<name>``); its model answers in the task."""

    deferrable = False

    def stage(self, keep) -> dict:
        from mlfactory.serving.deployment import read_endpoint_state, write_endpoint_state

        version, served = self.spec.model.version, read_endpoint_state(self.cfg).get("served_version")
        plan = {"version": version, "endpoint": f"toy://{self.cfg.backend.region}/{self.spec.name}", "new": f"v{version}",
                "old": f"v{served}" if served and served != version else None, "already_served": served == version}
        keep(plan)
        write_endpoint_state(self.cfg, toy_staged=version)
        return plan

    def predict(self, plan: dict, rows: list[dict], variant: str | None) -> tuple[str, list]:
        import json

        from mlfactory.serving.model import ServedModel
        from mlfactory.serving.payloads import parse_body

        if not hasattr(self, "_model"):
            import mlflow

            mlflow.set_tracking_uri(self.cfg.mlflow.tracking_uri)  # the pipeline's registry, whatever the environment says
            self._model = ServedModel(self.spec.model.registry_uri)
        columns = parse_body(json.dumps({"dataframe_records": rows}).encode(), "application/json", self._model.signature)
        outputs = self._model.predict(columns)
        return plan["new"], [dict(zip(outputs, values)) for values in zip(*outputs.values())]

    def set_weights(self, plan: dict, weights: dict[str, float]) -> None:
        from mlfactory.serving.deployment import write_endpoint_state

        write_endpoint_state(self.cfg, toy_weights=weights)

    def finalise(self, plan: dict) -> dict:
        return {"endpoint": plan["endpoint"], "backend": "toy", "toy_weights": {plan["new"]: 100}}

    def restore(self, plan: dict) -> None:
        from mlfactory.serving.deployment import write_endpoint_state

        write_endpoint_state(self.cfg, toy_weights={plan["old"]: 100} if plan.get("old") else None)


class ToyBackend(AirflowBackend):
    training_operator = ToyTrainingOperator
    batch_operator = ToyBatchOperator
    endpoint_adapter = "toy_backend.airflow:ToyEndpoint"
    deploy_doc = ("`stage` records the version at toy://<endpoint>; its model answers the smoke test and the canary in the "
                  "task; `full_traffic` marks it served.")
    batch_doc = "writes the spec it was given."

    def landing_trigger(self):
        return ToyLandingTrigger(self.cfg.storage.landing_uri)
