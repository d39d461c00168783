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
