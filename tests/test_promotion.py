"""The MLflow side, against a real MLflow server: what a training run logs, the pyfunc over raw columns,
and the promotion gate (floor, margin, aliases champion/challenger/previous, tags)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import config_with_bucket, train, with_section
from mlfactory import storage
from mlfactory.data import sample_data
from mlfactory.registry import CHALLENGER, CHAMPION, PREVIOUS, Registry, decide

# ---------------------------------------------------------------------------------------------
# The gate as a pure function


def test_gate_floor_margin_and_first_model():
    first = decide("roc_auc", 0.80, None, None, margin=0.01, floor=0.75)
    assert first.promote and "no champion yet" in first.reason
    low_first = decide("roc_auc", 0.70, None, None, margin=0.01, floor=0.75)
    assert not low_first.promote and "below the floor 0.7500" in low_first.reason
    assert decide("roc_auc", 0.815, 0.80, "3", margin=0.01, floor=0.75).promote
    tie = decide("roc_auc", 0.805, 0.80, "3", margin=0.01, floor=0.75)
    assert not tie.promote and "does not beat champion v3" in tie.reason and "margin 0.0100" in tie.reason
    worse = decide("roc_auc", 0.78, 0.80, "3", margin=0.0, floor=0.75)
    assert not worse.promote
    better_but_low = decide("roc_auc", 0.74, 0.60, "3", margin=0.0, floor=0.75)
    assert not better_but_low.promote and "below the floor" in better_but_low.reason
    assert not decide("roc_auc", math.nan, None, None, margin=0.0, floor=0.0).promote
    tags = tie.tags()
    assert tags["mlfactory.decision"] == "rejected" and tags["mlfactory.holdout_roc_auc"] == "0.805000"
    assert tags["mlfactory.champion_roc_auc"] == "0.800000" and tags["mlfactory.champion_version"] == "3"


def test_with_a_recent_window_the_gate_holds_the_past_and_must_win_the_present():
    """Rows new since the champion trained (neither model trained on them) decide; the frozen holdout, the
    first season, only keeps a challenger from forgetting it beyond the tolerance."""
    gate = {"margin": 0.01, "floor": 0.6, "tolerance": 0.02}
    season = decide("roc_auc", 0.79, 0.80, "3", recent=(0.78, 0.70), **gate)  # a little worse on the past
    assert season.promote and "wins on the recent window 0.7800 vs 0.7000" in season.reason, season.reason
    assert season.tags()["mlfactory.recent_roc_auc"] == "0.780000"
    assert season.tags()["mlfactory.recent_champion_roc_auc"] == "0.700000"
    forgot = decide("roc_auc", 0.75, 0.80, "3", recent=(0.78, 0.70), **gate)
    assert not forgot.promote and "trails on the frozen holdout 0.7500 vs champion v3 0.8000" in forgot.reason
    stale = decide("roc_auc", 0.85, 0.80, "3", recent=(0.705, 0.70), **gate)  # better on the past only
    assert not stale.promote and "does not win on the recent window" in stale.reason
    assert decide("roc_auc", 0.85, 0.80, "3", margin=0.01, floor=0.6).promote  # no window: the holdout alone
    assert decide("roc_auc", 0.85, 0.80, "3", margin=0.01, floor=0.6).tags()["mlfactory.recent_roc_auc"] == ""


def test_the_recent_window_is_new_rows_only_chosen_by_content_and_kept_out_of_training(tmp_path, monkeypatch):
    from mlfactory.config import load_config
    from mlfactory.training.data import ROW_HASH, prepare_training_set, read_holdout, row_hashes

    monkeypatch.setenv("MLFACTORY_BUCKET", str(tmp_path / "bucket"))
    cfg = load_config()
    sample_data.land_and_curate(cfg, 4000, seed=71)
    first = prepare_training_set(cfg)
    assert first.recent is None  # no champion yet: nothing to compare on the newest rows
    sample_data.land_and_curate(cfg, 3000, seed=72)  # a new batch
    second = prepare_training_set(cfg, first.uri)
    window = read_holdout(second.recent.uri, second.recent.sha256)
    assert 0.25 * 3000 < len(window) < 0.35 * 3000  # recent_fraction 0.3 of the new rows
    columns = [c for c in window.columns if c != ROW_HASH]
    old = pd.read_parquet(storage.local_path(storage.join(first.uri, "part-0.parquet")))
    new = pd.read_parquet(storage.local_path(storage.join(second.uri, "part-0.parquet")))
    hashes = set(row_hashes(window, columns))
    assert not hashes & set(row_hashes(old, columns))  # only rows the champion never saw...
    assert not hashes & set(row_hashes(new, columns))  # ...and the challenger does not train on
    assert second.rows == first.rows + 3000 - len(window)
    again = prepare_training_set(cfg, first.uri).recent  # the same rows each time (only created_at may differ)
    assert (again.uri, again.sha256, again.rows) == (second.recent.uri, second.recent.sha256, second.recent.rows)


def test_the_holdout_is_written_once_and_a_try_stopped_before_its_manifest_keeps_its_rows(tmp_path, monkeypatch):
    """The frozen holdout is created once (the clouds refuse Airflow any overwrite there): a try that died between
    the rows and the manifest leaves rows the next try adopts, never rewrites."""
    import os

    from mlfactory.config import load_config
    from mlfactory.training.data import HOLDOUT_MANIFEST, holdout_uri, prepare_training_set

    monkeypatch.setenv("MLFACTORY_BUCKET", str(tmp_path / "bucket"))
    cfg = load_config()
    sample_data.land_and_curate(cfg, 1000, seed=73)
    first = prepare_training_set(cfg).holdout
    os.remove(storage.local_path(storage.join(holdout_uri(cfg), HOLDOUT_MANIFEST)))  # the try died here
    rows = os.stat(storage.local_path(first.uri)).st_ino
    again = prepare_training_set(cfg).holdout
    assert (again.uri, again.sha256, again.rows) == (first.uri, first.sha256, first.rows)
    assert os.stat(storage.local_path(again.uri)).st_ino == rows  # adopted, not written again
    with pytest.raises(FileExistsError):
        storage.write_once(first.uri, b"other rows")


# ---------------------------------------------------------------------------------------------
# Real MLflow server


@pytest.fixture(scope="module")
def lab(tmp_path_factory, mlflow_server):
    """Curated data, a frozen holdout and three models of known quality, logged to the MLflow server."""
    import mlflow

    from mlfactory.training.data import prepare_training_set

    bucket = tmp_path_factory.mktemp("promo-bucket")
    # an experiment and a model of its own: set up again on one worker (pytest-xdist moves tests between workers),
    # the lab's identical training set would otherwise be MLflow's dataset of the first lab (deduplicated by digest)
    experiment = f"promotion-test-{bucket.name}"
    cfg = with_section(config_with_bucket(bucket), "mlflow", tracking_uri=mlflow_server.url, experiment=experiment,
                       model_name=f"churn_gate_{bucket.name}")
    mlflow.set_tracking_uri(mlflow_server.url)  # models:/ URIs below resolve through the server
    sample_data.land_and_curate(cfg, 20_000, seed=5)
    training_set = prepare_training_set(cfg)
    recipes = {  # the entrypoint's hyperparameters, deterministic for the seed: bad ~0.5, medium ~0.7, good ~0.81
        "bad": {"epochs": 1, "learning_rate": 0.000001, "hidden_sizes": [2]},
        "medium": {"epochs": 1, "learning_rate": 0.001, "hidden_sizes": [4], "batch_size": 256},
        "good": {"epochs": 5},
        "trees": {"model": "gbdt"},
    }
    models = {}
    for name, hyperparameters in recipes.items():
        out = storage.join(cfg.storage.models_uri, "runs", name)
        train(["--train-uri", training_set.uri, "--output-uri", out, "--mlflow-tracking-uri", mlflow_server.url,
               "--experiment", experiment, "--run-name", name, "--tag", "mlfactory.drifted_features=age,income",
               "--hyperparameters", json.dumps(hyperparameters)])
        models[name] = json.loads(storage.read_bytes(storage.join(out, "metrics.json")))
    return cfg, training_set, models


def test_a_job_that_fails_after_its_run_started_ends_the_run_failed(training_set, mlflow_server, tmp_path):
    """A job that fails ends its MLflow run FAILED, not FINISHED (MLflow's exit handler, in a process that runs it)
    nor RUNNING (a worker forked by torchrun exits without running exit handlers)."""
    from mlflow import MlflowClient

    from mlfactory.backends.local.processes import start_module

    blocker = tmp_path / "a-file"
    blocker.write_text("")  # the output folder would be under a file: the job fails once it has trained
    args = ["--train-uri", training_set.uri, "--output-uri", str(blocker / "out"), "--mlflow-tracking-uri",
            mlflow_server.url, "--experiment", "failing-job", "--hyperparameters", json.dumps({"epochs": 1}),
            "--threads", "1"]
    proc = start_module("mlfactory.training.train", args, dict(os.environ), one_thread=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0, out[-3000:]
    client = MlflowClient(mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name("failing-job").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"], out[-3000:]


def test_training_run_logs_params_curves_dataset_model_and_drift_tags(lab, mlflow_server):
    from mlflow import MlflowClient

    cfg, training_set, models = lab
    good = models["good"]
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(good["mlflow_run_id"])
    assert run.data.params["epochs"] == "5" and run.data.params["world_size"] == "1"
    assert run.data.tags["mlfactory.drifted_features"] == "age,income"
    assert run.data.tags["mlfactory.dataset_sha256"] == training_set.digest
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_roc_auc")] == [1, 2, 3, 4, 5]
    assert {"train_loss", "samples_per_s", "val_accuracy", "val_log_loss"} <= set(run.data.metrics)
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.digest == training_set.digest[:36]
    assert inputs[0].dataset.source and training_set.uri in inputs[0].dataset.source
    # the dataset's schema (from the first rows of each column) is what MLflow infers reading every row
    from mlflow.types import Schema
    from mlflow.types.utils import _infer_schema
    from mlfactory.training.train import read_training_set

    logged = Schema.from_json(json.dumps(json.loads(inputs[0].dataset.schema)["mlflow_colspec"]))
    assert logged == _infer_schema(read_training_set(training_set.uri)[1])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "training_curves.png" in artifacts
    # the model's input example is made up from the schema: no row of the training set is stored with the model
    import mlflow.models

    example = mlflow.models.Model.load(good["model_uri"]).load_input_example(
        mlflow.artifacts.download_artifacts(good["model_uri"]))
    assert len(example) == 2 and example["plan"].tolist() == [cfg.dataset.column("plan").categories[0]] * 2
    from mlfactory.features import to_wire

    real = to_wire(read_training_set(training_set.uri)[1], cfg.dataset)[list(example.columns)]
    assert not set(real.astype(str).apply(tuple, axis=1)) & set(example.astype(str).apply(tuple, axis=1))
    assert not set(real["income"]) & set(example["income"])  # (not even one value of a continuous column)


@pytest.mark.parametrize("recipe", ["good", "trees"])  # the network and the gradient-boosted trees
def test_pyfunc_takes_raw_feature_columns_as_a_json_caller_sends_them(lab, recipe):
    import mlflow.pyfunc

    from mlfactory.features import FeatureSet
    from mlfactory.tabular import load_logged_model

    cfg, _, models = lab
    assert load_logged_model(models[recipe]["model_uri"])[0].family == ("gbdt" if recipe == "trees" else "mlp")
    model = mlflow.pyfunc.load_model(models[recipe]["model_uri"])
    schema = model.metadata.get_input_schema()
    assert schema.input_names() == FeatureSet.of(cfg.dataset).raw_inputs  # raw columns, not encoded tensors
    assert "customer_id" not in schema.input_names() and cfg.dataset.target not in schema.input_names()
    raw = pd.DataFrame([
        {"signup_date": "2021-03-04T00:00:00", "age": 44.0, "income": 52000.5, "tenure_months": 3.0,
         "monthly_charges": 80.0, "total_charges": 240.0, "support_calls": 7.0, "plan": "basic", "region": "north",
         "device": "ios", "payment_method": "card", "contract": "monthly", "has_partner": False,
         "has_dependents": True, "paperless_billing": True, "avg_session_minutes": None, "data_usage_gb": 3.5,
         "satisfaction": None},
        {"signup_date": "2015-07-01T00:00:00", "age": 61.0, "income": 90000.0, "tenure_months": 100.0,
         "monthly_charges": 40.0, "total_charges": 4000.0, "support_calls": 0.0, "plan": "premium", "region": "west",
         "device": "web", "payment_method": "bank_transfer", "contract": "two_year", "has_partner": True,
         "has_dependents": False, "paperless_billing": False, "avg_session_minutes": 30.0, "data_usage_gb": 1.0,
         "satisfaction": 9.0},
    ])
    predictions = model.predict(raw)
    assert list(predictions.columns) == ["prediction", "probability"]
    assert predictions["probability"].between(0, 1).all()
    assert predictions["probability"][0] > predictions["probability"][1]  # short tenure, many calls: churn risk


def test_the_blend_of_both_families_is_the_candidate_when_it_beats_each_on_validation(lab, mlflow_server, capsys):
    """ml_train's select_best over a network and trees trained on the same validation rows: their blend (the
    weight chosen on those rows) is a logged model of its own that loads, serves and registers like any other,
    and scores as the weighted average of its members."""
    import numpy as np
    from mlflow import MlflowClient

    from mlfactory.training.blend import MEMBERS_TAG, read_validation
    from mlfactory.features import to_wire
    from mlfactory.tabular import load_logged_model
    from mlfactory.training.data import read_holdout
    from mlfactory.training.plan import select_best

    cfg, training_set, models = lab
    good, trees = models["good"], models["trees"]
    prepared = {"training_set": training_set.to_dict(), "started_by": "manual", "drifted_features": []}
    validation = read_validation(good["model_bundle_uri"])
    assert np.array_equal(validation["rows"], read_validation(trees["model_bundle_uri"])["rows"])

    candidate = select_best(cfg, prepared, [good, trees], "manual__blend-1")
    out = capsys.readouterr().out
    assert "blend" in out and candidate["value"] > max(good["value"], trees["value"]), out
    weights = candidate["hyperparameters"]["weights"]
    assert candidate["hyperparameters"]["model"] == "blend" and set(weights) == {"mlp", "gbdt"}
    assert 0 < weights["mlp"] < 1 and weights["mlp"] + weights["gbdt"] == pytest.approx(1)
    assert candidate["model_bundle_uri"] == storage.join(cfg.storage.models_uri, "runs", "manual-blend-1", "blend", "model.pt")
    run = MlflowClient(mlflow_server.url).get_run(candidate["mlflow_run_id"])
    assert set(run.data.tags[MEMBERS_TAG].split(",")) == {good["mlflow_run_id"], trees["mlflow_run_id"]}
    assert run.data.tags["mlfactory.drifted_features"] == "age,income"  # the members' tags carry over

    blended, _ = load_logged_model(candidate["model_uri"])
    members = {name: load_logged_model(models[name]["model_uri"])[0] for name in ("good", "trees")}
    holdout = read_holdout(training_set.holdout.uri, training_set.holdout.sha256).drop(columns=[cfg.dataset.target])
    expected = (weights["mlp"] * members["good"].predict(holdout)["probability"]
                + weights["gbdt"] * members["trees"].predict(holdout)["probability"])
    assert blended.family == "blend"
    np.testing.assert_allclose(blended.predict(holdout)["probability"], expected, rtol=1e-6)
    wire = to_wire(holdout.head(100), cfg.dataset)  # the model server's path (Arrow, wire values) answers the same
    served = blended.predict_wire({c: wire[c].tolist() for c in wire.columns})
    np.testing.assert_allclose(served["probability"], expected.head(100), rtol=1e-5)
    registry = Registry(with_section(cfg, "mlflow", model_name="churn_blend"))
    version = registry.register(candidate["model_uri"], candidate["mlflow_run_id"], {})
    assert registry.evaluate(version, read_holdout(training_set.holdout.uri, training_set.holdout.sha256)).challenger > 0.75

    # One family, or blending turned off: the best trial alone.
    assert select_best(cfg, prepared, [good, models["medium"]], "manual__blend-2")["model_uri"] == good["model_uri"]
    off = with_section(cfg, "training", blend=False)
    assert select_best(off, prepared, [good, trees], "manual__blend-3")["model_uri"] in (good["model_uri"], trees["model_uri"])


def test_a_blend_weight_of_0_or_1_is_no_blend():
    """Scores that only add noise get no weight: the better member alone wins on the validation rows."""
    import numpy as np

    from mlfactory.training.blend import weigh
    from mlfactory.tabular import Preprocessor

    rng = np.random.default_rng(0)
    target = rng.integers(0, 2, 4000)
    rows = np.arange(4000)
    informative = {"rows": rows, "target": target, "scores": (target * 0.3 + rng.random(4000) * 0.7).astype(np.float32)}
    noise = {"rows": rows, "target": target, "scores": rng.random(4000).astype(np.float32)}
    other = {"rows": rows, "target": target, "scores": (target * 0.3 + rng.random(4000) * 0.7).astype(np.float32)}
    pre = Preprocessor(numeric=[], mean=[], std=[], boolean=[], categorical={}, task="classification",
                       classes=["False", "True"])
    assert weigh(pre, informative, noise)[0] == 1.0
    weight, value = weigh(pre, informative, other)  # two as good, errors independent: the even blend helps
    assert 0.3 < weight < 0.7 and value > weigh(pre, informative, noise)[1] + 0.01
    assert weigh(pre, informative, {**noise, "rows": rows[::-1]}) is None  # other validation rows: no blend


def test_promotion_gate_with_aliases_tags_and_the_frozen_holdout(lab):
    from mlfactory.training.data import read_holdout

    cfg, training_set, models = lab
    holdout = read_holdout(training_set.holdout.uri, training_set.holdout.sha256)
    registry = Registry(with_section(cfg, "promotion", margin=0.005, floor=0.60))

    def submit(name: str):
        version = registry.register(models[name]["model_uri"], models[name]["mlflow_run_id"], {"recipe": name})
        assert registry.alias_version(CHALLENGER) == version
        decision = registry.evaluate(version, holdout)
        if decision.promote:
            registry.promote(version, training_set.holdout.uri, training_set.holdout.sha256)
        return version, decision

    # The first model becomes champion only if it passes the floor.
    bad_v, bad = submit("bad")
    assert not bad.promote and "below the floor" in bad.reason and registry.alias_version(CHAMPION) is None
    medium_v, medium = submit("medium")
    assert medium.promote and "no champion yet" in medium.reason
    assert registry.alias_version(CHAMPION) == medium_v
    tags = registry.client.get_registered_model(registry.name).tags
    assert tags["mlfactory.holdout_sha256"] == training_set.holdout.sha256  # kept with the first champion

    # A better model moves champion; the replaced one keeps `previous` for rollback.
    good_v, good = submit("good")
    assert good.promote and good.champion == pytest.approx(medium.challenger) and good.challenger > medium.challenger
    assert (registry.alias_version(CHAMPION), registry.alias_version(PREVIOUS)) == (good_v, medium_v)

    # A worse model is never promoted, even above the floor; the decision is on the version's tags.
    again_v, again = submit("medium")
    assert not again.promote and "does not beat champion" in again.reason
    assert registry.alias_version(CHAMPION) == good_v
    version_tags = registry.client.get_model_version(registry.name, again_v).tags
    assert version_tags["mlfactory.decision"] == "rejected"
    assert float(version_tags["mlfactory.holdout_roc_auc"]) == pytest.approx(again.challenger, abs=1e-6)
    assert float(version_tags["mlfactory.champion_roc_auc"]) == pytest.approx(good.challenger, abs=1e-6)
    assert registry.client.get_model_version(registry.name, good_v).tags["mlfactory.decision"] == "promoted"


def test_a_changed_holdout_is_refused(lab, tmp_path):
    from mlfactory.training.data import read_holdout

    _, training_set, _ = lab
    with pytest.raises(ValueError, match="changed since it was frozen"):
        read_holdout(training_set.holdout.uri, "0" * 64)


STARTER = """
import sys, time
from pathlib import Path
import mlflow
from mlfactory.training.tracking import start_run

Path(sys.argv[4]).touch()  # imported: ready for the race
go = Path(sys.argv[2])
while not go.exists():  # every process waits here, then all create the experiment at once
    time.sleep(0.001)
mlflow.set_tracking_uri(sys.argv[1])
with start_run(sys.argv[3], run_name="trial") as run:
    print(run.info.experiment_id)
"""


def test_parallel_trials_creating_the_experiment_log_into_it_whatever_the_environment_says(mlflow_server, tmp_path):
    """Trials that start at once all create the experiment; the losers of that race must not fall back to an
    MLFLOW_EXPERIMENT_ID inherited from the environment (a test runner's or a shell's): seen failing a trial."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.url)
    other = client.create_experiment("someone-elses-experiment")
    env = {**__import__("os").environ, "MLFLOW_EXPERIMENT_ID": other, "MLFLOW_TRACKING_URI": mlflow_server.url}
    for attempt in range(3):
        name, go = f"parallel-trials-{attempt}", tmp_path / f"go-{attempt}"
        env["MLFLOW_EXPERIMENT_NAME"] = name
        ready = [tmp_path / f"ready-{attempt}-{i}" for i in range(4)]
        procs = [subprocess.Popen([sys.executable, "-c", STARTER, mlflow_server.url, str(go), name, str(flag)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for flag in ready]
        deadline = time.monotonic() + 120
        while not all(flag.exists() for flag in ready):  # all four have imported mlflow and are waiting
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, [p.stderr.read() for p in procs if p.poll() is not None]
            time.sleep(0.05)
        go.touch()
        outputs = [p.communicate(timeout=120) for p in procs]
        expected = client.get_experiment_by_name(name).experiment_id
        for proc, (out, err) in zip(procs, outputs):
            assert proc.returncode == 0, err[-2000:]
            assert out.splitlines()[0] == expected
        assert len(client.search_runs([expected])) == 4


def test_a_model_given_in_the_form_must_come_from_the_pipelines_experiment(champion):
    """ml_promote's form registers only what this pipeline's experiment logged: a run or logged model of
    another experiment, or one MLflow does not have, is refused with the reason."""
    import mlflow

    cfg = champion[0]
    registry = Registry(cfg)
    run_id = registry.client.get_model_version(cfg.model_name, "1").run_id
    registry.check_own_model(f"runs:/{run_id}/model")
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    other = registry.client.create_experiment(f"someone-else-{run_id[:8]}")
    stranger = registry.client.create_run(other).info.run_id
    with pytest.raises(ValueError, match=r"logged in another experiment .* only models of experiment 'serving-test'"):
        registry.check_own_model(f"runs:/{stranger}/model")
    with pytest.raises(ValueError, match="MLflow has no such model"):
        registry.check_own_model("runs:/" + "0" * 32 + "/model")
    for bad in ("file:///tmp/evil", f"models:/{cfg.model_name}/1", f"runs:/{run_id}/model/../../x"):
        with pytest.raises(ValueError, match="is not models:/m-<id> or runs:/<run id>/<path>"):
            registry.check_own_model(bad)


def test_the_gate_trusts_the_pipelines_holdout_record_not_editable_tags(lab, tmp_path):
    """Someone with registry write access points the registered model's holdout tags at a holdout of their own
    (with its correct hash): the gate refuses to compare rather than judge on it."""
    import hashlib

    from mlfactory.registry import HOLDOUT_SHA_TAG, HOLDOUT_URI_TAG, evaluate_challenger

    cfg, training_set, models = lab
    registry = Registry(cfg)
    version = registry.register(models["medium"]["model_uri"], models["medium"]["mlflow_run_id"], {})
    forged = tmp_path / "easy-holdout.parquet"
    forged.write_bytes(storage.read_bytes(training_set.holdout.uri)[:-8] + b"forged!!")
    for key, value in ((HOLDOUT_URI_TAG, f"file://{forged}"), (HOLDOUT_SHA_TAG, hashlib.sha256(forged.read_bytes()).hexdigest())):
        registry.client.set_registered_model_tag(cfg.model_name, key, value)
    try:
        with pytest.raises(ValueError, match="holdout tags .* differ from the holdout this pipeline froze"):
            evaluate_challenger(cfg, version)
    finally:
        registry.client.set_registered_model_tag(cfg.model_name, HOLDOUT_URI_TAG, training_set.holdout.uri)
        registry.client.set_registered_model_tag(cfg.model_name, HOLDOUT_SHA_TAG, training_set.holdout.sha256)
    decision = evaluate_challenger(cfg, version)  # the pipeline's own record: judged as before
    assert decision["holdout_sha256"] == training_set.holdout.sha256
