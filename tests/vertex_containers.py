"""Playing the containers' part of the Vertex AI fake (tests/vertex_fake.py) on this machine: the project's
training entrypoint and model server, run with the environment Vertex gives them, against fake-gcs-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import serving_container

from mlfactory.backends.local.processes import answers, free_port, signal_group, stop_group


def _env(entries: list[dict]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in entries or []}


class TrainingContainers:
    """Plays a CustomJob: the chief of worker pool 0 runs the job's command and args with Vertex's variables
    (AIP_MODEL_DIR and AIP_CHECKPOINT_DIR under base_output_directory, CLUSTER_SPEC, CLOUD_ML_JOB_ID).
    With ``preempt_once``, the first run is killed (-9, as a Spot VM reclaimed) once its first checkpoint is
    in AIP_CHECKPOINT_DIR, and the container is started again, as ``restart_job_on_worker_restart`` does."""

    def __init__(self, workdir: Path, environment: dict | None = None, preempt_once: bool = False):
        self.workdir, self.environment, self.preempt_once = workdir, environment or {}, preempt_once
        self.runs: list[dict] = []

    def __call__(self, job: dict) -> None:
        from mlfactory import storage
        from mlfactory.specs import CHECKPOINT_FILE

        spec = job["jobSpec"]
        pool = spec["workerPoolSpecs"][0]
        container = pool["containerSpec"]
        base = spec["baseOutputDirectory"]["outputUriPrefix"].rstrip("/")
        job_id = job["name"].rsplit("/", 1)[-1]
        hosts = {"workerpool0": [f"cmle-training-workerpool0-{job_id}-0:2222"]}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AIP_"))}
        env.update({**_env(container.get("env")), **self.environment}, AIP_MODEL_DIR=f"{base}/model/",
                   AIP_CHECKPOINT_DIR=f"{base}/checkpoints/", AIP_TENSORBOARD_LOG_DIR=f"{base}/logs/",
                   CLOUD_ML_JOB_ID=job_id, CLUSTER_SPEC=json.dumps({"cluster": hosts,
                                                                    "task": {"type": "workerpool0", "index": 0}}))
        command = [sys.executable if c == "python" else c for c in container["command"]] + container.get("args", [])
        checkpoint = f"{base}/checkpoints/{CHECKPOINT_FILE}"
        log = self.workdir / f"{job_id}.log"
        self.workdir.mkdir(parents=True, exist_ok=True)
        run = {"job": job["name"], "preempted": False, "env": env}
        with open(log, "ab") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            if self.preempt_once and not any(r["preempted"] for r in self.runs):
                deadline = time.monotonic() + 300
                while process.poll() is None and not storage.exists(checkpoint) and time.monotonic() < deadline:
                    time.sleep(0.2)
                if process.poll() is None:
                    signal_group(process, signal.SIGKILL)
                    process.wait()
                    run["preempted"] = True
                    process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True)
            code = process.wait(timeout=600)
        run["log"] = log.read_text()
        self.runs.append(run)
        if code != 0:
            raise RuntimeError(f"The replica workerpool0-0 exited with a non-zero status of {code}. "
                               f"{run['log'][-1500:]}")


class ModelContainers:
    """Starts a Vertex Model's serving container (the project's model server) with Vertex's variables
    (AIP_HTTP_PORT, AIP_PREDICT_ROUTE, AIP_HEALTH_ROUTE, AIP_STORAGE_URI = the model's artifact_uri) and
    returns its URL once the health route answers; one container per model."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.processes: dict[str, tuple[subprocess.Popen, str]] = {}
        self.lock = threading.Lock()  # the fake serves requests on several threads: one container per model

    def __call__(self, model: dict) -> str:
        with self.lock:
            return self._start(model)

    def _start(self, model: dict) -> str:
        if model["name"] in self.processes:
            return self.processes[model["name"]][1]
        spec = model["containerSpec"]
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AIP_", "MLFACTORY_MODEL"))}
        env.update(_env(spec.get("env")), AIP_HTTP_PORT=str(port), AIP_PREDICT_ROUTE=spec["predictRoute"],
                   AIP_HEALTH_ROUTE=spec["healthRoute"], AIP_STORAGE_URI=model["artifactUri"],
                   MLFACTORY_SERVING_HOST="127.0.0.1")
        assert spec["command"] == ["python", "-m", "mlfactory.serving"], spec["command"]  # the image's model server
        log = self.workdir / f"{model['name'].rsplit('/', 1)[-1]}.log"
        url = f"http://127.0.0.1:{port}"
        process = serving_container(env, log, lambda: answers(url + spec["healthRoute"], ok_only=True),
                                    "the model container")
        self.processes[model["name"]] = (process, url)
        return url

    def stop(self) -> None:
        for process, _ in self.processes.values():
            stop_group(process)
        self.processes.clear()
