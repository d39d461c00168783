"""What ml_deploy shares on every backend: the version to deploy, its ``EndpointSpec``, the endpoint's
state in the bucket, and alias ``champion`` put back after a failed rollout.

Every backend rolls the spec out through the same steps and verdict (``mlfactory.serving.rollout``) with its own
endpoint adapter; all of them record the outcome in ``<bucket>/_mlfactory/endpoint/endpoint.json`` (what is served, where, the last
failure) and as tags ``mlfactory.serving.deployment*`` on the model version in MLflow.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timezone

from mlfactory import storage
from mlfactory.config import PipelineConfig
from mlfactory.specs import EndpointSizing, EndpointSpec, ModelRef, sizing

log = logging.getLogger(__name__)


class DeploymentFailed(RuntimeError):
    """A rollout step failed; the message says which and why."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def endpoint_state_uri(cfg: PipelineConfig) -> str:
    return storage.join(cfg.storage.state_uri, "endpoint", "endpoint.json")


def read_endpoint_state(cfg: PipelineConfig) -> dict:
    uri = endpoint_state_uri(cfg)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else {}


def write_endpoint_state(cfg: PipelineConfig, **changes) -> dict:
    state = {**read_endpoint_state(cfg), **changes}
    storage.write_bytes(endpoint_state_uri(cfg), json.dumps(state, indent=2).encode())
    return state


def record_failure(cfg: PipelineConfig, step: str, version: str, reason: str) -> None:
    """The failed step, for the rollback and for a person reading endpoint.json."""
    write_endpoint_state(cfg, last_failure={"step": step, "version": version, "reason": reason, "at": now()})


def version_to_deploy(cfg: PipelineConfig, asked: str | None, event_version: str | None) -> str:
    """The version a deployment run is for: the form's, else the `champion` event's, else the alias."""
    from mlfactory.registry import CHAMPION, Registry

    version = asked or event_version or Registry(cfg).alias_version(CHAMPION)
    if not version:
        raise ValueError(f"nothing to deploy: {cfg.model_name} has no `champion` yet; set 'version' in the form")
    return str(version)


def model_ref(cfg: PipelineConfig, version: str) -> ModelRef:
    """A registered version and its files in the bucket (what a cloud endpoint or batch job loads)."""
    from mlfactory.registry import Registry

    return ModelRef(name=cfg.model_name, version=str(version), uri=Registry(cfg).model_storage_uri(str(version)))


def endpoint_spec(cfg: PipelineConfig, version: str) -> EndpointSpec:
    """The pipeline's endpoint serving ``version``, sized and guarded as ``serving`` says."""
    return EndpointSpec(name=cfg.serving.endpoint_name or cfg.model_name, model=model_ref(cfg, version),
                        **sizing(cfg.serving, EndpointSizing))


def restore_after_failure(cfg: PipelineConfig, version: str | None) -> dict:
    """After a failed rollout of ``version`` (the backend has restored its traffic): alias `champion` back on
    the served version, and the failure tagged on ``version``."""
    from mlfactory.registry import Registry

    state = read_endpoint_state(cfg)
    served = state.get("served_version")
    reason = (state.get("last_failure") or {}).get("reason", "a deployment step failed")
    Registry(cfg).restore_champion(served, version)
    write_endpoint_state(cfg, rollout=None)  # the rollout is over: nothing left for a later rollback to undo
    if version:
        tag_version(cfg, version, {"mlfactory.deployment": "rolled_back", "mlfactory.deployment_reason": reason[:5000]})
    log.warning("rolled back v%s: %s; serving v%s", version, reason, served)
    return {"rolled_back": version, "serving": served, "reason": reason}


def tag_version(cfg: PipelineConfig, version: str, tags: dict) -> None:
    """Deployment tags (``mlfactory.serving.deployment*``) on the model version in MLflow."""
    from mlflow import MlflowClient

    client = MlflowClient(cfg.mlflow.tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, version, key, value)


def served(cfg: PipelineConfig, version: str, endpoint: str, tags: dict | None = None, **state) -> dict:
    """Record that ``version`` serves all traffic on ``endpoint`` (a URL or the cloud's endpoint name), with
    the backend's ``state``, in endpoint.json and as tags on the version. (``rollout`` is what a backend keeps
    for restoring traffic while a rollout is under way.)"""
    written = write_endpoint_state(cfg, served_version=version, endpoint=endpoint, deployed_at=now(), last_failure=None,
                                   rollout=None, **state)
    tag_version(cfg, version, {"mlfactory.deployment": "serving", "mlfactory.deployed_at": written["deployed_at"],
                               "mlfactory.endpoint": endpoint, **(tags or {})})
    return written


def holdout_requests(cfg: PipelineConfig, n: int) -> list[dict]:
    """``n`` rows of the frozen holdout as a JSON caller sends them (smoke tests, canary traffic, examples)."""
    from mlfactory.features import to_wire
    from mlfactory.training.data import frozen_holdout, read_holdout

    holdout = frozen_holdout(cfg)
    if holdout is None:
        raise DeploymentFailed(f"no frozen holdout under {cfg.storage.models_uri} to send requests from")
    rows = read_holdout(holdout.uri, holdout.sha256).head(n)
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in to_wire(rows, cfg.dataset).to_dict("records")]


def sane_prediction(prediction: dict) -> bool:
    """An answer a caller could use: a prediction, and probabilities that are probabilities."""
    if prediction.get("prediction") is None:
        return False
    return all(isinstance(v, int | float) and 0 <= v <= 1 for k, v in prediction.items() if k.startswith("probability"))
