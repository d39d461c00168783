"""Links from a task to the page of what it runs in its cloud's console (``operator_extra_links``).

Each backend's ``links`` module builds the URLs; an operator shows one as soon as its job exists or its
endpoint is known (so the button works while the task is deferred), and Airflow keeps it when the task
ends. Airflow 3 serializes a link as its name and XCom key, so these need no plugin registration.
"""

from __future__ import annotations

from airflow.sdk import BaseOperatorLink


class ConsoleLink(BaseOperatorLink):
    """The URL a task showed (``show``), read back from its XCom."""

    name = "Console"

    def get_link(self, operator, *, ti_key) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return XCom.get_value(ti_key=ti_key, key=self.xcom_key) or ""

    def show(self, context, url: str | None) -> None:
        if url:
            context["ti"].xcom_push(key=self.xcom_key, value=url)


class JobConsoleLink(ConsoleLink):
    name = "Job in the console"


class EndpointConsoleLink(ConsoleLink):
    name = "Endpoint in the console"
