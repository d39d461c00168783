"""The data contract: checks built from the pipeline config, run row by row and as a Great Expectations suite.

Each ``Check`` is defined once and used twice: ``failing_rows`` evaluates it with vectorised
pyarrow to route individual rows to quarantine, and ``to_expectation`` turns it into the Great
Expectations 1.x expectation of the same name, which validates each batch and renders Data Docs.
Great Expectations is imported only inside the functions that need it (it takes ~7 s to import).
"""

from __future__ import annotations

import functools
import html
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mlfactory import reports
from mlfactory.dataset import DatasetSpec

ARROW_TYPES = {
    "integer": pa.int64(),
    "float": pa.float64(),
    "string": pa.string(),
    "category": pa.string(),
    "boolean": pa.bool_(),
    "datetime": pa.timestamp("us"),
}

# Row failures found while parsing, before any expectation can run on a typed value.
MALFORMED_ROW = "malformed_row"
INVALID_UTF8 = "invalid_utf8"
WRONG_TYPE = "expect_column_values_to_be_of_type"
NON_FINITE = "expect_column_values_to_be_finite"

# dtype names a column may have after ``pa.Table.to_pandas`` (nulls turn int64 into float64 and bool
# into object). String and category columns are left out: GX 1.24 cannot name pandas 3's StringDtype
# and CategoricalDtype in a type list, and ETL has already parsed each of their values as text.
PANDAS_TYPES = {
    "integer": ["int64", "float64"],
    "float": ["float64"],
    "boolean": ["bool", "object"],
    "datetime": ["datetime64[us]"],
}

ROW_LEVEL = {
    "expect_column_values_to_not_be_null",
    "expect_column_values_to_be_between",
    "expect_column_values_to_be_in_set",
    "expect_column_values_to_be_unique",
}


def is_in(values: pa.Array | pa.ChunkedArray, value_set: pa.Array) -> pa.Array:
    """``pc.is_in`` through a dictionary: a low-cardinality text column is tested once per distinct value
    (about 8x faster than testing each of a million strings)."""
    if not (pa.types.is_string(values.type) or pa.types.is_binary(values.type)):
        return pc.is_in(values, value_set=value_set)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    encoded = values.dictionary_encode()
    return pc.take(pc.is_in(encoded.dictionary, value_set=value_set), encoded.indices)


@dataclass(frozen=True)
class Check:
    """One expectation of the suite, on one column or on the whole table."""

    expectation: str  # Great Expectations' snake_case name
    column: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def row_level(self) -> bool:
        """Row-level checks quarantine the rows they reject; the others judge the batch as a whole."""
        return self.expectation in ROW_LEVEL

    @property
    def label(self) -> str:
        return f"{self.expectation}({self.column})" if self.column else self.expectation

    def failing_rows(self, table: pa.Table) -> pa.BooleanArray:
        """True for each row of ``table`` (typed columns) that this row-level check rejects."""
        col = table.column(self.column)
        if self.expectation == "expect_column_values_to_not_be_null":
            bad = pc.is_null(col)
        elif self.expectation == "expect_column_values_to_be_between":
            low, high = self.kwargs.get("min_value"), self.kwargs.get("max_value")
            under = pc.less(col, pa.scalar(low)) if low is not None else None
            over = pc.greater(col, pa.scalar(high)) if high is not None else None
            bad = pc.or_(under, over) if under is not None and over is not None else (under if over is None else over)
        elif self.expectation == "expect_column_values_to_be_in_set":
            bad = pc.invert(is_in(col, pa.array(self.kwargs["value_set"], col.type)))
        else:
            raise ValueError(f"{self.expectation} is not evaluated row by row here")
        bad = pc.fill_null(bad, False)
        return bad.combine_chunks() if isinstance(bad, pa.ChunkedArray) else bad

    def to_expectations(self, mostly: float) -> list:
        """The GX expectation(s) that check the same thing on a whole batch."""
        import great_expectations.expectations as gxe

        kwargs = dict(self.kwargs)
        if self.column:
            kwargs["column"] = self.column
        if self.expectation == "expect_column_values_to_be_between" and self.kwargs.get("datetime"):
            # GX's pandas engine compares datetimes one Python object at a time (18 s per million
            # rows here); the column's min and max say the same for the batch in milliseconds.
            kwargs.pop("datetime")
            return [
                gxe.ExpectColumnMinToBeBetween(column=self.column, min_value=kwargs["min_value"]),
                gxe.ExpectColumnMaxToBeBetween(column=self.column, max_value=kwargs["max_value"]),
            ]
        if self.row_level and mostly < 1:
            kwargs["mostly"] = mostly
        cls_name = "".join(part.capitalize() for part in self.expectation.split("_"))
        return [getattr(gxe, cls_name)(**kwargs)]


def build_checks(dataset: DatasetSpec) -> list[Check]:
    """The suite for ``dataset``: schema, nulls, ranges, categories, uniqueness and row count."""
    checks = [
        Check("expect_table_columns_to_match_set", kwargs={"column_set": [c.name for c in dataset.columns], "exact_match": True}),
        Check("expect_table_row_count_to_be_between", kwargs={"min_value": dataset.min_rows, "max_value": dataset.max_rows}),
    ]
    for col in dataset.columns:
        if col.type in PANDAS_TYPES:
            checks.append(Check("expect_column_values_to_be_in_type_list", col.name, {"type_list": PANDAS_TYPES[col.type]}))
        if col.required:
            checks.append(Check("expect_column_values_to_not_be_null", col.name))
        if col.min is not None or col.max is not None:
            bounds = {"min_value": col.min, "max_value": col.max} | ({"datetime": True} if col.type == "datetime" else {})
            checks.append(Check("expect_column_values_to_be_between", col.name, bounds))
        if col.categories:
            checks.append(Check("expect_column_values_to_be_in_set", col.name, {"value_set": list(col.categories)}))
        if col.unique:
            checks.append(Check("expect_column_values_to_be_unique", col.name))
    return checks


# ---------------------------------------------------------------------------------------------
# Great Expectations


_FINGERPRINT_ATTR = "mlfactory_fingerprint"


def _install_fingerprint_shortcut() -> None:
    """Let GX use the snapshot's sha256 as a batch fingerprint instead of hashing every cell.

    GX 1.x fingerprints each pandas batch with ``pd.util.hash_pandas_object`` over all values
    (about 1 s per million rows here); our snapshots are already content-addressed, so a batch
    that carries its fingerprint in ``df.attrs`` uses that. Other DataFrames are hashed as before.
    """
    from great_expectations.execution_engine import pandas_execution_engine as engine

    original = engine.hash_pandas_dataframe
    if getattr(original, "mlfactory", False):
        return

    def fingerprint(df):
        return df.attrs.get(_FINGERPRINT_ATTR) or original(df)

    fingerprint.mlfactory = True
    engine.hash_pandas_dataframe = fingerprint


class SuiteRunner:
    """The suite, run on a batch one column at a time, its results merged into one validation result.

    GX's pandas engine filters the batch's whole frame (every column copied) for each column-map
    expectation; run on that column alone, the same expectations cost about a third less (0.46 s
    instead of 0.69 s for the 48 of the sample's suite on a million rows, measured). Each suite
    validates its batch directly (``Batch.validate``): a ``ValidationDefinition`` would also store
    each result in the context and check its freshness, a fifth of the time here for nothing (ETL
    summarises and renders the results itself). One ephemeral context, with a suite per column (and
    one for the table-level expectations), reused for every batch of a snapshot and, through
    ``suite_runner``, every snapshot of a process. One batch is validated at a time."""

    def __init__(self, dataset: DatasetSpec, checks: Iterable[Check], mostly: float) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        _install_fingerprint_shortcut()
        self.category_columns = {c.name for c in dataset.columns if c.type == "category"}
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)  # no tqdm in task logs
        self.batch_definition = (
            self.context.data_sources.add_pandas("mlfactory")
            .add_dataframe_asset(dataset.name)
            .add_batch_definition_whole_dataframe("batch")
        )
        self.suite_name = f"{dataset.name}_contract"
        groups: dict[str | None, list[Check]] = {}  # None: the table-level expectations
        for check in checks:
            groups.setdefault(check.column, []).append(check)
        self.suites = {}
        self._validating = threading.Lock()  # a GX context is not for two threads at once
        for column, group in groups.items():
            suite = gx.ExpectationSuite(name=f"{self.suite_name}.{column or '_table'}")
            for check in group:
                for expectation in check.to_expectations(mostly):
                    suite.add_expectation(expectation)
            self.suites[column] = self.context.suites.add(suite)

    def validate(self, table: pa.Table, fingerprint: str):
        """The suite's result on ``table`` (typed columns), as one GX validation result."""
        with self._validating:
            return self._validate(table, fingerprint)

    def _validate(self, table: pa.Table, fingerprint: str):
        from great_expectations.core import ExpectationSuiteValidationResult

        parts = []
        for column, suite in self.suites.items():
            if column is None:  # the table-level expectations see the batch's columns, not its rows
                df = table.slice(0, 0).to_pandas()
            else:
                values = table.column(column)
                if column in self.category_columns:  # GX checks sets on categoricals much faster than on strings
                    values = pc.dictionary_encode(values)
                df = values.to_pandas().to_frame(column)
            df.attrs[_FINGERPRINT_ATTR] = f"{fingerprint}:{column}"
            batch = self.batch_definition.get_batch(batch_parameters={"dataframe": df})
            parts.append(batch.validate(suite, result_format="BASIC"))
        results = [r for part in parts for r in part.results]
        passed = sum(bool(r.success) for r in results)
        statistics = {"evaluated_expectations": len(results), "successful_expectations": passed,
                      "unsuccessful_expectations": len(results) - passed,
                      "success_percent": 100.0 * passed / len(results) if results else None}
        return ExpectationSuiteValidationResult(success=all(p.success for p in parts), results=results,
                                                suite_name=self.suite_name, statistics=statistics,
                                                meta=parts[0].meta if parts else {})


_RUNNERS: dict[str, SuiteRunner] = {}
_RUNNERS_LOCK = threading.Lock()


def suite_runner(dataset: DatasetSpec, checks: list[Check], mostly: float) -> SuiteRunner:
    """The ``SuiteRunner`` of this dataset and suite, built once per process and kept: building one (a GX
    context and its suites) costs ~0.25 s, as much as validating a 300-row snapshot, and a task that curates a
    burst of small files would otherwise build it again for each."""
    key = json.dumps([dataset.model_dump(mode="json"), [(c.expectation, c.column, c.kwargs) for c in checks], mostly],
                     sort_keys=True, default=str)
    with _RUNNERS_LOCK:
        if key not in _RUNNERS:
            _RUNNERS[key] = SuiteRunner(dataset, checks, mostly)
        return _RUNNERS[key]


def summarize(result) -> list[dict]:
    """The per-expectation outcome of a GX validation result, JSON-serialisable."""
    rows = []
    for r in result.results:
        cfg = r.expectation_config
        res = r.result or {}
        rows.append(
            {
                "expectation": cfg.type,
                "column": cfg.kwargs.get("column"),
                "success": bool(r.success),
                "unexpected_count": res.get("unexpected_count"),
                "observed_value": _jsonable(res.get("observed_value")),
                "error": (r.exception_info or {}).get("exception_message") if not r.success else None,
            }
        )
    return rows


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def render_data_docs(result) -> str:
    """Data Docs HTML for one validation result (GX's own page renderer), every value from the data escaped
    before GX sees it (its templates do not escape), in the pipeline's page shape (``mlfactory.reports``)."""
    import copy

    from great_expectations.render.renderer import ValidationResultsPageRenderer

    result = copy.deepcopy(result)
    for r in result.results:
        r.result = reports.escaped(r.result)
        r.expectation_config.kwargs = reports.escaped(r.expectation_config.kwargs)
        r.exception_info = reports.escaped(r.exception_info)
    return reports.data_docs(_page_view().render(ValidationResultsPageRenderer().render(result)))


@functools.cache
def _page_view():
    """One GX page view: its Jinja environment compiles the templates once (0.1 s a page otherwise)."""
    from great_expectations.render.view import DefaultJinjaPageView

    return DefaultJinjaPageView()


def render_index(title: str, pages: list[tuple[str, str, bool]], summary: dict) -> str:
    """A small index page linking each batch's Data Docs page, with the snapshot-level outcome."""
    items = "\n".join(
        f'<li><a href="{html.escape(href)}">{html.escape(name)}</a> — {"passed" if ok else "failed"}</li>'
        for name, href, ok in pages
    )
    return (
        f"{reports.head(title, 'body{font-family:sans-serif;margin:2em}')}<body>"
        f"<h1>{html.escape(title)}</h1><pre>{html.escape(json.dumps(summary, indent=2, default=str))}</pre>"
        f"<h2>Great Expectations Data Docs, one page per batch</h2><ul>{items}</ul></body></html>"
    )
