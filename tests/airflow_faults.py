"""Faults injected into a LocalAirflow by the tests: kill -9 of one component, of one component with every
process under it, or of everything (a power cut). ``LocalAirflow.relaunch`` starts a component again, and
``stop`` also ends what a crashed component left running."""

from __future__ import annotations

from mlfactory.backends.local.local_airflow import LocalAirflow
from mlfactory.backends.local.processes import kill_tree


def crash(airflow: LocalAirflow, name: str) -> None:
    """kill -9 of one component's main process, as a crash or the OOM killer would; its children (a scheduler's
    executor workers, their tasks) are orphaned, not signalled."""
    proc = airflow.processes.pop(name)
    proc.kill()
    proc.wait()
    airflow.crashed.append(proc)


def crash_tree(airflow: LocalAirflow, name: str) -> None:
    """kill -9 of one component and every process under it, tasks included (they may leave its group): a
    machine or container that dies."""
    proc = airflow.processes.pop(name)
    kill_tree(proc)
    proc.wait()


def crash_all(airflow: LocalAirflow) -> None:
    """kill -9 of every process of every component, tasks included: a power cut."""
    for name in list(airflow.processes):
        crash_tree(airflow, name)
