"""Batch scoring on the `local` backend: a ``BatchJobSpec`` scored in the Airflow task, in chunks.

Each input is read in chunks of ``chunk_rows`` rows, scored with the model version loaded once, and
written as Parquet parts under the spec's output folder: the key columns (the dataset's string
columns), the model's outputs, the model version, the source (snapshot) and the time. A retried run
deletes its own folder first and writes it again: it replaces, never duplicates.
"""

from __future__ import annotations

import logging
import time

from mlfactory.serving.batch import complete, input_batches, key_columns
from mlfactory.config import PipelineConfig
from mlfactory.serving.scoring import load_tabular_model, write_predictions
from mlfactory.specs import BatchJobSpec

log = logging.getLogger(__name__)


def score(cfg: PipelineConfig, spec: BatchJobSpec) -> dict:
    """Score ``spec`` and record its snapshots as scored; returns what it wrote, with its throughput."""
    model = load_tabular_model(spec.model.registry_uri, cfg.mlflow.tracking_uri)
    started = time.perf_counter()
    written = write_predictions(model, input_batches(cfg, spec), key_columns(cfg), spec.model.version, spec.output_uri)
    complete(cfg, spec)
    seconds = time.perf_counter() - started
    rows, predict_s = written["rows"], written.pop("predict_s")
    summary = {"uri": spec.output_uri, "version": spec.model.version, **written, "snapshots": sorted(spec.inputs),
               "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds) if rows and seconds else 0,
               "predict_rows_per_s": round(rows / predict_s) if rows and predict_s else 0}
    log.info("batch scoring with v%s: %s", spec.model.version, summary)
    return summary
