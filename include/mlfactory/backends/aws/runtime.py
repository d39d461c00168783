"""SageMaker's container conventions, for the training entrypoint and the model server.

| meaning | SageMaker |
|---|---|
| nodes, this node's rank | ``len(SM_HOSTS)``, index of ``SM_CURRENT_HOST`` in ``SM_HOSTS`` |
| master address | ``SM_HOSTS[0]`` (port ``MASTER_PORT``, else 29500) |
| processes per node | ``SM_NUM_GPUS`` (else 1) |
| training data, model output | ``SM_CHANNEL_TRAIN``, ``SM_MODEL_DIR`` (local folders SageMaker syncs) |
| checkpoints | /opt/ml/checkpoints (synced to S3 with CheckpointConfig) |
| job id (an MLflow tag) | ``TRAINING_JOB_NAME`` |
| serving | port 8080, ``/ping`` and ``/invocations`` (the server always answers both); in a batch transform (``SAGEMAKER_BATCH``) every body may be ``SAGEMAKER_MAX_PAYLOAD_IN_MB`` |
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from mlfactory.training.cluster import Cluster
from mlfactory.runtime import DataLocations, ServingDefaults, master_port

CHECKPOINT_DIR = "/opt/ml/checkpoints"  # synced with CheckpointConfig.S3Uri
MiB = 1024 * 1024


def cluster(env: Mapping[str, str], nproc_per_node: int | None = None) -> Cluster:
    hosts = json.loads(env.get("SM_HOSTS") or '["algo-1"]')
    current = env.get("SM_CURRENT_HOST", hosts[0])
    return Cluster("sagemaker", len(hosts), hosts.index(current), hosts[0], master_port(env),
                   nproc_per_node or int(env.get("SM_NUM_GPUS") or 0) or 1, env.get("TRAINING_JOB_NAME", ""))


def data_locations(env: Mapping[str, str]) -> DataLocations:
    return DataLocations(env.get("SM_CHANNEL_TRAIN"), env.get("SM_MODEL_DIR"), CHECKPOINT_DIR)


def serving_defaults(env: Mapping[str, str] = os.environ) -> ServingDefaults:
    payload = env.get("SAGEMAKER_MAX_PAYLOAD_IN_MB", "")
    return ServingDefaults(authenticates_callers=True, port=8080, max_batch_body_bytes=int(payload) * MiB if payload.isdigit() else None,
                           batch=env.get("SAGEMAKER_BATCH", "").lower() == "true")
