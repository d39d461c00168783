"""ETL of one raw snapshot: parse with the configured types, check every row, write curated Parquet.

The snapshot is streamed in chunks of ``validation.chunk_rows`` rows, so a file larger than memory
is never loaded whole. For each chunk:

1. read every column as text (CSV, JSON Lines) or as stored (Parquet);
2. parse each column to its configured type; a value that does not parse fails its row;
3. run the row-level checks (nulls, ranges, categories, uniqueness) with vectorised pyarrow;
4. write the passing rows, with derived features, to a staging folder, and the failing rows, as
   their original text plus the failed expectation and column, to quarantine;
5. validate the parsed rows with the Great Expectations suite and render its Data Docs page.

Then the snapshot-level decision: the row count, the column types, and the quarantined share
against ``validation.max_quarantine_fraction``. A passing snapshot's staging folder becomes the
curated partition ``curated/ingest_date=YYYY-MM-DD/snapshot=<id>/``; a failing one raises
``ValidationFailed`` naming the expectation, the column and the count. Either way the raw snapshot
is untouched and every raw row is either curated or quarantined.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlfactory import BadInput, storage
from mlfactory.config import PipelineConfig
from mlfactory.dataset import ColumnSpec, DatasetSpec
from mlfactory.features import FALSE_WORDS, TRUE_WORDS, derive_features
from mlfactory.ingest import Manifest, read_manifest
from mlfactory.validation import (
    ARROW_TYPES,
    INVALID_UTF8,
    MALFORMED_ROW,
    NON_FINITE,
    WRONG_TYPE,
    SuiteRunner,
    build_checks,
    render_data_docs,
    render_index,
    summarize,
)

log = logging.getLogger(__name__)

NULL_TOKENS = ["", "NULL", "null", "NA", "N/A", "None"]
TRUE_TOKENS = pa.array(sorted(TRUE_WORDS))
FALSE_TOKENS = pa.array(sorted(FALSE_WORDS))
CSV_BLOCK_BYTES = 1 << 20  # pyarrow reads many blocks ahead: bigger blocks held most of a file in memory
FAILED_EXPECTATION = "_failed_expectation"
FAILED_COLUMN = "_failed_column"
ROW_NUMBER = "_row"
RAW_LINE = "_raw_line"


class ValidationFailed(BadInput):
    """The snapshot as a whole fails the data contract; its raw snapshot is kept."""

    def __init__(self, message: str, result: CurationResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class CurationResult:
    snapshot_id: str
    snapshot_uri: str
    curated_uri: str | None
    quarantine_uri: str
    report_uri: str
    raw_rows: int
    curated_rows: int
    quarantined_rows: int
    failures: dict[str, int]
    success: bool
    reason: str = ""
    expectations: list[dict] = field(default_factory=list)

    def to_extra(self) -> dict:
        """What the Asset event carries: small, JSON-serialisable, enough for the next stage."""
        extra = asdict(self)
        extra["expectations"] = [e for e in self.expectations if not e["success"]]
        return extra


@dataclass
class _Chunk:
    table: pa.Table  # columns as read: binary for text formats, typed for Parquet
    first_row: int  # 1-based number of the chunk's first data row
    malformed: list[str]  # raw text of rows that could not be split into the header's fields


# ---------------------------------------------------------------------------------------------
# Reading


def _csv_header(path: str, fs, delimiter: str) -> list[str]:
    with fs.open_input_stream(path) as f:
        first = f.read(1 << 20).split(b"\n", 1)[0].rstrip(b"\r")
    return next(csv.reader([first.decode("utf-8", errors="backslashreplace")], delimiter=delimiter), [])


def _read_csv(manifest: Manifest, dataset: DatasetSpec, chunk_rows: int) -> tuple[list[str], Iterator[_Chunk]]:
    import pyarrow.csv as pacsv

    fs, path = storage.pyarrow_filesystem(manifest.snapshot_uri)
    header = _csv_header(path, fs, dataset.csv_delimiter)
    malformed: list[str] = []

    def on_invalid(row) -> str:  # pyarrow calls this for rows with the wrong number of fields
        malformed.append(row.text)
        return "skip"

    def chunks() -> Iterator[_Chunk]:
        reader = pacsv.open_csv(
            fs.open_input_stream(path),
            read_options=pacsv.ReadOptions(column_names=header, skip_rows=1, block_size=CSV_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(delimiter=dataset.csv_delimiter, invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.binary() for name in header},
                null_values=NULL_TOKENS,
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,
            ),
        )
        yield from _rechunk(reader, chunk_rows, malformed)

    return header, chunks()


def _rechunk(batches, chunk_rows: int, malformed: list[str]) -> Iterator[_Chunk]:
    """Regroup a reader's record batches into chunks of ``chunk_rows`` rows (the last may be smaller)."""
    pending: list[pa.RecordBatch] = []
    rows, first_row, emitted = 0, 1, False

    def drain() -> list[str]:
        taken = malformed[:]
        malformed.clear()
        return taken

    for batch in batches:
        pending.append(batch)
        rows += batch.num_rows
        while rows >= chunk_rows:
            table = pa.Table.from_batches(pending)
            yield _Chunk(table.slice(0, chunk_rows), first_row, drain())
            emitted = True
            first_row += chunk_rows
            rest = table.slice(chunk_rows)
            pending, rows = rest.to_batches(), rest.num_rows
    if rows or malformed or not emitted:
        yield _Chunk(pa.Table.from_batches(pending) if rows else None, first_row, drain())


def _read_parquet(manifest: Manifest, dataset: DatasetSpec, chunk_rows: int) -> tuple[list[str], Iterator[_Chunk]]:
    fs, path = storage.pyarrow_filesystem(manifest.snapshot_uri)
    parquet = pq.ParquetFile(fs.open_input_file(path))
    header = parquet.schema_arrow.names

    def chunks() -> Iterator[_Chunk]:
        yield from _rechunk(parquet.iter_batches(batch_size=chunk_rows), chunk_rows, [])

    return header, chunks()


def _to_text(value) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, (dict, list)):
        return json.dumps(value).encode()
    return str(value).encode()


def _read_jsonl(manifest: Manifest, dataset: DatasetSpec, chunk_rows: int) -> tuple[list[str], Iterator[_Chunk]]:
    expected = [c.name for c in dataset.columns]
    fs, path = storage.pyarrow_filesystem(manifest.snapshot_uri)

    def records() -> Iterator[tuple[dict | None, str]]:
        with fs.open_input_stream(path) as stream:
            for raw in io.BufferedReader(stream):
                if not raw.strip():
                    continue
                text = raw.decode("utf-8", errors="backslashreplace").rstrip("\r\n")
                try:
                    record = json.loads(raw)
                except ValueError:
                    record = None
                yield (record if isinstance(record, dict) else None), text

    # The header is the set of keys seen in the first chunk, so an unknown key fails the schema check.
    stream = records()
    first: list[tuple[dict | None, str]] = [r for _, r in zip(range(chunk_rows), stream)]
    header = list(expected)
    for record, _ in first:
        for key in record or {}:
            if key not in header:
                header.append(key)

    def to_chunk(rows: list[tuple[dict | None, str]], first_row: int) -> _Chunk:
        good = [r for r, _ in rows if r is not None]
        bad = [text for r, text in rows if r is None]
        columns = {name: pa.array([_to_text(r.get(name)) for r in good], pa.binary()) for name in header}
        return _Chunk(pa.table(columns), first_row, bad)

    def chunks() -> Iterator[_Chunk]:
        rows, first_row = first, 1
        while rows:
            chunk = to_chunk(rows, first_row)
            first_row += chunk.table.num_rows
            yield chunk
            rows = [r for _, r in zip(range(chunk_rows), stream)]
        if first_row == 1 and not first:
            yield to_chunk([], 1)

    return header, chunks()


READERS = {"csv": _read_csv, "parquet": _read_parquet, "jsonl": _read_jsonl}


# ---------------------------------------------------------------------------------------------
# Parsing


def _decode_utf8(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """binary -> string; values that are not UTF-8 become null and are flagged."""
    try:
        return arr.cast(pa.string()), np.zeros(len(arr), bool)
    except pa.ArrowInvalid:
        bad = np.zeros(len(arr), bool)
        out = []
        for i, value in enumerate(arr.to_pylist()):
            if value is None:
                out.append(None)
                continue
            try:
                out.append(value.decode("utf-8"))
            except UnicodeDecodeError:
                bad[i] = True
                out.append(None)
        return pa.array(out, pa.string()), bad


def _parse_numbers(text: pa.Array, spec: ColumnSpec) -> tuple[pa.Array, np.ndarray]:
    target = ARROW_TYPES[spec.type]
    for candidate in (text, pc.utf8_trim_whitespace(text)):
        try:
            return pc.cast(candidate, target), np.zeros(len(text), bool)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    # Slow path, only for a chunk that holds some unparseable value: find which rows.
    values = pd.to_numeric(pd.Series(text.to_pylist(), dtype=object).str.strip(), errors="coerce")
    parsed = values.notna().to_numpy().copy()
    if spec.type == "integer":
        integral = parsed & np.isfinite(values.to_numpy(dtype=float, na_value=np.nan))
        integral &= np.equal(np.mod(values.to_numpy(dtype=float, na_value=0.0), 1), 0)
        parsed &= integral
    bad = text.is_valid().to_numpy(zero_copy_only=False) & ~parsed
    numbers = values.to_numpy(dtype=float, na_value=np.nan)
    if spec.type == "integer":
        return pa.array(np.where(parsed, numbers, 0).astype(np.int64), mask=~parsed), bad
    return pa.array(numbers, mask=~parsed), bad


def _parse_datetimes(text: pa.Array) -> tuple[pa.Array, np.ndarray]:
    try:
        return pc.cast(pc.utf8_trim_whitespace(text), pa.timestamp("us")), np.zeros(len(text), bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        parsed = pd.to_datetime(pd.Series(text.to_pylist(), dtype=object), errors="coerce", utc=True, format="ISO8601")
        ok = parsed.notna().to_numpy()
        bad = text.is_valid().to_numpy(zero_copy_only=False) & ~ok
        return pa.array(parsed.dt.tz_localize(None).astype("datetime64[us]"), pa.timestamp("us")), bad


def _parse_booleans(text: pa.Array) -> tuple[pa.Array, np.ndarray]:
    # A boolean column holds a handful of distinct spellings: parse those once, then map every row.
    encoded = text.dictionary_encode()
    spellings = pc.utf8_lower(pc.utf8_trim_whitespace(encoded.dictionary))
    is_true = pc.is_in(spellings, value_set=TRUE_TOKENS)
    known = pc.or_(is_true, pc.is_in(spellings, value_set=FALSE_TOKENS))
    values = pc.take(pc.if_else(known, is_true, pa.scalar(None, pa.bool_())), encoded.indices)
    bad = pc.and_(text.is_valid(), pc.invert(pc.take(known, encoded.indices)))
    return values, pc.fill_null(bad, False).to_numpy(zero_copy_only=False)


def parse_column(arr: pa.Array, spec: ColumnSpec) -> tuple[pa.Array, dict[str, np.ndarray]]:
    """One column to its configured type; returns the typed values and the rows each parse problem hit."""
    problems: dict[str, np.ndarray] = {}
    target = ARROW_TYPES[spec.type]
    if pa.types.is_binary(arr.type):
        arr, bad_utf8 = _decode_utf8(arr)
        problems[INVALID_UTF8] = bad_utf8
    elif not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        try:  # typed input (Parquet): a direct cast when it is lossless
            typed = pc.cast(arr, target)
            return typed, problems | ({NON_FINITE: _non_finite(typed)} if spec.type == "float" else {})
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            arr = pc.cast(arr, pa.string())
    if spec.type in ("string", "category"):
        typed, bad = pc.utf8_trim_whitespace(arr), np.zeros(len(arr), bool)
    elif spec.type == "boolean":
        typed, bad = _parse_booleans(arr)
    elif spec.type == "datetime":
        typed, bad = _parse_datetimes(arr)
    else:
        typed, bad = _parse_numbers(arr, spec)
    problems[WRONG_TYPE] = bad
    if spec.type == "float":
        problems[NON_FINITE] = _non_finite(typed)
    return typed, problems


def _non_finite(typed: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.invert(pc.is_finite(typed)), False).to_numpy(zero_copy_only=False)


# ---------------------------------------------------------------------------------------------
# The snapshot


def _schema_error(header: list[str], dataset: DatasetSpec, manifest: Manifest) -> str | None:
    expected = [c.name for c in dataset.columns]
    missing = [c for c in expected if c not in header]
    extra = [c for c in header if c not in expected]
    dupes = sorted({c for c in header if header.count(c) > 1})
    if not (missing or extra or dupes):
        return None
    parts = []
    if missing:
        parts.append(f"missing column(s) {missing}")
    if extra:
        parts.append(f"unknown column(s) {extra} not in the config")
    if dupes:
        parts.append(f"duplicated column(s) {dupes}")
    hint = ""
    if manifest.format == "csv" and len(header) == 1:
        seen = [d for d in (";", "\t", "|", ",") if d in header[0] and d != dataset.csv_delimiter]
        if seen:
            hint = (
                f" The header has a single field, which contains {seen[0]!r}: the file looks delimited by "
                f"{seen[0]!r}, the config says csv_delimiter {dataset.csv_delimiter!r}."
            )
    return f"expect_table_columns_to_match_set failed: {'; '.join(parts)}.{hint}"


class _Uniqueness:
    """Rejects the second and later occurrences of a key, across every chunk of the snapshot."""

    def __init__(self) -> None:
        self.seen: list[pa.Array] = []

    def failing_rows(self, values: pa.Array) -> np.ndarray:
        distinct = pc.unique(values).drop_null()
        if len(distinct) + values.null_count == len(values):  # the usual case: no repeat in this chunk
            dup = np.zeros(len(values), bool)
        else:
            codes = values.dictionary_encode().indices.to_numpy(zero_copy_only=False)
            dup = np.ones(len(values), bool)
            dup[np.unique(codes, return_index=True)[1]] = False  # the first occurrence of each value stays
            dup &= values.is_valid().to_numpy(zero_copy_only=False)  # nulls are the null check's business
        if self.seen:
            earlier = pc.fill_null(pc.is_in(values, value_set=pa.concat_arrays(self.seen)), False)
            dup |= earlier.to_numpy(zero_copy_only=False)
            distinct = pc.unique(values.filter(pa.array(~dup))).drop_null()
        self.seen.append(distinct)
        return dup


def curate_snapshot(cfg: PipelineConfig, snapshot_uri: str) -> CurationResult:
    """Run ETL and validation on one raw snapshot; raises ``ValidationFailed`` when the batch fails."""
    dataset = cfg.dataset
    manifest = read_manifest(snapshot_uri)
    sid = manifest.snapshot_id
    ingest_date = manifest.ingested_at[:10]
    staging = storage.join(cfg.storage.curated_uri, "_staging", f"snapshot={sid}")
    final = storage.join(cfg.storage.curated_uri, f"ingest_date={ingest_date}", f"snapshot={sid}")
    quarantine = storage.join(cfg.storage.quarantine_uri, f"snapshot={sid}")
    report_dir = storage.join(cfg.storage.reports_uri, "validation", f"snapshot={sid}")
    for stale in (staging, quarantine, report_dir):  # a retry starts clean; the raw snapshot is the source
        storage.remove(stale)

    header, chunks = READERS[manifest.format](manifest, dataset, cfg.validation.chunk_rows)
    result = CurationResult(sid, snapshot_uri, None, quarantine, storage.join(report_dir, "index.html"), 0, 0, 0, {}, False)
    problem = _schema_error(header, dataset, manifest)
    if problem:
        _write_report(result, report_dir, [])
        _fail(result, f"{manifest.source_uri}: {problem} Raw snapshot kept at {snapshot_uri}.")

    checks = build_checks(dataset)
    # Rows are judged on the whole snapshot (row count, cross-chunk uniqueness), not per GX batch.
    ge_checks = [c for c in checks if c.expectation != "expect_table_row_count_to_be_between"]
    row_checks = [c for c in checks if c.row_level and c.expectation != "expect_column_values_to_be_unique"]
    unique = {c.column: _Uniqueness() for c in checks if c.expectation == "expect_column_values_to_be_unique"}
    failures: Counter[str] = Counter()
    as_of = datetime.fromisoformat(manifest.ingested_at)
    # GX is mostly Python and holds the GIL; pyarrow's reading and writing mostly does not. One GX
    # worker validates batch i while this thread parses and writes batch i+1.
    gx = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gx")
    runner = gx.submit(SuiteRunner, dataset, ge_checks, 1 - cfg.validation.max_quarantine_fraction)
    batches: list[Future] = []
    try:
        for index, chunk in enumerate(chunks):
            if chunk.malformed:
                failures[f"{MALFORMED_ROW}()"] += len(chunk.malformed)
                _write_malformed(chunk.malformed, quarantine, index)
            result.raw_rows += len(chunk.malformed)
            if chunk.table is None or chunk.table.num_rows == 0:
                continue
            parsed, curated = _check_chunk(chunk, dataset, row_checks, unique, failures, quarantine, index)
            result.raw_rows += chunk.table.num_rows
            if len(batches) > 1:
                batches[-2].result()  # keep at most two batches in memory
            rows = f"rows {chunk.first_row}..{chunk.first_row + chunk.table.num_rows - 1}"
            fingerprint = f"{manifest.sha256}:{index}"
            batches.append(gx.submit(_validate_batch, runner, parsed, fingerprint, report_dir, index, rows))
            curated = derive_features(curated, dataset, as_of)
            result.curated_rows += curated.num_rows
            if curated.num_rows:
                _write_parquet(curated, storage.join(staging, f"part-{index:05d}.parquet"))
        outcomes = [b.result() for b in batches]
    finally:
        gx.shutdown(cancel_futures=True)
    result.expectations = [e for summary, _ in outcomes for e in summary]
    pages = [page for _, page in outcomes]
    result.quarantined_rows = result.raw_rows - result.curated_rows
    result.failures = dict(failures.most_common())
    decision = _decide(cfg, result, manifest)
    _write_report(result, report_dir, pages)
    if decision:
        storage.remove(staging)
        _fail(result, decision)
    if result.curated_rows:
        for part in storage.list_objects(staging):
            storage.move(part.uri, storage.join(final, part.key))
        storage.remove(staging)
        result.curated_uri = final
    result.success = True
    log.info(
        "snapshot %s: %d raw rows -> %d curated + %d quarantined", sid, result.raw_rows, result.curated_rows,
        result.quarantined_rows,
    )
    return result


def _check_chunk(chunk: _Chunk, dataset, row_checks, unique, failures: Counter, quarantine: str, index: int):
    """Parse and check one chunk; quarantines its failing rows and returns (parsed rows, passing rows)."""
    raw = chunk.table
    n = raw.num_rows
    reason = pa.nulls(n, pa.string())
    reason_col = pa.nulls(n, pa.string())

    def flag(mask: np.ndarray, expectation: str, column: str) -> None:
        nonlocal reason, reason_col
        count = int(mask.sum())
        if not count:
            return
        failures[f"{expectation}({column})"] += count
        new = pc.and_(pa.array(mask), pc.is_null(reason))  # a row keeps the first check it failed
        reason = pc.if_else(new, expectation, reason)
        reason_col = pc.if_else(new, column, reason_col)

    # pyarrow compute releases the GIL: parse the columns on all cores.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="parse") as pool:
        parsed_columns = list(pool.map(lambda spec: parse_column(raw.column(spec.name).combine_chunks(), spec), dataset.columns))
    for spec, (_, problems) in zip(dataset.columns, parsed_columns):
        for expectation, mask in problems.items():
            flag(mask, expectation, spec.name)
    typed = pa.table({spec.name: values for spec, (values, _) in zip(dataset.columns, parsed_columns)})
    parsed_ok = pc.is_null(reason).to_numpy(zero_copy_only=False)  # a value that did not parse is no null
    parsed = typed if parsed_ok.all() else typed.filter(pa.array(parsed_ok))
    for check in row_checks:
        flag(check.failing_rows(typed).to_numpy(zero_copy_only=False) & parsed_ok, check.expectation, check.column)
    for column, tracker in unique.items():
        dup = tracker.failing_rows(typed.column(column).combine_chunks())
        flag(dup & parsed_ok, "expect_column_values_to_be_unique", column)
    if reason.null_count == n:
        return parsed, typed
    good = pc.is_null(reason)
    _write_quarantine(raw, pc.invert(good), reason, reason_col, chunk.first_row, quarantine, index)
    return parsed, typed.filter(good)


def _validate_batch(runner: Future, parsed: pa.Table, fingerprint: str, report_dir: str, index: int, rows: str):
    """GX validation and Data Docs page of one batch (runs on the GX worker thread)."""
    df = parsed.to_pandas()
    for name in runner.result().category_columns:
        df[name] = df[name].astype("category")  # GX checks sets on categoricals much faster than on strings
    validation = runner.result().validate(df, fingerprint=fingerprint)
    page = f"batch-{index:05d}.html"
    storage.write_bytes(storage.join(report_dir, page), render_data_docs(validation).encode())
    return summarize(validation), (f"batch {index} ({rows})", page, bool(validation.success))


def _decide(cfg: PipelineConfig, result: CurationResult, manifest: Manifest) -> str | None:
    """Why the snapshot fails as a whole, or None when it passes."""
    dataset = cfg.dataset
    where = f"Raw snapshot kept at {manifest.snapshot_uri}; report at {result.report_uri}"
    low, high = dataset.min_rows, dataset.max_rows
    if result.raw_rows < low or (high is not None and result.raw_rows > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        what = "header only, no data rows" if result.raw_rows == 0 else f"{result.raw_rows} rows"
        return (
            f"{manifest.source_uri}: expect_table_row_count_to_be_between failed: the batch has {what}, "
            f"the config wants {bounds} (dataset.min_rows/max_rows). {where}."
        )
    for e in result.expectations:
        if not e["success"] and e["expectation"] == "expect_column_values_to_be_in_type_list":
            return (
                f"{manifest.source_uri}: {e['expectation']} failed on column {e['column']!r}: "
                f"observed {e['observed_value']}. {where}."
            )
    share = result.quarantined_rows / result.raw_rows
    limit = cfg.validation.max_quarantine_fraction
    if share > limit:
        label, count = next(iter(result.failures.items()))
        expectation, column = label.rstrip(")").split("(", 1)
        on = f" on column {column!r}" if column else ""
        return (
            f"{manifest.source_uri}: {expectation} failed{on} for {count} of {result.raw_rows} rows; "
            f"{result.quarantined_rows} rows ({share:.1%}) quarantined in total, over the limit of {limit:.1%} "
            f"(validation.max_quarantine_fraction). Quarantined rows: {result.quarantine_uri}. "
            f"All failures: {result.failures}. {where}."
        )
    return None


def _fail(result: CurationResult, reason: str) -> None:
    result.reason = reason
    raise ValidationFailed(reason, result)


def _write_parquet(table: pa.Table, uri: str) -> None:
    fs, path = storage.pyarrow_filesystem(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    pq.write_table(table, path, filesystem=fs)


def _text_columns(raw: pa.Table) -> dict[str, pa.Array]:
    """The rows' original values as text (invalid UTF-8 shown with backslash escapes)."""
    out = {}
    for name in raw.column_names:
        col = raw.column(name).combine_chunks()
        if pa.types.is_binary(col.type):
            try:
                col = col.cast(pa.string())
            except pa.ArrowInvalid:
                values = [None if v is None else v.decode("utf-8", errors="backslashreplace") for v in col.to_pylist()]
                col = pa.array(values, pa.string())
        elif not pa.types.is_string(col.type):
            col = pc.cast(col, pa.string())
        out[name] = col
    return out


def _write_quarantine(raw, bad, reason, reason_col, first_row, quarantine_uri, index) -> None:
    rows = pa.array(np.arange(first_row, first_row + raw.num_rows, dtype=np.int64))
    table = pa.table(
        {
            ROW_NUMBER: rows,
            FAILED_EXPECTATION: reason,
            FAILED_COLUMN: reason_col,
            **_text_columns(raw),
        }
    ).filter(bad)
    _write_parquet(table, storage.join(quarantine_uri, f"part-{index:05d}.parquet"))


def _write_malformed(lines: list[str], quarantine_uri: str, index: int) -> None:
    table = pa.table(
        {
            ROW_NUMBER: pa.nulls(len(lines), pa.int64()),
            FAILED_EXPECTATION: pa.array([MALFORMED_ROW] * len(lines)),
            FAILED_COLUMN: pa.nulls(len(lines), pa.string()),
            RAW_LINE: pa.array(lines, pa.string()),
        }
    )
    _write_parquet(table, storage.join(quarantine_uri, f"malformed-{index:05d}.parquet"))


def _write_report(result: CurationResult, report_dir: str, pages) -> None:
    summary = {k: v for k, v in asdict(result).items() if k != "expectations"}
    storage.write_bytes(storage.join(report_dir, "summary.json"), json.dumps(asdict(result), indent=2, default=str).encode())
    storage.write_bytes(
        storage.join(report_dir, "index.html"),
        render_index(f"Validation of snapshot {result.snapshot_id}", pages, summary).encode(),
    )


def read_quarantine(quarantine_uri: str) -> pa.Table | None:
    """All quarantined rows of a snapshot (for inspection and tests)."""
    parts = [o for o in storage.list_objects(quarantine_uri) if o.key.endswith(".parquet")]
    if not parts:
        return None
    tables = []
    for part in parts:
        fs, path = storage.pyarrow_filesystem(part.uri)
        tables.append(pq.read_table(path, filesystem=fs))
    return pa.concat_tables(tables, promote_options="permissive")
