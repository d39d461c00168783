"""The backend registry: backends as plug-ins, where the pipeline's events, jobs and endpoints live.

The core (the config, ``mlfactory.runtime``) finds a backend here by name and imports no backend package.

A backend is two packages and one registration, and nothing else in the project knows its name:

- a package under ``include/`` (``mlfactory.backends`` holds the built-in ones): its settings model — the
  config section of the same name, a ``BackendSettings`` —, its pure translation of the
  cloud-neutral specs (``mlfactory.specs``) into its own requests, and its containers' conventions
  (a ``runtime`` module: ``mlfactory.runtime``). Light to import: the DAG
  processor imports the settings model of the configured backend on every parse.
- a package under ``plugins/``: its Airflow implementation, an ``AirflowBackend``
  (``mlfactory_airflow.backends``): the landing-event trigger, the training operator, the
  deployment steps, the batch-scoring operator and how traffic is restored after a failed rollout.
- one registration: a ``Backend`` naming both, either in ``BUILTIN`` below or, for a backend
  shipped as its own distribution, as an entry point in group ``mlfactory.backends``::

      [project.entry-points."mlfactory.backends"]
      toy = "toy_backend:BACKEND"

Entry points are read only when the config names a backend that is not built in (reading them costs
tens of milliseconds, on every DAG parse).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache

from pydantic import BaseModel, ConfigDict

ENTRY_POINT_GROUP = "mlfactory.backends"
BUILTIN = {
    "local": "mlfactory.backends.local:BACKEND",
    "aws": "mlfactory.backends.aws:BACKEND",
    "gcp": "mlfactory.backends.gcp:BACKEND",
    "azure": "mlfactory.backends.azure:BACKEND",
}


class BackendSettings(BaseModel):
    """A backend's section of the pipeline config (``backend: <name>`` picks it; the section has the same name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str

    def check_pipeline(self, cfg) -> None:
        """Checks across sections (e.g. the bucket's scheme); raise ValueError naming the problem."""


@dataclass(frozen=True)
class Backend:
    name: str
    settings: type[BackendSettings]
    airflow: str  # "module:attribute" of its AirflowBackend class, imported by Airflow processes only
    # the module of its containers' conventions (cluster, data_locations, serving_defaults: mlfactory.runtime)
    runtime: str = "mlfactory.backends.local.runtime"


class UnknownBackend(ValueError):
    pass


def imported(target: str):
    """What a "module:attribute" string names (a registration's ``airflow``, an endpoint adapter), imported."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _load(target: str, name: str) -> Backend:
    backend = imported(target)
    if not isinstance(backend, Backend) or backend.name != name:
        raise TypeError(f"{target} is registered as backend {name!r} but is not Backend(name={name!r}, ...)")
    return backend


@cache
def _entry_points() -> dict[str, str]:
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


@cache
def get(name: str) -> Backend:
    """The backend registered as ``name`` (built in, else an entry point)."""
    target = BUILTIN.get(name) or _entry_points().get(name)
    if target is None:
        raise UnknownBackend(f"{name!r} is not a registered backend; registered: {', '.join(sorted(names()))} "
                             f"(a plug-in registers more through entry point group {ENTRY_POINT_GROUP!r})")
    return _load(target, name)


def is_registered(name: str) -> bool:
    return name in BUILTIN or name in _entry_points()


def names() -> list[str]:
    return sorted({*BUILTIN, *_entry_points()})

