"""The model's view of a dataset: which columns feed it, how raw values are typed, derived features.

Used by ETL (derived features written to curated data) and by the trained model itself, which takes
the RAW feature columns and derives the same features at prediction time: one definition, so
training and serving cannot drift apart. Light on purpose (pyarrow, pandas): it is shipped inside
every logged model.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mlfactory.dataset import DatasetSpec

TRUE_WORDS = {"true", "t", "yes", "y", "1"}
FALSE_WORDS = {"false", "f", "no", "n", "0"}


def derive_features(table: pa.Table, dataset: DatasetSpec, as_of: datetime) -> pa.Table:
    for feature in dataset.derived:
        a = table.column(feature.inputs[0])
        if feature.kind == "ratio":
            b = pc.cast(table.column(feature.inputs[1]), pa.float64())
            zero = pc.equal(b, 0.0)
            value = pc.if_else(zero, pa.scalar(None, pa.float64()), pc.divide(pc.cast(a, pa.float64()), b))
        elif feature.kind == "log1p":
            a = pc.cast(a, pa.float64())
            value = pc.if_else(pc.less(a, -1.0), pa.scalar(None, pa.float64()), pc.log1p(pc.max_element_wise(a, -1.0)))
        elif feature.kind == "month":
            value = pc.month(a)
        elif feature.kind == "day_of_week":
            value = pc.day_of_week(a)
        else:  # days_since
            now = pa.scalar(as_of.replace(tzinfo=None), pa.timestamp("us"))
            value = pc.divide(pc.cast(pc.subtract(now, a), pa.int64()), 86_400_000_000.0)
        table = table.append_column(feature.name, value)
    return table


@dataclass(frozen=True)
class FeatureSet:
    """The columns a model reads: raw inputs (what a caller sends) and the encoded groups."""

    raw_inputs: list[str]  # configured columns the model needs, in config order (the model's signature)
    numeric: list[str]  # integer, float, datetime (as days since 1970) and every derived feature
    boolean: list[str]
    categorical: dict[str, list[str] | None]  # column -> its configured categories; None: open vocabulary

    @classmethod
    def of(cls, dataset: DatasetSpec) -> FeatureSet:
        """Every configured column except the target and free-text/key (``string``) columns."""
        columns = [c for c in dataset.columns if c.name != dataset.target and c.type != "string"]
        numeric = [c.name for c in columns if c.type in ("integer", "float", "datetime")]
        return cls(
            raw_inputs=[c.name for c in columns],
            numeric=numeric + [f.name for f in dataset.derived],
            boolean=[c.name for c in columns if c.type == "boolean"],
            categorical={c.name: c.categories and list(c.categories) for c in columns if c.type == "category"},
        )


def _boolean(series: pd.Series) -> pd.Series:
    if pd.api.types.is_bool_dtype(series):
        return series.astype("boolean")
    text = series.astype("string").str.strip().str.lower()
    return text.map(lambda v: True if v in TRUE_WORDS else False if v in FALSE_WORDS else pd.NA).astype("boolean")


def typed_features(frame: pd.DataFrame, dataset: DatasetSpec, as_of: datetime | None = None) -> pd.DataFrame:
    """Raw feature columns (as a caller sends them: numbers, strings, booleans, ISO dates) typed as in
    curated data, with the derived features added. A value that does not parse becomes missing."""
    features = FeatureSet.of(dataset)
    missing = [name for name in features.raw_inputs if name not in frame.columns]
    if missing:
        raise ValueError(f"input is missing feature column(s) {missing}; the model takes {features.raw_inputs}")
    arrays = {}
    for name in features.raw_inputs:
        spec, values = dataset.column(name), frame[name]
        if spec.type in ("integer", "float"):
            arrays[name] = pa.array(pd.to_numeric(values, errors="coerce").astype("float64"), pa.float64())
        elif spec.type == "datetime":
            parsed = values
            if not pd.api.types.is_datetime64_any_dtype(values):
                parsed = pd.to_datetime(values, errors="coerce", utc=True, format="ISO8601")
            if parsed.dt.tz is not None:
                parsed = parsed.dt.tz_convert(None)
            arrays[name] = pa.array(parsed.astype("datetime64[us]"), pa.timestamp("us"))
        elif spec.type == "boolean":
            arrays[name] = pa.array(_boolean(values), pa.bool_())
        else:
            arrays[name] = pa.array(values.astype("string"), pa.string())
    table = derive_features(pa.table(arrays), dataset, as_of or datetime.now(timezone.utc))
    return table.to_pandas()


def wire_table(columns: dict[str, list], dataset: DatasetSpec, as_of: datetime | None = None) -> pa.Table:
    """Checked wire values (numbers as floats, ISO 8601 datetimes, booleans, strings; None for missing)
    of the raw feature columns -> an Arrow table typed as curated data, with the derived features.
    The serving hot path: no pandas."""
    arrays = {}
    for name in FeatureSet.of(dataset).raw_inputs:
        kind, values = dataset.column(name).type, columns[name]
        if kind in ("integer", "float"):
            arrays[name] = pa.array(values, pa.float64())
        elif kind == "datetime":
            stamps = [None if v is None else datetime.fromisoformat(v) for v in values]
            stamps = [t if t is None or t.tzinfo is None else t.astimezone(timezone.utc).replace(tzinfo=None) for t in stamps]
            arrays[name] = pa.array(stamps, pa.timestamp("us"))
        elif kind == "boolean":
            arrays[name] = pa.array(values, pa.bool_())
        else:
            arrays[name] = pa.array(values, pa.string())
    return derive_features(pa.table(arrays), dataset, as_of or datetime.now(timezone.utc))


def numeric_arrow(column: pa.ChunkedArray) -> np.ndarray:
    """A numeric or datetime Arrow column as float64 (datetimes in days since 1970), NaN where missing."""
    if pa.types.is_timestamp(column.type):
        column = pc.divide(pc.cast(pc.cast(column, pa.timestamp("us")), pa.int64()), 86_400_000_000.0)
    return (column if column.type == pa.float64() else pc.cast(column, pa.float64())).to_numpy(zero_copy_only=False)


def numeric_matrix(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Numeric and datetime columns as float64 (datetimes in days since 1970), NaN where missing."""
    out = np.empty((len(frame), len(columns)), dtype=np.float64)
    for j, name in enumerate(columns):
        values = frame[name]
        if pd.api.types.is_datetime64_any_dtype(values):
            stamps = values.to_numpy(dtype="datetime64[us]")
            days = stamps.astype("int64").astype(np.float64) / 86_400_000_000.0
            out[:, j] = np.where(np.isnat(stamps), np.nan, days)
        else:
            out[:, j] = pd.to_numeric(values, errors="coerce").astype("float64").to_numpy(na_value=np.nan)
    return out


def to_wire(frame: pd.DataFrame, dataset: DatasetSpec) -> pd.DataFrame:
    """Typed rows -> the model's raw input columns as a JSON caller sends them (the model's signature):
    numbers as doubles, datetimes as ISO 8601 strings, categories and text as plain strings."""
    out = pd.DataFrame(index=frame.index)
    for name in FeatureSet.of(dataset).raw_inputs:
        kind, values = dataset.column(name).type, frame[name]
        if kind == "datetime":
            out[name] = values.map(lambda t: None if pd.isna(t) else pd.Timestamp(t).isoformat()).astype(object)
        elif kind in ("integer", "float"):
            out[name] = pd.to_numeric(values, errors="coerce").astype("float64")
        elif kind == "boolean":
            out[name] = values
        else:
            out[name] = values.astype(object).where(values.notna(), None)
    return out
