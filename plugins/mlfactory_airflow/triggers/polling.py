"""What the cloud backends' job and operation triggers share: polling one resource from the triggerer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class PollingTrigger(BaseTrigger):
    """Polls one cloud resource (``name``, reached through ``connection``: what the backend's clients need, as
    plain JSON) every ``poll_interval`` s, the first time one interval after the deferral (a resource already
    done would otherwise fire while the deferring try is still being reported finished), for at most
    ``timeout_s``. Subclasses implement ``check()``: the event payload once the resource is done, else None.
    ``extra`` keyword arguments travel with the trigger (``self.extra``)."""

    def __init__(self, name: str, connection: dict, poll_interval: float = 30.0, timeout_s: float = 86400.0,
                 **extra) -> None:
        super().__init__()
        self.name, self.connection, self.poll_interval, self.timeout_s = name, connection, poll_interval, timeout_s
        self.extra = extra

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{type(self).__module__}.{type(self).__qualname__}", {
            "name": self.name, "connection": self.connection, "poll_interval": self.poll_interval,
            "timeout_s": self.timeout_s, **self.extra}

    def check(self) -> dict | None:
        raise NotImplementedError

    async def run(self) -> AsyncIterator[TriggerEvent]:
        deadline = time.monotonic() + self.timeout_s
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                payload = await asyncio.to_thread(self.check)
            except Exception as err:  # noqa: BLE001 - a transient API error: look again next time
                self.log.warning("checking %s failed (%s); trying again in %ss", self.name, err, self.poll_interval)
                payload = None
            if payload is not None:
                yield TriggerEvent({"name": self.name, **payload})
                return
            if time.monotonic() > deadline:
                yield TriggerEvent({"name": self.name, "state": "timeout",
                                    "detail": f"still not done after {self.timeout_s:.0f}s"})
                return
