"""ml_deploy's rollout steps as Airflow tasks, one operator for every backend.

``RolloutStepOperator`` runs one step of ``mlfactory.serving.rollout.Rollout`` (``stage`` ... ``full_traffic``)
through the configured backend's endpoint adapter. When the adapter answers ``Wait`` (an endpoint update,
a deployment being provisioned, the canary's time on real traffic), the task defers on the adapter's
trigger (or a timer) and runs the same step again when it fires, with what the adapter asked to get back:
no worker slot is held while the cloud works, and a retry takes over where the last try stopped.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from airflow.sdk import BaseOperator

from mlfactory_airflow.links import EndpointConsoleLink


class RolloutStepOperator(BaseOperator):
    """Step ``step`` of the rollout of ``spec`` (an EndpointSpec) along ``plan`` (what ``stage`` returned), through
    ``adapter`` ("module:Class" of an ``EndpointAdapter``)."""

    template_fields = ("spec", "plan")
    ui_color = "#e8e0f5"
    operator_extra_links = (EndpointConsoleLink(),)

    def __init__(self, *, step: str, spec: dict[str, Any], adapter: str, plan: dict[str, Any] | None = None,
                 poll_interval: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.step, self.spec, self.adapter, self.plan, self.poll_interval = step, spec, adapter, plan, poll_interval

    @cached_property
    def rollout(self):
        from mlfactory.backend_registry import imported
        from mlfactory.config import load_config
        from mlfactory.serving.rollout import Rollout
        from mlfactory.specs import EndpointSpec

        cfg, spec = load_config(), EndpointSpec.model_validate(self.spec)
        return Rollout(cfg, spec, imported(self.adapter)(cfg, spec, self.poll_interval))

    def execute(self, context, event: Any = None, waited_for: str | None = None, resume: dict | None = None):
        from mlfactory.serving.rollout import Wait

        if isinstance(event, dict) and event.get("state") not in (None, "succeeded", "deleted"):
            self.rollout.fail(self.step, f"{waited_for} {event['state']} ({event.get('name')}): {event.get('detail')}")
        outcome = self.rollout.run(self.step, self.plan, **(resume or {}))
        plan = self.plan or (outcome if isinstance(outcome, dict) else (outcome.resume or {}).get("plan"))
        if plan and plan.get("endpoint"):
            self.operator_extra_links[0].show(context, self.rollout.adapter.console_url(plan))
        if not isinstance(outcome, Wait):
            return outcome
        trigger = outcome.operation
        if trigger is None:
            from datetime import timedelta

            from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger

            trigger = TimeDeltaTrigger(timedelta(seconds=outcome.seconds))
        self.log.info("%s: waiting for %s", self.step, outcome.what)
        self.defer(trigger=trigger, method_name="execute", kwargs={"waited_for": outcome.what, "resume": outcome.resume})
