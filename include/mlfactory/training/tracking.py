"""What a training run records in MLflow (rank 0 only): params, per-epoch metrics, the training set as a
dataset input with its digest, the training curves, and the model as a pyfunc over the raw feature
columns, with its signature, an input example, its code and pinned requirements."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

log = logging.getLogger("mlfactory.training.train")



class MlflowTracker:
    def __init__(self, mlflow, run_id: str):
        self.mlflow, self.run_id = mlflow, run_id

    @classmethod
    def start(cls, tracking_uri: str | None, experiment: str, run_name: str | None, resume_run_id: str | None,
              params: dict, tags: dict, dataset, frame, digest: str, source_uri: str) -> MlflowTracker | None:
        """A new run (or the checkpoint's run, resumed) with ``params``, ``tags`` and the training set as its
        dataset input; None without a tracking URI."""
        if not tracking_uri:
            log.info("MLflow: no tracking URI (--mlflow-tracking-uri or MLFLOW_TRACKING_URI); not logging")
            return None
        import warnings

        import mlflow

        # the training set's integer columns are typed; the hint is about serving, where the signature decides
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
        mlflow.set_tracking_uri(tracking_uri)
        if resume_run_id:
            run = mlflow.start_run(run_id=resume_run_id)
            return cls(mlflow, run.info.run_id)
        run = start_run(experiment, run_name)
        mlflow.log_params(params)
        mlflow.set_tags(tags)
        source = mlflow.data.from_pandas(frame, source=_dataset_source(source_uri), name=dataset.name,
                                         targets=dataset.target, digest=digest[:36])
        if (schema := frame_schema(frame)) is not None:
            source.schema = schema
        try:
            mlflow.log_input(source, context="training")
        except mlflow.exceptions.MlflowException:  # a parallel trial registered the same dataset first: reuse it
            time.sleep(1)
            mlflow.log_input(source, context="training")
        return cls(mlflow, run.info.run_id)

    def log_epoch(self, row: dict) -> None:
        self.mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch" and v == v}, step=row["epoch"])

    def finish(self, bundle: str, history: list[dict], dataset) -> dict:
        mlflow = self.mlflow
        mlflow.log_figure(_curves(history), "training_curves.png")
        model_info = log_pyfunc(bundle, dataset)
        mlflow.end_run()
        return {"mlflow_run_id": self.run_id, "model_uri": model_info.model_uri}


def _curves(history: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    val_keys = [k for k in (history[0] if history else {}) if k.startswith("val_")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(epochs, [h.get("train_loss", float("nan")) for h in history], marker="o")  # gbdt: none
    axes[0].set(title="training loss", xlabel="epoch")
    for key in val_keys:
        axes[1].plot(epochs, [h[key] for h in history], marker="o", label=key)
    axes[1].set(title="validation", xlabel="epoch")
    axes[1].legend()
    fig.tight_layout()
    return fig


MODEL_CODE = ("__init__.py", "dataset.py", "features.py", "hyperparameters.py", "tabular.py")  # what prediction imports, nothing more


def pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in
            ("mlflow", "torch", "pandas", "numpy", "pyarrow", "pydantic", "pyyaml", "scikit-learn", "xgboost-cpu")]


def frame_schema(frame):
    """The training set's MLflow schema (the dataset input's), inferred from the first 1,000 values of each column:
    the columns are typed (Parquet), and MLflow's own inference reads every value of each text column (~3 s on 100k
    rows). A column is optional where any of its rows is null. None when a column is null in every row (MLflow
    infers the schema itself then)."""
    from mlflow.models import infer_signature
    from mlflow.types import ColSpec, Schema

    columns = []
    for name in frame.columns:
        values = frame[[name]].dropna().head(1000)
        if values.empty:
            return None
        (spec,) = infer_signature(values).inputs.inputs
        columns.append(ColSpec(spec.type, name, required=not frame[name].isna().any()))
    return Schema(columns)


def log_pyfunc(bundle: str, dataset):
    """Log the model as a pyfunc over the RAW feature columns, with its code, signature and example.

    The signature is written from the config, as a JSON caller sends values: numbers as doubles,
    datetimes as ISO 8601 strings, categories as strings; a column the config allows to be null is
    optional.
    """
    import shutil

    import mlflow
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import ColSpec, Schema

    from mlfactory.features import FeatureSet, to_wire
    from mlfactory.tabular import LoadedModel

    wire = {"integer": "double", "float": "double", "datetime": "string", "boolean": "boolean"}
    columns = [dataset.column(name) for name in FeatureSet.of(dataset).raw_inputs]
    inputs = Schema([ColSpec(wire.get(c.type, "string"), c.name, required=c.required) for c in columns])
    example = to_wire(synthetic_rows(dataset, 2), dataset)
    outputs = infer_signature(example, LoadedModel(bundle).predict(example)).outputs
    signature = ModelSignature(inputs=inputs, outputs=outputs)
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "mlfactory"
        package.mkdir()
        here = Path(__file__).resolve().parents[1]  # the mlfactory package
        for name in MODEL_CODE:  # only what prediction imports: the model stays small and light
            shutil.copy(here / name, package / name)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(here / "model_code.py"),  # models-from-code: nothing pickled
            artifacts={"bundle": bundle},
            code_paths=[str(package)],
            signature=signature,
            input_example=example,
            pip_requirements=pip_requirements(),
        )


def synthetic_rows(dataset, rows: int):
    """``rows`` rows made up from the schema alone: the model's input example, so that no real row (a customer's)
    is stored with the model. A number is the middle of its bounds (or its one bound, else 0), a category its
    first listed value (an open vocabulary's: ``example``), a date its lower bound (else 2024-01-01), a flag false."""
    import pandas as pd

    out = {}
    for column in dataset.columns:
        if column.type in ("integer", "float"):
            bounds = [b for b in (column.min, column.max) if b is not None]
            value = sum(bounds) / len(bounds) if bounds else 0
            out[column.name] = [int(value) if column.type == "integer" else float(value)] * rows
        elif column.type == "datetime":
            out[column.name] = [pd.Timestamp(column.min or "2024-01-01")] * rows
        elif column.type == "boolean":
            out[column.name] = [False] * rows
        else:
            out[column.name] = [(column.categories or ["example"])[0]] * rows
    return pd.DataFrame(out)


def _dataset_source(uri: str):
    """``uri`` as MLflow's dataset source: MLflow's own where it has a resolver (files, s3://, http...), else a
    ``BucketDatasetSource`` that records the URI (MLflow resolves no abfs:// URI)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.exceptions import MlflowException

    try:
        return resolve_dataset_source(uri)
    except MlflowException:
        return _bucket_source_class()(uri)


def _bucket_source_class():
    import json

    from mlflow.data.dataset_source import DatasetSource

    class BucketDatasetSource(DatasetSource):
        """A training set in the pipeline's bucket, by its URI."""

        def __init__(self, uri: str):
            self.uri = uri

        @staticmethod
        def _get_source_type() -> str:
            return "mlfactory_bucket"

        def load(self, **kwargs):
            return self.uri

        @staticmethod
        def _can_resolve(raw_source) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source):
            return cls(str(raw_source))

        def to_dict(self) -> dict:
            return {"uri": self.uri}

        @classmethod
        def from_dict(cls, source_dict: dict):
            return cls(source_dict["uri"])

        def to_json(self) -> str:
            return json.dumps(self.to_dict())

    return BucketDatasetSource


def start_run(experiment: str, run_name: str | None):
    """A new MLflow run in ``experiment`` (created if missing), whatever ``MLFLOW_EXPERIMENT_ID`` says.

    The id goes to ``start_run`` explicitly: when parallel trials create the experiment at once, the loser's
    ``set_experiment`` returns it without making it active (MLflow 3.17), and ``start_run`` would then take
    ``MLFLOW_EXPERIMENT_ID`` from the environment, which may name another experiment."""
    import mlflow

    experiment_id = mlflow.set_experiment(experiment).experiment_id
    return mlflow.start_run(run_name=run_name, experiment_id=experiment_id)
