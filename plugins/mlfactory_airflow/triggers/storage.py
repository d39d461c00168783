"""The bucket-change trigger that lists a prefix through the project's storage layer (any URI it reads): the
`local` backend's (a folder on this machine is the bucket), and any backend's fallback when its bucket has no
event queue (the `azure` backend's without ``azure.event_queue``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import TriggerEvent

from mlfactory_airflow.triggers.watermark import WatermarkedTrigger


class StoragePrefixPollTrigger(WatermarkedTrigger):
    """Fires once per new or changed object under ``prefix_uri`` (any storage URI: a file:// folder, abfs://...),
    never twice for the same.

    Used as an AssetWatcher trigger. The set of announced objects (the watermark) lives in Airflow's
    asset state store for the watched Asset, so a restarted triggerer does not announce them again.
    Delivery is at least once: an event yielded just before a crash may come again, and ingestion
    is idempotent (content-addressed), so a repeat costs a skipped task, never a duplicate snapshot.
    """

    def __init__(self, prefix_uri: str, poll_interval: float = 2.0, settle_seconds: float = 1.0,
                 ledger_uri: str | None = None) -> None:
        super().__init__()
        self.prefix_uri = prefix_uri
        self.poll_interval = poll_interval
        self.settle_seconds = settle_seconds
        self.ledger_uri = ledger_uri

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"prefix_uri": self.prefix_uri, "poll_interval": self.poll_interval, "settle_seconds": self.settle_seconds,
             "ledger_uri": self.ledger_uri},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from mlfactory import storage

        self.log.info("watching %s", self.prefix_uri)
        async for event in self.waiting_at_start(self.prefix_uri, self.settle_seconds):
            yield event
        async for event in self.poll(lambda: storage.list_objects(self.prefix_uri),
                                     lambda obj: {"uri": obj.uri, "key": obj.key, "size": obj.size,
                                                  "fingerprint": obj.fingerprint},
                                     self.poll_interval, self.settle_seconds):
            yield event
