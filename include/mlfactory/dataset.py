"""The dataset's schema: its columns, their types and bounds, the target, and the derived features.

The data contract that ETL enforces, the features the model is built from, and what the model's
signature takes. A model logged to MLflow carries this module with it (``mlfactory.training.tracking``), so
it imports nothing from the rest of the project.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ColumnType = Literal["integer", "float", "string", "category", "boolean", "datetime"]
NUMERIC_TYPES = ("integer", "float")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnSpec(_Strict):
    """One column of the landed dataset."""

    name: str = Field(min_length=1)
    type: ColumnType
    required: bool = Field(True, description="nulls are not allowed in this column")
    unique: bool = Field(False, description="every non-null value appears once per batch")
    min: float | datetime | None = Field(None, description="inclusive lower bound (numeric or datetime)")
    max: float | datetime | None = Field(None, description="inclusive upper bound (numeric or datetime)")
    categories: list[str] | None = Field(
        None, description="allowed values of a category column (a value outside them is quarantined); "
        "omitted: an open vocabulary, learned from the training data")
    max_categories: int = Field(
        1000, ge=1, description="open vocabulary: the model keeps the most frequent values seen at least twice "
        "in its training data, up to this many; any other value is encoded as 'other'")
    description: str = ""

    @model_validator(mode="after")
    def _bounds_fit_type(self) -> ColumnSpec:
        if self.categories is not None and not self.categories:
            raise ValueError(f"column {self.name!r}: 'categories' is empty (omit it for an open vocabulary)")
        if self.categories is not None and self.type != "category":
            raise ValueError(f"column {self.name!r}: 'categories' is only allowed on type category")
        for bound in ("min", "max"):
            value = getattr(self, bound)
            if value is None:
                continue
            if self.type in NUMERIC_TYPES and isinstance(value, datetime):
                raise ValueError(f"column {self.name!r}: {bound} must be a number for type {self.type}")
            if self.type == "datetime" and not isinstance(value, datetime):
                raise ValueError(f"column {self.name!r}: {bound} must be a datetime for type datetime")
            if self.type not in (*NUMERIC_TYPES, "datetime"):
                raise ValueError(f"column {self.name!r}: {bound} is not allowed on type {self.type}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"column {self.name!r}: min {self.min} is greater than max {self.max}")
        return self


class DerivedFeature(_Strict):
    """A feature computed during ETL from other columns and written to the curated data."""

    name: str = Field(min_length=1)
    kind: Literal["ratio", "log1p", "day_of_week", "month", "days_since"]
    inputs: list[str] = Field(min_length=1, max_length=2)

    @model_validator(mode="after")
    def _arity(self) -> DerivedFeature:
        want = 2 if self.kind == "ratio" else 1
        if len(self.inputs) != want:
            raise ValueError(f"derived feature {self.name!r} ({self.kind}) takes {want} input(s)")
        return self


class DatasetSpec(_Strict):
    name: str = Field(min_length=1)
    task: Literal["classification", "regression"]
    target: str
    columns: list[ColumnSpec] = Field(min_length=2)
    derived: list[DerivedFeature] = []
    min_rows: int = Field(1, ge=1, description="a batch with fewer rows fails as a whole")
    max_rows: int | None = Field(None, ge=1)
    csv_delimiter: str = Field(",", min_length=1, max_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> DatasetSpec:
        names = [c.name for c in self.columns]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate column names: {dupes}")
        by_name = {c.name: c for c in self.columns}
        if self.target not in by_name:
            raise ValueError(f"target {self.target!r} is not one of the columns {names}")
        if not by_name[self.target].required:
            raise ValueError(f"target {self.target!r} must be required (a row without a label is useless)")
        target_types = ("boolean", "category") if self.task == "classification" else NUMERIC_TYPES
        if by_name[self.target].type == "category" and not by_name[self.target].categories:
            raise ValueError(f"target {self.target!r}: a category target lists its classes in 'categories'")
        if by_name[self.target].type not in target_types:
            raise ValueError(
                f"target {self.target!r} is {by_name[self.target].type}; a {self.task} target must be "
                f"{' or '.join(target_types)}"
            )
        for feature in self.derived:
            if feature.name in by_name:
                raise ValueError(f"derived feature {feature.name!r} clashes with a column of that name")
            for source in feature.inputs:
                if source not in by_name:
                    raise ValueError(f"derived feature {feature.name!r}: unknown input column {source!r}")
                wanted = ("datetime",) if feature.kind in ("day_of_week", "month", "days_since") else NUMERIC_TYPES
                if by_name[source].type not in wanted:
                    raise ValueError(
                        f"derived feature {feature.name!r} ({feature.kind}) needs {' or '.join(wanted)} "
                        f"input, column {source!r} is {by_name[source].type}"
                    )
        return self

    def column(self, name: str) -> ColumnSpec:
        return next(c for c in self.columns if c.name == name)
