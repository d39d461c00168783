"""The training entrypoint under torchrun: quality on 1 and 2 DDP processes, determinism, SIGKILL resume,
the cloud container conventions, job specs and the hyperparameter search."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest

from mlfactory import storage
from mlfactory.backends.local.runtime import this_machine
from mlfactory.training.cluster import LOOPBACK_ENV, Cluster, data_locations, launched_by_torchrun
from mlfactory.specs import Accelerator, TrainingJobSpec
from mlfactory.training.plan import search_trials
from mlfactory.backends.local.processes import Forked, kill_tree, start_job
from mlfactory.training.train import parse_args

AUC_BAR = 0.80  # the sample data's label noise caps ROC AUC near 0.82; 6 epochs reach 0.81


def run_entrypoint(args: list[str], processes: int) -> subprocess.Popen | Forked:
    """The entrypoint as ml_train starts it on this machine (its ``main`` forked from this process for one
    process, ``torchrun --nproc-per-node N ...`` for more) in its own process group, output piped."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # one intra-op thread per process, as ml_train gives jobs side by side: the suite runs two tests at once on
    # 2 cores, and a second thread fighting the other test for a core made a run ~5x slower
    return start_job(this_machine(processes), "mlfactory.training.train", [*args, "--threads", "1"],
                     {**env, **LOOPBACK_ENV})


def hyperparameters(**values) -> list[str]:
    """The entrypoint's one hyperparameters argument (the others at their defaults)."""
    return ["--hyperparameters", json.dumps(values)]


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def metrics_of(output_uri: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(output_uri, "metrics.json")))


def assert_validation_file_gives_the_metric(out, result: dict, rows: int) -> None:
    """validation.npz (for ml_train's blend): the validation rows of the seeded split, and the kept model's
    scores on them, from which its reported metric comes."""
    import torch

    from mlfactory.training.blend import read_validation
    from mlfactory.tabular import LoadedModel, metrics
    from mlfactory.training.train import split

    validation = read_validation(str(out / "model.pt"))
    assert validation["rows"].tolist() == split(rows, 0.15, 42)[1].tolist()
    pre = LoadedModel(str(out / "model.pt")).pre
    assert metrics(pre, torch.from_numpy(validation["target"]), validation["scores"])["roc_auc"] == pytest.approx(
        result["value"], abs=1e-6)


@pytest.mark.parametrize("processes", [1, 2])
def test_reaches_the_auc_bar_on_one_and_two_ddp_processes(training_set, tmp_path, processes):
    out = tmp_path / "out"
    log = finish(run_entrypoint(["--train-uri", training_set.uri, "--output-uri", str(out), *hyperparameters(epochs=6)],
                                processes))
    result = metrics_of(str(out))
    assert result["world_size"] == processes and result["backend"] == "gloo"
    assert result["metric"] == "val_roc_auc" and result["value"] >= AUC_BAR, result["history"]
    assert [h["epoch"] for h in result["history"]][:6] == [1, 2, 3, 4, 5, 6]
    assert result["value"] == max(h["val_roc_auc"] for h in result["history"])  # the best epoch's weights are kept
    assert (out / "model.pt").stat().st_size > 0
    assert_validation_file_gives_the_metric(out, result, training_set.rows)
    assert f"training customer_churn on {training_set.rows - round(training_set.rows * 0.15)} rows" in log

    # The bundle scores the never-trained-on holdout from its RAW columns just as well.
    from mlfactory.config import load_config
    from mlfactory.registry import holdout_score
    from mlfactory.tabular import LoadedModel
    from mlfactory.training.data import read_holdout

    holdout = read_holdout(training_set.holdout.uri, training_set.holdout.sha256)
    model = LoadedModel(str(out / "model.pt"))
    assert holdout_score(load_config().dataset, holdout, model.predict(holdout)) >= AUC_BAR - 0.02


def test_sigkill_after_epoch_one_resumes_at_epoch_two_and_matches_an_uninterrupted_run(training_set, tmp_path):
    epochs = 4
    common = ["--train-uri", training_set.uri, *hyperparameters(epochs=epochs, batch_size=128)]
    victim = run_entrypoint([*common, "--output-uri", str(tmp_path / "a"), "--checkpoint-uri", str(tmp_path / "ck")], 2)
    for line in victim.stdout:  # a lost spot machine: torchrun and both workers die at once after epoch 1
        if "checkpoint: epoch 1 saved" in line:
            kill_tree(victim, signal.SIGKILL)
            break
    victim.wait(30)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "a" / "metrics.json").exists()

    log = finish(run_entrypoint([*common, "--output-uri", str(tmp_path / "a"), "--checkpoint-uri", str(tmp_path / "ck")], 2))
    assert f"epoch 1 of {epochs} done, starting epoch 2" in log, log
    assert "epoch 1/" not in log  # epoch 1 was not trained again
    resumed = metrics_of(str(tmp_path / "a"))
    assert [h["epoch"] for h in resumed["history"]][:epochs] == list(range(1, epochs + 1))

    finish(run_entrypoint([*common, "--output-uri", str(tmp_path / "b"), "--checkpoint-uri", str(tmp_path / "ck2")], 2))
    straight = metrics_of(str(tmp_path / "b"))
    assert resumed["value"] == pytest.approx(straight["value"], abs=1e-9)  # deterministic for a seed, across a resume
    assert resumed["history"][-1]["train_loss"] == pytest.approx(straight["history"][-1]["train_loss"], abs=1e-9)


def test_the_learning_rate_cycle_holds_for_any_number_of_steps():
    import math

    import torch

    from mlfactory.training.train import one_cycle

    for total in range(1, 60):  # OneCycleLR divided by zero at 10 steps (2 epochs of 5 batches)
        optimizer = torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), lr=0.003)
        schedule, rates = one_cycle(optimizer, total), []
        for _ in range(total):
            rates.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        assert all(math.isfinite(r) and 0 < r <= 0.003 + 1e-12 for r in rates), (total, rates)
        assert rates[0] == pytest.approx(0.003 / 25), (total, rates)
        if total >= 10:
            peak = rates.index(max(rates))
            assert max(rates) == pytest.approx(0.003) and peak == round(0.1 * total)
            assert rates[-1] == pytest.approx(0.003 * 1e-4)
            assert all(a > b for a, b in zip(rates[peak:], rates[peak + 1:]))


def test_the_network_follows_one_learning_rate_cycle_stops_early_and_keeps_its_best_epoch(training_set, tmp_path):
    import torch

    from mlfactory.registry import holdout_score
    from mlfactory.tabular import LoadedModel, build_net, save_bundle
    from mlfactory.training.train import read_training_set, split

    out = tmp_path / "out"
    log = finish(run_entrypoint(["--train-uri", training_set.uri, "--output-uri", str(out),
                                 *hyperparameters(epochs=40, patience=2)], 1))
    result = metrics_of(str(out))
    *trained, kept = result["history"]
    best = max(trained, key=lambda h: h["val_roc_auc"])
    assert "early stop: val_roc_auc has not improved for 2 epochs" in log
    assert len(trained) < 40 and trained[-1]["epoch"] == best["epoch"] + 2
    assert kept == best and result["epochs"] == best["epoch"] and result["value"] == best["val_roc_auc"]
    assert f"kept the weights of epoch {best['epoch']}" in log

    rates = [h["learning_rate"] for h in trained]  # warm-up over the first tenth of 40 epochs, then annealing
    peak = rates.index(max(rates))
    assert max(rates) <= 0.003 + 1e-12 and rates[0] < max(rates) / 2 and 2 <= peak <= 4
    assert all(a > b for a, b in zip(rates[peak:], rates[peak + 1:]))

    # The bundle holds the best epoch's weights: it scores the validation rows as that epoch did.
    dataset, frame, _ = read_training_set(training_set.uri)
    _, val_idx = split(len(frame), 0.15, 42)
    model = LoadedModel(str(out / "model.pt"))
    validation = frame.iloc[val_idx]
    assert holdout_score(dataset, validation, model.predict_typed(validation)) == pytest.approx(best["val_roc_auc"], abs=1e-6)
    assert model.net.numeric_embedding == "periodic" and model.net.periodic is not None

    # A bundle saved before numeric embeddings existed loads as the plain network it was.
    save_bundle(str(tmp_path / "old.pt"), dataset, model.pre, build_net(model.pre, [16], 0.0, "none"))
    bundle = torch.load(tmp_path / "old.pt", weights_only=True)
    del bundle["net"]["numeric_embedding"]
    torch.save(bundle, tmp_path / "old.pt")
    assert LoadedModel(str(tmp_path / "old.pt")).net.periodic is None


@pytest.mark.parametrize("family", ["mlp", "gbdt"])
def test_balanced_class_weights_give_the_rarer_class_more_of_the_predictions(training_set, tmp_path, family):
    """About a third of the sample's customers churn: weighed as much as the others, the churners raise the
    mean predicted probability toward one half, on either model family."""
    from mlfactory.tabular import LoadedModel
    from mlfactory.training.data import read_holdout

    holdout = read_holdout(training_set.holdout.uri, training_set.holdout.sha256)
    means = {}
    for weight in ("none", "balanced"):
        out = tmp_path / weight
        finish(run_entrypoint(["--train-uri", training_set.uri, "--output-uri", str(out),
                               *hyperparameters(model=family, epochs=3, trees=60, class_weight=weight)], 1))
        assert metrics_of(str(out))["value"] >= AUC_BAR - 0.02  # the ranking barely moves
        means[weight] = float(LoadedModel(str(out / "model.pt")).predict(holdout)["probability"].mean())
    churn = holdout["churned"].mean()
    assert abs(means["none"] - churn) < 0.05 and means["balanced"] > means["none"] + 0.08, (means, churn)


def test_class_weights_are_sized_by_class_share_and_refused_for_regression(tmp_path):
    import torch

    from mlfactory.config import load_config
    from mlfactory.tabular import Preprocessor, class_weights, loss_function

    pre = Preprocessor([], [], [], [], {}, "classification", ["False", "True"])
    weights = class_weights(pre, torch.tensor([0.0] * 90 + [1.0] * 10), "balanced")
    assert weights.tolist() == pytest.approx([100 / 180, 100 / 20])
    assert float(loss_function(pre, weights).pos_weight) == pytest.approx(9.0)
    assert class_weights(pre, torch.tensor([0.0, 1.0]), "none") is None
    with pytest.raises(ValueError, match="applies to classification"):
        class_weights(Preprocessor([], [], [], [], {}, "regression", None), torch.tensor([1.0]), "balanced")

    base = load_config().model_dump(mode="json", exclude={"source"})
    regression = {**base, "dataset": {**base["dataset"], "task": "regression", "target": "monthly_charges"}}
    for training in ({"class_weight": "balanced"}, {"search_space": {"class_weight": ["none", "balanced"]}}):
        text = json.dumps({**regression, "training": {**base["training"], **training}})
        (tmp_path / "p.json").write_text(text)
        with pytest.raises(Exception, match="class_weight balanced applies to classification"):
            load_config(str(tmp_path / "p.json"))
    with pytest.raises(Exception, match=r"search_space.numeric_embedding lists \['fourier'\]"):
        (tmp_path / "q.json").write_text(json.dumps({**base, "training": {**base["training"],
                                                     "search_space": {"numeric_embedding": ["fourier"]}}}))
        load_config(str(tmp_path / "q.json"))


@pytest.mark.parametrize("processes", [1, 2])
def test_gradient_boosted_trees_reach_the_bar_alone_and_across_processes_and_serve_like_the_network(
        training_set, tmp_path, processes):
    """model gbdt: XGBoost early-stopped on the validation rows; on 2 processes XGBoost's collective joins
    the shards into one model. The bundle holds no pickle, and the serving path (Arrow, wire values) answers
    what the pandas path answers."""
    import torch

    from mlfactory.config import load_config
    from mlfactory.features import to_wire
    from mlfactory.registry import holdout_score
    from mlfactory.tabular import LoadedModel
    from mlfactory.training.data import read_holdout

    out = tmp_path / "out"
    log = finish(run_entrypoint(["--train-uri", training_set.uri, "--output-uri", str(out),
                                 *hyperparameters(model="gbdt")], processes))
    result = metrics_of(str(out))
    assert result["world_size"] == processes and result["hyperparameters"]["model"] == "gbdt"
    assert result["value"] >= AUC_BAR, result["history"]
    assert f"(best)  val_roc_auc {result['value']:.4f}" in log  # the kept trees are those of the best round
    rounds = result["epochs"]
    assert 1 <= rounds < 1000 and f"after {rounds} rounds" in log  # early-stopped
    bundle = torch.load(out / "model.pt", weights_only=True)  # tensors and plain values: no pickled object
    assert bundle["booster"].dtype == torch.uint8 and "state_dict" not in bundle
    assert_validation_file_gives_the_metric(out, result, training_set.rows)  # the early-stopped trees', not the refit's

    model = LoadedModel(str(out / "model.pt"))  # refit on every row, validation rows included: more rounds
    assert model.family == "gbdt" and model.booster.num_boosted_rounds() == math.ceil(rounds / 0.85)
    assert f"refit on all {training_set.rows} rows: {math.ceil(rounds / 0.85)} rounds" in log
    holdout = read_holdout(training_set.holdout.uri, training_set.holdout.sha256)
    dataset = load_config().dataset
    assert holdout_score(dataset, holdout, model.predict(holdout)) >= AUC_BAR - 0.02
    wire = to_wire(holdout.head(200), dataset)
    served = model.predict_wire({c: wire[c].tolist() for c in wire.columns})
    assert served["probability"] == pytest.approx(model.predict(wire)["probability"].tolist(), abs=1e-6)


def test_gbdt_killed_after_a_checkpoint_resumes_from_its_trees(training_set, tmp_path):
    common = ["--train-uri", training_set.uri, *hyperparameters(model="gbdt", tree_learning_rate=0.02),
              "--checkpoint-uri", str(tmp_path / "ck")]
    victim = run_entrypoint([*common, "--output-uri", str(tmp_path / "a")], 1)
    for line in victim.stdout:  # a lost spot machine, after the checkpoint of round 50
        if "checkpoint: round 50 saved" in line:
            kill_tree(victim, signal.SIGKILL)
            break
    victim.wait(30)
    assert victim.returncode == -signal.SIGKILL
    log = finish(run_entrypoint([*common, "--output-uri", str(tmp_path / "a")], 1))
    assert "resuming from checkpoint" in log and ": 50 rounds done" in log, log
    assert "round 10/" not in log  # the first 50 rounds were not boosted again
    assert metrics_of(str(tmp_path / "a"))["value"] >= AUC_BAR


def test_checkpoint_of_other_hyperparameters_is_refused(training_set, tmp_path):
    ck = tmp_path / "ck"
    finish(run_entrypoint(["--train-uri", training_set.uri, "--output-uri", str(tmp_path / "a"),
                           *hyperparameters(epochs=1), "--checkpoint-uri", str(ck)], 1))
    proc = run_entrypoint(["--train-uri", training_set.uri, "--output-uri", str(tmp_path / "b"),
                           *hyperparameters(epochs=1, learning_rate=0.01), "--checkpoint-uri", str(ck)], 1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "was written with other hyperparameters" in out and "use a new --checkpoint-uri" in out


def test_missing_training_set_and_bad_arguments_fail_clearly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mlfactory.training.train", "--train-uri", str(tmp_path),
                           "--output-uri", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode != 0 and "is not a training set folder: dataset.json is missing" in proc.stderr + proc.stdout
    with pytest.raises(SystemExit):
        parse_args(["--output-uri", "y"], env={})  # no --train-uri and no platform variable
    for bad, says in (({"epochs": 0}, "epochs: Input should be greater than or equal to 1"),
                      ({"hidden_sizes": [0]}, "hidden_sizes.0: Input should be greater than or equal to 1"),
                      ({"momentum": 0.9}, "momentum: Extra inputs are not permitted")):
        proc = subprocess.run([sys.executable, "-m", "mlfactory.training.train", "--train-uri", "x", "--output-uri", "y",
                               *hyperparameters(**bad)], capture_output=True, text=True)
        assert proc.returncode == 2 and f"argument --hyperparameters: {says}" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------
# The cloud container conventions (each backend's runtime module has the table and its sources), read by the
# backend the container runs under: its operators put MLFACTORY_RUNTIME in the job's environment


def test_sagemaker_conventions():
    env = {"MLFACTORY_RUNTIME": "aws", "SM_HOSTS": '["algo-1", "algo-2"]', "SM_CURRENT_HOST": "algo-2", "SM_NUM_GPUS": "4",
           "SM_MODEL_DIR": "/opt/ml/model", "SM_CHANNEL_TRAIN": "/opt/ml/input/data/train", "TRAINING_JOB_NAME": "job-1"}
    cluster = Cluster.from_environ(env)
    assert (cluster.platform, cluster.nodes, cluster.node_rank, cluster.master_addr, cluster.nproc_per_node) == (
        "sagemaker", 2, 1, "algo-1", 4)
    assert cluster.world_size == 8 and cluster.job_id == "job-1"
    places = data_locations(env)
    assert (places.train_uri, places.output_uri, places.checkpoint_uri) == (
        "/opt/ml/input/data/train", "/opt/ml/model", "/opt/ml/checkpoints")
    args = parse_args([], env=env)  # the platform's variables stand in for the arguments
    assert (args.train_uri, args.output_uri) == ("/opt/ml/input/data/train", "/opt/ml/model")


def test_vertex_ai_conventions():
    spec = {"cluster": {"workerpool0": ["cmle-training-workerpool0-0:2222"],
                        "workerpool1": ["cmle-training-workerpool1-0:2222", "cmle-training-workerpool1-1:2222"]},
            "task": {"type": "workerpool1", "index": 1}, "environment": "cloud"}
    env = {"MLFACTORY_RUNTIME": "gcp", "CLUSTER_SPEC": json.dumps(spec), "AIP_MODEL_DIR": "gs://b/model/", "AIP_CHECKPOINT_DIR": "gs://b/checkpoints/",
           "AIP_TRAINING_DATA_URI": "gs://b/train/", "CLOUD_ML_JOB_ID": "123"}
    cluster = Cluster.from_environ(env, nproc_per_node=1)
    assert (cluster.platform, cluster.nodes, cluster.node_rank, cluster.master_addr) == (
        "vertex", 3, 2, "cmle-training-workerpool0-0")
    places = data_locations(env)
    assert (places.train_uri, places.output_uri, places.checkpoint_uri) == (
        "gs://b/train/", "gs://b/model/", "gs://b/checkpoints/")


def test_azure_ml_conventions_per_node_and_per_process():
    per_node = {"MLFACTORY_RUNTIME": "azure", "AZUREML_RUN_ID": "run-1", "NODE_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.4",
                "MASTER_PORT": "6105"}
    cluster = Cluster.from_environ(per_node, nproc_per_node=4)
    assert (cluster.platform, cluster.nodes, cluster.node_rank, cluster.master_addr, cluster.master_port) == (
        "azureml", 2, 1, "10.0.0.4", 6105)
    assert not launched_by_torchrun(per_node)
    command = cluster.torchrun_command("mlfactory.training.train", hyperparameters(epochs=1))
    assert "--nnodes=2" in command and "--node-rank=1" in command and "--master-addr=10.0.0.4" in command
    # Azure ML's per-process launch sets what torchrun sets: the entrypoint then trains directly.
    assert launched_by_torchrun({**per_node, "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"})


def test_local_default_is_one_node():
    cluster = Cluster.from_environ({}, nproc_per_node=2)
    assert (cluster.platform, cluster.nodes, cluster.world_size, cluster.master_addr) == ("local", 1, 2, "127.0.0.1")
    assert data_locations({}).train_uri is None
    # another platform's variables mean nothing to a container not told it runs there
    stray = {"SM_HOSTS": '["algo-1", "algo-2"]', "SM_CHANNEL_TRAIN": "/opt/ml/input/data/train"}
    assert Cluster.from_environ(stray).nodes == 1 and data_locations(stray).train_uri is None
    with pytest.raises(ValueError, match="'nowhere' is not a registered backend"):
        Cluster.from_environ({"MLFACTORY_RUNTIME": "nowhere"})


# ---------------------------------------------------------------------------------------------
# Job specs and the search


def test_job_spec_arguments_are_what_the_entrypoint_parses():
    spec = TrainingJobSpec(name="run-1-t0", input_uri="file:///d", output_uri="file:///o", checkpoint_uri="file:///c",
                           hyperparameters={"epochs": 3, "learning_rate": 0.01, "hidden_sizes": [64, 32]},
                           tags={"mlfactory.trial": "0"})
    args = parse_args(spec.arguments(), env={})
    assert (args.train_uri, args.output_uri, args.checkpoint_uri) == ("file:///d", "file:///o", "file:///c")
    assert (args.hyperparameters, args.tag) == (spec.hyperparameters, ["mlfactory.trial=0"])
    assert (args.hyperparameters.epochs, args.hyperparameters.hidden_sizes) == (3, [64, 32])
    assert TrainingJobSpec.model_validate(json.loads(spec.model_dump_json())) == spec  # travels through XCom
    with pytest.raises(ValueError, match="needs count >= 1"):
        Accelerator(kind="gpu")
    with pytest.raises(ValueError, match="pattern"):
        TrainingJobSpec(name="Bad Name", input_uri="a", output_uri="b")


def test_search_grid_and_random():
    base = {"epochs": 3, "learning_rate": 0.003}
    space = {"learning_rate": [0.01, 0.001], "hidden_sizes": [[64], [128, 64]]}
    grid = search_trials(base, space, 3, "grid", seed=1)
    assert len(grid) == 3 and all(t["epochs"] == 3 for t in grid)
    assert grid[0] == {"epochs": 3, "learning_rate": 0.01, "hidden_sizes": [64]}
    sample = search_trials(base, space, 2, "random", seed=1)
    assert sample == search_trials(base, space, 2, "random", seed=1)  # seeded
    assert len({json.dumps(t, sort_keys=True) for t in sample}) == 2
    assert search_trials(base, {}, 4, "grid", seed=1) == [base]  # no space: one trial of the base
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        search_trials(base, {"momentum": [0.9]}, 2, "grid", seed=1)
