"""The MLflow tracking and registry server of the `local` backend: SQLite metadata, artifacts in the bucket.

``make run`` and the tests start it through this class, so both use a real server over HTTP (never a
file store inside the calling process). It binds 127.0.0.1 and runs in its own process group.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mlfactory import storage
from mlfactory.backends.local.processes import answers, launch, stop_group, wait_ready


@dataclass
class LocalMlflow:
    home: Path  # holds mlflow.db and the server's log
    artifacts_uri: str  # where run artifacts and models go (the bucket, for `local`)
    port: int = 5000
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> LocalMlflow:
        return self.launch().wait_ready(timeout)

    def launch(self) -> LocalMlflow:
        """Start the server without waiting for it (it takes seconds: start something else meanwhile)."""
        self.home.mkdir(parents=True, exist_ok=True)
        artifacts = storage.local_path(self.artifacts_uri) if storage.is_local(self.artifacts_uri) else self.artifacts_uri
        command = [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{self.home / 'mlflow.db'}",
            "--artifacts-destination", artifacts,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
        ]
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "MLFLOW_DISABLE_TELEMETRY": "true",
               # MLflow 3 starts a job runner and ~6 huey consumers beside the server for its GenAI jobs (LLM
               # judges, trace rollups), ~10 s of CPU each at start and memory all along; the pipeline runs none
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = launch(command, self.home / "mlflow-server.log", env=env, cwd=self.home)
        return self

    def wait_ready(self, timeout: float = 90) -> LocalMlflow:
        wait_ready(self.process, self.healthy, "the MLflow server", self.home / "mlflow-server.log", timeout, 0.5)
        return self

    def healthy(self) -> bool:
        return answers(f"{self.url}/health", ok_only=True)

    def stop(self, grace: float = 10) -> None:
        if self.process is not None:
            stop_group(self.process, grace)
            self.process = None

    def __enter__(self) -> LocalMlflow:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
