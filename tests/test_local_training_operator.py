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
    return [p for p in psutil.process_iter(["cmdline"]) if any(marker in part for part in (p.info["cmdline"] or []))]


def test_runs_torchrun_streams_the_log_and_returns_the_metrics(training_set, tmp_path, capfd):
    operator = LocalTrainingOperator(task_id="train", spec=spec_for(training_set, tmp_path))
    result = operator.execute(context={})
    assert result["epochs"] == 2 and result["world_size"] == 2 and result["metric"] == "val_roc_auc"
    captured = capfd.readouterr()
    logged = captured.out + captured.err  # the task logger's output: one record per line of the job
    assert "--nproc-per-node=2" in logged and "epoch 1/2" in logged and "epoch 2/2" in logged  # streamed per line
    assert storage.exists(str(tmp_path / "out" / "model.pt"))


def test_max_runtime_stops_the_whole_job(training_set, tmp_path):
    spec = spec_for(training_set, tmp_path, max_runtime_s=8, hyperparameters={"epochs": 500})
    operator = LocalTrainingOperator(task_id="train", spec=spec)
    with pytest.raises(AirflowException, match="ran past its max runtime of 8s"):
        operator.execute(context={})
    time.sleep(1)
    assert training_processes(str(tmp_path / "out")) == []  # torchrun and both workers are gone


def test_on_kill_stops_torchrun_and_every_worker(training_set, tmp_path):
    operator = LocalTrainingOperator(task_id="train", spec=spec_for(training_set, tmp_path, hyperparameters={"epochs": 500}))
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
    assert len(training_processes(str(tmp_path / "out"))) == 3  # torchrun + 2 workers
    operator.on_kill()
    worker.join(60)
    assert failure and "exited with" in str(failure[0])
    time.sleep(1)
    assert training_processes(str(tmp_path / "out")) == []


def test_refuses_what_one_machine_cannot_run(training_set, tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match="asks for 2 nodes"):
        LocalTrainingOperator(task_id="t", spec=spec_for(training_set, tmp_path, nodes=2)).execute(context={})
