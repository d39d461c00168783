"""Scoring with our own code, wherever a backend runs it (the `local` backend's task, Azure ML's batch driver):
the model version loaded once, each (source, record batch) scored and written as a Parquet part with the key
columns, the model's outputs, the model version, the source (snapshot) and the time."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from mlfactory import storage


def load_tabular_model(model_uri: str, tracking_uri: str | None = None):
    """The model at ``model_uri`` (models:/name/version, or a model folder) as our LoadedModel (typed rows in,
    no pyfunc round trip, no code stored with the model run)."""
    import mlflow

    from mlfactory.tabular import load_logged_model

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return load_logged_model(model_uri)[0]


def _write_part(table: pa.Table, uri: str) -> None:
    with storage.atomic_write(uri) as f:
        pq.write_table(table, f)


def write_predictions(model, batches, keys: list[str], version: str, out: str) -> dict:
    """Each (source, record batch) of ``batches`` scored and written as a Parquet part under ``out`` (replaced
    whole if it exists: a retry writes it again); returns {"rows", "files", "predict_s"}."""
    if storage.exists(out):
        storage.remove(out)  # a retry of this run: write it again, whole
    rows = parts = 0
    predict_s = 0.0
    pending = None  # the previous chunk's write, overlapping this chunk's predict (Arrow releases the GIL)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-write") as writer:
        for sid, batch in batches:
            t = time.perf_counter()
            table = pa.table(model.predict_table(pa.Table.from_batches([batch])))
            predict_s += time.perf_counter() - t
            for name in reversed(keys):
                table = table.add_column(0, name, batch.column(name))
            n = batch.num_rows
            table = table.append_column("model_version", pa.repeat(pa.scalar(version, pa.string()), n))
            table = table.append_column("snapshot", pa.repeat(pa.scalar(sid, pa.string()), n))
            now = pa.scalar(datetime.now(timezone.utc), pa.timestamp("us", tz="UTC"))
            table = table.append_column("scored_at", pa.repeat(now, n))
            if pending is not None:
                pending.result()
            pending = writer.submit(_write_part, table, storage.join(out, f"part-{parts:05d}.parquet"))
            rows, parts = rows + n, parts + 1
        if pending is not None:
            pending.result()
    return {"rows": rows, "files": parts, "predict_s": predict_s}
