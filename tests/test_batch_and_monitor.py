"""Batch scoring (idempotent per run, only new data) and drift monitoring of curated data and of the
endpoint's prediction log, against the champion's training data in a real MLflow registry."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import train

from mlfactory import storage
from mlfactory.data import sample_data
from mlfactory.registry import CHAMPION, Registry

FIRST_VERSION = "1"  # the `champion` fixture registers the first version of its own model name


@pytest.fixture
def served_cfg(champion):
    cfg = champion[0]
    Registry(cfg).client.set_registered_model_alias(cfg.model_name, CHAMPION, FIRST_VERSION)
    return cfg


def parts_of(uri: str) -> list[str]:
    return sorted(o.uri for o in storage.list_objects(uri) if o.key.endswith(".parquet")) if storage.exists(uri) else []


def test_batch_scoring_is_idempotent_per_run_and_scores_only_new_data(served_cfg, champion):
    import mlflow.pyfunc

    from mlfactory import NothingToDo
    from mlfactory.backends.local.scoring import score
    from mlfactory.serving.batch import batch_uri, plan
    from mlfactory.features import to_wire

    cfg = served_cfg
    cfg = cfg.model_copy(update={"batch_scoring": cfg.batch_scoring.model_copy(update={"chunk_rows": 3000})})
    curated_rows = sum(pq.read_metadata(storage.local_path(u)).num_rows for u in parts_of(cfg.storage.curated_uri))

    first = score(cfg, plan(cfg, "scheduled__2026-11-01", FIRST_VERSION))
    assert first["rows"] == curated_rows and first["files"] >= 3  # chunked
    table = pd.concat([pq.read_table(storage.local_path(u)).to_pandas() for u in parts_of(first["uri"])])
    assert len(table) == curated_rows and table["customer_id"].is_unique
    assert set(table["model_version"]) == {FIRST_VERSION} and table["probability"].between(0, 1).all()
    assert str(table["scored_at"].dtype).startswith("datetime64")

    # The pyfunc gives the same answers for the same customers.
    curated = pd.concat([pq.read_table(storage.local_path(u)).to_pandas() for u in parts_of(cfg.storage.curated_uri)])
    sample = curated.head(50)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{cfg.model_name}/{FIRST_VERSION}")
    want = pyfunc.predict(to_wire(sample, cfg.dataset))["probability"].to_numpy()
    got = table.set_index("customer_id").loc[sample["customer_id"], "probability"].to_numpy()
    assert got == pytest.approx(want, abs=1e-6)

    # A retry of the same run replaces its output; a later run finds nothing new.
    again = score(cfg, plan(cfg, "scheduled__2026-11-01", FIRST_VERSION))
    assert again["rows"] == curated_rows and len(parts_of(again["uri"])) == first["files"]
    with pytest.raises(NothingToDo, match="every curated snapshot is scored already"):
        plan(cfg, "scheduled__2026-11-02", FIRST_VERSION)

    # New curated data is scored by the next run, and only it.
    sample_data.land_and_curate(cfg, 1500, seed=41)
    third = score(cfg, plan(cfg, "scheduled__2026-11-03"))  # the champion (alias) when no version is given
    assert third["rows"] == 1500 and len(third["snapshots"]) == 1
    runs = {o.key.split("/")[0] for o in storage.list_objects(batch_uri(cfg))}
    assert runs == {"run=scheduled__2026-11-01", "run=scheduled__2026-11-03"}


def test_monitor_flags_drifted_curated_data_and_drifted_traffic_only(served_cfg, champion):
    from mlfactory.features import to_wire
    from mlfactory.monitoring.monitor import check
    from mlfactory.serving.prediction_log import PredictionLog

    cfg = served_cfg
    cfg = cfg.model_copy(update={"monitoring": cfg.monitoring.model_copy(update={"min_rows": 500})})
    log_uri = storage.join(cfg.storage.predictions_uri, "serving")
    # what the serving tests of this worker sent the session's champion, and what their checks saw: not this test's
    from mlfactory.monitoring.monitor import drift_uri

    assert log_uri == cfg.storage.prediction_log_uri
    for earlier in (log_uri, drift_uri(cfg)):
        storage.remove(earlier)

    def log_traffic(rows: pd.DataFrame) -> None:  # what the model server's log writes, through the same writer
        wire = to_wire(rows, cfg.dataset)
        log = PredictionLog(log_uri)
        columns = {c: wire[c].astype(object).where(wire[c].notna(), None).tolist() for c in wire.columns}
        log.append(columns, {"prediction": [True] * len(rows)}, FIRST_VERSION, "blue", ["r"] * len(rows))
        log.flush()

    # Everything seen so far comes from the training distribution: no drift, nothing announced.
    log_traffic(sample_data.generate(2000, seed=51).to_pandas())
    quiet = check(cfg, "m1")
    assert not quiet["drift"], quiet
    assert quiet["sources"]["curated"]["checked"] and quiet["sources"]["serving"]["checked"]
    assert check(cfg, "m2")["sources"]["curated"] == {"checked": False, "why": "no new data"}

    # Too few new rows wait for more rather than being judged.
    log_traffic(sample_data.generate(100, seed=52, drift=1.0).to_pandas())
    waiting = check(cfg, "m3")
    assert waiting["sources"]["serving"]["why"] == "100 new rows; waiting for 500" and not waiting["drift"]

    # A drifted batch lands, and callers send drifted rows: both are flagged, with a report each.
    sample_data.land_and_curate(cfg, 3000, seed=53)  # a fresh undrifted batch is fine...
    log_traffic(sample_data.generate(2000, seed=54, drift=1.0).to_pandas())
    loud = check(cfg, "m4")
    assert loud["drift"] and loud["drifted_sources"] == ["serving"], loud  # ...the traffic is not
    assert {"age", "income", "support_calls"} <= set(loud["drifted_features"])
    serving = loud["sources"]["serving"]
    assert serving["current_rows"] == 2100  # the waiting rows are judged with the new ones
    page = storage.read_bytes(serving["report"]).decode()
    assert "DRIFT" in page and page.count("<svg") == 18

    from mlfactory.data.etl import curate_snapshot
    from mlfactory.data.ingest import ingest_object

    landed = storage.join(cfg.storage.landing_uri, "drifted.csv")
    sample_data.write(sample_data.generate(3000, seed=55, drift=1.0, id_offset=10**8), storage.local_path(landed))
    curate_snapshot(cfg, ingest_object(cfg, landed)[0].snapshot_uri)
    curated = check(cfg, "m5")
    assert curated["drifted_sources"] == ["curated"] and "age" in curated["drifted_features"]
    assert curated["scores"]["age"] >= 0.1 and curated["champion_version"] == FIRST_VERSION


def _train_and_gate(cfg, name: str, recent_training_set: str | None = None) -> dict:
    """What ml_train and ml_promote do for one candidate: a training set (with the recent window once a
    champion exists), a gbdt trained and logged to MLflow, registered, judged by the gate, promoted if it passes."""
    from mlfactory.registry import evaluate_challenger, register_candidate
    from mlfactory.training.data import prepare_training_set

    training_set = prepare_training_set(cfg, recent_training_set)
    out = storage.join(cfg.storage.models_uri, "runs", name)
    train(["--train-uri", training_set.uri, "--output-uri", out, "--hyperparameters", '{"model": "gbdt"}',
           "--mlflow-tracking-uri", cfg.mlflow.tracking_uri, "--experiment", cfg.mlflow.experiment])
    trained = json.loads(storage.read_bytes(storage.join(out, "metrics.json")))
    candidate = register_candidate(cfg, {**trained, "training_set": training_set.to_dict()})
    decision = evaluate_challenger(cfg, candidate["version"], candidate["training_set"]["recent"])
    if decision["promote"]:
        Registry(cfg).promote(candidate["version"], decision["holdout_uri"], decision["holdout_sha256"])
    return {**decision, "training_set": training_set}


def test_a_season_with_stable_features_is_seen_by_its_labels_and_the_retrained_model_wins_the_recent_window(
        mlflow_server, tmp_path, monkeypatch):
    """A season of its own: the features keep their distribution, but the label rate and its relationship
    to the features change (annual contracts churn too). Feature drift sees nothing; ml_monitor's judgement
    of the champion on the new labelled rows sees its ROC AUC fall and the labels drift, and emits drift
    for the reason `performance`. The retraining keeps a recent window out of training, and the retrained
    model wins there while holding the frozen holdout (the first season) within the tolerance."""
    import pyarrow as pa

    from mlfactory.config import load_config
    from mlfactory.data.etl import curate_snapshot
    from mlfactory.data.ingest import ingest_object
    from mlfactory.monitoring.monitor import check
    from mlfactory.registry import TRAINING_SET_TAG

    monkeypatch.setenv("MLFACTORY_BUCKET", str(tmp_path / "bucket"))
    cfg = load_config()
    cfg = cfg.model_copy(update={
        "mlflow": cfg.mlflow.model_copy(update={"tracking_uri": mlflow_server.url, "experiment": "seasons",
                                                "model_name": "churn_seasons"}),
        "monitoring": cfg.monitoring.model_copy(update={"min_rows": 500}),
        "promotion": cfg.promotion.model_copy(update={"floor": 0.6})})
    sample_data.land_and_curate(cfg, 8000, seed=60)
    first = _train_and_gate(cfg, "first")
    assert first["promote"] and Registry(cfg).alias_version(CHAMPION) == first["version"]

    sample_data.land_and_curate(cfg, 3000, seed=61)  # the usual season
    usual = check(cfg, "p1")
    assert usual["drift"] is False and usual["reasons"] == [], usual
    judged = usual["performance"]
    assert judged["checked"] and not judged["degraded"] and abs(judged["drop"]) < 0.05

    season = sample_data.generate(3000, seed=62, id_offset=10**8).to_pandas()  # the same features...
    season["churned"] = season["churned"] | (season["contract"] == "annual")  # ...another label rule and rate
    landed = storage.join(cfg.storage.landing_uri, "season.csv")
    sample_data.write(pa.Table.from_pandas(season, preserve_index=False), storage.local_path(landed))
    curate_snapshot(cfg, ingest_object(cfg, landed)[0].snapshot_uri)
    shifted = check(cfg, "p2")
    assert shifted["sources"]["curated"]["checked"] and not shifted["sources"]["curated"]["dataset_drift"]
    assert shifted["drift"] is True and shifted["reasons"] == ["performance"], shifted
    judged = shifted["performance"]
    assert judged["degraded"] and judged["drop"] > cfg.monitoring.max_metric_drop
    assert judged["target_drift"] and judged["label_mean"] > judged["reference_label_mean"] + 0.1
    history = json.loads(storage.read_bytes(storage.join(cfg.storage.reports_uri, "drift", "_performance.json")))
    assert [h["run"] for h in history] == ["p1", "p2"] and [h["degraded"] for h in history] == [False, True]
    page = storage.read_bytes(judged["report"]).decode()
    assert page.count("<polyline") == 2 and "degraded" in page
    print(f"performance: {history}")

    # drift_detected -> ml_train: the rows new since the champion trained give the recent window
    champion_set = Registry(cfg).client.get_model_version("churn_seasons", first["version"]).tags[TRAINING_SET_TAG]
    retrained = _train_and_gate(cfg, "season", champion_set)
    print(f"gate: {retrained['reason']}")
    assert retrained["training_set"].recent.rows > 0.25 * 6000  # 30% of the 6000 rows new since then
    assert retrained["recent_challenger"] > retrained["recent_champion"] + cfg.promotion.margin
    assert retrained["promote"] and "wins on the recent window" in retrained["reason"], retrained["reason"]
    tags = Registry(cfg).client.get_model_version("churn_seasons", retrained["version"]).tags
    assert tags["mlfactory.recent_roc_auc"] and tags["mlfactory.holdout_roc_auc"]  # lineage: both windows
