"""A model version loaded once by the server: its signature, and predict over checked columns."""

from __future__ import annotations

import math

from mlfactory.serving.payloads import InputColumn, Signature



class ServedModel:
    """An MLflow model loaded once: its signature, and predict over checked columns."""

    def __init__(self, model_uri: str, version: str | None = None):
        from mlfactory.tabular import load_logged_model

        # a cloud endpoint loads the files (s3://...) and is told the registered version beside them
        self.model_uri, self.version = model_uri, version or _resolve_version(model_uri)
        # Read, never run: no code stored with the model is executed (see load_logged_model). The checked
        # columns go straight into Arrow and numpy: no pyfunc schema enforcement and no DataFrame on the hot
        # path (the request was already checked against the signature, with messages that say why).
        self.tabular, meta = load_logged_model(model_uri)
        self.signature = _signature(meta.get_input_schema(), self.tabular.dataset)

    def predict(self, columns: dict[str, list]) -> dict[str, list]:
        """Checked input columns -> output columns (lists of plain Python values; JSON has no NaN: null)."""
        outputs = self.tabular.predict_wire(columns)
        return {name: [None if isinstance(v, float) and math.isnan(v) else v for v in values]
                for name, values in outputs.items()}


def _signature(schema, dataset) -> Signature:
    if schema is None:
        raise ValueError("the model has no input signature; log it with one so requests can be checked")
    datetimes = {c.name for c in dataset.columns if c.type == "datetime"}
    inputs = [InputColumn(spec.name, spec.type.name if hasattr(spec.type, "name") else str(spec.type),
                          getattr(spec, "required", True), spec.name in datetimes) for spec in schema.inputs]
    taken = {c.name for c in inputs}
    ignored = tuple(c.name for c in dataset.columns if c.name not in taken)
    return Signature(inputs, ignored, echo=tuple(c.name for c in dataset.columns if c.name in ignored and c.type == "string"))


def _resolve_version(model_uri: str) -> str:
    """models:/name@alias and models:/name/3 -> the version number it is now; other URIs as given."""
    if not model_uri.startswith("models:/"):
        return model_uri
    from mlflow import MlflowClient

    name, _, ref = model_uri[len("models:/"):].partition("@")
    if ref:
        return str(MlflowClient().get_model_version_by_alias(name, ref).version)
    name, _, version = model_uri[len("models:/"):].rpartition("/")
    return version if version.isdigit() else model_uri


def mounted_model(root: str) -> str:
    """The MLflow model folder under a platform's model mount (Azure ML's holds the registered folder by
    its own name): ``root`` itself when it has an MLmodel file, else the one folder
    below it that does."""
    import os

    if os.path.isfile(os.path.join(root, "MLmodel")):
        return root
    found = sorted(os.path.dirname(os.path.join(d, "MLmodel")) for d, _, files in os.walk(root) if "MLmodel" in files)
    if len(found) != 1:
        raise FileNotFoundError(f"expected one MLflow model (a folder with an MLmodel file) under {root}, found "
                                f"{len(found)}: {found[:3]}")
    return found[0]
