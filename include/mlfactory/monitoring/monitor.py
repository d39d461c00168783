"""ml_monitor: drift of new data against the champion's training data.

Two kinds of "new": curated snapshots not checked yet, and the endpoint's prediction log since the
last check (what callers actually send). Curated rows carry their labels, so on them the champion is
also judged as a model (``judge_performance``): its primary metric against its metric on the frozen
holdout, and the drift of the labels (target drift) and of its predictions against the training set;
a drop beyond ``monitoring.max_metric_drop`` is drift with the reason "performance", even with stable
features (a seasonal change in the label rate). Each judgement is kept in
``reports/drift/_performance.json`` and drawn over time in ``reports/drift/performance.html``. The reference is the training set of the `champion` version
(tag ``mlfactory.training_set_uri``, written at registration), sampled to
``monitoring.reference_max_rows``. A source with fewer than ``monitoring.min_rows`` new rows waits
for the next check. Each comparison writes an HTML report (a plot per feature) and its JSON under
``<bucket>/reports/drift/run=<run>/``; what was checked is kept in ``reports/drift/_state.json`` and
moves on only when a check completes.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from mlfactory import reports, storage
from mlfactory.config import PipelineConfig
from mlfactory.monitoring.drift import Columns, compare, html_report
from mlfactory.features import FeatureSet, typed_features
from mlfactory.training.data import curated_snapshots, row_hashes

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


def reference_rows(cfg: PipelineConfig, version: str) -> tuple[pd.DataFrame, str, np.ndarray]:
    """The champion's training rows (raw features and the target), sampled to ``reference_max_rows``, and
    the content hashes of all of them (rows it trained on do not judge it)."""
    from mlflow import MlflowClient

    from mlfactory.registry import TRAINING_SET_TAG

    tags = MlflowClient(cfg.mlflow.tracking_uri).get_model_version(cfg.model_name, version).tags
    uri = tags.get(TRAINING_SET_TAG)
    if not uri:
        raise ValueError(f"{cfg.model_name} v{version} has no tag {TRAINING_SET_TAG}: its training data is unknown")
    columns = [*FeatureSet.of(cfg.dataset).raw_inputs, cfg.dataset.target]
    frame = _read([uri], columns)
    trained = row_hashes(frame, columns)
    if len(frame) > cfg.monitoring.reference_max_rows:
        chosen = np.random.default_rng(0).choice(len(frame), cfg.monitoring.reference_max_rows, replace=False)
        frame = frame.iloc[np.sort(chosen)].reset_index(drop=True)
    return frame, uri, trained


PERFORMANCE_FILE = "_performance.json"


def _outcomes(cfg: PipelineConfig, model, frame: pd.DataFrame) -> tuple[Columns, pd.DataFrame]:
    """The labels and the model's predictions on ``frame`` (typed rows with the target) as drift columns
    ("label", "prediction": the positive class's probability, or the value), and the predictions."""
    from mlfactory.monitoring.drift import categorical_values
    from mlfactory.features import to_wire

    dataset = cfg.dataset
    predictions = model.predict(to_wire(frame, dataset))
    labels = frame[dataset.target]
    score = predictions["probability"] if "probability" in predictions else predictions["prediction"]
    numeric = {"prediction": pd.to_numeric(score, errors="coerce").to_numpy(dtype=np.float64)}
    categorical = {}
    if dataset.task == "regression":
        numeric["label"] = pd.to_numeric(labels, errors="coerce").to_numpy(dtype=np.float64)
    else:
        categorical["label"] = categorical_values(labels)
    return Columns(numeric=numeric, categorical=categorical), predictions


def judge_performance(cfg: PipelineConfig, version: str, reference: pd.DataFrame, labelled: pd.DataFrame,
                      run_key: str, source: str = "curated") -> dict:
    """The champion ``version`` judged on new labelled rows (``source``: newly curated batches, or "served"
    traffic whose labels arrived later, ``mlfactory.monitoring.feedback``): its primary metric against the one
    ml_promote measured on the frozen holdout (tag ``mlfactory.holdout_<metric>``), and the drift of the
    labels and of its predictions from ``reference`` (its training rows). Appends to the history and
    redraws the performance page."""
    from datetime import datetime, timezone

    from mlflow import MlflowClient

    from mlfactory.registry import holdout_score
    from mlfactory.tabular import load_logged_model, primary_metric

    spec, metric = cfg.monitoring, primary_metric(cfg.dataset.task)
    tags = MlflowClient(cfg.mlflow.tracking_uri).get_model_version(cfg.model_name, version).tags
    baseline = float(tags[f"mlfactory.holdout_{metric}"]) if tags.get(f"mlfactory.holdout_{metric}") else None
    model, _ = load_logged_model(f"models:/{cfg.model_name}/{version}")
    ref_outcomes, _ = _outcomes(cfg, model, reference)
    cur_outcomes, predictions = _outcomes(cfg, model, labelled)
    value = holdout_score(cfg.dataset, labelled, predictions.set_index(labelled.index))
    drop = None if baseline is None or np.isnan(value) else baseline - value
    outcomes = compare(ref_outcomes, cur_outcomes, spec.threshold, spec.alpha, drift_share=1.0)
    drifted = {f.feature: f for f in outcomes.features}
    entry = {
        "run": run_key, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "version": version,
        "source": source, "rows": len(labelled), "metric": metric, "value": round(value, 6), "baseline": baseline,
        "drop": None if drop is None else round(drop, 6), "degraded": bool(drop is not None and drop > spec.max_metric_drop),
        "label_mean": _mean(cur_outcomes, "label"), "reference_label_mean": _mean(ref_outcomes, "label"),
        "prediction_mean": _mean(cur_outcomes, "prediction"),
        "reference_prediction_mean": _mean(ref_outcomes, "prediction"),
        "target_drift": drifted["label"].drifted, "target_drift_score": round(drifted["label"].score, 4),
        "prediction_drift": drifted["prediction"].drifted, "prediction_drift_score": round(drifted["prediction"].score, 4),
    }
    history_uri = storage.join(drift_uri(cfg), PERFORMANCE_FILE)
    history = json.loads(storage.read_bytes(history_uri)) if storage.exists(history_uri) else []
    history.append(entry)
    storage.write_bytes(history_uri, json.dumps(history, indent=2).encode())
    page = storage.join(drift_uri(cfg), "performance.html")
    storage.write_bytes(page, performance_page(history, f"{cfg.model_name}: {metric} of the champion on each new "
                                                        f"labelled batch").encode())
    log.info("performance of v%s on %d new labelled %s rows: %s %.4f (holdout %s, drop %s)%s", version, len(labelled),
             source, metric, value, baseline, entry["drop"], " — DEGRADED" if entry["degraded"] else "")
    return {**entry, "checked": True, "report": page}


def expire_prediction_log(cfg: PipelineConfig, now: datetime) -> list[str]:
    """Deletes the prediction log's days (``date=YYYY-MM-DD`` folders) older than ``monitoring.prediction_log_days``:
    the raw inputs of every request are not kept for ever. Returns the days deleted."""
    oldest = f"date={(now - timedelta(days=cfg.monitoring.prediction_log_days)).date():%Y-%m-%d}"
    days = {o.key.split("/", 1)[0] for o in storage.list_objects(cfg.storage.prediction_log_uri)}
    expired = sorted(d for d in days if d.startswith("date=") and d < oldest)
    for day in expired:
        storage.remove(storage.join(cfg.storage.prediction_log_uri, day))
    if expired:
        log.info("prediction log: deleted %d day(s) older than %d days (%s..%s)", len(expired),
                 cfg.monitoring.prediction_log_days, expired[0], expired[-1])
    return expired


def _mean(columns: Columns, name: str) -> float | None:
    """A label's or prediction's mean: a numeric column's, or a boolean label's rate of true (None for classes)."""
    if name in columns.numeric:
        values = columns.numeric[name]
        return round(float(np.nanmean(values)), 6) if np.isfinite(values).any() else None
    present = [v for v in columns.categorical[name].to_pylist() if v is not None]
    if not present or not set(present) <= {"true", "false"}:
        return None
    return round(present.count("true") / len(present), 6)


def performance_page(history: list[dict], title: str) -> str:
    """The champion's metric over the batches it was judged on (orange) and its holdout metric (grey), as
    inline SVG, with the table of every judgement."""
    from mlfactory.monitoring.drift import _escape

    width, height, pad = 640, 200, 30
    values = [h["value"] for h in history if h["value"] == h["value"]]
    baselines = [h["baseline"] for h in history if h.get("baseline") is not None]
    low, high = min(values + baselines, default=0.0), max(values + baselines, default=1.0)
    low, high = (low - 0.01, high + 0.01) if high - low < 0.02 else (low, high)

    def xy(i: int, v: float) -> str:
        x = pad + (width - 2 * pad) * (i / max(len(history) - 1, 1))
        return f"{x:.1f},{pad + (height - 2 * pad) * (1 - (v - low) / (high - low)):.1f}"

    line = " ".join(xy(i, h["value"]) for i, h in enumerate(history) if h["value"] == h["value"])
    base = " ".join(xy(i, h["baseline"]) for i, h in enumerate(history) if h.get("baseline") is not None)
    svg = (f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
           f'<polyline points="{base}" fill="none" stroke="#9aa5b1" stroke-dasharray="4"/>'
           f'<polyline points="{line}" fill="none" stroke="#f08c00" stroke-width="2"/>'
           f'<text x="2" y="{pad}" font-size="10">{high:.3f}</text><text x="2" y="{height - pad}" font-size="10">{low:.3f}</text></svg>')
    rows = "".join(
        f'<tr class="{"drift" if h["degraded"] else ""}"><td>{_escape(h["at"])}</td><td>{_escape(h["run"])}</td>'
        f'<td>v{_escape(h["version"])}</td><td>{_escape(h.get("source", "curated"))}</td><td>{h["rows"]:,}</td><td><b>{h["value"]:.4f}</b></td><td>{_escape(h["baseline"])}</td>'
        f'<td>{_escape(h["drop"])}</td><td>{_escape(h["label_mean"])} ({_escape(h["reference_label_mean"])})</td>'
        f'<td>{_escape(h["prediction_mean"])} ({_escape(h["reference_prediction_mean"])})</td>'
        f'<td>{"<b>degraded</b>" if h["degraded"] else "ok"}</td></tr>' for h in history)
    style = "body{font-family:sans-serif;margin:2em} td,th{border-bottom:1px solid #ddd;padding:4px 8px} tr.drift td{background:#fff4e6}"
    return f"""{reports.head(title, style)}<body><h1>{_escape(title)}</h1>
<p>Orange: the champion's {_escape(history[-1]["metric"] if history else "")} on each new labelled batch (curated
data, or served rows whose labels arrived later); grey dashes:
its metric on the frozen holdout when it was promoted.</p>{svg}
<table><tr><th>at</th><th>run</th><th>champion</th><th>rows of</th><th>rows</th><th>metric</th><th>holdout</th><th>drop</th>
<th>label mean (training)</th><th>prediction mean (training)</th><th></th></tr>{rows}</table></body></html>"""


def check(cfg: PipelineConfig, run_key: str, min_rows: int | None = None) -> dict:
    """Compare every source with enough new rows; returns the verdicts (and whether anything drifted)."""
    from mlfactory.registry import CHAMPION, Registry

    expired = expire_prediction_log(cfg, datetime.now(timezone.utc))
    version = Registry(cfg).alias_version(CHAMPION)
    if version is None:
        return {"skipped": "no champion yet: nothing to compare against", "drift": False, "prediction_log_expired": expired}
    spec = cfg.monitoring
    min_rows = spec.min_rows if min_rows is None else min_rows
    state_uri = storage.join(drift_uri(cfg), "_state.json")
    state = json.loads(storage.read_bytes(state_uri)) if storage.exists(state_uri) else {"curated": [], "serving_after": ""}
    state.setdefault("labels", {})
    raw = FeatureSet.of(cfg.dataset).raw_inputs
    reference_frame, reference_uri, trained = reference_rows(cfg, version)
    reference = Columns.of(reference_frame, cfg.dataset)

    snapshots = {sid: uri for sid, uri in curated_snapshots(cfg).items() if sid not in state["curated"]}
    serving_log = cfg.storage.prediction_log_uri
    parts = [o for o in storage.list_objects(serving_log) if o.key.endswith(".parquet") and o.key > state["serving_after"]]
    pending = {
        "curated": (lambda: _read(list(snapshots.values()), [*raw, cfg.dataset.target]), list(snapshots)),
        "serving": (lambda: typed_features(_read([p.uri for p in parts], raw), cfg.dataset), [p.key for p in parts]),
    }
    results, out = {}, storage.join(drift_uri(cfg), f"run={run_key}")
    performance = {"checked": False, "why": "no new labelled (curated) rows judged"}
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
        if source == "curated":  # labelled rows: the champion is judged as a model too, on those it never saw
            unseen = current[~np.isin(row_hashes(current, list(current.columns)), trained)]
            performance = (judge_performance(cfg, version, reference_frame, unseen.reset_index(drop=True), run_key)
                           if len(unseen) >= min_rows else
                           {"checked": False, "why": f"{len(unseen)} new labelled rows it did not train on; "
                                                     f"waiting for {min_rows}"})
            state["curated"] = sorted({*state["curated"], *items})
        else:
            state["serving_after"] = max(items)
    served = _judge_served(cfg, version, reference_frame, run_key, min_rows, state["labels"])
    storage.write_bytes(state_uri, json.dumps(state, indent=2).encode())
    drifted = [s for s, r in results.items() if r.get("dataset_drift")]
    degraded = bool(performance.get("degraded") or served.get("degraded"))
    features = sorted({f for s in drifted for f in results[s]["drifted_features"]})
    scores = {}
    for s in drifted:
        for feature, score in results[s]["scores"].items():
            scores[feature] = max(score, scores.get(feature, 0.0))
    reasons = (["features"] if drifted else []) + (["performance"] if degraded else [])
    return {"drift": bool(reasons), "reasons": reasons, "sources": results, "drifted_sources": drifted,
            "drifted_features": features, "scores": scores, "champion_version": version, "reference": reference_uri,
            "performance": performance, "served_performance": served, "prediction_log_expired": expired}


def _judge_served(cfg: PipelineConfig, version: str, reference: pd.DataFrame, run_key: str, min_rows: int,
                  taken: dict[str, str]) -> dict:
    """The champion judged on served rows whose labels arrived (``mlfactory.monitoring.feedback``), once there are
    ``min_rows`` of them; records in ``taken`` (file -> fingerprint) the label files used, refused, or with
    no row to give."""
    from mlfactory.monitoring.feedback import labelled_traffic

    labelled, files = labelled_traffic(cfg, taken)
    ready = {key for key, f in files.items() if f["status"] == "taken"}
    if len(labelled) >= min_rows:
        judged = judge_performance(cfg, version, reference, labelled, run_key, source="served")
    else:
        judged = {"checked": False, "why": f"{len(labelled)} served rows with labels; waiting for {min_rows}" if files
                  else "no new labels of served rows"}
        ready = {key for key in ready if not files[key]["matched"]}
    ready |= {key for key, f in files.items() if f["status"] == "refused"}
    taken.update({key: files[key]["fingerprint"] for key in ready})
    for key, f in files.items():
        if f["status"] in ("refused", "waiting") or f.get("unmatched_examples"):
            log.warning("label file %s: %s %s", key, f["status"], f.get("why") or f"unmatched: {f['unmatched_examples']}")
    return {**judged, "label_files": files}
