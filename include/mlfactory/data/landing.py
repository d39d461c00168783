"""Which landed objects have already been announced: the watermark behind the bucket-change triggers.

An existence-based trigger fires again every time it restarts (upstream airflow#49900). The
watermark records, per object key, the fingerprint (size + mtime/etag) last announced; the trigger
keeps it in Airflow's asset state store, so it survives a scheduler or triggerer restart. An object
is announced once per distinct fingerprint: new and changed objects fire, unchanged ones never.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from mlfactory.storage import ObjectInfo

STATE_KEY = "landing_watermark"


class LandingWatermark:
    def __init__(self, seen: dict[str, str] | None = None) -> None:
        self.seen: dict[str, str] = dict(seen or {})

    def unannounced(self, listing: Iterable[ObjectInfo], settle_s: float, now: float | None = None) -> list[ObjectInfo]:
        """Objects new or changed since last announced, and unchanged for ``settle_s`` (fully written)."""
        now = time.time() if now is None else now
        return [
            obj
            for obj in listing
            if self.seen.get(obj.key) != obj.fingerprint and obj.settled(settle_s, now)
        ]

    def mark(self, obj: ObjectInfo) -> None:
        self.remember(obj.key, obj.fingerprint)

    def announced(self, key: str, fingerprint: str) -> bool:
        return self.seen.get(key) == fingerprint

    def remember(self, key: str, fingerprint: str) -> None:
        self.seen[key] = fingerprint
