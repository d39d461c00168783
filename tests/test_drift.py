"""Drift statistics: quiet on samples of one distribution (large and small), loud on shifted ones,
the same verdicts whatever the seed, and the HTML report."""

from __future__ import annotations

import numpy as np
import pytest

from mlfactory.data import sample_data
from mlfactory.monitoring.drift import Columns, categorical_values, compare, html_report


def synthetic(rows: int, seed: int, shifted: bool) -> Columns:
    """15 stable features and 5 drifted ones (0.2-0.3 sd mean shifts, moved category shares)."""
    rng = np.random.default_rng(seed)
    numeric = {f"x{i}": rng.normal(0.0, 1.0, rows) for i in range(10)}
    numeric["count"] = rng.poisson(3.0, rows).astype(float)
    numeric["age"] = rng.integers(18, 95, rows).astype(float)
    for i, shift in enumerate((0.2, 0.25, 0.3)):
        numeric[f"shifted{i}"] = rng.normal(shift if shifted else 0.0, 1.0, rows)
    numeric["x0"][rng.random(rows) < 0.05] = np.nan  # missing values are allowed and reported
    letters = np.array(["a", "b", "c", "d"], dtype=object)
    categorical = {
        "plan": rng.choice(letters, rows, p=[0.4, 0.3, 0.2, 0.1]),
        "region": rng.choice(letters, rows, p=[0.25, 0.25, 0.25, 0.25]),
        "flag": rng.random(rows) < 0.3,
        "moved_plan": rng.choice(letters, rows, p=[0.25, 0.3, 0.2, 0.25] if shifted else [0.4, 0.3, 0.2, 0.1]),
        "moved_flag": rng.random(rows) < (0.5 if shifted else 0.3),
    }
    return Columns(numeric, {k: categorical_values(v) for k, v in categorical.items()})


DRIFTED = {"shifted0", "shifted1", "shifted2", "moved_plan", "moved_flag"}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_same_distribution_shows_no_drift_at_large_and_small_sizes(seed):
    for rows in (200_000, 300):
        report = compare(synthetic(rows, seed, False), synthetic(rows, seed + 100, False))
        assert report.drifted_features == [] and not report.dataset_drift, (rows, report.summary())
        assert all(f.score < 0.1 for f in report.features if rows > 100_000)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_shifted_features_and_only_they_drift_whatever_the_seed(seed):
    report = compare(synthetic(200_000, seed, False), synthetic(150_000, seed + 100, True), drift_share=0.2)
    assert set(report.drifted_features) == DRIFTED
    assert report.dataset_drift and report.share_drifted == pytest.approx(5 / 20)
    by_name = {f.feature: f for f in report.features}
    assert by_name["shifted0"].statistic == "wasserstein_norm" and 0.15 < by_name["shifted0"].score < 0.25
    assert by_name["moved_plan"].statistic == "jensen_shannon"
    assert by_name["count"].statistic == "wasserstein_norm" and by_name["flag"].statistic == "jensen_shannon"
    assert by_name["x0"].reference_missing == pytest.approx(0.05, abs=0.005)
    assert by_name["shifted2"].psi > by_name["x1"].psi
    summary = report.summary()
    assert summary["drifted_features"] == report.drifted_features and set(summary["psi"]) == set(by_name)


def test_the_sample_datasets_drifted_batch_drifts(cfg):
    from mlfactory.features import typed_features

    reference = typed_features(sample_data.generate(20_000, seed=1).to_pandas(), cfg.dataset)
    same = typed_features(sample_data.generate(20_000, seed=2).to_pandas(), cfg.dataset)
    drifted = typed_features(sample_data.generate(20_000, seed=3, drift=1.0).to_pandas(), cfg.dataset)
    ref = Columns.of(reference, cfg.dataset)
    assert compare(ref, Columns.of(same, cfg.dataset)).drifted_features == []
    report = compare(ref, Columns.of(drifted, cfg.dataset))
    assert report.dataset_drift and {"age", "income", "plan", "support_calls"} <= set(report.drifted_features)
    page = html_report(report, ref, Columns.of(drifted, cfg.dataset), "customer_churn drift")
    assert page.startswith("<!doctype html>") and page.count("<svg") == len(report.features)
    assert "DRIFT" in page and "support_calls" in page


def test_missing_feature_in_current_data_is_named():
    ref = synthetic(1000, 1, False)
    cur = Columns({k: v for k, v in ref.numeric.items() if k != "age"}, ref.categorical)
    with pytest.raises(ValueError, match=r"lacks feature\(s\) \['age'\]"):
        compare(ref, cur)


def test_the_report_escapes_every_value_that_comes_from_data():
    """Category labels come from served traffic: a label that is markup must show as text, never run."""
    from html.parser import HTMLParser

    hostile = ['<script>alert(1)</script>', '"><img src=x onerror=alert(2)>', "</title><svg onload=alert(3)>",
               "<a href='javascript:alert(4)'>x</a>", "&lt;b&gt;"]
    rng = np.random.default_rng(0)
    ref = Columns({"x": rng.normal(0, 1, 500)}, {"<b>feature</b>": categorical_values(rng.choice(["a", "b"], 500))})
    cur = Columns({"x": rng.normal(0, 1, 500)}, {"<b>feature</b>": categorical_values(rng.choice(hostile + ["a"], 500))})
    page = html_report(compare(ref, cur), ref, cur, "<script>alert('title')</script>")

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.attributes, self.text = set(), set(), []

        def handle_starttag(self, tag, attrs):
            self.tags.add(tag)
            self.attributes |= {name for name, _ in attrs}

        def handle_data(self, data):
            self.text.append(data)

    parsed = Tags()
    parsed.feed(page)
    assert parsed.tags <= {"html", "head", "meta", "title", "style", "body", "h1", "p", "b", "span", "table", "tr",
                           "td", "br", "svg", "rect", "text"}, parsed.tags
    assert not {a for a in parsed.attributes if a.startswith("on") or a == "href"}, parsed.attributes
    text = "".join(parsed.text)
    for label in ("<script>alert(1", '"><img src=x on', "</title><svg onl", "&lt;b&gt;", "<b>feature</b>"):
        assert label in text, label  # shown as text (cut to 10 characters under the bars, whole in the tooltips)
    assert "default-src 'none'" in page  # and a CSP, should anything slip through one day


def test_the_prediction_log_keeps_its_last_days_only(cfg, bucket):
    """The model server logs every request's raw inputs; ml_monitor's check deletes the days past
    monitoring.prediction_log_days (default 30), which may not be shorter than the labels' lookback."""
    from datetime import datetime, timezone

    import pydantic

    from mlfactory import storage
    from mlfactory.config import MonitoringSpec
    from mlfactory.monitoring.monitor import expire_prediction_log

    now = datetime(2026, 12, 6, 12, tzinfo=timezone.utc)
    for day in ("2026-10-01", "2026-11-05", "2026-11-06", "2026-12-06"):
        storage.write_bytes(storage.join(cfg.storage.prediction_log_uri, f"date={day}", "part-1.parquet"), b"x")
    assert cfg.monitoring.prediction_log_days == 30
    assert expire_prediction_log(cfg, now) == ["date=2026-10-01", "date=2026-11-05"]
    assert sorted({o.key.split("/")[0] for o in storage.list_objects(cfg.storage.prediction_log_uri)}) == [
        "date=2026-11-06", "date=2026-12-06"]
    assert expire_prediction_log(cfg, now) == []
    with pytest.raises(pydantic.ValidationError, match="must be at least label_lookback_days"):
        MonitoringSpec(prediction_log_days=7, label_lookback_days=30)
