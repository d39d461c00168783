"""What the bucket-change triggers of every backend share: the watermark of announced objects,
kept in Airflow's asset state store for the watched Asset (see mlfactory.landing)."""

from __future__ import annotations

from airflow.triggers.base import BaseEventTrigger


class WatermarkedTrigger(BaseEventTrigger):
    async def load_watermark(self):
        from mlfactory.landing import STATE_KEY, LandingWatermark

        if self.asset_state_store is None:
            self.log.warning("no asset state store (not run as an AssetWatcher?): the watermark is kept in memory only")
            return LandingWatermark()
        return LandingWatermark(await self.asset_state_store.aget(STATE_KEY, default={}) or {})

    async def save_watermark(self, watermark) -> None:
        from mlfactory.landing import STATE_KEY

        if self.asset_state_store is not None:
            await self.asset_state_store.aset(STATE_KEY, watermark.seen)
