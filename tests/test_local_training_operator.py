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


@pytest.fixture(autouse=True)
def one_core_per_job(monkeypatch):
    """Each job trains on one intra-op thread, as ml_train's jobs side by side do on this machine: this test's process
    has computed on several threads, and a job forked from it on more than one would wait forever on the OpenMP pool
    it does not get (an Airflow task that forks a job has computed nothing; see ``processes.Forked``)."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 1)


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
    """One process: the entrypoint's main in a child forked from the task (which has torch and MLflow loaded) when the
    task runs one thread (an Airflow task does; this test process does not, so here it is the command itself: the
    fork from a task is FORKED_FROM_A_TASK below); either way it shows as the command, streams its log, and a
    failure is its exit status."""
    import os

    import torch  # loaded here as the scheduler preloads it for its tasks

    torch.set_num_threads(2)
    (torch.randn(1000, 1000) @ torch.randn(1000, 1000)).sum()  # as this process may have before (one_core_per_job)
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


FORKED_FROM_A_TASK = """
import os, socket, sys
from mlfactory.backends.local.processes import Forked

# as in an Airflow task: the streams are the task's own objects, owning descriptors 1 and 2, and a socket to the
# supervisor is open
sys.stdout = open(1, "w", buffering=1)
sys.stderr = open(2, "w", buffering=1)
supervisor, held = socket.socketpair()

def main(argv):
    print("out", argv, os.environ["ONLY"], sorted(os.environ))
    print("err", file=sys.stderr)
    held_by_child = [fd for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")
                     and os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")]
    print("sockets", held_by_child)
    raise SystemExit(3)

child = Forked("some.module", main, ["--a", "1"], {"ONLY": "this"})
output, _ = child.communicate(timeout=60)
supervisor.close()
print(repr(output), child.returncode, held.recv(1) == b"", file=open("/dev/stdout", "w"))
"""


def test_a_forked_job_writes_to_its_own_pipe_whatever_streams_and_sockets_the_task_holds():
    """The child's output reaches its pipe when the task's own stream objects own descriptors 1 and 2 (collected in
    the child, they would close them); it holds none of the task's sockets; env and exit status are its own."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FORKED_FROM_A_TASK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    output, status, closed = done.stdout.strip().rsplit(" ", 2)
    assert output == repr("out ['--a', '1'] this ['ONLY']\nerr\nsockets []\n") and status == "3", done.stdout
    assert closed == "True"  # the supervisor's end saw EOF: the child kept no copy of the task's socket


def test_a_forked_server_appends_to_its_log_in_a_session_of_its_own_and_is_gone_once_reaped(tmp_path):
    """A server forked from this process (the local endpoint's model server) appends its output to its log, runs in
    a session of its own (stopped by its group, as a command would be), and once stopped and reaped no signal
    reaches it: an unreaped child is a zombie that ``killpg(pid, 0)`` still finds."""
    import os
    import signal

    from mlfactory.backends.local.processes import Forked, reap

    def serve(argv):
        print("serving", argv, os.environ["ONLY"], flush=True)
        time.sleep(120)

    log = tmp_path / "server.log"
    log.write_text("an earlier start\n")
    child = Forked("some.server", serve, ["--port", "1"], {"ONLY": "this"}, log)
    assert child.stdout is None
    deadline = time.monotonic() + 30
    while "serving" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.getsid(child.pid) == child.pid
    assert log.read_text() == "an earlier start\nserving ['--port', '1'] this\n"
    os.killpg(child.pid, signal.SIGTERM)
    time.sleep(0.5)
    os.killpg(child.pid, 0)  # exited, but a zombie until reaped
    reap(child.pid, wait=True)
    with pytest.raises(ProcessLookupError):
        os.killpg(child.pid, 0)
    reap(child.pid)  # not a child any more: nothing to do, no error


FORKED_AFTER_COMPUTING = """
import sys, torch
from mlfactory.backends.local.processes import Forked

torch.set_num_threads(2)
a = torch.randn(1500, 1500)
a @ a  # this process now has an OpenMP pool, which a forked child does not get

def main(argv):
    (a @ a).sum()  # on the 2 threads this process set, without one_thread
    print("computed on", torch.get_num_threads(), "thread")

child = Forked("some.module", main, [], {}, one_thread=True)
print(child.communicate(timeout=60)[0].strip(), child.returncode)
"""


def test_a_child_forked_after_computing_computes_on_one_thread_instead_of_hanging():
    """A forked child's parallel loop on several threads waits forever for the parent's OpenMP pool (measured: a
    child of a process that ran a 2-thread matmul hung on its own); with ``one_thread`` it runs."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FORKED_AFTER_COMPUTING], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "computed on 1 thread 0", done.stdout
