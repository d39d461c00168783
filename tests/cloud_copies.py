"""What the cloud backends' tests put where the cloud would find it: files copied into the emulated bucket,
the spec of a short training job on them, another registered version of the served model, and the endpoint
spec of a version whose files are the copied champion's."""

from __future__ import annotations

from pathlib import Path


def copy_tree(local: Path, uri: str) -> None:
    from mlfactory import storage

    for path in local.rglob("*"):
        if path.is_file():
            storage.write_bytes(storage.join(uri, str(path.relative_to(local))), path.read_bytes())


def training_job_spec(bucket: str, **changes) -> dict:
    """A short training job on the training set copied to ``bucket``/models/training_sets/ts1."""
    from mlfactory.specs import TrainingJobSpec

    fields = dict(name="run-1-t0", input_uri=f"{bucket}/models/training_sets/ts1",
                  output_uri=f"{bucket}/models/runs/run-1/trial-0",
                  hyperparameters={"epochs": 4, "learning_rate": 0.003, "batch_size": 512, "hidden_sizes": [32]},
                  max_runtime_s=1800)
    return TrainingJobSpec(**{**fields, **changes}).model_dump()


def another_version(client) -> str:
    """A new registered version of churn_served (the same model as v1)."""
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)
    return str(mlflow.register_model(client.get_model_version("churn_served", "1").source, "churn_served").version)


def endpoint_spec(model_uri: str, version: str) -> dict:
    """The config's endpoint serving ``version`` of churn_served, whose files are at ``model_uri``."""
    from mlfactory.config import load_config
    from mlfactory.specs import EndpointSizing, EndpointSpec, ModelRef, sizing

    cfg = load_config()
    return EndpointSpec(name=cfg.serving.endpoint_name, model=ModelRef(name="churn_served", version=version,
                                                                         uri=model_uri),
                        **sizing(cfg.serving, EndpointSizing)).model_dump()
