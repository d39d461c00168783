"""Cloud-neutral job specs: what to run, on what, reading and writing which URIs.

A ``TrainingJobSpec`` says everything a backend needs to start the training entrypoint; each
backend turns it into its own request (torchrun here, SageMaker CreateTrainingJob, Vertex AI
CustomJob, Azure ML command job). Specs travel through XCom as plain JSON.
"""

from __future__ import annotations

import itertools
import json
import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlfactory.config import check_search_space


class Accelerator(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["cpu", "gpu", "tpu"] = "cpu"
    model: str | None = Field(None, description="e.g. nvidia-l4, nvidia-h100-80gb, tpu-v5e; None: the backend's default")
    count: int = Field(0, ge=0, description="per node; 0 for cpu")

    @model_validator(mode="after")
    def _count_fits_kind(self) -> Accelerator:
        if self.kind == "cpu" and self.count:
            raise ValueError("a cpu job has no accelerator count")
        if self.kind != "cpu" and self.count < 1:
            raise ValueError(f"a {self.kind} job needs count >= 1")
        return self


class TrainingJobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9-]*$",
                      description="stable across retries: a retried job resumes its own checkpoints")
    image: str | None = Field(None, description="container image for cloud backends; local runs this checkout")
    entrypoint: list[str] = ["python", "-m", "mlfactory.train"]
    hyperparameters: dict[str, int | float | str | list[int]] = {}
    input_uri: str
    output_uri: str
    checkpoint_uri: str | None = None
    nodes: int = Field(1, ge=1)
    processes_per_node: int = Field(1, ge=1)
    accelerator: Accelerator = Accelerator()
    spot: bool = False
    max_runtime_s: int = Field(3600, ge=1)
    environment: dict[str, str] = {}
    tags: dict[str, str] = {}

    def arguments(self) -> list[str]:
        """The entrypoint's command-line arguments (without the launcher)."""
        args = ["--train-uri", self.input_uri, "--output-uri", self.output_uri]
        if self.checkpoint_uri:
            args += ["--checkpoint-uri", self.checkpoint_uri]
        return args + self.hyperparameter_arguments()

    def hyperparameter_arguments(self) -> list[str]:
        """Hyperparameters and tags as arguments; a cloud container takes its data locations from its
        platform's variables instead (``mlfactory.cluster``)."""
        args = []
        for key, value in sorted(self.hyperparameters.items()):
            args += [f"--{key.replace('_', '-')}", json.dumps(value) if isinstance(value, list) else str(value)]
        for key, value in sorted(self.tags.items()):
            args += ["--tag", f"{key}={value}"]
        return args


def search_trials(base: dict, space: dict[str, list], trials: int, mode: str, seed: int) -> list[dict]:
    """Hyperparameters of each trial: ``base`` with values from ``space`` (grid order or a seeded sample).

    Grid takes the first ``trials`` combinations of the cartesian product; random draws ``trials``
    distinct combinations. Fewer combinations than trials gives one trial per combination.
    """
    keys = sorted(check_search_space(space))
    combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(space[k] for k in keys))] or [{}]
    if mode == "random":
        combos = random.Random(seed).sample(combos, min(trials, len(combos)))
    elif mode != "grid":
        raise ValueError(f"search must be 'grid' or 'random', got {mode!r}")
    return [{**base, **combo} for combo in combos[:trials]]
