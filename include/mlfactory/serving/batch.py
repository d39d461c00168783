"""What ml_batch_score shares on every backend: which data a run scores, with which version, and where
its predictions go, as a ``BatchJobSpec``; and the record of which run scored which snapshot.

A run scores every curated snapshot that no other run has scored yet (or one URI given in the
trigger form) with one model version (the champion by default), into
``<bucket>/predictions/batch/run=<run>/``. A retried run writes its own folder again: it replaces,
never duplicates. Which run scored which snapshot is kept in ``predictions/batch/_scored.json``.
Each backend scores the spec its own way (``mlfactory_airflow.backends``) and calls ``complete``.
"""

from __future__ import annotations

import json
import re

from mlfactory import NothingToDo, storage
from mlfactory.config import PipelineConfig
from mlfactory.specs import BatchJobSpec, BatchSizing, sizing
from mlfactory.training.data import curated_snapshots


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


def plan(cfg: PipelineConfig, run_id: str, version: str | None = None, input_uri: str | None = None) -> BatchJobSpec:
    """The batch job of run ``run_id``: ``version`` (else the champion) over ``input_uri`` (else the curated
    snapshots not scored yet). ``NothingToDo`` when there is no champion or nothing new to score."""
    from mlfactory.serving.deployment import model_ref
    from mlfactory.registry import CHAMPION, Registry

    version = version or Registry(cfg).alias_version(CHAMPION)
    if not version:
        raise NothingToDo(f"{cfg.model_name} has no champion yet: nothing to score with")
    key = run_key(run_id)
    if input_uri:
        input_uri = storage.under(input_uri, cfg.storage.bucket, "the form's input_uri")
    inputs = {input_uri: input_uri} if input_uri else unscored(cfg, key)
    if not inputs:
        raise NothingToDo("every curated snapshot is scored already: nothing new to score")
    return BatchJobSpec(name=key, model=model_ref(cfg, version), inputs=inputs,
                        snapshots=[] if input_uri else sorted(inputs), output_uri=output_uri(cfg, key),
                        **sizing(cfg.batch_scoring, BatchSizing))


def model_columns(cfg: PipelineConfig) -> list[str]:
    """The columns a model of ``cfg.dataset`` reads: every column but the target, and the derived ones."""
    return [c.name for c in cfg.dataset.columns if c.name != cfg.dataset.target] + [f.name for f in cfg.dataset.derived]


def key_columns(cfg: PipelineConfig) -> list[str]:
    """The columns written beside each prediction to find its row again (the dataset's string columns)."""
    return [c.name for c in cfg.dataset.columns if c.type == "string"]


def input_batches(cfg: PipelineConfig, spec: BatchJobSpec):
    """(source label, Arrow record batch of at most ``chunk_rows`` rows) over ``spec``'s inputs, with the
    columns a model of ``cfg.dataset`` needs."""
    return read_batches(spec.inputs, model_columns(cfg), spec.chunk_rows)


def read_batches(inputs: dict[str, str], needed: list[str], chunk_rows: int):
    """(source label, record batch of ``needed`` columns) over ``inputs`` (label -> Parquet folder or file). An
    input that lacks a column is refused, naming the columns."""
    import pyarrow.dataset as ds

    from mlfactory import BadInput

    for source, uri in inputs.items():
        fs, root = storage.pyarrow_filesystem(uri)
        dataset = ds.dataset(root, filesystem=fs, format="parquet")
        missing = sorted(set(needed) - set(dataset.schema.names))
        if missing:
            raise BadInput(f"{uri} lacks column(s) {missing} that the model needs (is it curated data?)")
        for batch in dataset.to_batches(columns=needed, batch_size=chunk_rows):
            yield source, batch


def complete(cfg: PipelineConfig, spec: BatchJobSpec) -> None:
    """The job succeeded: its snapshots are scored (by run ``spec.name``)."""
    if spec.snapshots:
        uri, scored = _scored(cfg)
        scored.update(dict.fromkeys(spec.snapshots, spec.name))
        storage.write_bytes(uri, json.dumps(scored, indent=2, sort_keys=True).encode())
