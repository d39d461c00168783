"""ml_monitor: drift of new data against the champion's training data.

Two kinds of "new": curated snapshots not checked yet, and the endpoint's prediction log since the
last check (what callers actually send). The reference is the training set of the `champion` version
(tag ``mlfactory.training_set_uri``, written at registration), sampled to
``monitoring.reference_max_rows``. A source with fewer than ``monitoring.min_rows`` new rows waits
for the next check. Each comparison writes an HTML report (a plot per feature) and its JSON under
``<bucket>/reports/drift/run=<run>/``; what was checked is kept in ``reports/drift/_state.json`` and
moves on only when a check completes.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from mlfactory import storage
from mlfactory.config import PipelineConfig
from mlfactory.drift import Columns, compare, html_report
from mlfactory.features import FeatureSet, typed_features
from mlfactory.training_data import curated_snapshots

log = logging.getLogger(__name__)


def drift_uri(cfg: PipelineConfig) -> str:
    return storage.join(cfg.storage.reports_uri, "drift")


def _read(uris: list[str], columns: list[str]) -> pd.DataFrame:
    """The Parquet files at ``uris`` (files, or folders of them) as one frame."""
    files = [o.uri for uri in uris for o in storage.list_objects(uri) if o.key.endswith(".parquet")] if uris else []
    files += [uri for uri in uris if uri.endswith(".parquet")]
    frames = []
    for uri in files:
        with storage.open_uri(uri) as f:
            frames.append(pq.read_table(f, columns=columns).to_pandas())
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def reference_columns(cfg: PipelineConfig, version: str) -> tuple[Columns, str]:
    from mlflow import MlflowClient

    from mlfactory.registry import TRAINING_SET_TAG

    tags = MlflowClient(cfg.mlflow.tracking_uri).get_model_version(cfg.model_name, version).tags
    uri = tags.get(TRAINING_SET_TAG)
    if not uri:
        raise ValueError(f"{cfg.model_name} v{version} has no tag {TRAINING_SET_TAG}: its training data is unknown")
    frame = _read([uri], FeatureSet.of(cfg.dataset).raw_inputs)
    if len(frame) > cfg.monitoring.reference_max_rows:
        chosen = np.random.default_rng(0).choice(len(frame), cfg.monitoring.reference_max_rows, replace=False)
        frame = frame.iloc[np.sort(chosen)].reset_index(drop=True)
    return Columns.of(frame, cfg.dataset), uri


def check(cfg: PipelineConfig, run_key: str, min_rows: int | None = None) -> dict:
    """Compare every source with enough new rows; returns the verdicts (and whether anything drifted)."""
    from mlfactory.registry import CHAMPION, Registry

    version = Registry(cfg).alias_version(CHAMPION)
    if version is None:
        return {"skipped": "no champion yet: nothing to compare against", "drift": False}
    spec = cfg.monitoring
    min_rows = spec.min_rows if min_rows is None else min_rows
    state_uri = storage.join(drift_uri(cfg), "_state.json")
    state = json.loads(storage.read_bytes(state_uri)) if storage.exists(state_uri) else {"curated": [], "serving_after": ""}
    raw = FeatureSet.of(cfg.dataset).raw_inputs
    reference, reference_uri = reference_columns(cfg, version)

    snapshots = {sid: uri for sid, uri in curated_snapshots(cfg).items() if sid not in state["curated"]}
    serving_log = cfg.storage.prediction_log_uri
    parts = [o for o in storage.list_objects(serving_log) if o.key.endswith(".parquet") and o.key > state["serving_after"]]
    pending = {
        "curated": (lambda: _read(list(snapshots.values()), raw), list(snapshots)),
        "serving": (lambda: typed_features(_read([p.uri for p in parts], raw), cfg.dataset), [p.key for p in parts]),
    }
    results, out = {}, storage.join(drift_uri(cfg), f"run={run_key}")
    for source, (read, items) in pending.items():
        if not items:
            results[source] = {"checked": False, "why": "no new data"}
            continue
        current = read()
        if len(current) < min_rows:
            results[source] = {"checked": False, "why": f"{len(current)} new rows; waiting for {min_rows}"}
            continue
        current_columns = Columns.of(current, cfg.dataset)
        report = compare(reference, current_columns, spec.threshold, spec.alpha, spec.drift_share)
        title = f"{cfg.model_name} v{version}: drift of {source} data ({len(current):,} rows) vs its training data"
        storage.write_bytes(storage.join(out, f"{source}.html"), html_report(report, reference, current_columns, title).encode())
        storage.write_bytes(storage.join(out, f"{source}.json"), json.dumps(report.to_dict(), indent=2).encode())
        results[source] = {"checked": True, **report.summary(), "report": storage.join(out, f"{source}.html")}
        log.info("%s: %s — report %s", source, "DRIFT" if report.dataset_drift else "no drift", results[source]["report"])
        if source == "curated":
            state["curated"] = sorted({*state["curated"], *items})
        else:
            state["serving_after"] = max(items)
    storage.write_bytes(state_uri, json.dumps(state, indent=2).encode())
    drifted = [s for s, r in results.items() if r.get("dataset_drift")]
    features = sorted({f for s in drifted for f in results[s]["drifted_features"]})
    scores = {}
    for s in drifted:
        for feature, score in results[s]["scores"].items():
            scores[feature] = max(score, scores.get(feature, 0.0))
    return {"drift": bool(drifted), "sources": results, "drifted_sources": drifted, "drifted_features": features,
            "scores": scores, "champion_version": version, "reference": reference_uri}
