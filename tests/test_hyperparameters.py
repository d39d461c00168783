"""A hyperparameter is declared once (``mlfactory.hyperparameters``): ml_train's trigger form, the config's
``training`` section, a ``TrainingJobSpec`` and the training entrypoint take its bounds from there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlfactory.config import TrainingSpec
from mlfactory.hyperparameters import SEARCHABLE, Hyperparameters
from mlfactory.specs import TrainingJobSpec
from mlfactory.training.plan import plan

ROOT = Path(__file__).resolve().parents[1]

# In a fresh interpreter, as an edit of the model would be: epochs' bound (at most 1000) becomes at most 50 before
# anything else is imported; then 50 and 51 go through each of the places that take the bound from the model.
CHANGED_BOUND = """
import contextlib, io, json
from annotated_types import Le
from mlfactory.hyperparameters import Hyperparameters

field = Hyperparameters.model_fields["epochs"]
field.metadata = [Le(50) if isinstance(m, Le) else m for m in field.metadata]
Hyperparameters.model_rebuild(force=True)

from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.exceptions import ParamValidationError
from mlfactory.config import TrainingSpec
from mlfactory.specs import TrainingJobSpec
from mlfactory.training.train import parse_args

form = DagBag(dag_folder="dags/ml_train.py").dags["ml_train"].params

checks = {
    "form": lambda epochs: form.get_param("epochs").resolve(epochs),
    "config": lambda epochs: TrainingSpec(epochs=epochs),
    "config search_space": lambda epochs: TrainingSpec(search_space={"epochs": [epochs]}),
    "job spec": lambda epochs: TrainingJobSpec(name="t", input_uri="i", output_uri="o", hyperparameters={"epochs": epochs}),
    "entrypoint": lambda epochs: parse_args(["--train-uri", "x", "--output-uri", "y",
                                             "--hyperparameters", json.dumps({"epochs": epochs})], env={}),
}
results = {}
for name, check in checks.items():
    for epochs in (50, 51):
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                check(epochs)
            results[f"{name} {epochs}"] = "accepted"
        except SystemExit as exit:
            results[f"{name} {epochs}"] = f"exit {exit.code}: {stderr.getvalue()}"
        except (ParamValidationError, ValueError) as err:
            results[f"{name} {epochs}"] = f"refused: {err}"
print(json.dumps(results))
"""


def test_a_bound_changed_in_the_model_is_the_bound_of_the_form_the_config_the_job_spec_and_the_entrypoint(bucket):
    done = subprocess.run([sys.executable, "-c", CHANGED_BOUND], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    places = ("form", "config", "config search_space", "job spec", "entrypoint")
    assert {place: results[f"{place} 50"] for place in places} == dict.fromkeys(places, "accepted")
    refusals = {place: results[f"{place} 51"] for place in places}
    assert all(r.startswith("refused: ") for p, r in refusals.items() if p != "entrypoint"), refusals
    assert "51 is greater than the maximum of 50" in refusals["form"]
    for place in ("config", "config search_space", "job spec"):
        assert "Input should be less than or equal to 50" in refusals[place], refusals[place]
    # the entrypoint: argparse's usage error (exit code 2), naming the field and its bound
    assert refusals["entrypoint"].startswith("exit 2: ")
    assert "argument --hyperparameters: epochs: Input should be less than or equal to 50" in refusals["entrypoint"]
    # here, with the model as declared, 51 epochs are fine: the refusals above come from the changed bound
    assert TrainingSpec(epochs=51).epochs == 51
    spec = TrainingJobSpec(name="t", input_uri="i", output_uri="o", hyperparameters={"epochs": 51})
    assert spec.hyperparameters.epochs == 51


def test_the_form_offers_both_families_knobs_with_the_models_bounds_and_the_configs_defaults(cfg):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import ParamValidationError

    params = DagBag(dag_folder=str(ROOT / "dags" / "ml_train.py")).dags["ml_train"].params
    sections = {name: params.get_param(name).schema.get("section") for name in params}
    assert {name for name, section in sections.items() if section == "Boosted trees (model: gbdt)"} == {
        "trees", "tree_leaves", "tree_learning_rate"}
    assert sections["epochs"] == sections["hidden_sizes"] == "Network (model: mlp)" and sections["model"] == "Model"
    assert not {"dropout", "patience", "seed", "validation_fraction"} & set(params)  # Knob(form=False)
    resolved = params.validate()
    assert {k: resolved[k] for k in ("trees", "tree_leaves", "tree_learning_rate", "model")} == {
        "trees": cfg.training.trees, "tree_leaves": cfg.training.tree_leaves,
        "tree_learning_rate": cfg.training.tree_learning_rate, "model": cfg.training.model}
    for name, bad, good in (("trees", 100_001, 100_000), ("tree_leaves", 1, 2), ("tree_learning_rate", 0, 1),
                            ("model", "forest", "gbdt")):
        assert params.get_param(name).resolve(good) == good
        with pytest.raises(ParamValidationError):
            params.get_param(name).resolve(bad)
    # the search space names the searchable ones, with the choices of each that has choices (the bounds of the
    # others are checked when the run plans its trials: each candidate validated by the model)
    space = params.get_param("search_space")
    assert space.schema["propertyNames"]["enum"] == list(SEARCHABLE)
    assert space.resolve({"trees": [300, 1000], "model": ["mlp", "gbdt"]})
    with pytest.raises(ParamValidationError):
        space.resolve({"class_weight": ["heavy"]})
    with pytest.raises(ValueError, match=r"search_space.trees lists \[0\]; trees: Input should be greater than or equal"):
        plan(cfg, {"training_set": {"uri": "file:///t"}, "started_by": "manual", "drifted_features": []},
             {**resolved, "search_space": {"trees": [0, 300]}}, "manual__1")


def test_the_entrypoint_takes_one_json_argument_and_exits_2_on_a_value_out_of_bounds(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mlfactory.training.train", "--train-uri", str(tmp_path), "--output-uri",
                           str(tmp_path / "o"), "--hyperparameters", '{"model": "gbdt", "tree_leaves": 1}'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "argument --hyperparameters: tree_leaves: Input should be greater than or equal to 2" in proc.stderr
    spec = TrainingJobSpec(name="t", input_uri="i", output_uri="o", hyperparameters={"model": "gbdt", "trees": 300})
    assert isinstance(spec.hyperparameters, Hyperparameters)  # typed, and so through XCom's JSON and back
    assert TrainingJobSpec.model_validate(json.loads(spec.model_dump_json())).hyperparameters == spec.hyperparameters
