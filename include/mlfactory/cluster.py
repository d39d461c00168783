"""Where the training entrypoint runs: the container conventions of each cloud, read in one place.

The same ``python -m mlfactory.train`` runs on this machine and inside SageMaker, Vertex AI and
Azure ML jobs. Each platform tells a container who it is and where its data lives through its own
environment variables; ``Cluster.from_environ`` maps them onto torchrun's terms (nodes, node rank,
master address) and ``data_locations`` onto the entrypoint's URIs. An explicit command-line argument
always wins over the environment.

| meaning | SageMaker | Vertex AI | Azure ML (PyTorch distribution) | local |
|---|---|---|---|---|
| nodes | ``len(SM_HOSTS)`` | ``CLUSTER_SPEC`` workerpool0 + workerpool1 sizes | ``WORLD_SIZE`` ÷ ``process_count_per_instance`` (per-node launch: 1) | 1 |
| this node's rank | index of ``SM_CURRENT_HOST`` in ``SM_HOSTS`` | ``CLUSTER_SPEC`` task: workerpool0 → 0, workerpool1[i] → 1+i | ``NODE_RANK`` | 0 |
| master address | ``SM_HOSTS[0]`` | host of ``CLUSTER_SPEC`` workerpool0[0] | ``MASTER_ADDR`` (+ ``MASTER_PORT``) | 127.0.0.1 |
| processes per node | ``SM_NUM_GPUS`` (else 1) | GPUs seen by torch (else 1) | GPUs seen by torch (else 1) | ``--nproc-per-node`` |
| training data | ``SM_CHANNEL_TRAIN`` (a local folder) | ``AIP_TRAINING_DATA_URI`` (gs://) | ``--train-uri ${{inputs.train}}`` | ``--train-uri`` |
| model output | ``SM_MODEL_DIR`` (/opt/ml/model, uploaded at the end) | ``AIP_MODEL_DIR`` (gs://) | ``--output-uri ${{outputs.model}}`` | ``--output-uri`` |
| checkpoints | /opt/ml/checkpoints (synced to S3 with CheckpointConfig) | ``AIP_CHECKPOINT_DIR`` | ``--checkpoint-uri`` | ``--checkpoint-uri`` |
| job id (an MLflow tag) | ``TRAINING_JOB_NAME`` | ``CLOUD_ML_JOB_ID`` | ``AZUREML_RUN_ID`` | Airflow task |

Azure ML's own per-process launch (``process_count_per_instance`` = GPUs) sets ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` for every process, exactly as torchrun
does, so the entrypoint then runs directly without launching anything.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_MASTER_PORT = 29500
# On one machine the workers' DDP traffic stays on loopback.
LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo"}
SAGEMAKER_CHECKPOINT_DIR = "/opt/ml/checkpoints"


@dataclass(frozen=True)
class Cluster:
    platform: str  # local | sagemaker | vertex | azureml
    nodes: int
    node_rank: int
    master_addr: str
    master_port: int
    nproc_per_node: int
    job_id: str = ""

    @classmethod
    def from_environ(cls, env: Mapping[str, str], nproc_per_node: int | None = None) -> Cluster:
        gpus = _visible_gpus()
        if "SM_HOSTS" in env:
            hosts = json.loads(env["SM_HOSTS"])
            current = env.get("SM_CURRENT_HOST", hosts[0])
            return cls(
                "sagemaker",
                len(hosts),
                hosts.index(current),
                hosts[0],
                int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
                nproc_per_node or int(env.get("SM_NUM_GPUS") or 0) or 1,
                env.get("TRAINING_JOB_NAME", ""),
            )
        if "CLUSTER_SPEC" in env:
            spec = json.loads(env["CLUSTER_SPEC"])
            pools = spec.get("cluster", {})
            primary, workers = pools.get("workerpool0", []), pools.get("workerpool1", [])
            task = spec.get("task", {"type": "workerpool0", "index": 0})
            rank = 0 if task["type"] == "workerpool0" else 1 + int(task["index"])
            return cls(
                "vertex",
                len(primary) + len(workers),
                rank,
                primary[0].rsplit(":", 1)[0] if primary else "127.0.0.1",
                int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
                nproc_per_node or gpus or 1,
                env.get("CLOUD_ML_JOB_ID", ""),
            )
        if "AZUREML_RUN_ID" in env and "NODE_RANK" in env:
            per_node = int(env.get("AZUREML_PROCESS_COUNT_PER_INSTANCE", "1") or 1)
            return cls(
                "azureml",
                max(1, int(env.get("WORLD_SIZE", "1")) // per_node),
                int(env["NODE_RANK"]),
                env.get("MASTER_ADDR", "127.0.0.1"),
                int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
                nproc_per_node or gpus or 1,
                env["AZUREML_RUN_ID"],
            )
        return cls("local", 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)), nproc_per_node or 1)

    @classmethod
    def this_machine(cls, processes: int) -> Cluster:
        """One node, ``processes`` workers, rendezvous on a free loopback port (the local backend)."""
        from mlfactory.processes import free_port

        return cls("local", 1, 0, "127.0.0.1", free_port(), processes)

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    def torchrun_command(self, module: str, args: list[str]) -> list[str]:
        """The torchrun command line that starts ``module`` on this node (static rendezvous)."""
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={self.nodes}",
            f"--node-rank={self.node_rank}",
            f"--nproc-per-node={self.nproc_per_node}",
            f"--master-addr={self.master_addr}",
            f"--master-port={self.master_port}",
            "--max-restarts=0",
            "-m",
            module,
            *args,
        ]


def launched_by_torchrun(env: Mapping[str, str]) -> bool:
    """True inside a worker started by torchrun (or by a platform that sets the same variables)."""
    return "LOCAL_RANK" in env and "RANK" in env and "WORLD_SIZE" in env


@dataclass(frozen=True)
class DataLocations:
    train_uri: str | None
    output_uri: str | None
    checkpoint_uri: str | None


def data_locations(env: Mapping[str, str]) -> DataLocations:
    """Defaults for the entrypoint's URIs from the platform's variables (arguments override these)."""
    if "SM_MODEL_DIR" in env or "SM_CHANNEL_TRAIN" in env:
        return DataLocations(env.get("SM_CHANNEL_TRAIN"), env.get("SM_MODEL_DIR"), SAGEMAKER_CHECKPOINT_DIR)
    if "AIP_MODEL_DIR" in env:
        return DataLocations(env.get("AIP_TRAINING_DATA_URI"), env["AIP_MODEL_DIR"], env.get("AIP_CHECKPOINT_DIR"))
    return DataLocations(None, None, None)


def _visible_gpus() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch or no driver: no GPU
        return 0
