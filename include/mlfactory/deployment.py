"""The real-time endpoint of the `local` backend and ml_deploy's blue/green rollout.

The local endpoint is one model server process (``mlfactory.serving``) on ``127.0.0.1:serving.port``
that outlives Airflow tasks. A rollout loads the new version as the idle colour (blue or green) next
to the live one, health-checks it, smoke-tests it with holdout rows sent to it alone, gives it a
canary share of the traffic, then all of it, and unloads the old one. The colours are variants of one
endpoint, as SageMaker production variants, Vertex AI traffic splits and Azure ML deployments are,
so the same rollout reads the same on every backend. Any failed step rolls back: traffic returns to
the old colour, the new one is unloaded, and alias ``champion`` goes back to the served version.

Where to look: ``<bucket>/_mlfactory/endpoint/endpoint.json`` (URL, served version, colours, pid),
``endpoint.log`` beside it, and tags ``mlfactory.deployment*`` on the model version in MLflow.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from mlfactory import storage
from mlfactory.config import PipelineConfig

log = logging.getLogger(__name__)

COLOURS = ("blue", "green")


class DeploymentFailed(RuntimeError):
    """A rollout step failed; the message says which and why."""


def endpoint_state_uri(cfg: PipelineConfig) -> str:
    """The endpoint's state on every backend: URL or name, served version, last failure."""
    return storage.join(cfg.storage.state_uri, "endpoint", "endpoint.json")


def read_endpoint_state(cfg: PipelineConfig) -> dict:
    uri = endpoint_state_uri(cfg)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else {}


def write_endpoint_state(cfg: PipelineConfig, **changes) -> dict:
    state = {**read_endpoint_state(cfg), **changes}
    storage.write_bytes(endpoint_state_uri(cfg), json.dumps(state, indent=2).encode())
    return state


def version_to_deploy(cfg: PipelineConfig, asked: str | None, events: list) -> str:
    """The version a deployment run is for: the form's, else the `champion` event's, else the alias."""
    from mlfactory.registry import CHAMPION, Registry

    version = asked or (events[-1].extra.get("version") if events else None) or Registry(cfg).alias_version(CHAMPION)
    if not version:
        raise ValueError(f"nothing to deploy: {cfg.model_name} has no `champion` yet; set 'version' in the form")
    return str(version)


def cloud_target(cfg: PipelineConfig, version: str) -> dict:
    """What a cloud endpoint or batch job loads: the version, and its files in the bucket."""
    from mlfactory.registry import Registry

    return {"version": str(version), "model_uri": Registry(cfg).model_storage_uri(str(version))}


def restore_after_failure(cfg: PipelineConfig, version: str | None, served: str | None, reason: str) -> dict:
    """After a failed rollout of ``version``: alias `champion` back on the ``served`` version, and the
    failure tagged on the version."""
    from mlfactory.registry import Registry

    Registry(cfg).restore_champion(served, version)
    if version:
        tag_version(cfg, version, {"mlfactory.deployment": "rolled_back", "mlfactory.deployment_reason": reason[:5000]})
    log.warning("rolled back v%s: %s; serving v%s", version, reason, served)
    return {"rolled_back": version, "serving": served, "reason": reason}


def tag_version(cfg: PipelineConfig, version: str, tags: dict) -> None:
    """Deployment tags (``mlfactory.deployment*``) on the model version in MLflow."""
    from mlflow import MlflowClient

    client = MlflowClient(cfg.mlflow.tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, version, key, value)


class LocalEndpoint:
    """The local model server: started on demand, driven through its admin API."""

    def __init__(self, cfg: PipelineConfig):
        if not storage.is_local(cfg.storage.bucket):
            raise ValueError(f"the local endpoint keeps its state in a local bucket; {cfg.source} has {cfg.storage.bucket}")
        self.cfg = cfg
        self.url = f"http://127.0.0.1:{cfg.serving.port}"
        self.home = Path(storage.local_path(storage.join(cfg.storage.state_uri, "endpoint")))
        self.state_file = Path(storage.local_path(endpoint_state_uri(cfg)))
        self.log_file = self.home / "endpoint.log"

    @property
    def token(self) -> str:
        """The configured token, else one generated on first use and kept (mode 600) beside the state."""
        if self.cfg.serving.token:
            return self.cfg.serving.token
        path = self.home / "token"
        if not path.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
        return path.read_text().strip()

    # --- the process ----------------------------------------------------------------------------

    def alive(self) -> bool:
        try:
            return self.call("/live", auth=False)[0] == 200
        except OSError:
            return False

    def ensure_running(self, timeout: float = 120) -> None:
        if self.alive():
            return
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFACTORY_SERVING_TOKEN": self.token, "MLFLOW_TRACKING_URI": self.cfg.mlflow.tracking_uri}
        with open(self.log_file, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mlfactory.serving", "--host", "127.0.0.1", "--port", str(self.cfg.serving.port),
                 "--log-uri", self.cfg.storage.prediction_log_uri,
                 "--log-flush-seconds", str(self.cfg.serving.log_flush_s)],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # outlives the task that started it; stop() ends its group
            )
        self.write_state(pid=proc.pid, started_at=_now())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DeploymentFailed(f"the model server exited with {proc.returncode}: see {self.log_file}")
            if self.alive():
                log.info("local endpoint started at %s (pid %d, log %s)", self.url, proc.pid, self.log_file)
                return
            time.sleep(0.3)
        raise DeploymentFailed(f"the model server did not answer on {self.url} within {timeout:.0f}s: see {self.log_file}")

    def stop(self, grace: float = 15) -> None:
        """Stop the server process (it writes out its prediction log first)."""
        pid = self.state().get("pid")
        if not pid:
            return
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        os.killpg(pid, signal.SIGKILL)

    # --- state --------------------------------------------------------------------------------

    def state(self) -> dict:
        return read_endpoint_state(self.cfg)

    def write_state(self, **changes) -> dict:
        return write_endpoint_state(self.cfg, url=self.url, log=str(self.log_file), **changes)

    # --- HTTP ---------------------------------------------------------------------------------

    def call(self, path: str, body=None, method: str | None = None, auth: bool = True, headers: dict | None = None,
             timeout: float = 60) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, method=method or ("GET" if body is None else "POST"),
                                         data=None if body is None else json.dumps(body).encode())
        request.add_header("Content-Type", "application/json")
        if auth:
            request.add_header("Authorization", f"Bearer {self.token}")
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw)
            except json.JSONDecodeError:
                return err.code, {"message": raw.decode(errors="replace")}

    def variants(self) -> dict[str, dict]:
        status, reply = self.call("/admin/variants")
        if status != 200:
            raise DeploymentFailed(f"the endpoint's admin API answered {status}: {reply.get('message')}")
        return {v["name"]: v for v in reply["variants"]}

    def predict(self, rows: list[dict], variant: str | None = None) -> tuple[int, dict]:
        headers = {"X-Target-Variant": variant} if variant else None
        return self.call("/invocations", {"dataframe_records": rows}, headers=headers)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _finite_rows(rows: list[dict]) -> list[dict]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]


class Rollout:
    """The steps of one blue/green rollout of model ``version``; each is one ml_deploy task."""

    def __init__(self, cfg: PipelineConfig, endpoint: LocalEndpoint | None = None):
        self.cfg = cfg
        self.endpoint = endpoint or LocalEndpoint(cfg)

    def sample_rows(self, n: int) -> list[dict]:
        """Rows of the frozen holdout as a JSON caller sends them (smoke test and canary traffic)."""
        from mlfactory.features import to_wire
        from mlfactory.training_data import frozen_holdout, read_holdout

        holdout = frozen_holdout(self.cfg)
        if holdout is None:
            raise DeploymentFailed(f"no frozen holdout under {self.cfg.storage.models_uri} to smoke-test with")
        rows = read_holdout(holdout.uri, holdout.sha256).head(n)
        return _finite_rows(to_wire(rows, self.cfg.dataset).to_dict("records"))

    def stage(self, version: str) -> dict:
        """Start the endpoint if needed and load ``version`` as the idle colour, with no traffic."""
        self.endpoint.ensure_running()
        variants = self.endpoint.variants()
        live = next((v for v in variants.values() if v["weight"] > 0), None)
        plan = {"version": version, "model_uri": f"models:/{self.cfg.model_name}/{version}",
                "old": live["name"] if live else None, "old_version": live["version"] if live else None}
        if live and live["version"] == version:
            return {**plan, "new": live["name"], "already_served": True}
        plan["new"] = next(c for c in COLOURS if c != plan["old"])
        self._fail_if(plan, *self._put(plan["new"], plan["model_uri"]), step="stage")
        return {**plan, "already_served": False}

    def _put(self, name: str, model_uri: str) -> tuple[bool, str]:
        status, reply = self.endpoint.call(f"/admin/variants/{name}", {"model_uri": model_uri, "weight": 0},
                                           method="PUT", timeout=600)
        return status == 201, f"loading {model_uri} answered {status}: {reply.get('message', reply)}"

    def health_check(self, plan: dict) -> None:
        status, reply = self.endpoint.call(f"/admin/variants/{plan['new']}")
        ok = status == 200 and reply.get("state") == "ready" and reply.get("version") == plan["version"]
        self._fail_if(plan, ok, f"health check of {plan['new']}: {status} {reply}", step="health_check")

    def smoke_test(self, plan: dict) -> None:
        rows = self.sample_rows(self.cfg.serving.smoke_rows)
        status, reply = self.endpoint.predict(rows, variant=plan["new"])
        predictions = reply.get("predictions") or []
        ok = status == 200 and len(predictions) == len(rows) and all(_sane(p) for p in predictions)
        self._fail_if(plan, ok, f"smoke test of v{plan['version']} ({plan['new']}) answered {status}: "
                                f"{reply.get('message') or predictions[:3]}", step="smoke_test")

    def canary(self, plan: dict) -> dict:
        """A share of the traffic on the new colour; its error rate must stay under the limit."""
        spec = self.cfg.serving
        if not plan["old"] or plan["already_served"]:
            return {"skipped": "nothing served before: no traffic to share"}
        before = self.endpoint.variants()[plan["new"]]
        self._traffic({plan["old"]: 100 - spec.canary_percent, plan["new"]: spec.canary_percent})
        rows = self.sample_rows(max(spec.smoke_rows, 1))
        for i in range(spec.canary_requests):
            self.endpoint.predict([rows[i % len(rows)]])
        after = self.endpoint.variants()[plan["new"]]
        requests, errors = after["requests"] - before["requests"], after["errors"] - before["errors"]
        rate = errors / requests if requests else 0.0
        result = {"requests": requests, "errors": errors, "error_rate": rate, "percent": spec.canary_percent}
        self._fail_if(plan, rate <= spec.max_error_rate,
                      f"canary of v{plan['version']}: {errors} of {requests} requests failed "
                      f"({rate:.1%} > {spec.max_error_rate:.1%})", step="canary")
        return result

    def complete(self, plan: dict) -> dict:
        """All traffic to the new colour; the old one is unloaded; the state says what is served."""
        if not plan["already_served"]:
            self._traffic({plan["new"]: 100})
            if plan["old"]:
                self.endpoint.call(f"/admin/variants/{plan['old']}", method="DELETE")
        state = self.endpoint.write_state(served_version=plan["version"], live=plan["new"],
                                          model_uri=plan["model_uri"], deployed_at=_now(), last_failure=None)
        self._tag(plan["version"], {"mlfactory.deployment": "serving", "mlfactory.deployed_at": state["deployed_at"],
                                    "mlfactory.endpoint": self.endpoint.url})
        log.info("v%s serves all traffic at %s (%s)", plan["version"], self.endpoint.url, plan["new"])
        return state

    def rollback(self, plan: dict | None, version: str | None) -> dict:
        """Traffic back to the old colour, the new one unloaded, alias `champion` back on the served version."""
        state = self.endpoint.state()
        reason = (state.get("last_failure") or {}).get("reason", "a rollout step failed")
        if plan and self.endpoint.alive():
            if plan.get("old"):
                self._traffic({plan["old"]: 100})
            if not plan.get("already_served") and plan.get("new") in self.endpoint.variants():
                self.endpoint.call(f"/admin/variants/{plan['new']}", method="DELETE")
        served = (plan or {}).get("old_version") or state.get("served_version")
        return restore_after_failure(self.cfg, version, served, reason)

    def _traffic(self, weights: dict) -> None:
        status, reply = self.endpoint.call("/admin/traffic", weights, method="PUT")
        if status != 200:
            raise DeploymentFailed(f"setting traffic {weights} answered {status}: {reply.get('message')}")

    def _fail_if(self, plan: dict, ok: bool, reason: str, step: str) -> None:
        if not ok:
            self.endpoint.write_state(last_failure={"step": step, "version": plan["version"], "reason": reason, "at": _now()})
            raise DeploymentFailed(reason)

    def _tag(self, version: str, tags: dict) -> None:
        tag_version(self.cfg, version, tags)


def _sane(prediction: dict) -> bool:
    """An answer a caller could use: a prediction, and probabilities that are probabilities."""
    if prediction.get("prediction") is None:
        return False
    return all(isinstance(v, int | float) and 0 <= v <= 1 for k, v in prediction.items() if k.startswith("probability"))
