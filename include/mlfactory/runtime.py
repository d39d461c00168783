"""Where a container of the pipeline runs: the conventions of the platform that started it, found through the
backend registry instead of switched on here.

The same training entrypoint (``python -m mlfactory.training.train``) and model server (``python -m mlfactory.serving``)
run on this machine and inside each cloud's jobs and endpoints. Each platform tells a container who it is and
where its data lives through variables of its own (the tables are in each backend's ``runtime`` module). A
backend's operators say which backend a container runs under
(``MLFACTORY_RUNTIME``, in the job's or model's environment), and that backend's ``runtime`` module maps its
variables onto three cloud-neutral answers:

- ``cluster(env, nproc_per_node)``: torchrun's terms (nodes, this node's rank, master address, processes);
- ``data_locations(env)``: defaults for the entrypoint's training data, model output and checkpoint URIs;
- ``serving_defaults(env)``: the model server's model, port, routes and payload limits.

An explicit command-line argument always wins over these. Without ``MLFACTORY_RUNTIME`` a container runs
under the `local` conventions (this machine).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType

RUNTIME_ENV = "MLFACTORY_RUNTIME"
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class DataLocations:
    train_uri: str | None = None
    output_uri: str | None = None
    checkpoint_uri: str | None = None


@dataclass(frozen=True)
class ServingDefaults:
    model_uri: str | None = None  # what to serve when --model-uri is not given
    port: int | None = None  # where the platform sends requests
    health_route: str = "/health"
    predict_route: str = "/predict"
    max_batch_body_bytes: int | None = None  # the platform's payload limit, when it says one
    batch: bool = False  # a batch job sends every body at that limit
    # the platform admits only callers it authenticated (SageMaker, Vertex AI, Azure ML endpoints): the server
    # may then listen on every interface with no client token of its own
    authenticates_callers: bool = False


def environment(backend: str) -> dict[str, str]:
    """What a backend's operators put in the environment of the containers they start."""
    return {RUNTIME_ENV: backend}


def of(env: Mapping[str, str]) -> ModuleType:
    """The ``runtime`` module of the backend the container runs under."""
    from mlfactory.backend_registry import get

    return importlib.import_module(get(env.get(RUNTIME_ENV) or "local").runtime)


def master_port(env: Mapping[str, str]) -> int:
    return int(env.get("MASTER_PORT") or DEFAULT_MASTER_PORT)
