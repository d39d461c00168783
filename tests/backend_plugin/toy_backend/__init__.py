"""A third backend that exists only for the tests: what a plug-in shipped as its own distribution looks like.

It is registered by the entry point in ``../mlfactory_toy_backend-0.1.dist-info/entry_points.txt``
alone (group ``mlfactory.backends``), with no edit to the project: its settings model here (the
``toy:`` section of a pipeline config), its Airflow side in ``toy_backend.airflow``. Its "cloud" is
this machine: a training job runs on ``nodes`` toy "nodes" (2), one process each, told their place through
the toy's own conventions (``toy_backend.runtime``, as a cloud tells its containers), the "endpoint" is a
record in the bucket, and batch scoring writes a manifest of what it would score.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mlfactory.backend_registry import Backend, BackendSettings


class ToySettings(BackendSettings):
    name: Literal["toy"] = "toy"
    region: str = Field(description="required, so a config without a `toy:` section is refused")
    epochs_cap: int = Field(2, ge=1, description="the toy trains at most this many epochs, whatever the form says")
    nodes: int = Field(2, ge=1, le=4, description="the toy \"nodes\" (processes on this machine) of each training job")

    def check_pipeline(self, cfg) -> None:
        if not cfg.storage.bucket.startswith("file://"):
            raise ValueError("backend toy keeps its bucket in a folder")


BACKEND = Backend("toy", ToySettings, airflow="toy_backend.airflow:ToyBackend", runtime="toy_backend.runtime")
