"""ml_deploy's rollout, written once for every backend: the steps, their order and the verdict.

Five steps, one task each in ml_deploy's task group ``deploy``, on every backend:

- ``stage``: the new version beside the served one, with no traffic (on a first deployment, alone); the
  plan (what is served, what is new) is kept in the endpoint state for the rollback.
- ``health_check``: the new variant says it is ready.
- ``smoke_test``: ``smoke_rows`` holdout rows sent to the new variant alone must get sane predictions, before
  any client reaches it.
- ``canary``: ``canary_percent`` of the traffic on the new variant (after ``canary_wait_s`` on a cloud, where
  real traffic reaches it meanwhile), then ``canary_requests`` holdout rows, one per request: their error
  rate must stay under ``max_error_rate``, their 95th percentile latency under ``max_latency_ms`` (when set),
  and no alarm of ``rollback_alarms`` may be firing. On a first deployment the new variant gets all the traffic
  (there is nothing else to share it with), then the same requests and verdict, at once.
- ``full_traffic``: all the traffic on the new variant, the old one removed, autoscaling in place, and the
  endpoint state (``deployment.served``) written.

A failed step records why (``deployment.record_failure``) and raises ``DeploymentFailed``; ml_deploy's
``rollback`` then has the adapter restore the traffic and ``deployment.restore_after_failure`` the alias.

The policy is here; the mechanism is a backend's ``EndpointAdapter``, which owns its clients as a
provider's hook does. Where the cloud works for long (an endpoint update, a deployment being provisioned),
an adapter returns ``Wait`` and the step runs again once that is over (the Airflow side defers meanwhile).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from mlfactory.config import PipelineConfig
from mlfactory.serving.deployment import (DeploymentFailed, holdout_requests, record_failure, sane_prediction, served,
                                  write_endpoint_state)
from mlfactory.specs import EndpointSpec

log = logging.getLogger(__name__)

STEPS = ("stage", "health_check", "smoke_test", "canary", "full_traffic")


@dataclass(frozen=True)
class Wait:
    """The cloud is working on ``what``: run the step again, with ``resume`` as keyword arguments, once
    ``operation`` (the backend's trigger, built on the Airflow side) fires, or after ``seconds``."""

    what: str
    operation: Any = None
    seconds: int = 0
    resume: dict = field(default_factory=dict)


class Unreachable(Exception):
    """The endpoint itself stopped answering (not one failed request): the canary stops at once."""


class EndpointAdapter(ABC):
    """What a backend's endpoint gives the rollout. A plan is a dict with at least ``version``, ``new`` (the new
    variant), ``old`` (the served one, None on a first deployment) and ``already_served``; the rest is the
    adapter's own (endpoint name, configs, ...). Methods raise ``DeploymentFailed`` naming what went wrong."""

    deferrable = True  # False: the steps run in the task and never wait (the canary does not wait canary_wait_s)

    def __init__(self, cfg: PipelineConfig, spec: EndpointSpec, poll_interval: int | None = None) -> None:
        self.cfg, self.spec, self.settings = cfg, spec, cfg.backend
        # how often the backend's triggers look at what the cloud does (default: its ``poll_interval_s``)
        self.poll_interval = poll_interval or getattr(self.settings, "poll_interval_s", None)
        self.log = logging.getLogger(type(self).__module__)

    @abstractmethod
    def stage(self, keep, **resume) -> dict | Wait:
        """The new version beside the served one at weight 0 (or alone on a new endpoint); ``keep(plan)`` before
        anything changes, so that a rollback finds it. Returns the plan."""

    def ready(self, plan: dict, **resume) -> str | Wait | None:
        """Why the new variant is not ready (None: it is)."""
        return None

    @abstractmethod
    def predict(self, plan: dict, rows: list[dict], variant: str | None) -> tuple[str, list]:
        """``rows`` in one request, to ``variant`` alone or (None) as a client sends them: (the variant that answered,
        or "" when the platform does not say; its predictions). Raises on a failed request."""

    @abstractmethod
    def set_weights(self, plan: dict, weights: dict[str, float], **resume) -> Wait | None:
        """Each named variant's share of the traffic (percent)."""

    def console_url(self, plan: dict) -> str | None:
        """The endpoint's page in the platform's console (none where it has no console)."""
        return None

    def firing_alarms(self, plan: dict, names: list[str]) -> list[str]:
        """Which of the platform's alarms ``names`` fire now (none where the platform has no alarms)."""
        return []

    @abstractmethod
    def finalise(self, plan: dict, **resume) -> dict | Wait:
        """All traffic on the new variant, the old one removed, autoscaling in place. Returns what
        ``deployment.served`` records: ``endpoint``, optional ``tags``, and the backend's own state."""

    @abstractmethod
    def restore(self, plan: dict) -> None:
        """After a failed step (ml_deploy's rollback): the traffic back on the old variant, the new one removed."""


class Rollout:
    """The steps of rolling ``spec.model`` out through ``adapter``; each step is one task of ml_deploy."""

    def __init__(self, cfg: PipelineConfig, spec: EndpointSpec, adapter: EndpointAdapter) -> None:
        self.cfg, self.spec, self.adapter = cfg, spec, adapter
        self.version = spec.model.version

    def run(self, step: str, plan: dict | None = None, /, **resume):
        """One step (``plan``: what ``stage`` returned); a failure is recorded for the rollback, then raised."""
        if step not in STEPS:
            raise ValueError(f"{step!r} is not a rollout step: {', '.join(STEPS)}")
        try:
            return getattr(self, f"_{step}")(**resume) if step == "stage" else getattr(self, f"_{step}")(plan, **resume)
        except DeploymentFailed as err:
            record_failure(self.cfg, step, self.version, str(err))
            raise

    def stage(self, **resume):
        return self.run("stage", **resume)

    def health_check(self, plan: dict, **resume):
        return self.run("health_check", plan, **resume)

    def smoke_test(self, plan: dict, **resume):
        return self.run("smoke_test", plan, **resume)

    def canary(self, plan: dict, **resume):
        return self.run("canary", plan, **resume)

    def full_traffic(self, plan: dict, **resume):
        return self.run("full_traffic", plan, **resume)

    def fail(self, step: str, reason: str):
        record_failure(self.cfg, step, self.version, reason)
        raise DeploymentFailed(reason)

    # --- the steps ------------------------------------------------------------------------------

    def _stage(self, **resume):
        return self.adapter.stage(lambda plan: write_endpoint_state(self.cfg, rollout=plan), **resume)

    def _health_check(self, plan: dict, **resume):
        if plan["already_served"]:
            return {"skipped": f"v{self.version} serves all traffic already"}
        problem = self.adapter.ready(plan, **resume)
        if isinstance(problem, Wait):
            return problem
        if problem:
            raise DeploymentFailed(f"health check of v{self.version} ({plan['new']}): {problem}")
        return {"ready": plan["new"]}

    def _smoke_test(self, plan: dict) -> dict:
        if plan["already_served"]:
            return {"skipped": f"v{self.version} serves all traffic already"}
        rows = holdout_requests(self.cfg, self.spec.smoke_rows)
        try:
            _, predictions = self.adapter.predict(plan, rows, plan["new"])
        except Exception as err:  # noqa: BLE001 - the model raised, hung, or its server died: the smoke test failed
            raise DeploymentFailed(f"smoke test of v{self.version} ({plan['new']}) failed: {err}") from None
        if not (len(predictions) == len(rows) and all(sane_prediction(p) for p in predictions)):
            raise DeploymentFailed(f"smoke test of v{self.version} ({plan['new']}): {len(predictions)} answers to "
                                   f"{len(rows)} rows, e.g. {predictions[:3]}")
        log.info("smoke test of v%s (%s): %d sane predictions", self.version, plan["new"], len(rows))
        return {"rows": len(rows)}

    def _canary(self, plan: dict, waited: bool = False):
        spec = self.spec
        if plan["already_served"]:
            return {"skipped": f"v{self.version} serves all traffic already", "variant": plan["new"]}
        if not waited:  # a first deployment takes all the traffic (there is no one else's) and is checked at once
            weights = ({plan["old"]: 100 - spec.canary_percent, plan["new"]: spec.canary_percent} if plan["old"]
                       else {plan["new"]: 100})
            pending = self.adapter.set_weights(plan, weights)
            if pending is not None:
                return pending
            log.info("traffic: %s", weights)
            if plan["old"] and spec.canary_wait_s and self.adapter.deferrable:
                return Wait(f"v{self.version} with {spec.canary_percent}% of the traffic for {spec.canary_wait_s}s",
                            seconds=spec.canary_wait_s, resume={"waited": True})
        return self._verdict(plan)

    def _verdict(self, plan: dict) -> dict:
        """``canary_requests`` (at least ``smoke_rows``) holdout rows through the endpoint as a client sends them (the
        traffic split picks who answers), one per request; then the error rate, the latency and the alarms."""
        spec = self.spec
        rows = holdout_requests(self.cfg, spec.smoke_rows)
        answered: dict[str, int] = {}
        errors, samples, latencies, requests = 0, [], [], max(spec.canary_requests, len(rows))
        for i in range(requests):
            started = time.monotonic()
            try:
                variant, predictions = self.adapter.predict(plan, [rows[i % len(rows)]], None)
                if variant:
                    answered[variant] = answered.get(variant, 0) + 1
                if not (len(predictions) == 1 and sane_prediction(predictions[0])):
                    raise ValueError(f"not a usable prediction: {predictions[:1]}")
            except Unreachable as err:
                raise DeploymentFailed(f"canary of v{self.version}: the endpoint stopped answering: {err}") from None
            except Exception as err:  # noqa: BLE001 - every failed request counts against the canary
                errors += 1
                samples.append(str(err)[:300])
            latencies.append(1000 * (time.monotonic() - started))
        rate = errors / requests
        p95 = sorted(latencies)[max(0, round(0.95 * len(latencies)) - 1)]
        firing = self.adapter.firing_alarms(plan, spec.rollback_alarms) if spec.rollback_alarms else []
        result = {"requests": requests, "errors": errors, "error_rate": rate, "latency_p95_ms": round(p95, 1),
                  "answered_by": answered, "percent": spec.canary_percent if plan["old"] else 100, "alarms": firing,
                  "variant": plan["new"]}
        log.info("canary of v%s: %s", self.version, result)
        where = f"canary of v{self.version} on {plan.get('endpoint') or 'the endpoint'}"
        if firing:
            raise DeploymentFailed(f"{where}: alarm {', '.join(firing)} fired")
        if rate > spec.max_error_rate:
            raise DeploymentFailed(f"{where}: {errors} of {requests} requests failed ({rate:.1%} > "
                                   f"{spec.max_error_rate:.1%}), e.g. {samples[:2]}")
        if spec.max_latency_ms and p95 > spec.max_latency_ms:
            raise DeploymentFailed(f"{where}: 95th percentile latency {p95:.0f} ms > {spec.max_latency_ms:.0f} ms")
        return result

    def _full_traffic(self, plan: dict, **resume):
        record = self.adapter.finalise(plan, **resume)
        if isinstance(record, Wait):
            return record
        record = dict(record)
        endpoint, tags = record.pop("endpoint"), record.pop("tags", None)
        state = served(self.cfg, self.version, endpoint=endpoint, tags=tags, **record)
        log.info("v%s serves all traffic on %s (%s)", self.version, endpoint, plan["new"])
        return state
