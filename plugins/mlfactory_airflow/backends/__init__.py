"""The Airflow side of a backend: one small interface, implemented once per backend.

The DAGs build every backend-specific task through ``backend_for(cfg)`` and never name a backend:

| DAG | what the backend provides | task ids (every backend) |
|---|---|---|
| ml_ingest (its Asset `landing`) | ``landing_trigger()``: the AssetWatcher's event trigger | (the watcher) |
| ml_train | ``training_operator``: runs one ``TrainingJobSpec``, returns the entrypoint's metrics (on a cloud, a ``mlfactory_airflow.training.CloudTrainingOperator`` with its ``JobAdapter``) | ``train`` (mapped, one per trial) |
| ml_deploy | ``endpoint_adapter``: its endpoint's ``mlfactory.serving.rollout.EndpointAdapter``; the rollout itself (``mlfactory.serving.rollout``) is the same everywhere, one ``RolloutStepOperator`` per step in task group ``deploy``, ending in ``full_traffic`` (the endpoint state) | ``deploy.stage``, ``deploy.health_check``, ``deploy.smoke_test``, ``deploy.canary``, ``deploy.full_traffic`` |
| ml_deploy | ``rollback``: after a failed step, the same adapter's ``restore`` puts the traffic back on the served version; the run ends failed | ``rollback`` |
| ml_batch_score | ``batch_operator``: scores one ``BatchJobSpec``, returns a summary with its ``uri`` | ``score`` |

Which class implements a backend is in its registration (``mlfactory.backend_registry``); it is imported
only when a DAG file, task or trigger of that backend needs it. Operators and triggers import their
cloud SDKs and providers inside their methods, so parsing a DAG stays light.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cached_property
from typing import Any

from airflow.sdk import BaseOperator

from mlfactory.config import PipelineConfig
from mlfactory_airflow.links import JobConsoleLink


class SpecOperator(BaseOperator):
    """An operator that runs one cloud-neutral spec (``mlfactory.specs``, as JSON; templated, so it can come
    from an upstream task's XCom): the shape of every backend's training and batch operators."""

    template_fields = ("spec",)

    def __init__(self, *, spec: dict[str, Any], **kwargs) -> None:
        super().__init__(**kwargs)
        self.spec = spec


class CloudSpecOperator(SpecOperator):
    """A SpecOperator of a cloud backend: the pipeline config (which must name ``backend``), that backend's
    settings, and how often its deferred work is checked (``poll_interval``, else ``<backend>.poll_interval_s``)."""

    backend: str  # the backend whose operators these are
    platform: str  # what the error calls them (e.g. "an Azure ML operator")
    operator_extra_links = (JobConsoleLink(),)

    def __init__(self, *, poll_interval: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._poll_interval = poll_interval

    @property
    def poll_interval(self) -> int:
        return self._poll_interval or self.settings.poll_interval_s

    @cached_property
    def config(self) -> PipelineConfig:
        from mlfactory.config import load_config

        cfg = load_config()
        if cfg.backend.name != self.backend:
            raise ValueError(f"{self.platform} runs with backend {self.backend}; {cfg.source} says {cfg.backend.name}")
        return cfg

    @property
    def settings(self):
        return self.config.backend

    def show_job(self, context, url: str) -> None:
        """The job's page in the console, as the task's link (the backend's ``links`` builds ``url``)."""
        self.operator_extra_links[0].show(context, url)


class AirflowBackend(ABC):
    """What a backend gives the DAGs. ``cfg.backend`` is its own settings model."""

    training_operator: type[SpecOperator]  # runs a TrainingJobSpec; returns the entrypoint's metrics dict
    batch_operator: type[SpecOperator]  # runs a BatchJobSpec; returns {"uri", "version", "snapshots", ...}
    endpoint_adapter: str  # "module:Class" of its mlfactory.serving.rollout.EndpointAdapter, imported by the deploy tasks only
    deploy_doc: str = ""  # how this backend rolls an EndpointSpec out (in ml_deploy's docs, in the UI)
    batch_doc: str = ""  # how it scores a BatchJobSpec (in ml_batch_score's docs)

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def landing_trigger(self):
        """The ``BaseEventTrigger`` that announces each new object under the landing prefix, once per version
        of it: {"uri", "key", "size", ...} (see ``mlfactory_airflow.triggers.watermark``)."""

    def deploy_steps(self, spec) -> list:
        """The rollout of ``spec`` (an ``EndpointSpec`` XComArg), built inside task group ``deploy``: one
        ``RolloutStepOperator`` per step of ``mlfactory.serving.rollout.STEPS``, in order; the last, ``full_traffic``,
        returns the endpoint state. A failing step records why and raises."""
        from mlfactory.serving.rollout import STEPS
        from mlfactory_airflow.rollout import RolloutStepOperator

        stage = RolloutStepOperator(task_id=STEPS[0], step=STEPS[0], spec=spec, adapter=self.endpoint_adapter)
        return [stage, *(RolloutStepOperator(task_id=step, step=step, spec=spec, plan=stage.output,
                                             adapter=self.endpoint_adapter) for step in STEPS[1:])]

    def rollback(self, version: str | None) -> dict:
        """ml_deploy's ``rollback`` of ``version`` after a failed step: the traffic back on the served version
        (where the platform has not already put it back), then alias `champion` (``restore_after_failure``)."""
        from mlfactory.backend_registry import imported
        from mlfactory.serving.deployment import endpoint_spec, read_endpoint_state, restore_after_failure

        plan = read_endpoint_state(self.cfg).get("rollout")
        if plan:
            imported(self.endpoint_adapter)(self.cfg, endpoint_spec(self.cfg, plan["version"])).restore(plan)
        return restore_after_failure(self.cfg, version)


def backend_for(cfg: PipelineConfig) -> AirflowBackend:
    """The configured backend's Airflow implementation."""
    from mlfactory.backend_registry import get, imported

    target = get(cfg.backend.name).airflow
    implementation = imported(target)
    if not (isinstance(implementation, type) and issubclass(implementation, AirflowBackend)):
        raise TypeError(f"backend {cfg.backend.name!r}: {target} is not an AirflowBackend")
    return implementation(cfg)
