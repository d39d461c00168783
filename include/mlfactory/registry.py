"""The MLflow model registry and the promotion gate.

A candidate is registered as a new version with alias ``challenger``. It is compared with the
version that holds ``champion`` on the frozen holdout (the same rows every time, never trained on)
and, when its training set kept one out, on the recent window (rows new since the champion trained,
neither model trained on them); ``champion`` moves only when the challenger reaches the absolute floor
AND wins by the margin (on the recent window, holding the frozen holdout within a tolerance, when there
is one; ``decide``); the replaced champion keeps alias ``previous`` for rollback. The decision, the
metrics and the reason are written as tags on the challenger's version.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from mlfactory.config import PipelineConfig
from mlfactory.dataset import DatasetSpec
from mlfactory.features import to_wire
from mlfactory.tabular import primary_metric

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
HOLDOUT_URI_TAG, HOLDOUT_SHA_TAG = "mlfactory.holdout_uri", "mlfactory.holdout_sha256"
TRAINING_SET_TAG = "mlfactory.training_set_uri"  # on each version: its training data, the drift reference


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    metric: str
    challenger: float
    champion: float | None
    champion_version: str | None
    margin: float
    floor: float
    recent_challenger: float | None = None  # the two models on the recent window, when there is one
    recent_champion: float | None = None
    tolerance: float = 0.0

    def tags(self) -> dict[str, str]:
        def number(value: float | None) -> str:
            return "" if value is None else f"{value:.6f}"

        return {
            "mlfactory.decision": "promoted" if self.promote else "rejected",
            "mlfactory.reason": self.reason,
            "mlfactory.metric": self.metric,
            f"mlfactory.holdout_{self.metric}": number(self.challenger),
            f"mlfactory.champion_{self.metric}": number(self.champion),
            "mlfactory.champion_version": self.champion_version or "",
            f"mlfactory.recent_{self.metric}": number(self.recent_challenger),
            f"mlfactory.recent_champion_{self.metric}": number(self.recent_champion),
        }

    def to_dict(self) -> dict:
        return asdict(self)


def decide(metric: str, challenger: float, champion: float | None, champion_version: str | None,
           margin: float, floor: float, recent: tuple[float, float] | None = None, tolerance: float = 0.0) -> Decision:
    """The gate, as a pure function of the scores (higher is better). ``recent``: (challenger, champion) on
    the recent window, rows neither trained on. Without one, the challenger must beat the champion on the
    frozen holdout by ``margin``. With one, it must not trail the champion on the frozen holdout by more
    than ``tolerance`` (the old season must not be forgotten) and must beat it on the recent window by
    ``margin`` (the new one must be learnt): the frozen holdout alone favours the champion whenever the
    data changed since it was frozen."""

    def verdict(promote: bool, reason: str) -> Decision:
        return Decision(promote, reason, metric, challenger, champion, champion_version, margin, floor,
                        *(recent or (None, None)), tolerance if recent else 0.0)

    if not math.isfinite(challenger):
        return verdict(False, f"challenger {metric} on the holdout is not a number")
    if challenger < floor:
        return verdict(False, f"challenger {metric} {challenger:.4f} is below the floor {floor:.4f}")
    if champion is None:
        return verdict(True, f"no champion yet; challenger {metric} {challenger:.4f} passes the floor {floor:.4f}")
    if recent is not None:
        new, old = recent
        holdout = (f"on the frozen holdout {challenger:.4f} vs champion v{champion_version} {champion:.4f} "
                   f"({challenger - champion:+.4f}, tolerance {tolerance:.4f})")
        window = f"on the recent window {new:.4f} vs {old:.4f} ({new - old:+.4f}, margin {margin:.4f})"
        if challenger < champion - tolerance:
            return verdict(False, f"challenger {metric} trails {holdout}; {window}")
        if not (math.isfinite(new) and new >= old + margin):
            return verdict(False, f"challenger {metric} does not win {window}; {holdout}")
        return verdict(True, f"challenger {metric} wins {window} and holds {holdout}")
    if challenger >= champion + margin:
        return verdict(True, f"challenger {metric} {challenger:.4f} beats champion v{champion_version} "
                             f"{champion:.4f} by {challenger - champion:+.4f} (margin {margin:.4f})")
    return verdict(False, f"challenger {metric} {challenger:.4f} does not beat champion v{champion_version} "
                          f"{champion:.4f} by the margin {margin:.4f} ({challenger - champion:+.4f})")


def holdout_score(dataset: DatasetSpec, holdout: pd.DataFrame, predictions: pd.DataFrame) -> float:
    """The primary metric of ``predictions`` (a model's output frame) against the holdout's labels."""
    from sklearn import metrics

    truth = holdout[dataset.target]
    if dataset.task == "regression":
        return float(metrics.r2_score(pd.to_numeric(truth).astype(float), predictions["prediction"].astype(float)))
    target = dataset.column(dataset.target)
    if target.type == "boolean":
        classes = [False, True]
        labels = truth.astype(bool).to_numpy()
    else:
        classes = list(target.categories or [])
        labels = truth.astype(str).to_numpy()
    if len(classes) == 2:
        y = (labels == classes[1]).astype(int)
        return float(metrics.roc_auc_score(y, predictions["probability"].astype(float))) if len(np.unique(y)) == 2 else math.nan
    proba = np.column_stack([predictions[f"probability_{c}"].astype(float) for c in classes])
    return float(metrics.roc_auc_score(labels, proba, multi_class="ovr", labels=classes))


def score_model(model_uri: str, dataset: DatasetSpec, holdout: pd.DataFrame) -> float:
    """Load ``model_uri`` (read, never run: ``load_logged_model``) and score it on the holdout's RAW feature columns."""
    from mlfactory.tabular import load_logged_model

    model, _ = load_logged_model(model_uri)
    return holdout_score(dataset, holdout, model.predict(to_wire(holdout, dataset)))


class Registry:
    """The registered model of one pipeline, through a real MLflow tracking server."""

    def __init__(self, cfg: PipelineConfig):
        import mlflow
        from mlflow import MlflowClient

        mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
        self.cfg, self.name = cfg, cfg.model_name
        self.client = MlflowClient(cfg.mlflow.tracking_uri)

    def register(self, model_uri: str, run_id: str | None, tags: dict[str, str]) -> str:
        """A new version of ``model_uri`` with alias ``challenger``; returns the version."""
        import mlflow
        from mlflow.exceptions import RestException

        try:
            self.client.get_registered_model(self.name)
        except RestException:
            self.client.create_registered_model(self.name, description=f"mlfactory model of {self.cfg.dataset.name}")
        version = mlflow.register_model(model_uri, self.name, tags={k: str(v) for k, v in tags.items()}).version
        self.client.set_registered_model_alias(self.name, CHALLENGER, version)
        log.info("registered %s version %s (run %s) as %s", self.name, version, run_id, CHALLENGER)
        return str(version)

    def check_own_model(self, model_uri: str) -> None:
        """A model given by hand (the trigger form) must be one this pipeline's experiment logged: a logged
        model ``models:/m-<id>`` or a run's ``runs:/<id>/<path>``; anything else is refused, naming it."""
        import re

        from mlflow.exceptions import MlflowException

        from mlfactory.specs import HAND_MODEL_URI

        found = re.fullmatch(HAND_MODEL_URI, model_uri)
        if not found or "/../" in model_uri or model_uri.endswith("/.."):
            raise ValueError(f"model_uri {model_uri!r} is not models:/m-<id> or runs:/<run id>/<path>")
        experiment = self.client.get_experiment_by_name(self.cfg.mlflow.experiment)
        try:
            owner = (self.client.get_logged_model(found[1]).experiment_id if found[1]
                     else self.client.get_run(found[2]).info.experiment_id)
        except MlflowException as err:
            raise ValueError(f"model_uri {model_uri!r}: MLflow has no such model: {err.message}") from None
        if experiment is None or owner != experiment.experiment_id:
            raise ValueError(f"model_uri {model_uri!r} was logged in another experiment ({owner}); this pipeline "
                             f"registers only models of experiment {self.cfg.mlflow.experiment!r}")

    def alias_version(self, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.name, alias).version)
        except MlflowException:
            return None

    def model_storage_uri(self, version: str) -> str:
        """Where ``version``'s files are in the bucket (e.g. s3://...): what a cloud endpoint or batch
        job loads. The server's proxied ``mlflow-artifacts:/`` paths live under ``storage.mlflow_prefix``."""
        uri = self.client.get_model_version_download_uri(self.name, version)
        if uri.startswith("mlflow-artifacts:"):
            return self.cfg.storage.mlflow_artifacts_uri.rstrip("/") + "/" + uri.split(":", 1)[1].lstrip("/")
        return uri

    def restore_champion(self, served: str | None, failed: str | None) -> bool:
        """After a failed rollout of ``failed``: alias `champion` back on the ``served`` version (if the
        alias still points at the failed one). True if it moved."""
        if not (served and failed and served != failed and self.alias_version(CHAMPION) == failed):
            return False
        self.client.set_registered_model_alias(self.name, CHAMPION, served)
        log.warning("%s: champion back on v%s (v%s failed to deploy)", self.name, served, failed)
        return True

    def check_holdout_tags(self, frozen_uri: str, frozen_sha256: str) -> None:
        """The gate trusts the pipeline's own record of the holdout (the manifest ml_train froze in the bucket),
        never the registered model's tags, which anyone with registry write access can edit: tags that name
        another holdout or hash are refused, naming both."""
        tags = self.client.get_registered_model(self.name).tags
        recorded = (tags.get(HOLDOUT_URI_TAG, frozen_uri), tags.get(HOLDOUT_SHA_TAG, frozen_sha256))
        if recorded != (frozen_uri, frozen_sha256):
            raise ValueError(f"registered model {self.name}'s holdout tags ({HOLDOUT_URI_TAG}={recorded[0]}, "
                             f"{HOLDOUT_SHA_TAG}={recorded[1][:12]}…) differ from the holdout this pipeline froze "
                             f"({frozen_uri}, sha256 {frozen_sha256[:12]}…): refusing to compare on either; the tags "
                             "were edited, or the model belongs to another pipeline")

    def evaluate(self, version: str, holdout: pd.DataFrame, recent: pd.DataFrame | None = None) -> Decision:
        """Score challenger ``version`` and the champion on the holdout (and on the ``recent`` window, rows
        neither trained on), decide, tag the version."""
        metric = primary_metric(self.cfg.dataset.task)
        challenger = score_model(f"models:/{self.name}/{version}", self.cfg.dataset, holdout)
        champion_version = self.alias_version(CHAMPION)
        champion = window = None
        if champion_version is not None:
            champion = score_model(f"models:/{self.name}/{champion_version}", self.cfg.dataset, holdout)
            if recent is not None:
                window = tuple(score_model(f"models:/{self.name}/{v}", self.cfg.dataset, recent)
                               for v in (version, champion_version))
        gate = self.cfg.promotion
        decision = decide(metric, challenger, champion, champion_version, gate.margin, gate.floor, window,
                          gate.holdout_tolerance)
        for key, value in decision.tags().items():
            self.client.set_model_version_tag(self.name, version, key, value)
        log.info("%s v%s: %s — %s", self.name, version, "PROMOTE" if decision.promote else "REJECT", decision.reason)
        return decision

    def promote(self, version: str, holdout_uri: str, holdout_sha256: str) -> dict:
        """Move ``champion`` to ``version``; the replaced champion gets ``previous``."""
        replaced = self.alias_version(CHAMPION)
        if replaced == version:
            return {"model_name": self.name, "version": version, "previous_version": None}
        if replaced is not None:
            self.client.set_registered_model_alias(self.name, PREVIOUS, replaced)
        else:  # the first champion: keep the holdout it was judged on with the registered model
            self.client.set_registered_model_tag(self.name, HOLDOUT_URI_TAG, holdout_uri)
            self.client.set_registered_model_tag(self.name, HOLDOUT_SHA_TAG, holdout_sha256)
        self.client.set_registered_model_alias(self.name, CHAMPION, version)
        log.info("%s: champion is now v%s (previous: v%s)", self.name, version, replaced)
        return {"model_name": self.name, "version": version, "previous_version": replaced,
                "model_uri": f"models:/{self.name}/{version}"}


# ---------------------------------------------------------------------------------------------
# ml_promote's steps


def candidate_from(form_model_uri: str | None, event_extras: list[dict]) -> dict:
    """The candidate to register: the model URI given in the trigger form, else the latest `candidate`
    event's (ml_train's best trial)."""
    if form_model_uri:
        return {"model_uri": form_model_uri, "mlflow_run_id": None}
    if not event_extras:
        raise ValueError("nothing to promote: no `candidate` event started this run; set 'model_uri' in the form")
    candidate = event_extras[-1]
    if not candidate.get("model_uri"):
        raise ValueError(f"the candidate has no MLflow model URI (was MLflow reachable from training?): {candidate}")
    return candidate


def register_candidate(cfg: PipelineConfig, candidate: dict) -> dict:
    """A new version of the candidate with alias ``challenger``, tagged with its run, metric and training set."""
    tags = {"mlfactory.mlflow_run_id": candidate.get("mlflow_run_id") or "",
            "mlfactory.validation_metric": f"{candidate.get('metric')}={candidate.get('value')}",
            TRAINING_SET_TAG: (candidate.get("training_set") or {}).get("uri", "")}
    version = Registry(cfg).register(candidate["model_uri"], candidate.get("mlflow_run_id"), tags)
    return {"version": version, **candidate}


def evaluate_challenger(cfg: PipelineConfig, version: str, recent: dict | None = None) -> dict:
    """Challenger ``version`` vs the champion on the frozen holdout, and on the recent window its training
    set kept out (``recent``: {uri, sha256}, from ml_train's candidate event: Airflow's record, not an
    editable tag); the decision is tagged on the version."""
    from mlfactory.training.data import frozen_holdout, read_holdout

    registry = Registry(cfg)
    frozen = frozen_holdout(cfg)
    if frozen is None:
        raise ValueError(f"no frozen holdout under {cfg.storage.models_uri}: ml_train freezes one on its first run")
    registry.check_holdout_tags(frozen.uri, frozen.sha256)
    window = read_holdout(recent["uri"], recent["sha256"]) if recent else None
    decision = registry.evaluate(version, read_holdout(frozen.uri, frozen.sha256), window)
    return {**decision.to_dict(), "version": version, "holdout_uri": frozen.uri, "holdout_sha256": frozen.sha256,
            "recent_uri": recent["uri"] if recent else None}
