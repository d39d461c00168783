"""Batch scoring of the `local` backend: curated data not yet scored -> a predictions table.

Each run scores, with one model version (the champion by default), every curated snapshot that no
other run has scored yet (or one URI given in the trigger form), in chunks of
``batch_scoring.chunk_rows`` rows, and writes Parquet under
``<bucket>/predictions/batch/run=<run>/``: the key columns, the model's outputs, the model version,
the snapshot and the time. A retried run deletes its own folder first and writes it again: it
replaces, never duplicates. Which run scored which snapshot is kept in ``predictions/batch/_scored.json``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from mlfactory import storage
from mlfactory.config import PipelineConfig
from mlfactory.training_data import curated_snapshots

log = logging.getLogger(__name__)


def batch_uri(cfg: PipelineConfig) -> str:
    return storage.join(cfg.storage.predictions_uri, "batch")


def run_key(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id).strip("-")[:80]


def output_uri(cfg: PipelineConfig, key: str) -> str:
    """Where run ``key`` writes its predictions (every backend)."""
    return storage.join(batch_uri(cfg), f"run={key}")


def _scored(cfg: PipelineConfig) -> tuple[str, dict]:
    uri = storage.join(batch_uri(cfg), "_scored.json")
    return uri, json.loads(storage.read_bytes(uri)) if storage.exists(uri) else {}


def unscored(cfg: PipelineConfig, key: str) -> dict[str, str]:
    """Snapshot id -> folder of the curated snapshots no run but ``key`` (a retry of itself) has scored."""
    _, scored = _scored(cfg)
    return {sid: uri for sid, uri in curated_snapshots(cfg).items() if scored.get(sid) in (None, key)}


def mark_scored(cfg: PipelineConfig, key: str, snapshot_ids) -> None:
    uri, scored = _scored(cfg)
    scored.update(dict.fromkeys(snapshot_ids, key))
    storage.write_bytes(uri, json.dumps(scored, indent=2, sort_keys=True).encode())


def load_tabular_model(cfg: PipelineConfig, version: str):
    """The registered version as our LoadedModel (typed rows in, no pyfunc round trip)."""
    import mlflow.pyfunc

    from mlfactory.tabular import TabularPyfunc

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    python_model = mlflow.pyfunc.load_model(f"models:/{cfg.model_name}/{version}").unwrap_python_model()
    if not isinstance(python_model, TabularPyfunc):
        raise TypeError(f"{cfg.model_name} v{version} is not an mlfactory tabular model")
    return python_model.model


def _write_part(table: pa.Table, uri: str) -> None:
    with storage.atomic_write(uri) as f:
        pq.write_table(table, f)


def score(cfg: PipelineConfig, run_id: str, version: str, input_uri: str | None = None) -> dict:
    model = load_tabular_model(cfg, version)
    key = run_key(run_id)
    out = output_uri(cfg, key)
    sources = {input_uri: input_uri} if input_uri else unscored(cfg, key)
    if storage.exists(out):
        storage.remove(out)  # a retry of this run: write it again, whole
    keys = [c.name for c in cfg.dataset.columns if c.type == "string"]
    needed = [c.name for c in cfg.dataset.columns if c.name != cfg.dataset.target] + [f.name for f in cfg.dataset.derived]
    rows = parts = 0
    started = time.perf_counter()
    predict_s = 0.0
    pending = None  # the previous chunk's write, overlapping this chunk's predict (Arrow releases the GIL)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-write") as writer:
        for sid, uri in sources.items():
            fs, root = storage.pyarrow_filesystem(uri)
            dataset = ds.dataset(root, filesystem=fs, format="parquet")
            missing = sorted(set(needed) - set(dataset.schema.names))
            if missing:
                raise ValueError(f"{uri} lacks column(s) {missing} that the model needs (is it curated data?)")
            for batch in dataset.to_batches(columns=needed, batch_size=cfg.batch_scoring.chunk_rows):
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
    if not input_uri:
        mark_scored(cfg, key, sources)
    seconds = time.perf_counter() - started
    summary = {"uri": out, "version": version, "rows": rows, "files": parts, "snapshots": sorted(sources),
               "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds) if rows and seconds else 0,
               "predict_rows_per_s": round(rows / predict_s) if rows and predict_s else 0}
    log.info("batch scoring with v%s: %s", version, summary)
    return summary
