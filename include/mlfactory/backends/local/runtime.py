"""The `local` backend's container conventions: this machine. One node; everything else comes from the command
line (``--train-uri``, ``--output-uri``, ``--checkpoint-uri``, ``--nproc-per-node``, ``--model-uri``, ``--port``)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from mlfactory.training.cluster import Cluster
from mlfactory.runtime import DataLocations, ServingDefaults, master_port


def cluster(env: Mapping[str, str], nproc_per_node: int | None = None) -> Cluster:
    return Cluster("local", 1, 0, "127.0.0.1", master_port(env), nproc_per_node or 1)


def this_machine(processes: int) -> Cluster:
    """One node, ``processes`` workers, rendezvous on a free loopback port: how the local backend launches a job."""
    from mlfactory.backends.local.processes import free_port

    return Cluster("local", 1, 0, "127.0.0.1", free_port(), processes)


def data_locations(env: Mapping[str, str]) -> DataLocations:
    return DataLocations()


def serving_defaults(env: Mapping[str, str] = os.environ) -> ServingDefaults:
    return ServingDefaults(port=int(env["PORT"]) if env.get("PORT") else None)
