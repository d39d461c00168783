"""The library's outcomes as Airflow task states, in one place."""

from __future__ import annotations

from contextlib import contextmanager

from mlfactory import BadInput, NothingToDo


@contextmanager
def task_outcome():
    """``NothingToDo`` skips the task (the log says why); ``BadInput`` fails it at once, without the
    retries that could not help."""
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    try:
        yield
    except NothingToDo as err:
        raise AirflowSkipException(str(err)) from err
    except BadInput as err:
        raise AirflowFailException(str(err)) from err


def report_outcomes(what: str, total: int, failed: dict[str, str], unfinished: list[str]) -> dict:
    """The last task of a run that works through many items (objects, snapshots) in shares: fails the
    run, without retries, naming each item that failed and why, and each that no task finished (their
    task's log says why; the next run takes them again)."""
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    if not total:
        raise AirflowSkipException(f"no {what} waited: nothing to do")
    if failed or unfinished:
        lines = [f"{len(failed) + len(unfinished)} of {total} {what}(s) not done:"]
        lines += [f"- {item}: {why}" for item, why in failed.items()]
        lines += [f"- {item}: its task failed (see that task's log); the next run takes it again" for item in unfinished]
        raise AirflowFailException("\n".join(lines))
    return {what: total}
