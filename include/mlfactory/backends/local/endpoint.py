"""The `local` backend's real-time endpoint: one model server process that outlives Airflow tasks.

The server (``mlfactory.serving``) listens on ``127.0.0.1:local.port`` for clients (predict-only
tokens) and on ``127.0.0.1:local.admin_port`` for its admin API (the admin token), and holds the
endpoint's variants (blue and green, as SageMaker production variants, Vertex AI traffic splits and
Azure ML deployments are), driven through that admin API by ml_deploy's rollout (``rollout``), which
may load only versions of the configured model.

Where to look: ``<bucket>/_mlfactory/endpoint/endpoint.json`` (URL, served version, colours, pid),
``endpoint.log`` beside it, and beside it (mode 600) ``token`` (the client token, unless
``local.token`` is set), ``tokens.json`` (more client tokens: ``python -m mlfactory.serving.auth``)
and ``admin-token`` (unless ``local.admin_token`` is set).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

from mlfactory import storage
from mlfactory.backends.local.processes import reap, start_module
from mlfactory.config import PipelineConfig
from mlfactory.serving.deployment import DeploymentFailed, endpoint_state_uri, now, read_endpoint_state, write_endpoint_state
from mlfactory.serving.auth import ADMIN_TOKEN_ENV, CLIENT_TOKEN_ENV, TOKENS_FILE_ENV, write_tokens

log = logging.getLogger(__name__)


class LocalEndpoint:
    """The local model server: started on demand, driven through its admin API."""

    def __init__(self, cfg: PipelineConfig):
        if not storage.is_local(cfg.storage.bucket):
            raise ValueError(f"the local endpoint keeps its state in a local bucket; {cfg.source} has {cfg.storage.bucket}")
        self.cfg, self.settings = cfg, cfg.backend
        self.url = self.settings.endpoint_url or f"http://127.0.0.1:{self.settings.port}"
        self.admin_url = self.settings.admin_url or f"http://127.0.0.1:{self.settings.admin_listen_port}"
        self.home = Path(storage.local_path(storage.join(cfg.storage.state_uri, "endpoint")))
        self.state_file = Path(storage.local_path(endpoint_state_uri(cfg)))
        self.log_file = self.home / "endpoint.log"

    @property
    def token(self) -> str:
        """The client token: the configured one, else one generated on first use and kept (mode 600) beside the state."""
        return self.settings.token or storage.private_file(self.home / "token", lambda: secrets.token_urlsafe(32)).strip()

    @property
    def admin_token(self) -> str:
        """The admin API's token: configured, else generated on first use and kept (mode 600) beside the state."""
        return self.settings.admin_token or storage.private_file(self.home / "admin-token",
                                                                 lambda: secrets.token_urlsafe(32)).strip()

    @property
    def tokens_file(self) -> Path:
        return self.home / "tokens.json"

    # --- the process ----------------------------------------------------------------------------

    def alive(self) -> bool:
        """Whether the model server answers /live on its admin listener. Anything else there (nothing, or a service
        that does not speak HTTP/1.1, such as a gRPC port) is not it."""
        import http.client

        try:
            return self.call("/live", auth=False)[0] == 200
        except (OSError, http.client.HTTPException):
            return False

    def ensure_running(self, timeout: float = 120) -> None:
        if self.alive():
            return
        if self.settings.endpoint_url:  # someone else runs it (docker-compose, Kubernetes): wait for it, never start one
            deadline = time.monotonic() + timeout
            while not self.alive():
                if time.monotonic() > deadline:
                    raise DeploymentFailed(f"the model server at {self.admin_url} (local.admin_url) did not answer "
                                           f"/live within {timeout:.0f}s")
                time.sleep(1)
            return
        self.home.mkdir(parents=True, exist_ok=True)
        if not self.tokens_file.exists():
            write_tokens(self.tokens_file, {})
        env = {**os.environ, CLIENT_TOKEN_ENV: self.token, TOKENS_FILE_ENV: str(self.tokens_file),
               ADMIN_TOKEN_ENV: self.admin_token, "MLFLOW_TRACKING_URI": self.cfg.mlflow.tracking_uri}
        # forked from this process (an Airflow task has MLflow, torch and pandas loaded: ~1 s instead of ~9 s of
        # imports) in a session of its own: it outlives the task that started it, and stop() ends its group. It
        # predicts on one thread per request, as it would started on its own (--threads 1)
        proc = start_module("mlfactory.serving", [
            "--host", "127.0.0.1", "--port", str(self.settings.port),
            "--admin-host", "127.0.0.1", "--admin-port", str(self.settings.admin_listen_port),
            "--allowed-model", self.cfg.model_name, "--log-uri", self.cfg.storage.prediction_log_uri,
            "--log-flush-seconds", str(self.cfg.serving.log_flush_s)], env, log=self.log_file, one_thread=True)
        self.write_state(pid=proc.pid, started_at=now())
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
            reap(pid)  # forked from this process: a zombie until collected
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        os.killpg(pid, signal.SIGKILL)
        reap(pid, wait=True)

    # --- state --------------------------------------------------------------------------------

    def state(self) -> dict:
        return read_endpoint_state(self.cfg)

    def write_state(self, **changes) -> dict:
        return write_endpoint_state(self.cfg, url=self.url, log=str(self.log_file), **changes)

    # --- HTTP ---------------------------------------------------------------------------------

    def call(self, path: str, body=None, method: str | None = None, auth: bool = True, headers: dict | None = None,
             timeout: float = 60) -> tuple[int, dict]:
        """A call to the admin listener, as ml_deploy (the admin token)."""
        request = urllib.request.Request(self.admin_url + path, method=method or ("GET" if body is None else "POST"),
                                         data=None if body is None else json.dumps(body).encode())
        request.add_header("Content-Type", "application/json")
        if auth:
            request.add_header("Authorization", f"Bearer {self.admin_token}")
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
        """``rows`` through the client port. Waits longer than the server's own predict timeout, so that a model that
        hangs is answered by the server (504), not cut by this client."""
        from mlfactory.serving.limits import Limits

        headers = {"X-Target-Variant": variant} if variant else None
        return self.call("/invocations", {"dataframe_records": rows}, headers=headers,
                         timeout=Limits.predict_timeout_s + 30)

    def set_traffic(self, weights: dict) -> None:
        status, reply = self.call("/admin/traffic", weights, method="PUT")
        if status != 200:
            raise DeploymentFailed(f"setting traffic {weights} answered {status}: {reply.get('message')}")

    def restore(self, plan: dict | None) -> None:
        """After a failed rollout (``plan``: what ``Rollout.stage`` set up): all traffic back on the old colour,
        the new one unloaded. A server that died on the way (kill -9, out of memory) is started again (or, run
        elsewhere, waited for) and given the old version back: traffic never stays split, nor on a dead variant."""
        if not plan or (not plan.get("old") and not self.alive()):  # nothing served before, nothing running
            return
        self.ensure_running()
        variants = self.variants()
        if plan.get("old"):
            if plan["old"] not in variants:  # a restarted server holds nothing yet
                uri = f"models:/{self.cfg.model_name}/{plan['old_version']}"
                status, reply = self.call(f"/admin/variants/{plan['old']}", {"model_uri": uri, "weight": 100},
                                          method="PUT", timeout=600)
                if status != 201:
                    raise DeploymentFailed(f"reloading v{plan['old_version']} after a failed rollout answered {status}: "
                                           f"{reply.get('message', reply)}")
            self.set_traffic({plan["old"]: 100})
        if not plan.get("already_served") and plan.get("new") in variants:
            self.call(f"/admin/variants/{plan['new']}", method="DELETE")
