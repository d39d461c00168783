"""ml_deploy's blue/green rollout on the local endpoint, one step per task.

``stage`` loads the new version as the idle colour (blue or green) next to the live one;
``health_check`` and ``smoke_test`` (holdout rows sent to it alone) check it; ``canary`` gives it
``canary_percent`` of the traffic for ``canary_requests`` requests, whose error rate must stay
under ``max_error_rate``; ``complete`` gives it all the traffic and unloads the old colour. A failed
step records why (``deployment.record_failure``); ml_deploy's rollback then restores the traffic
(``LocalEndpoint.restore``) and alias ``champion`` (``deployment.restore_after_failure``).
"""

from __future__ import annotations

import logging

from mlfactory.backends.local.endpoint import LocalEndpoint
from mlfactory.config import PipelineConfig
from mlfactory.deployment import DeploymentFailed, holdout_requests, record_failure, sane_prediction, served
from mlfactory.specs import EndpointSpec

log = logging.getLogger(__name__)

COLOURS = ("blue", "green")


class Rollout:
    """The steps of one blue/green rollout of ``spec.model`` on the local endpoint."""

    def __init__(self, cfg: PipelineConfig, spec: EndpointSpec, endpoint: LocalEndpoint | None = None):
        self.cfg, self.spec = cfg, spec
        self.version = spec.model.version
        self.endpoint = endpoint or LocalEndpoint(cfg)

    def stage(self) -> dict:
        """Start the endpoint if needed and load the version as the idle colour, with no traffic. The plan is
        kept in the endpoint's state too, for the rollback."""
        self.endpoint.ensure_running()
        variants = self.endpoint.variants()
        live = next((v for v in variants.values() if v["weight"] > 0), None)
        plan = {"version": self.version, "model_uri": self.spec.model.registry_uri,
                "old": live["name"] if live else None, "old_version": live["version"] if live else None}
        if live and live["version"] == self.version:
            plan.update(new=live["name"], already_served=True)
        else:
            plan.update(new=next(c for c in COLOURS if c != plan["old"]), already_served=False)
        self.endpoint.write_state(rollout=plan)
        if not plan["already_served"]:
            status, reply = self.endpoint.call(f"/admin/variants/{plan['new']}",
                                               {"model_uri": plan["model_uri"], "weight": 0}, method="PUT", timeout=600)
            self._fail_if(status == 201, f"loading {plan['model_uri']} answered {status}: {reply.get('message', reply)}",
                          step="stage")
        return plan

    def health_check(self, plan: dict) -> None:
        status, reply = self.endpoint.call(f"/admin/variants/{plan['new']}")
        ok = status == 200 and reply.get("state") == "ready" and reply.get("version") == plan["version"]
        self._fail_if(ok, f"health check of {plan['new']}: {status} {reply}", step="health_check")

    def smoke_test(self, plan: dict) -> None:
        rows = holdout_requests(self.cfg, self.spec.smoke_rows)
        try:
            status, reply = self.endpoint.predict(rows, variant=plan["new"])
        except OSError as err:  # no answer at all (the server's own predict timeout answers 504 before this)
            status, reply = 0, {"message": f"no answer: {err}"}
        predictions = reply.get("predictions") or []
        ok = status == 200 and len(predictions) == len(rows) and all(sane_prediction(p) for p in predictions)
        self._fail_if(ok, f"smoke test of v{plan['version']} ({plan['new']}) answered {status}: "
                          f"{reply.get('message') or predictions[:3]}", step="smoke_test")

    def canary(self, plan: dict) -> dict:
        """A share of the traffic on the new colour; its error rate must stay under the limit."""
        spec = self.spec
        if not plan["old"] or plan["already_served"]:
            return {"skipped": "nothing served before: no traffic to share"}
        before = self.endpoint.variants()[plan["new"]]
        self.endpoint.set_traffic({plan["old"]: 100 - spec.canary_percent, plan["new"]: spec.canary_percent})
        rows = holdout_requests(self.cfg, spec.smoke_rows)
        try:
            for i in range(spec.canary_requests):
                self.endpoint.predict([rows[i % len(rows)]])
            after = self.endpoint.variants()[plan["new"]]
        except (OSError, DeploymentFailed) as err:  # the server died or stopped answering mid-canary
            self._fail_if(False, f"canary of v{plan['version']}: the endpoint stopped answering: {err}", step="canary")
        requests, errors = after["requests"] - before["requests"], after["errors"] - before["errors"]
        rate = errors / requests if requests else 0.0
        result = {"requests": requests, "errors": errors, "error_rate": rate, "percent": spec.canary_percent}
        self._fail_if(rate <= spec.max_error_rate, f"canary of v{plan['version']}: {errors} of {requests} requests "
                                                   f"failed ({rate:.1%} > {spec.max_error_rate:.1%})", step="canary")
        return result

    def complete(self, plan: dict) -> dict:
        """All traffic to the new colour; the old one is unloaded; the state says what is served."""
        if not plan["already_served"]:
            self.endpoint.set_traffic({plan["new"]: 100})
            if plan["old"]:
                self.endpoint.call(f"/admin/variants/{plan['old']}", method="DELETE")
        state = served(self.cfg, plan["version"], endpoint=self.endpoint.url, live=plan["new"],
                       model_uri=plan["model_uri"])
        log.info("v%s serves all traffic at %s (%s)", plan["version"], self.endpoint.url, plan["new"])
        return state

    def _fail_if(self, ok: bool, reason: str, step: str) -> None:
        if not ok:
            record_failure(self.cfg, step, self.version, reason)
            raise DeploymentFailed(reason)

