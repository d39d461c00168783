"""The `local` backend's operators: ml_train's training job and ml_batch_score's scoring, on this machine.

``LocalTrainingOperator``: the training entrypoint as a child process of the Airflow task: forked from the task
when the job is one process (the task has torch, MLflow and pandas loaded already), under torchrun when it has more.

It takes the same ``TrainingJobSpec`` the cloud operators take. The job's output is streamed into
the task log line by line; a job running past ``max_runtime_s`` is stopped; clearing or killing the
task (``on_kill``) stops the job and every worker torchrun started (the whole process group). Retries
resume from the job's checkpoint. ml_train runs it in the ``training.pool`` pool: its size
(``training.concurrent_jobs``) is how many training jobs this machine runs at once (the local
stand-in for a GPU quota), and each job's intra-op threads are its share of the cores.


``LocalBatchScoreOperator``: a ``BatchJobSpec`` scored in the task, in chunks (``mlfactory.backends.local.scoring``).

The local backend has no hooks or triggers of its own: its endpoint adapter needs no Airflow
(``mlfactory.backends.local.rollout``), and its landing trigger is the storage layer's
(``mlfactory_airflow.triggers.storage``).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading

from mlfactory_airflow.backends import SpecOperator


class LocalTrainingOperator(SpecOperator):
    ui_color = "#fde8d7"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._process = None  # the job: a subprocess.Popen, or a processes.Forked

    def execute(self, context) -> dict:
        from airflow.sdk.exceptions import AirflowException, AirflowFailException
        from mlfactory import storage
        from mlfactory.backends.local.processes import start_job
        from mlfactory.backends.local.runtime import this_machine
        from mlfactory.config import load_config
        from mlfactory.specs import METRICS_FILE, TrainingJobSpec
        from mlfactory.training.cluster import LOOPBACK_ENV

        spec = TrainingJobSpec.model_validate(self.spec)
        if spec.nodes != 1:
            raise AirflowFailException(f"the local backend runs on this one machine; job {spec.name} asks for {spec.nodes} nodes")
        if spec.accelerator.kind == "tpu":
            raise AirflowFailException(f"job {spec.name} asks for a TPU: run it on the gcp backend (Vertex AI)")
        gpu = spec.accelerator.kind == "gpu"
        processes = spec.accelerator.count if gpu else spec.processes_per_node
        cluster = this_machine(processes)
        # Jobs share this machine's cores with the other jobs the pool lets run at once: more intra-op
        # threads than cores makes every OpenMP barrier wait on a descheduled thread (measured: 2
        # trials x 2 threads on 2 cores trained 10x slower than 2 x 1: 6k vs 62k samples/s).
        threads = max(1, (os.cpu_count() or 1) // (processes * load_config().training.concurrent_jobs))
        module, args = "mlfactory.training.train", [*spec.arguments(), "--device", "cuda" if gpu else "cpu",
                                                    "--threads", str(threads)]
        env = {**LOOPBACK_ENV, **os.environ, **spec.environment, "PYTHONUNBUFFERED": "1"}
        self.log.info("training job %s: %d process(es), max runtime %ds\n  %s", spec.name, processes, spec.max_runtime_s,
                      " ".join(cluster.command(module, args)))
        # one process: forked from this task, which has its libraries loaded; more: torchrun
        self._process = start_job(cluster, module, args, env)
        streamer = threading.Thread(target=self._stream, args=(self._process,), daemon=True)
        streamer.start()
        try:
            returncode = self._process.wait(timeout=spec.max_runtime_s)
        except subprocess.TimeoutExpired:
            self._stop()
            raise AirflowException(
                f"training job {spec.name} ran past its max runtime of {spec.max_runtime_s}s and was stopped; "
                f"checkpoints in {spec.checkpoint_uri} let a retry resume"
            ) from None
        finally:
            streamer.join(timeout=10)
        if returncode != 0:
            raise AirflowException(f"training job {spec.name} exited with {returncode}; its output is in the log above")
        return json.loads(storage.read_bytes(storage.join(spec.output_uri, METRICS_FILE)))

    def _stream(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.log.info("%s", line.rstrip())

    def on_kill(self) -> None:
        self._stop()

    def _stop(self) -> None:
        from mlfactory.backends.local.processes import stop_group

        if self._process is not None:
            stop_group(self._process, grace=10)


class LocalBatchScoreOperator(SpecOperator):
    """Scores a ``BatchJobSpec`` in this task, in chunks (``mlfactory.backends.local.scoring``)."""

    ui_color = "#e3f1dc"

    def execute(self, context) -> dict:
        from mlfactory.backends.local.scoring import score
        from mlfactory.config import load_config
        from mlfactory.specs import BatchJobSpec

        from mlfactory_airflow.outcomes import task_outcome

        with task_outcome():
            return score(load_config(), BatchJobSpec.model_validate(self.spec))

