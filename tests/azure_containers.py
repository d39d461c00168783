"""Playing the containers' part of the Azure ML fake (tests/azureml_fake.py) on this machine: the project's
training entrypoint, model server and batch driver, run with the environment Azure ML gives them, against
Azurite for the datastore.

A datastore path (``azureml://datastores/<ds>/paths/<p>``) is the registered datastore's container on
Azurite (``abfs://<container>/<p>``): Azure ML mounts it as a folder, here the entrypoint reads and writes the
blobs themselves through the storage layer."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import serving_container

from mlfactory.backends.local.processes import answers, free_port, signal_group, stop_group


def blob_uri(fake, path: str) -> str:
    """``azureml://[.../]datastores/<ds>/paths/<p>`` -> ``abfs://<container>/<p>`` (the datastore's container)."""
    # the SDK may send the long form: azureml://subscriptions/S/resourcegroups/R/workspaces/W/datastores/...
    m = re.fullmatch(r"azureml://(?:subscriptions/[^/]+/resourcegroups/[^/]+/workspaces/[^/]+/)?"
                     r"datastores/(?P<ds>[^/]+)/paths/(?P<path>.*)", path, re.I)
    assert m, f"not a datastore path: {path}"
    (datastore,) = fake.find(r"/datastores/" + m["ds"] + "$").values()
    return f"abfs://{datastore['properties']['containerName']}/{m['path'].rstrip('/')}"


def download(uri: str, folder: Path) -> Path:
    from mlfactory import storage

    for obj in storage.list_objects(uri):
        target = folder / obj.key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(obj.uri))
    return folder


def _base_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AZUREML_", "MLFACTORY_MODEL"))}
    env.update(extra)
    return env


class TrainingContainers:
    """Plays a command job: ``instanceCount`` x ``processCountPerInstance`` processes of the job's command (its
    ``${{inputs.x}}``/``${{outputs.x}}`` resolved), each with what Azure ML's PyTorch launch sets: RANK,
    LOCAL_RANK, WORLD_SIZE, NODE_RANK, MASTER_ADDR, MASTER_PORT, AZUREML_RUN_ID. With ``preempt_once``, every
    process is killed (-9, a Spot VM reclaimed) once the first checkpoint is written, and the job runs again
    on the same outputs, as Azure ML requeues a preempted Spot job."""

    def __init__(self, fake, workdir: Path, environment: dict | None = None, preempt_once: bool = False):
        self.fake, self.workdir, self.environment, self.preempt_once = fake, workdir, environment or {}, preempt_once
        self.runs: list[dict] = []

    def __call__(self, job: dict) -> None:
        from mlfactory import storage
        from mlfactory.specs import CHECKPOINT_FILE

        props = job["properties"]
        paths = {f"inputs.{k}": blob_uri(self.fake, v["uri"]) for k, v in props["inputs"].items()}
        paths.update({f"outputs.{k}": blob_uri(self.fake, v["uri"]) for k, v in props["outputs"].items()})
        command = re.sub(r"\$\{\{(\w+\.\w+)\}\}", lambda m: paths[m[1]], props["command"])
        nodes = props["resources"]["instanceCount"]
        per_node = props["distribution"]["processCountPerInstance"]
        assert nodes == 1, "this machine plays one node"
        port = free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / f"{job['name']}.log"
        run = {"job": job["name"], "preempted": False, "processes": per_node, "command": command}

        def start(out) -> list[subprocess.Popen]:
            argv = [sys.executable if a == "python" else a for a in shlex.split(command)]  # as the job's shell does
            return [subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=_base_env({
                **props.get("environmentVariables", {}), **self.environment, "RANK": str(rank), "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(per_node), "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "AZUREML_RUN_ID": job["name"], "GLOO_SOCKET_IFNAME": "lo"})) for rank in range(per_node)]

        checkpoint = storage.join(paths["outputs.checkpoints"], CHECKPOINT_FILE)
        with open(log, "ab") as out:
            processes = start(out)
            if self.preempt_once and not any(r["preempted"] for r in self.runs):
                deadline = time.monotonic() + 300
                while all(p.poll() is None for p in processes) and not storage.exists(checkpoint) \
                        and time.monotonic() < deadline:
                    time.sleep(0.2)
                if all(p.poll() is None for p in processes):
                    for p in processes:
                        signal_group(p, signal.SIGKILL)
                        p.wait()
                    run["preempted"] = True
                    processes = start(out)
            codes = [p.wait(timeout=600) for p in processes]
        run["log"] = log.read_text()
        self.runs.append(run)
        if any(codes):
            raise RuntimeError(f"AzureMLCompute job failed: a process exited with {codes}. {run['log'][-1500:]}")


def model_folder(fake, model_id: str, into: Path) -> Path:
    """A registered model's files downloaded as Azure ML mounts them: AZUREML_MODEL_DIR/<folder name>/..."""
    model = fake._get(model_id)
    uri = blob_uri(fake, model["properties"]["modelUri"])
    return download(uri, into / uri.rstrip("/").rsplit("/", 1)[-1]).parent


class ModelContainers:
    """Starts an online deployment's container (the project's model server, the image's default command) with
    Azure ML's variables (AZUREML_MODEL_DIR with the model mounted, the deployment's environment variables)
    and returns its URL once the readiness route of its inference config answers."""

    def __init__(self, fake, workdir: Path):
        self.fake, self.workdir = fake, workdir
        self.processes: dict[str, tuple[subprocess.Popen, str]] = {}
        self.lock = threading.Lock()  # the fake serves requests on several threads: one container per deployment

    def __call__(self, deployment: dict) -> str:
        with self.lock:
            if deployment["name"] in self.processes:  # provisioned again (an update): a fresh container
                stop_group(self.processes.pop(deployment["name"])[0])
            return self._start(deployment)

    def _start(self, deployment: dict) -> str:
        props = deployment["properties"]
        environment = self.fake._get(props["environmentId"])
        routes = environment["properties"]["inferenceConfig"]
        name = deployment["name"]
        model_dir = model_folder(self.fake, props["model"], self.workdir / name / "azureml-models")
        port = free_port()
        env = _base_env({**props.get("environmentVariables", {}), "AZUREML_MODEL_DIR": str(model_dir),
                         "PORT": str(port), "MLFACTORY_SERVING_HOST": "127.0.0.1"})
        url = f"http://127.0.0.1:{port}"
        log = self.workdir / f"{name}.log"
        process = serving_container(env, log, lambda: all(answers(url + routes[r]["path"], ok_only=True)
                                                          for r in ("readinessRoute", "livenessRoute")),
                                    "the deployment's container")
        self.processes[name] = (process, url)
        return url

    def stop(self) -> None:
        for process, _ in self.processes.values():
            stop_group(process)
        self.processes.clear()


class BatchContainers:
    """Plays a batch deployment's job: the code asset's scoring script, ``init()`` once with the model mounted
    at AZUREML_MODEL_DIR, then ``run(mini_batch)`` per ``miniBatchSize`` files of the invocation's input folder."""

    def __init__(self, fake, workdir: Path):
        self.fake, self.workdir = fake, workdir
        self.runs: list[str] = []

    def __call__(self, deployment: dict, inputs: dict) -> None:
        props = deployment["properties"]
        work = self.workdir / deployment["name"] / str(len(self.runs))
        model_dir = model_folder(self.fake, props["model"]["assetId"], work / "azureml-models")
        code = self.fake._get(props["codeConfiguration"]["codeId"])
        code_dir = download(blob_uri(self.fake, code["properties"]["codeUri"]), work / "code")
        (folder,) = inputs.values()
        files = sorted(download(blob_uri(self.fake, folder["uri"]), work / "inputs").iterdir())
        size = props["miniBatchSize"]
        runner = ("import importlib.util, json, sys\n"
                  f"spec = importlib.util.spec_from_file_location('driver', {str(code_dir / props['codeConfiguration']['scoringScript'])!r})\n"
                  "driver = importlib.util.module_from_spec(spec); spec.loader.exec_module(driver)\n"
                  "driver.init()\n"
                  f"batches = json.loads(sys.argv[1]); print(json.dumps([driver.run(b) for b in batches]))\n")
        import json

        batches = [[str(f) for f in files[i:i + size]] for i in range(0, len(files), size)]
        done = subprocess.run([sys.executable, "-c", runner, json.dumps(batches)], capture_output=True, text=True,
                              timeout=600, env=_base_env({**props.get("environmentVariables", {}),
                                                          "AZUREML_MODEL_DIR": str(model_dir)}))
        if done.returncode:
            raise RuntimeError(f"batch driver failed: {done.stderr[-2000:]}")
        self.runs.append(done.stdout)
