"""The `local` backend's endpoint adapter for ml_deploy's rollout (``mlfactory.serving.rollout``): blue/green colours on
the local model server, driven through its admin API.

``stage`` loads the new version as the idle colour (blue or green) next to the live one, with no traffic;
``predict`` sends rows to one colour (``X-Target-Variant``) or through the traffic weights; ``finalise``
gives the new colour all the traffic and unloads the old one; ``restore`` (ml_deploy's rollback) puts the
traffic back on the old colour, starting the server again if it died. The steps run in the task: nothing
to defer, and the canary does not wait ``canary_wait_s``.
"""

from __future__ import annotations

import http.client

from mlfactory.backends.local.endpoint import LocalEndpoint
from mlfactory.serving.deployment import DeploymentFailed
from mlfactory.serving.rollout import EndpointAdapter, Unreachable

COLOURS = ("blue", "green")


class LocalEndpointAdapter(EndpointAdapter):
    deferrable = False

    def __init__(self, cfg, spec, poll_interval: int | None = None, endpoint: LocalEndpoint | None = None) -> None:
        super().__init__(cfg, spec, poll_interval)
        self.endpoint = endpoint or LocalEndpoint(cfg)

    def stage(self, keep) -> dict:
        self.endpoint.ensure_running()
        live = next((v for v in self.endpoint.variants().values() if v["weight"] > 0), None)
        plan = {"version": self.spec.model.version, "model_uri": self.spec.model.registry_uri,
                "old": live["name"] if live else None, "old_version": live["version"] if live else None}
        if live and live["version"] == plan["version"]:
            plan.update(new=live["name"], already_served=True)
        else:
            plan.update(new=next(c for c in COLOURS if c != plan["old"]), already_served=False)
        keep(plan)
        if not plan["already_served"]:
            status, reply = self.endpoint.call(f"/admin/variants/{plan['new']}",
                                               {"model_uri": plan["model_uri"], "weight": 0}, method="PUT", timeout=600)
            if status != 201:
                raise DeploymentFailed(f"loading {plan['model_uri']} answered {status}: {reply.get('message', reply)}")
        return plan

    def ready(self, plan: dict) -> str | None:
        status, reply = self.endpoint.call(f"/admin/variants/{plan['new']}")
        ok = status == 200 and reply.get("state") == "ready" and reply.get("version") == plan["version"]
        return None if ok else f"{status} {reply}"

    def predict(self, plan: dict, rows: list[dict], variant: str | None) -> tuple[str, list]:
        try:
            status, reply = self.endpoint.predict(rows, variant=variant)
        except (OSError, http.client.HTTPException) as err:  # the server died or stopped answering
            raise Unreachable(f"no answer: {err}") from None
        if status != 200:
            raise RuntimeError(f"answered {status}: {reply.get('message') or reply}")
        return variant or "", reply.get("predictions") or []

    def set_weights(self, plan: dict, weights: dict[str, float]) -> None:
        self.endpoint.set_traffic(weights)

    def finalise(self, plan: dict) -> dict:
        if not plan["already_served"]:
            self.endpoint.set_traffic({plan["new"]: 100})
            if plan["old"]:
                self.endpoint.call(f"/admin/variants/{plan['old']}", method="DELETE")
        return {"endpoint": self.endpoint.url, "url": self.endpoint.url, "live": plan["new"],
                "model_uri": plan["model_uri"]}

    def restore(self, plan: dict) -> None:
        self.endpoint.restore(plan)
