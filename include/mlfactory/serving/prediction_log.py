"""The prediction log: what the endpoint served, written to the bucket for ml_monitor, never on the request path."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import datetime, timezone

log = logging.getLogger("mlfactory.serving")



class PredictionLog:
    """Served rows buffered in memory and written as Parquet parts by a background thread."""

    def __init__(self, uri: str | None, flush_seconds: float = 10.0, flush_rows: int = 5000, max_rows: int = 1_000_000):
        self.uri, self.flush_seconds, self.flush_rows, self.max_rows = uri, flush_seconds, flush_rows, max_rows
        self.chunks: list[dict[str, list]] = []
        self.rows = self.dropped = self.written = 0
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)

    def start(self) -> None:
        if self.uri:
            self.thread.start()

    def append(self, inputs: dict[str, list], outputs: dict[str, list], version: str, variant: str, request_ids: list[str]) -> None:
        """The rows of one request (``request_row``: each one's position in it, what a label arriving later names
        with the request id). Cheap on the request path: the rows are added to per-column lists; Arrow sees them at flush."""
        if not self.uri:
            return
        n = len(request_ids)
        rows = {**inputs, **outputs, "model_version": [version] * n, "variant": [variant] * n,
                "request_id": request_ids, "request_row": list(range(n)), "served_at": [time.time_ns() // 1000] * n}
        with self.lock:
            if self.rows + n > self.max_rows:  # the bucket is unreachable for long: drop, count, never block
                self.dropped += n
                return
            last = self.chunks[-1] if self.chunks else None
            if last is not None and last.keys() == rows.keys():  # the same columns (one signature): one segment
                for name, values in rows.items():
                    last[name].extend(values)
            else:
                self.chunks.append({name: list(values) for name, values in rows.items()})
            self.rows += n
        if self.rows >= self.flush_rows:
            self.wake.set()

    def _run(self) -> None:
        while not self.stopping:
            self.wake.wait(self.flush_seconds)
            self.wake.clear()
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        from mlfactory import storage

        with self.lock:
            chunks, self.chunks, rows, self.rows = self.chunks, [], self.rows, 0
        if not chunks:
            return
        try:
            served_at = pa.timestamp("us", tz="UTC")
            table = pa.concat_tables([pa.Table.from_pydict({**c, "served_at": pa.array(c["served_at"], pa.int64()).cast(served_at)})
                                      for c in chunks], promote_options="permissive")
            now = datetime.now(timezone.utc)
            name = f"date={now:%Y-%m-%d}/part-{now:%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
            import pyarrow.parquet as pq

            with storage.atomic_write(storage.join(self.uri, name)) as f:
                pq.write_table(table, f)
            self.written += rows
        except Exception:  # noqa: BLE001 - keep the rows for the next try rather than lose them
            log.exception("could not write %d logged predictions to %s; will retry", rows, self.uri)
            with self.lock:
                self.chunks = chunks + self.chunks
                self.rows += rows

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        self.flush()
