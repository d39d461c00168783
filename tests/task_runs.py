"""Running an operator as Airflow's worker and triggerer would, without a scheduler: a task instance that
records what the task pushed to XCom (its console links among them), and the deferral loop."""

from __future__ import annotations

import asyncio


class TaskInstance:
    def __init__(self, try_number: int = 1) -> None:
        self.try_number, self.xcoms = try_number, {}

    def xcom_push(self, key: str, value) -> None:
        self.xcoms[key] = value


def context(try_number: int = 1) -> dict:
    return {"ti": TaskInstance(try_number)}


def run_trigger(trigger, timeout: float = 300) -> list:
    async def collect():
        return [event async for event in trigger.run()]

    return asyncio.run(asyncio.wait_for(collect(), timeout))


def resume(operator, deferred, task_context: dict | None = None):
    """What Airflow does when a trigger fires: run the trigger, then the operator's resume method."""
    (event,) = run_trigger(deferred.trigger)
    return getattr(operator, deferred.method_name)(task_context or context(), event=event.payload,
                                                   **(deferred.kwargs or {}))


def run_to_end(operator, try_number: int = 1, limit: int = 12, task_context: dict | None = None):
    """execute, then every deferral resumed in turn, to the result."""
    from airflow.exceptions import TaskDeferred

    task_context = task_context or context(try_number)
    step = lambda: operator.execute(task_context)  # noqa: E731
    for _ in range(limit):
        try:
            return step()
        except TaskDeferred as deferred:
            step = lambda d=deferred: resume(operator, d, task_context)  # noqa: E731
    raise AssertionError(f"{operator.task_id} still deferring after {limit} steps")


def rollout_step(adapter: str, name: str, spec: dict, plan: dict | None = None, **operator_kwargs):
    """One of ml_deploy's rollout tasks (``adapter``: a backend's ``endpoint_adapter``), run to its end."""
    from mlfactory_airflow.rollout import RolloutStepOperator

    return run_to_end(RolloutStepOperator(task_id=name, step=name, spec=spec, plan=plan, adapter=adapter,
                                          **operator_kwargs))


def rollout(adapter: str, spec: dict, done: dict | None = None, **operator_kwargs) -> dict:
    """ml_deploy's deploy group: its five steps in order, each run as its task runs it. Each step's result by
    name (the stage's is the plan the others get); a failing step raises, and ``done`` holds those before it."""
    from mlfactory.serving.rollout import STEPS

    done = {} if done is None else done
    for name in STEPS:
        done[name] = rollout_step(adapter, name, spec, done.get("stage"), **operator_kwargs)
    return done
