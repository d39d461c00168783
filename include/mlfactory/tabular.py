"""The tabular model: preprocessing fitted on training rows, a PyTorch network, and the MLflow pyfunc.

Numeric features are standardised (with a missing-value indicator each), booleans become 0/1 (plus
an indicator), and each categorical column gets an embedding; the configured categories fix the
vocabulary, or, for an open-vocabulary column, its most frequent training values (``vocabulary``);
index 0 is "other or missing". The pyfunc wraps all of it, so a caller sends the RAW
feature columns and gets predictions: no preprocessing to repeat on the serving side.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from mlfactory.hyperparameters import CHOICES
from mlfactory.dataset import DatasetSpec
from mlfactory.features import FeatureSet, numeric_arrow, numeric_matrix, typed_features, wire_table


def primary_metric(task: str) -> str:
    """The metric every stage compares on (validation, search, promotion); higher is better."""
    return "roc_auc" if task == "classification" else "r2"


@dataclass
class Preprocessor:
    numeric: list[str]
    mean: list[float]
    std: list[float]
    boolean: list[str]
    categorical: dict[str, list[str]]
    task: str
    classes: list[str] | None  # classification labels in output order; None for regression
    target_mean: float = 0.0
    target_std: float = 1.0

    @classmethod
    def fit(cls, frame: pd.DataFrame, dataset: DatasetSpec) -> Preprocessor:
        features = FeatureSet.of(dataset)
        values = numeric_matrix(frame, features.numeric)
        with np.errstate(invalid="ignore"):
            mean = np.nan_to_num(np.nanmean(values, axis=0)) if len(values) else np.zeros(values.shape[1])
            std = np.nan_to_num(np.nanstd(values, axis=0)) if len(values) else np.ones(values.shape[1])
        std[std < 1e-9] = 1.0
        target = dataset.column(dataset.target)
        classes = None
        target_mean, target_std = 0.0, 1.0
        if dataset.task == "classification":
            classes = ["False", "True"] if target.type == "boolean" else list(target.categories or [])
        else:
            y = pd.to_numeric(frame[dataset.target], errors="coerce").astype("float64")
            target_mean, target_std = float(y.mean()), float(y.std(ddof=0) or 1.0)
        return cls(
            numeric=features.numeric,
            mean=mean.tolist(),
            std=std.tolist(),
            boolean=features.boolean,
            categorical={name: cats or vocabulary(frame[name], dataset.column(name).max_categories)
                         for name, cats in features.categorical.items()},
            task=dataset.task,
            classes=classes,
            target_mean=target_mean,
            target_std=target_std,
        )

    @property
    def numeric_width(self) -> int:
        return 2 * len(self.numeric) + 2 * len(self.boolean)

    @property
    def cardinalities(self) -> list[int]:
        return [len(cats) + 1 for cats in self.categorical.values()]

    @property
    def outputs(self) -> int:
        return 1 if self.classes is None or len(self.classes) == 2 else len(self.classes)

    def encode(self, frame: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        """Typed feature rows -> (float features, categorical indices)."""
        values = numeric_matrix(frame, self.numeric)
        missing = np.isnan(values)
        scaled = (np.where(missing, np.asarray(self.mean), values) - np.asarray(self.mean)) / np.asarray(self.std)
        parts = [scaled, missing.astype(np.float64)]
        if self.boolean:
            flags = np.column_stack([frame[c].astype("boolean").to_numpy(dtype=np.float64, na_value=np.nan) for c in self.boolean])
            parts += [np.nan_to_num(flags, nan=0.0), np.isnan(flags).astype(np.float64)]
        dense = torch.from_numpy(np.hstack(parts).astype(np.float32))
        codes = [
            pd.Categorical(frame[c].astype("string"), categories=cats).codes.astype(np.int64) + 1
            for c, cats in self.categorical.items()
        ]
        cats = torch.from_numpy(np.column_stack(codes)) if codes else torch.zeros((len(frame), 0), dtype=torch.int64)
        return dense, cats

    def encode_table(self, table: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode`` for an Arrow table (serving and batch scoring: no pandas); the same numbers.
        Built feature-major, one contiguous float32 row per feature, and handed over transposed:
        5x faster than filling a row-major block column by column, and the network's first op
        (``torch.cat``) copies either layout once. The arithmetic runs once over the whole block,
        so a one-row request costs few numpy calls."""
        n, k, b = table.num_rows, len(self.numeric), len(self.boolean)
        mean, std, vocabularies = self._arrow_constants
        values = np.empty((k + b, n), dtype=np.float64)
        for j, name in enumerate(self.numeric):
            values[j] = numeric_arrow(table.column(name))
        for i, name in enumerate(self.boolean):
            column = table.column(name)
            values[k + i] = column.to_numpy() if column.null_count == 0 else pc.cast(column, pa.float64()).to_numpy(
                zero_copy_only=False)
        missing = np.isnan(values)
        values[:k] -= mean
        values[:k] /= std
        values[missing] = 0.0
        dense = np.empty((self.numeric_width, n), dtype=np.float32)
        dense[:k], dense[k:2 * k] = values[:k], missing[:k]
        dense[2 * k:2 * k + b], dense[2 * k + b:] = values[k:], missing[k:]
        cats = np.empty((len(vocabularies), n), dtype=np.int64)
        for j, (name, vocabulary) in enumerate(vocabularies.items()):
            column = table.column(name)
            index = pc.index_in(column if column.type == pa.string() else pc.cast(column, pa.string()), value_set=vocabulary)
            cats[j] = (index if index.null_count == 0 else pc.fill_null(index, -1)).to_numpy(zero_copy_only=False)
        cats += 1
        return torch.from_numpy(dense).T, torch.from_numpy(cats).T

    @cached_property
    def _arrow_constants(self) -> tuple[np.ndarray, np.ndarray, dict[str, pa.Array]]:
        """What encode_table needs besides the rows, built once (it runs per request when serving)."""
        return (np.asarray(self.mean)[:, None], np.asarray(self.std)[:, None],
                {c: pa.array(cats, pa.string()) for c, cats in self.categorical.items()})

    def encode_target(self, series: pd.Series) -> torch.Tensor:
        if self.classes is None:
            y = (pd.to_numeric(series, errors="coerce").astype("float64").to_numpy() - self.target_mean) / self.target_std
            return torch.from_numpy(y.astype(np.float32))
        labels = series.astype("string")
        if len(self.classes) == 2 and pd.api.types.is_bool_dtype(series):
            labels = series.map({True: "True", False: "False"}).astype("string")
        index = pd.Categorical(labels, categories=self.classes).codes
        if (index < 0).any():
            raise ValueError(f"target has labels outside {self.classes}")
        return torch.from_numpy(index.astype(np.float32 if len(self.classes) == 2 else np.int64))


def vocabulary(values: pd.Series, limit: int) -> list[str]:
    """An open-vocabulary column's categories: its values seen at least twice, the ``limit`` most
    frequent (ties by value, so the same rows give the same list). A value seen once would get an
    embedding trained on one row; it shares index 0 ("other") with every value unseen in training."""
    counts = values.dropna().astype("string").value_counts()
    counts = counts[counts >= 2]
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [value for value, _ in ordered[:limit]]


class PeriodicEmbeddings(nn.Module):
    """Each standardised numeric feature x -> ReLU(W [cos(2 pi c x), sin(2 pi c x)]): periodic embeddings with
    frequencies ``c`` learned per feature and one linear layer shared by all features ("PLR-lite", Gorishniy
    et al. 2022, *On Embeddings for Numerical Features in Tabular Deep Learning*). They let the network cut a
    feature into many pieces, as a tree's thresholds do, where a plain MLP sees one straight line."""

    def __init__(self, features: int, frequencies: int = 16, width: int = 8, sigma: float = 0.1):
        super().__init__()
        self.frequencies = nn.Parameter(torch.randn(features, frequencies) * sigma)
        self.linear = nn.Linear(2 * frequencies, width)

    @property
    def width(self) -> int:
        return self.frequencies.shape[0] * self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * self.frequencies * x[..., None]
        return torch.relu(self.linear(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))).flatten(1)


class TabularNet(nn.Module):
    """An MLP over the dense inputs (``Preprocessor.encode``), one embedding per categorical column and, with
    ``numeric_embedding="periodic"``, periodic embeddings of the first ``numeric_features`` dense inputs (the
    standardised numeric columns)."""

    def __init__(self, numeric_width: int, cardinalities: list[int], hidden_sizes: list[int], dropout: float, outputs: int,
                 numeric_features: int = 0, numeric_embedding: str = "none"):
        super().__init__()
        if numeric_embedding not in CHOICES["numeric_embedding"]:
            raise ValueError(f"numeric_embedding must be one of {CHOICES['numeric_embedding']}, got {numeric_embedding!r}")
        self.hidden_sizes, self.dropout, self.numeric_embedding = list(hidden_sizes), dropout, numeric_embedding
        self.embeddings = nn.ModuleList(nn.Embedding(card, min(16, (card + 1) // 2 + 1)) for card in cardinalities)
        self.periodic = PeriodicEmbeddings(numeric_features) if numeric_embedding == "periodic" and numeric_features else None
        width = numeric_width + sum(e.embedding_dim for e in self.embeddings) + (self.periodic.width if self.periodic else 0)
        layers: list[nn.Module] = []
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, outputs))
        self.mlp = nn.Sequential(*layers)

    def forward(self, dense: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
        parts = [dense, *(emb(cats[:, i]) for i, emb in enumerate(self.embeddings))]
        if self.periodic is not None:
            parts.append(self.periodic(dense[:, :self.periodic.frequencies.shape[0]]))
        out = self.mlp(torch.cat(parts, dim=1))
        return out.squeeze(1) if out.shape[1] == 1 else out


def build_net(pre: Preprocessor, hidden_sizes: list[int], dropout: float, numeric_embedding: str = "none") -> TabularNet:
    """``numeric_embedding`` defaults to "none" for bundles saved before it existed; training passes its own."""
    return TabularNet(pre.numeric_width, pre.cardinalities, hidden_sizes, dropout, pre.outputs, len(pre.numeric),
                      numeric_embedding)


def class_weights(pre: Preprocessor, y: torch.Tensor, kind: str) -> torch.Tensor | None:
    """Per-class loss weights: "balanced" gives class c the weight n / (classes * n_c), as scikit-learn's
    ``class_weight="balanced"``, so each class weighs as much in the loss as the others whatever its share;
    "none": None. Classification only."""
    if kind == "none":
        return None
    if pre.classes is None:
        raise ValueError("class_weight balanced applies to classification; this dataset's task is regression")
    counts = torch.bincount(y.long(), minlength=len(pre.classes)).double()
    return (len(y) / (len(pre.classes) * counts.clamp(min=1))).float()


def loss_function(pre: Preprocessor, weights: torch.Tensor | None = None) -> nn.Module:
    if pre.classes is None:
        return nn.MSELoss()
    if len(pre.classes) == 2:
        return nn.BCEWithLogitsLoss(pos_weight=None if weights is None else weights[1] / weights[0])
    return nn.CrossEntropyLoss(weight=weights)


def scores(pre: Preprocessor, logits: torch.Tensor) -> np.ndarray:
    """Network output -> positive-class probability, class probabilities, or the value in target units."""
    if pre.classes is None:
        return logits.double().numpy() * pre.target_std + pre.target_mean
    if len(pre.classes) == 2:
        return torch.sigmoid(logits).double().numpy()
    return torch.softmax(logits, dim=1).double().numpy()


def metrics(pre: Preprocessor, y_true: torch.Tensor, predicted: np.ndarray) -> dict[str, float]:
    """Quality of ``predicted`` (from ``scores``) against encoded targets; includes ``primary_metric``."""
    from sklearn import metrics as m

    y = y_true.numpy()
    if pre.classes is None:
        truth = y.astype(np.float64) * pre.target_std + pre.target_mean
        return {
            "r2": float(m.r2_score(truth, predicted)),
            "rmse": float(math.sqrt(m.mean_squared_error(truth, predicted))),
            "mae": float(m.mean_absolute_error(truth, predicted)),
        }
    if len(pre.classes) == 2:
        auc = float(m.roc_auc_score(y, predicted)) if len(np.unique(y)) == 2 else float("nan")
        return {
            "roc_auc": auc,
            "accuracy": float(((predicted >= 0.5) == (y >= 0.5)).mean()),
            "log_loss": float(m.log_loss(y, np.clip(predicted, 1e-7, 1 - 1e-7), labels=[0, 1])),
        }
    labels = list(range(len(pre.classes)))
    return {
        "roc_auc": float(m.roc_auc_score(y, predicted, multi_class="ovr", labels=labels)),
        "accuracy": float((predicted.argmax(axis=1) == y).mean()),
        "log_loss": float(m.log_loss(y, predicted, labels=labels)),
    }


# ---------------------------------------------------------------------------------------------
# The bundle written to the job's output and wrapped by the pyfunc


def tree_inputs(dense: torch.Tensor, cats: torch.Tensor) -> np.ndarray:
    """The trees' feature matrix: the network's dense inputs, then the category indices (0: other or
    missing) as categorical features (``tree_feature_types``). One encoding for both model families."""
    return np.hstack([dense.numpy(), cats.numpy().astype(np.float32)])


def tree_feature_types(pre: Preprocessor) -> list[str]:
    return ["q"] * pre.numeric_width + ["c"] * len(pre.categorical)


def tree_objective(pre: Preprocessor) -> dict:
    """XGBoost's objective on ``encode_target``'s labels; its margins are what ``scores`` takes."""
    if pre.classes is None:
        return {"objective": "reg:squarederror", "eval_metric": "rmse"}
    if len(pre.classes) == 2:
        return {"objective": "binary:logistic", "eval_metric": "auc"}
    return {"objective": "multi:softprob", "num_class": len(pre.classes), "eval_metric": "mlogloss"}


def save_bundle(path: str, dataset: DatasetSpec, pre: Preprocessor, model) -> None:
    """The model file: tensors and plain values only (``torch.load(weights_only=True)`` reads it). ``model``:
    a TabularNet (its weights), or an XGBoost Booster (its UBJSON bytes, as a uint8 tensor)."""
    bundle = {"dataset": dataset.model_dump(mode="json"), "preprocessor": asdict(pre)}
    if isinstance(model, TabularNet):
        bundle.update(net={"hidden_sizes": model.hidden_sizes, "dropout": model.dropout,
                           "numeric_embedding": model.numeric_embedding}, state_dict=model.state_dict())
    else:
        bundle["booster"] = torch.frombuffer(bytearray(model.save_raw("ubj")), dtype=torch.uint8)
    torch.save(bundle, path)


def save_blend(path: str, dataset: DatasetSpec, members: list[dict], weights: list[float]) -> None:
    """A blend's model file: the bundles of its members (as ``save_bundle`` wrote them) and their weights
    (summing to 1); ``LoadedModel`` averages the members' scores (probabilities, or predictions) with them."""
    if len(members) != len(weights) or len(members) < 2 or abs(sum(weights) - 1) > 1e-6 or min(weights) <= 0:
        raise ValueError(f"a blend takes two or more members with positive weights summing to 1, got {weights}")
    torch.save({"dataset": dataset.model_dump(mode="json"), "weights": [float(w) for w in weights],
                "members": members}, path)


class LoadedModel:
    """A trained model bundle: RAW feature rows in, a predictions frame out. The bundle holds a network, trees
    (``save_bundle``) or a blend of such bundles (``save_blend``)."""

    def __init__(self, path: str):
        self._load(torch.load(path, map_location="cpu", weights_only=True))

    @classmethod
    def _of(cls, bundle: dict) -> LoadedModel:
        model = cls.__new__(cls)
        model._load(bundle)
        return model

    def _load(self, bundle: dict) -> None:
        self.dataset = DatasetSpec.model_validate(bundle["dataset"])
        self.net = self.booster = None
        self.members: list[tuple[float, LoadedModel]] = []
        if "members" in bundle:
            self.members = [(float(w), LoadedModel._of(member)) for w, member in zip(bundle["weights"], bundle["members"],
                                                                                     strict=True)]
            self.pre = self.members[0][1].pre  # the members' targets and classes are the dataset's: the same
            return
        self.pre = Preprocessor(**bundle["preprocessor"])
        if "booster" in bundle:
            import xgboost as xgb

            self.booster = xgb.Booster(model_file=bytearray(bundle["booster"].numpy().tobytes()))
        else:
            self.net = build_net(self.pre, **bundle["net"])
            self.net.load_state_dict(bundle["state_dict"])
            self.net.eval()

    @property
    def family(self) -> str:
        return "blend" if self.members else "mlp" if self.net is not None else "gbdt"

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """RAW feature columns (as a caller sends them) -> predictions."""
        return self.predict_typed(typed_features(frame, self.dataset), index=frame.index)

    def predict_typed(self, typed: pd.DataFrame, index=None) -> pd.DataFrame:
        """Rows already typed and with derived features (curated data) -> predictions."""
        outputs = self._columns(self._scores(typed, Preprocessor.encode))
        return pd.DataFrame(outputs, index=typed.index if index is None else index)

    def predict_table(self, table: pa.Table) -> dict[str, np.ndarray]:
        """An Arrow table typed as curated data (with derived features) -> output columns (batch scoring)."""
        return self._columns(self._scores(table, Preprocessor.encode_table))

    def predict_wire(self, columns: dict[str, list]) -> dict[str, list]:
        """Checked wire values per raw column (what the model server parsed) -> output columns as lists."""
        outputs = self.predict_table(wire_table(columns, self.dataset))
        return {name: values.tolist() for name, values in outputs.items()}

    def _scores(self, rows, encode) -> np.ndarray:
        """``scores`` of the rows (``encode``: how this model's preprocessor turns them into inputs); a
        blend's: the weighted average of its members'."""
        if self.members:
            return sum(weight * member._scores(rows, encode) for weight, member in self.members)
        dense, cats = encode(self.pre, rows)
        if self.booster is not None:
            margins = self.booster.inplace_predict(tree_inputs(dense, cats), predict_type="margin")
            return scores(self.pre, torch.from_numpy(np.asarray(margins, dtype=np.float32)))
        with torch.no_grad():
            return scores(self.pre, self.net(dense, cats))

    def _columns(self, predicted: np.ndarray) -> dict[str, np.ndarray]:
        if self.pre.classes is None:
            return {"prediction": predicted}
        if len(self.pre.classes) == 2:
            positive = predicted >= 0.5
            labels = positive if self.pre.classes == ["False", "True"] else np.where(
                positive, self.pre.classes[1], self.pre.classes[0])
            return {"prediction": labels, "probability": predicted}
        out = {"prediction": np.asarray(self.pre.classes, dtype=object)[predicted.argmax(axis=1)],
               "probability": predicted.max(axis=1)}
        for i, label in enumerate(self.pre.classes):
            out[f"probability_{label}"] = predicted[:, i]
        return out


def load_logged_model(model_uri: str) -> tuple[LoadedModel, object]:
    """A model this project logged (``tracking.log_pyfunc``), as (LoadedModel, its MLflow ``Model`` metadata),
    read without running any code stored with it: the MLmodel file is YAML, the bundle is loaded with
    ``torch.load(weights_only=True)``. Whoever can write to the registry or its artifact store can give us
    wrong weights, never code. Any other model (a pickled pyfunc, another flavour) is refused.

    ``model_uri``: models:/name/version (or @alias), runs:/..., an artifact URI, or a model folder."""
    import os

    import mlflow.artifacts
    from mlflow.models import Model

    local = model_uri if os.path.isdir(model_uri) else mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
    meta = Model.load(os.path.join(local, "MLmodel"))
    pyfunc = meta.flavors.get("python_function") or {}
    bundle = ((pyfunc.get("artifacts") or {}).get("bundle") or {}).get("path")
    if pyfunc.get("loader_module") != "mlflow.pyfunc.loaders.code_model" or "python_model" in pyfunc or not bundle:
        raise ValueError(f"{model_uri} is not an mlfactory tabular model (a models-from-code pyfunc with a "
                         f"'bundle' artifact; this one has loader {pyfunc.get('loader_module')!r}, python_model "
                         f"{pyfunc.get('python_model')!r}): refusing to load it, as that would run code stored with it")
    path = os.path.realpath(os.path.join(local, bundle))
    if not path.startswith(os.path.realpath(local) + os.sep):
        raise ValueError(f"{model_uri}: the bundle path {bundle!r} leaves the model folder")
    return LoadedModel(path), meta


try:  # the pyfunc flavour needs mlflow; the training containers of a cloud may run without it
    import mlflow.pyfunc

    class TabularPyfunc(mlflow.pyfunc.PythonModel):
        def load_context(self, context) -> None:
            self.model = LoadedModel(context.artifacts["bundle"])

        def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
            return self.model.predict(model_input)

except ImportError:  # pragma: no cover - exercised only where mlflow is absent
    TabularPyfunc = None
