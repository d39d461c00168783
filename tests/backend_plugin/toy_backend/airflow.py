"""The toy backend's Airflow side: a folder watcher of its own, training as one plain process, a two-step
"rollout" that records the endpoint, and a batch step that writes what it scored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from airflow.sdk import task
from airflow.triggers.base import TriggerEvent

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
        from mlfactory.cluster import LOOPBACK_ENV
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
        command = [sys.executable, "-m", "mlfactory.train", *job.hyperparameter_arguments(), "--device", "cpu",
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
        from mlfactory.batch_scoring import complete
        from mlfactory.config import load_config
        from mlfactory.specs import BatchJobSpec

        spec = BatchJobSpec.model_validate(self.spec)
        storage.write_bytes(storage.join(spec.output_uri, "toy.json"), json.dumps(spec.model_dump()).encode())
        complete(load_config(), spec)
        return {"uri": spec.output_uri, "version": spec.model.version, "snapshots": spec.snapshots}


class ToyBackend(AirflowBackend):
    training_operator = ToyTrainingOperator
    batch_operator = ToyBatchOperator
    deploy_doc = "`stage` records the version; `full_traffic` marks it served at toy://<endpoint>."
    batch_doc = "writes the spec it was given."

    def landing_trigger(self):
        return ToyLandingTrigger(self.cfg.storage.landing_uri)

    def deploy_steps(self, spec) -> list:
        cfg = self.cfg

        @task
        def stage(spec: dict) -> dict:
            from mlfactory.deployment import write_endpoint_state

            write_endpoint_state(cfg, toy_staged=spec["model"]["version"])
            return {"version": spec["model"]["version"], "endpoint": f"toy://{cfg.backend.region}/{spec['name']}"}

        @task
        def full_traffic(staged: dict) -> dict:
            from mlfactory.deployment import served

            return served(cfg, staged["version"], endpoint=staged["endpoint"], backend="toy")

        staged = stage(spec)
        return [staged, full_traffic(staged)]
