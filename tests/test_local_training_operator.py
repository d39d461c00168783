"""The local backend's training operator: torchrun as a child, its log streamed, max runtime, on_kill."""

from __future__ import annotations

import threading
import time

import psutil
import pytest
from airflow.sdk.exceptions import AirflowException

from mlfactory import storage
from mlfactory.specs import TrainingJobSpec
from mlfactory_airflow.backends.local.operators import LocalTrainingOperator


def spec_for(training_set, tmp_path, **changes) -> dict:
    spec = TrainingJobSpec(
        name="op-test", input_uri=training_set.uri, output_uri=str(tmp_path / "out"),
        checkpoint_uri=str(tmp_path / "ck"), processes_per_node=2, hyperparameters={"epochs": 2}, max_runtime_s=300,
    )
    return spec.model_copy(update=changes).model_dump()


def training_processes(marker: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline", "ppid"]) if any(marker in part for part in (p.info["cmdline"] or []))]


def test_runs_torchrun_streams_the_log_and_returns_the_metrics(training_set, tmp_path, capfd):
    operator = LocalTrainingOperator(task_id="train", spec=spec_for(training_set, tmp_path))
    result = operator.execute(context={})
    assert result["epochs"] == 2 and result["world_size"] == 2 and result["metric"] == "val_roc_auc"
    captured = capfd.readouterr()
    logged = captured.out + captured.err  # the task logger's output: one record per line of the job
    assert "--nproc-per-node=2" in logged and "epoch 1/2" in logged and "epoch 2/2" in logged  # streamed per line
    assert storage.exists(str(tmp_path / "out" / "model.pt"))


def test_a_one_process_job_is_forked_from_the_task_and_behaves_as_the_command(training_set, tmp_path, capfd):
    """One process: the entrypoint's main in a child forked from the task (which has torch and MLflow loaded), not a
    new interpreter; it shows as the command, streams its log, and a failure is its exit status."""
    import os

    import torch  # noqa: F401 - loaded here as the scheduler preloads it for its tasks

    operator = LocalTrainingOperator(task_id="train", spec=spec_for(training_set, tmp_path, processes_per_node=1))
    seen: list[psutil.Process] = []
    watcher = threading.Thread(target=lambda: seen.extend(wait_for_processes(str(tmp_path / "out"), 1)), daemon=True)
    watcher.start()
    result = operator.execute(context={})
    watcher.join(5)
    assert result["epochs"] == 2 and result["world_size"] == 1
    assert [p.info["ppid"] for p in seen] == [os.getpid()]  # a child of this process
    title = " ".join(seen[0].info["cmdline"])
    assert "-m mlfactory.training.train" in title and "--threads" in title, title
    logged = "".join(capfd.readouterr())
    assert "epoch 1/2" in logged and "epoch 2/2" in logged and "--nproc-per-node" not in logged

    bad = LocalTrainingOperator(task_id="train", spec=spec_for(training_set, tmp_path, processes_per_node=1,
                                                               input_uri=str(tmp_path / "missing")))
    with pytest.raises(AirflowException, match="exited with 1"):
        bad.execute(context={})


def wait_for_processes(marker: str, count: int, timeout: float = 120) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while len(found := training_processes(marker)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_max_runtime_stops_the_whole_job(training_set, tmp_path):
    spec = spec_for(training_set, tmp_path, max_runtime_s=8, hyperparameters={"epochs": 500})
    operator = LocalTrainingOperator(task_id="train", spec=spec)
    with pytest.raises(AirflowException, match="ran past its max runtime of 8s"):
        operator.execute(context={})
    time.sleep(1)
    assert training_processes(str(tmp_path / "out")) == []  # torchrun and both workers are gone


@pytest.mark.parametrize("processes", [1, 2], ids=["forked", "torchrun"])
def test_on_kill_stops_torchrun_and_every_worker(training_set, tmp_path, processes):
    operator = LocalTrainingOperator(task_id="train", spec=spec_for(training_set, tmp_path, processes_per_node=processes,
                                                                    hyperparameters={"epochs": 500}))
    failure: list[BaseException] = []

    def run():
        try:
            operator.execute(context={})
        except BaseException as err:  # noqa: BLE001 - collected for the assertion below
            failure.append(err)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 120
    while not storage.exists(str(tmp_path / "ck" / "checkpoint.pt")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(training_processes(str(tmp_path / "out"))) == {1: 1, 2: 3}[processes]  # the job, or torchrun + 2 workers
    operator.on_kill()
    worker.join(60)
    assert failure and "exited with" in str(failure[0])
    time.sleep(1)
    assert training_processes(str(tmp_path / "out")) == []


def test_refuses_what_one_machine_cannot_run(training_set, tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match="asks for 2 nodes"):
        LocalTrainingOperator(task_id="t", spec=spec_for(training_set, tmp_path, nodes=2)).execute(context={})
