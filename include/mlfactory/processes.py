"""Child processes of the `local` backend: free loopback ports, and stopping a whole process tree.

Airflow's scheduler, the MLflow server and torchrun each start workers of their own. They run in
their own session (``start_new_session=True``) and are stopped with every descendant: torchrun puts
each worker in a session of its own, so signalling the process group alone would leave workers
training on after their launcher is gone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def descendants(process: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_tree(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``process``, its group and every descendant at once (what a lost machine does)."""
    tree = descendants(process)
    signal_group(process, sig)
    for child in tree:
        try:
            child.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def stop_group(process: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the process group of ``process`` (launchers forward it to their workers), then SIGKILL
    every process of the tree still there after ``grace`` seconds."""
    tree = descendants(process)  # now, while they are still its children: orphans cannot be found later
    signal_group(process, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    _, alive = psutil.wait_procs(tree, timeout=1)
    signal_group(process, signal.SIGKILL)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()
