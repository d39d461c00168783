"""What the bucket-change triggers of every backend share: the watermark of announced objects,
kept in Airflow's asset state store for the watched Asset (see mlfactory.data.landing), and the polling
loop of the triggers that list a prefix."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from airflow.triggers.base import BaseEventTrigger, TriggerEvent


class WatermarkedTrigger(BaseEventTrigger):
    ledger_uri: str | None = None  # ingestion's ledger (mlfactory.data.ingest.ledger_uri), set by the landing triggers

    async def load_watermark(self):
        from mlfactory.data.landing import STATE_KEY, LandingWatermark

        if self.asset_state_store is None:
            self.log.warning("no asset state store (not run as an AssetWatcher?): the watermark is kept in memory only")
            return LandingWatermark()
        return LandingWatermark(await self.asset_state_store.aget(STATE_KEY, default={}) or {})

    async def save_watermark(self, watermark) -> None:
        from mlfactory.data.landing import STATE_KEY

        if self.asset_state_store is not None:
            await self.asset_state_store.aset(STATE_KEY, watermark.seen)

    async def waiting_at_start(self, landing_uri: str, settle_s: float) -> AsyncIterator[TriggerEvent]:
        """One event if objects under ``landing_uri`` wait, not ingested, as the watcher starts (with a
        ``ledger_uri``: ingestion's ledger, see mlfactory.data.ingest). An event yielded just before a crash
        can be lost on its way to Airflow's database after the watermark was saved; an ml_ingest run
        takes every object not ingested yet, so this one event starts theirs."""
        from mlfactory.data.ingest import waiting_objects

        if not self.ledger_uri:
            return
        try:
            waiting = await asyncio.to_thread(waiting_objects, landing_uri, self.ledger_uri, settle_s)
        except Exception as err:  # noqa: BLE001 - the watcher must start anyway; the sweep schedule is the net
            self.log.warning("could not list the landed objects waiting for ingestion: %s", err)
            return
        if waiting:
            self.log.info("%d landed object(s) wait for ingestion, e.g. %s", len(waiting), waiting[0].uri)
            yield TriggerEvent({"waiting": len(waiting), "first": waiting[0].uri})

    async def poll(self, listing: Callable[[], list], payload: Callable, poll_interval: float,
                   settle_seconds: float) -> AsyncIterator[TriggerEvent]:
        """Every ``poll_interval`` s, ``listing()`` (in a thread) -> one event per object new or changed
        since announced and settled for ``settle_seconds``; the watermark is saved after each event."""
        watermark = await self.load_watermark()
        self.log.info("polling every %.1fs (%d objects already announced)", poll_interval, len(watermark.seen))
        while True:
            for obj in watermark.unannounced(await asyncio.to_thread(listing), settle_seconds):
                self.log.info("new object %s (%d bytes)", obj.uri, obj.size)
                yield TriggerEvent(payload(obj))
                watermark.mark(obj)
                await self.save_watermark(watermark)
            await asyncio.sleep(poll_interval)
