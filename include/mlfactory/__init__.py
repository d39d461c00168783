"""mlfactory: the library behind the DAGs (no Airflow import anywhere in it).

Two outcomes every stage shares, which the Airflow layer turns into task states
(``mlfactory_airflow.outcomes``):
"""


class NothingToDo(Exception):
    """This run has nothing to do (no champion yet, every snapshot already scored, ...): the task is
    skipped, not failed, and the message says why."""


class BadInput(ValueError):
    """The data or the request is wrong: retrying the same thing fails the same way, so the task fails
    at once, naming the problem."""
