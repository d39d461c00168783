"""The toy platform's container conventions: what its "nodes" (processes on this machine) are told, in
variables of its own, as a cloud tells its containers (``mlfactory.runtime``).

| meaning | toy |
|---|---|
| nodes, this node's rank | ``TOY_NODES``, ``TOY_NODE`` |
| master | 127.0.0.1:``TOY_MASTER_PORT`` |
| training data, model output, checkpoints | ``TOY_TRAIN``, ``TOY_OUTPUT``, ``TOY_CHECKPOINTS`` |
| job id | ``TOY_JOB`` |
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from mlfactory.training.cluster import Cluster
from mlfactory.runtime import DataLocations, ServingDefaults


def cluster(env: Mapping[str, str], nproc_per_node: int | None = None) -> Cluster:
    return Cluster("toy", int(env["TOY_NODES"]), int(env["TOY_NODE"]), "127.0.0.1", int(env["TOY_MASTER_PORT"]),
                   nproc_per_node or 1, env.get("TOY_JOB", ""))


def data_locations(env: Mapping[str, str]) -> DataLocations:
    return DataLocations(env.get("TOY_TRAIN"), env.get("TOY_OUTPUT"), env.get("TOY_CHECKPOINTS"))


def serving_defaults(env: Mapping[str, str] = os.environ) -> ServingDefaults:
    return ServingDefaults()
