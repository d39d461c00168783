"""Batch prediction input on the `gcp` backend: curated Parquet snapshots -> JSON Lines instance files.

Vertex batch prediction reads JSON Lines (or CSV, TFRecord, BigQuery), not Parquet. Each row of the
snapshots to score becomes one line, as a caller of the endpoint sends it (``features.to_wire``), plus
the key columns the model does not take and ``_source`` (the snapshot id): the job lists those as
``excluded_fields``, so Vertex keeps them out of the model's request and writes them beside each
prediction. Files of at most ``chunk_rows`` rows, streamed: memory stays bounded by one chunk.
"""

from __future__ import annotations

import io

from mlfactory import BadInput, storage
from mlfactory.serving.batch import input_batches
from mlfactory.config import PipelineConfig
from mlfactory.features import FeatureSet, to_wire
from mlfactory.specs import BatchJobSpec

SOURCE_FIELD = "_source"


def write_instances(cfg: PipelineConfig, spec: BatchJobSpec, folder: str) -> tuple[list[str], list[str]]:
    """Write ``spec``'s inputs as instance files under ``folder`` (replacing what a failed try left there).
    Returns (the files, the excluded fields)."""
    inputs = FeatureSet.of(cfg.dataset).raw_inputs
    keys = [c.name for c in cfg.dataset.columns if c.type == "string" and c.name not in inputs]
    if storage.exists(folder):
        storage.remove(folder)
    files = []
    for source, batch in input_batches(cfg, spec):
        frame = batch.to_pandas()
        rows = to_wire(frame, cfg.dataset)
        for key in keys:
            rows[key] = frame[key].astype(object).where(frame[key].notna(), None)
        rows[SOURCE_FIELD] = source
        text = io.StringIO()
        rows.to_json(text, orient="records", lines=True, date_format="iso", force_ascii=False)
        files.append(storage.join(folder, f"instances-{len(files):05d}.jsonl"))
        storage.write_bytes(files[-1], text.getvalue().encode())
    if not files:
        raise BadInput(f"batch job {spec.name}: its inputs {sorted(spec.inputs.values())} hold no rows")
    return files, [*keys, SOURCE_FIELD]
