"""Vertex AI's container conventions, for the training entrypoint and the model server.

| meaning | Vertex AI |
|---|---|
| nodes | ``CLUSTER_SPEC`` workerpool0 + workerpool1 sizes |
| this node's rank | ``CLUSTER_SPEC`` task: workerpool0 → 0, workerpool1[i] → 1+i |
| master address | host of ``CLUSTER_SPEC`` workerpool0[0] (port ``MASTER_PORT``, else 29500) |
| processes per node | GPUs seen by torch (else 1) |
| training data, model output, checkpoints | ``AIP_TRAINING_DATA_URI``, ``AIP_MODEL_DIR``, ``AIP_CHECKPOINT_DIR`` (gs://) |
| job id (an MLflow tag) | ``CLOUD_ML_JOB_ID`` |
| serving | the model's ``artifact_uri`` as ``AIP_STORAGE_URI``; ``AIP_HTTP_PORT``, ``AIP_HEALTH_ROUTE``, ``AIP_PREDICT_ROUTE`` |
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from mlfactory.training.cluster import Cluster, visible_gpus
from mlfactory.runtime import DataLocations, ServingDefaults, master_port


def cluster(env: Mapping[str, str], nproc_per_node: int | None = None) -> Cluster:
    spec = json.loads(env.get("CLUSTER_SPEC") or "{}")
    pools = spec.get("cluster", {})
    primary, workers = pools.get("workerpool0", []), pools.get("workerpool1", [])
    task = spec.get("task", {"type": "workerpool0", "index": 0})
    rank = 0 if task["type"] == "workerpool0" else 1 + int(task["index"])
    return Cluster("vertex", max(1, len(primary) + len(workers)), rank,
                   primary[0].rsplit(":", 1)[0] if primary else "127.0.0.1", master_port(env),
                   nproc_per_node or visible_gpus() or 1, env.get("CLOUD_ML_JOB_ID", ""))


def data_locations(env: Mapping[str, str]) -> DataLocations:
    return DataLocations(env.get("AIP_TRAINING_DATA_URI"), env.get("AIP_MODEL_DIR"), env.get("AIP_CHECKPOINT_DIR"))


def serving_defaults(env: Mapping[str, str] = os.environ) -> ServingDefaults:
    return ServingDefaults(authenticates_callers=True, model_uri=env.get("AIP_STORAGE_URI"),
                           port=int(env["AIP_HTTP_PORT"]) if env.get("AIP_HTTP_PORT") else 8080,
                           health_route=env.get("AIP_HEALTH_ROUTE", "/health"),
                           predict_route=env.get("AIP_PREDICT_ROUTE", "/predict"))
