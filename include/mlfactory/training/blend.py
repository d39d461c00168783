"""ml_train's blend: the weighted average of the best trial of each model family, when it beats every trial.

On tabular data the network and the trees are often close, and which one scores better on the validation
rows is partly chance; their errors differ, so their average is usually better than either (on the P7
datasets, +0.0002 to +0.001 ROC AUC or R² on the frozen holdout over the better one, at the weight chosen
on the validation rows). Each trial leaves its scores on the validation rows beside its model
(``train.write_validation``: the early-stopped trees', the kept epoch's network); the weight of the better
of the two goes over ``WEIGHTS`` and the one with the best validation metric wins. The blend is the
candidate only when it beats the best trial there; with a weight of 0 or 1 it is that trial alone.
``training.blend: false`` turns it off.

The blend is one model file (``tabular.save_blend``: the members' bundles and weights) logged to MLflow as
its own run, whose tags name its members' runs: the registry, the gate, the model server and batch scoring
take it like any other model.
"""

from __future__ import annotations

import io
import logging

from mlfactory import storage
from mlfactory.specs import MODEL_FILE, VALIDATION_FILE

log = logging.getLogger("mlfactory.training.blend")

WEIGHTS = [i / 20 for i in range(21)]  # the first member's weight; the second has the rest
MEMBERS_TAG = "mlfactory.blend_of"


def read_validation(model_bundle_uri: str) -> dict | None:
    """The validation file beside a trial's model, or None where the trial left none (an older trainer)."""
    import numpy as np

    uri = storage.join(model_bundle_uri.rsplit("/", 1)[0], VALIDATION_FILE)
    if not storage.exists(uri):
        return None
    with np.load(io.BytesIO(storage.read_bytes(uri))) as data:
        return {name: data[name] for name in ("rows", "scores", "target")}


def family(result: dict) -> str:
    """A trial's model family (a trial's hyperparameters always name it; the entrypoint's default is mlp)."""
    return result["hyperparameters"].get("model", "mlp")


def family_leaders(results: list[dict]) -> list[dict]:
    """The best trial of each model family, best first."""
    leaders: dict[str, dict] = {}
    for result in sorted(results, key=lambda r: -r["value"]):
        leaders.setdefault(family(result), result)
    return list(leaders.values())


def weigh(pre, a: dict, b: dict) -> tuple[float, float] | None:
    """(the weight of ``a``, the blend's validation metric) at the best weight for two validation files, or
    None when they do not hold the same validation rows. ``pre``: a member's preprocessor (its task, classes
    and target scale; the same for both, fitted on the same training rows)."""
    import numpy as np
    import torch

    from mlfactory.tabular import metrics, primary_metric

    if a["rows"].shape != b["rows"].shape or not np.array_equal(a["rows"], b["rows"]):
        return None
    key = primary_metric(pre.task)
    target = torch.from_numpy(a["target"])
    value = {w: metrics(pre, target, w * a["scores"].astype(np.float64) + (1 - w) * b["scores"])[key] for w in WEIGHTS}
    best = max(WEIGHTS, key=lambda w: (value[w], -abs(w - 0.5)))  # ties: the more even blend
    return best, value[best]


def blend(cfg, prepared: dict, results: list[dict], best: dict, folder: str) -> dict | None:
    """The blend of the best trial of each family as a candidate (``select_best``'s fields), written under
    ``folder`` and logged to MLflow, when it beats ``best`` on the validation rows; else None."""
    import torch

    from mlfactory.tabular import Preprocessor

    leaders = family_leaders(results)
    if len(leaders) < 2:
        return None
    first, second = leaders[:2]
    validation = []
    for leader in (first, second):
        if not leader.get("mlflow_run_id"):
            log.info("no blend: trial %s was not logged to MLflow", leader["hyperparameters"])
            return None
        validation.append(read_validation(leader["model_bundle_uri"]))
        if validation[-1] is None:
            log.info("no blend: %s has no %s beside it", leader["model_bundle_uri"], VALIDATION_FILE)
            return None
    bundles = [torch.load(io.BytesIO(storage.read_bytes(m["model_bundle_uri"])), map_location="cpu", weights_only=True)
               for m in (first, second)]
    weighed = weigh(Preprocessor(**bundles[0]["preprocessor"]), *validation)
    if weighed is None:
        log.info("no blend: the trials were validated on different rows")
        return None
    weight, value = weighed
    weights = {family(first): weight, family(second): 1 - weight}
    print(" + ".join(f"{w:.2f} x {name}" for name, w in weights.items()), f"(blend): {best['metric']} {value:.4f}")
    if not (0 < weight < 1 and value > best["value"]):  # a NaN metric (one class among the rows) never wins
        print(f"the best trial alone stays the candidate ({best['metric']} {best['value']:.4f})")
        return None
    bundle_uri = storage.join(folder, MODEL_FILE)
    logged = _write_and_log(cfg, prepared, (first, second), bundles, weights, bundle_uri, best["metric"], value)
    return {**logged, "model_bundle_uri": bundle_uri, "metric": best["metric"], "value": value,
            "hyperparameters": {"model": "blend", "weights": weights,
                                "members": [m["hyperparameters"] for m in (first, second)]}}


def _write_and_log(cfg, prepared: dict, members, bundles, weights: dict[str, float], bundle_uri: str, metric: str,
                   value: float) -> dict:
    """The blend's model file at ``bundle_uri``, and its MLflow run and logged model. ``weights``: each member's
    family -> its weight, in member order."""
    import tempfile
    from pathlib import Path

    import mlflow
    from mlfactory.dataset import DatasetSpec
    from mlfactory.tabular import save_blend
    from mlfactory.training.tracking import log_pyfunc, start_run

    dataset = DatasetSpec.model_validate(bundles[0]["dataset"])
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    client = mlflow.MlflowClient()
    tags = {k: v for k, v in client.get_run(members[0]["mlflow_run_id"]).data.tags.items()
            if k.startswith("mlfactory.") and k != "mlfactory.trial"}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / MODEL_FILE)
        save_blend(path, dataset, bundles, list(weights.values()))
        storage.write_bytes(bundle_uri, Path(path).read_bytes())
        with start_run(cfg.mlflow.experiment, "blend"):
            mlflow.set_tags({**tags, MEMBERS_TAG: ",".join(m["mlflow_run_id"] for m in members)})
            mlflow.log_params({"model": "blend", "train_uri": prepared["training_set"]["uri"],
                               **{f"weight_{name}": round(w, 4) for name, w in weights.items()}})
            mlflow.log_metric(metric, value)
            run_id = mlflow.active_run().info.run_id
            info = log_pyfunc(path, dataset)
    log.info("blend logged: run %s, model %s, file %s", run_id, info.model_uri, bundle_uri)
    return {"mlflow_run_id": run_id, "model_uri": info.model_uri}
