"""Request bodies of every serving contract (MLflow's JSON formats, CSV, a SageMaker transform's Parquet),
checked against the model's signature: a bad body is a ``BadRequest`` whose message names the problem."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from datetime import datetime

from mlfactory.features import FALSE_WORDS, TRUE_WORDS


class BadRequest(Exception):
    """A request the caller must fix: answered with ``status`` and ``message``, never a 500."""

    def __init__(self, message: str, status: int = 400, code: str = "BAD_REQUEST"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


# ---------------------------------------------------------------------------------------------
# The signature and request bodies


@dataclass(frozen=True)
class InputColumn:
    name: str
    type: str  # double | float | long | integer | string | boolean | datetime (MLflow DataType names)
    required: bool = True
    iso_datetime: bool = False  # a string column that holds ISO 8601 datetimes (from the dataset config)


@dataclass(frozen=True)
class Signature:
    columns: list[InputColumn]
    # Columns of the dataset the model does not take (the target; ``string`` columns, identifiers): a row of the
    # user's own file holds them, so they are accepted and left out of the prediction. ``echo``: those a
    # prediction carries back (the identifiers), so each answer can be matched to its row.
    ignored: tuple[str, ...] = ()
    echo: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def check_columns(self, given: list[str]) -> None:
        unknown = [c for c in given if c not in self.names and c not in self.ignored]
        if unknown:
            also = f" (and accepts, unused: {list(self.ignored)})" if self.ignored else ""
            raise BadRequest(f"unknown column(s) {unknown}; the model takes {self.names}{also}")
        missing = [c.name for c in self.columns if c.required and c.name not in given]
        if missing:
            raise BadRequest(f"missing required column(s) {missing}; the model takes {self.names}")

    def typed(self, columns: dict[str, list], rows: int) -> dict[str, list]:
        """Every signature column, checked value by value (an absent optional column is all null), then each
        ``echo`` column sent, as sent (plain values)."""
        if rows == 0:
            raise BadRequest("the batch is empty: send at least one row")
        out = {}
        for name in self.echo:
            bad = next((i for i, v in enumerate(columns.get(name, ())) if isinstance(v, dict | list)), None)
            if bad is not None:
                raise BadRequest(f"column {name!r} row {bad}: expected a plain value, got {columns[name][bad]!r}")
        for col in self.columns:
            values = columns.get(col.name)
            if values is None:
                out[col.name] = [None] * rows
            else:
                fast = _check_fast(col, values)
                out[col.name] = fast if fast is not None else [_check(col, v, i) for i, v in enumerate(values)]
        return out | {name: list(columns[name]) for name in self.echo if name in columns}


_JSON_TYPES = {"double": {float, int}, "float": {float, int}, "long": {int}, "integer": {int},
               "boolean": {bool}, "string": {str}, "datetime": {str}}


def _check_fast(col: InputColumn, values: list) -> list | None:
    """The common case in a few C-level passes: every value already of the column's JSON type (and
    no NaN, no bad date). None when any value needs a closer look: then ``_check`` value by value
    gives the same result or the error that names the row."""
    allowed = _JSON_TYPES.get(col.type)
    kinds = set(map(type, values))
    if allowed is None or not kinds <= (allowed if col.required else allowed | {type(None)}):
        return None
    present = values if type(None) not in kinds else [v for v in values if v is not None]
    if float in kinds and any(map(math.isnan, present)):
        return None
    if int in kinds and col.type in ("double", "float"):
        values = [v if v is None else float(v) for v in values]
    if col.iso_datetime or col.type == "datetime":
        try:
            list(map(datetime.fromisoformat, present))  # parses every value (any() would stop at the first)
        except ValueError:
            return None
    return values


def _check(col: InputColumn, value, row: int):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if col.required:
            raise BadRequest(f"column {col.name!r} is required but row {row} is null")
        return None
    kind = col.type
    if kind in ("double", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRequest(f"column {col.name!r} row {row}: expected a number, got {value!r}")
        return float(value)
    if kind in ("long", "integer"):
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise BadRequest(f"column {col.name!r} row {row}: expected an integer, got {value!r}")
        return int(value)
    if kind == "boolean":
        if not isinstance(value, bool):
            raise BadRequest(f"column {col.name!r} row {row}: expected true or false, got {value!r}")
        return value
    if not isinstance(value, str):
        raise BadRequest(f"column {col.name!r} row {row}: expected a string, got {value!r}")
    if col.iso_datetime or kind == "datetime":
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise BadRequest(f"column {col.name!r} row {row}: expected an ISO 8601 date/time, got {value!r}") from None
    return value


def _csv_value(col: InputColumn, text: str, row: int):
    """A CSV cell typed by the signature (CSV has no types of its own); empty is null."""
    if text == "":
        return None
    if col.type in ("double", "float", "long", "integer"):
        try:
            number = float(text)
        except ValueError:
            raise BadRequest(f"column {col.name!r} row {row}: expected a number, got {text!r}") from None
        return number
    if col.type == "boolean":
        word = text.strip().lower()
        if word not in TRUE_WORDS | FALSE_WORDS:
            raise BadRequest(f"column {col.name!r} row {row}: expected true or false, got {text!r}")
        return word in TRUE_WORDS
    return text


def parse_body(body: bytes, content_type: str, signature: Signature, max_rows: int = 100_000,
               max_decoded_bytes: int = 512 * 1024 * 1024) -> dict[str, list]:
    """A request body in any supported format -> checked columns (signature order). ``max_rows`` holds for
    every format, counted before any value is checked (CSV and JSON lines: as they are read)."""
    if not body.strip():
        raise BadRequest("the request body is empty")
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if media in ("text/csv", "application/csv"):
        header = {"present": True, "absent": False}.get(_param(params, "header"))
        return _parse_csv(body, signature, max_rows, header)
    if media in PARQUET_TYPES:
        return _parse_parquet(body, signature, max_rows, max_decoded_bytes)
    if media in JSONLINES_TYPES:
        return _parse_jsonlines(body, signature, max_rows)
    if media and media not in ("application/json", "*/*"):
        raise BadRequest(f"unsupported content type {media!r}: send application/json, application/jsonlines, "
                         f"text/csv or {PARQUET_TYPES[0]}", 415, "UNSUPPORTED_MEDIA_TYPE")
    return _parse_json(_json(body), signature, max_rows)


def _too_many(rows: int, max_rows: int, what: str = "the body") -> None:
    if rows > max_rows:
        raise BadRequest(f"{what} has more than {max_rows} rows, the limit per request", 413, "PAYLOAD_TOO_LARGE")


JSONLINES_TYPES = ("application/jsonlines", "application/x-jsonlines", "application/jsonl", "application/x-ndjson")


def _param(params: str, name: str) -> str | None:
    for part in params.split(";"):
        key, _, value = part.partition("=")
        if key.strip().lower() == name:
            return value.strip().strip('"').lower()
    return None


def _json(text: bytes | str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"the body is not valid JSON: {err}") from None
    except RecursionError:  # the C parser's guard against stack exhaustion
        raise BadRequest("the body's JSON is nested too deeply (rows are objects or lists of plain values)") from None


def _parse_jsonlines(body: bytes, signature: Signature, max_rows: int) -> dict[str, list]:
    """JSON lines, as SageMaker batch transform sends them with ``SplitType: Line``: one row per line, an
    object (column -> value) or a list of values in signature order (or a whole request body per line,
    e.g. ``{"instances": [...]}``, whose rows are joined)."""
    try:
        lines = [line for line in body.decode("utf-8-sig").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise BadRequest(f"the body is not valid UTF-8 JSON lines: {err}") from None
    _too_many(len(lines), max_rows)
    rows = []
    for i, line in enumerate(lines):
        value = _json(line)
        if isinstance(value, dict) and len(set(value) & set(FORMATS)) == 1 and not set(value) - set(FORMATS) - {"params", "parameters"}:
            parsed = _parse_json(value, signature, max_rows - len(rows))
            rows.extend(dict(zip(parsed, r, strict=True)) for r in zip(*parsed.values(), strict=True))
        elif isinstance(value, dict | list):
            rows.append(value)
        else:
            raise BadRequest(f"line {i + 1} is a {type(value).__name__}; each line must be a JSON object or list (one row)")
    if all(isinstance(r, list) for r in rows):
        return _parse_json({"instances": rows}, signature, max_rows)
    if any(isinstance(r, list) for r in rows):
        raise BadRequest("the lines mix objects and lists; send one kind")
    return _parse_json({"dataframe_records": rows}, signature, max_rows)


FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs", "input_data", "data")


def _parse_json(payload, signature: Signature, max_rows: int) -> dict[str, list]:
    if not isinstance(payload, dict):
        raise BadRequest(f"expected a JSON object with one of the keys {list(FORMATS)}, got a {type(payload).__name__}")
    keys = [k for k in FORMATS if k in payload]
    extra = sorted(set(payload) - set(FORMATS) - {"params", "parameters"})
    if len(keys) != 1 or extra:
        raise BadRequest(f"expected exactly one of the keys {list(FORMATS)} (and optionally 'params'), got {sorted(payload)}")
    key, value = keys[0], payload[keys[0]]
    if key == "dataframe_split" or (key == "input_data" and isinstance(value, dict) and "columns" in value):
        return _split(value, signature, max_rows)
    if isinstance(value, dict):  # {"instances": {"col": [values]}}: MLflow's columnar form
        signature.check_columns(list(value))
        lengths = {len(v) if isinstance(v, list) else -1 for v in value.values()}
        if -1 in lengths or len(lengths) > 1:
            raise BadRequest(f"'{key}' as an object must map each column to a list of values of one length")
        rows = lengths.pop() if lengths else 0
        _too_many(rows, max_rows)
        return signature.typed(value, rows)
    if not isinstance(value, list):
        raise BadRequest(f"'{key}' must be a list of rows, got {type(value).__name__}")
    _too_many(len(value), max_rows)
    if not value:
        raise BadRequest("the batch is empty: send at least one row")
    if all(isinstance(r, list) for r in value):  # rows of values in signature order
        if key == "dataframe_records":
            raise BadRequest("'dataframe_records' must be a list of objects (column -> value)")
        width = len(signature.columns)
        bad = next((i for i, r in enumerate(value) if len(r) != width), None)
        if bad is not None:
            raise BadRequest(f"row {bad} has {len(value[bad])} values; the model takes {width}: {signature.names}")
        return signature.typed({c: [r[j] for r in value] for j, c in enumerate(signature.names)}, len(value))
    bad = next((i for i, r in enumerate(value) if not isinstance(r, dict)), None)
    if bad is not None:
        raise BadRequest(f"row {bad} of '{key}' is a {type(value[bad]).__name__}; send objects (column -> value) or lists")
    given = dict.fromkeys(k for r in value for k in r)
    signature.check_columns(list(given))
    for i, r in enumerate(value):
        absent = [c.name for c in signature.columns if c.required and c.name not in r]
        if absent:
            raise BadRequest(f"row {i} lacks required column(s) {absent}")
    return signature.typed({c: [r.get(c) for r in value] for c in given}, len(value))


def _split(value, signature: Signature, max_rows: int) -> dict[str, list]:
    if not isinstance(value, dict) or not isinstance(value.get("columns"), list) or not isinstance(value.get("data"), list):
        raise BadRequest("'dataframe_split' must be an object with 'columns' (a list) and 'data' (a list of rows)")
    columns, data = value["columns"], value["data"]
    _too_many(len(data), max_rows)
    signature.check_columns(columns)
    bad = next((i for i, r in enumerate(data) if not isinstance(r, list) or len(r) != len(columns)), None)
    if bad is not None:
        raise BadRequest(f"row {bad} of 'data' must be a list of {len(columns)} values (one per column)")
    return signature.typed({c: [r[j] for r in data] for j, c in enumerate(columns)}, len(data))


def _parse_csv(body: bytes, signature: Signature, max_rows: int, header: bool | None = None) -> dict[str, list]:
    """CSV with a header row, or without one (SageMaker sends ``text/csv`` rows bare: values in signature
    order). ``header`` says which (the ``header=present|absent`` parameter of text/csv, RFC 7111); without
    it, a first row that names signature columns is the header."""
    try:
        rows = []
        for row in csv.reader(io.StringIO(body.decode("utf-8-sig"))):
            if row:
                rows.append(row)
                _too_many(len(rows), max_rows + 1)  # (a header row is allowed beside them)
    except (UnicodeDecodeError, csv.Error) as err:
        raise BadRequest(f"the body is not valid CSV: {err}") from None
    if not rows:
        raise BadRequest("the batch is empty: send at least one row")
    if header is None:
        header = any(cell.strip() in signature.names for cell in rows[0])
    if header:
        names, data = [cell.strip() for cell in rows[0]], rows[1:]
    else:
        names, data = signature.names, rows
    _too_many(len(data), max_rows)
    signature.check_columns(names)
    by_name = {c.name: c for c in signature.columns}
    bad = next((i for i, r in enumerate(data) if len(r) != len(names)), None)
    if bad is not None:
        what = "the header has" if header else "the model takes (no header row: values in signature order)"
        raise BadRequest(f"CSV row {bad} has {len(data[bad])} fields; {what} {len(names)}: {names}")
    columns = {c: [_csv_value(by_name[c], r[j], i) if c in by_name else r[j] or None for i, r in enumerate(data)]
               for j, c in enumerate(names)}
    return signature.typed(columns, len(data))


PARQUET_TYPES = ("application/vnd.apache.parquet", "application/x-parquet")


def _parse_parquet(body: bytes, signature: Signature, max_rows: int, max_decoded_bytes: int) -> dict[str, list]:
    """A Parquet file (a batch transform sends each curated file whole): the signature's columns are
    taken (and the ids it echoes), any other column (the target, keys) is ignored, and timestamps become
    ISO 8601 strings as a JSON caller sends them. The answers come back in the file's row order.

    A small file can hold a bomb: its rows and uncompressed size are checked from the footer before anything
    is decompressed, a column the model takes must be of a plain type (a struct or list of the same name is
    refused, not read), and the size the columns decode to, dictionary values repeated included, is counted
    batch by batch as they are read."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(io.BytesIO(body))
        meta, schema = parquet.metadata, parquet.schema_arrow
        wanted = [c for c in [*signature.names, *signature.echo] if c in schema.names]
        nested = [f"{name} ({schema.field(name).type})" for name in wanted if pa.types.is_nested(schema.field(name).type)]
        if nested:
            raise BadRequest(f"the Parquet file's column(s) {nested} are nested; the model takes plain values")
        _too_many(meta.num_rows, max_rows, "the Parquet file")
        decoded = sum(rg.column(j).total_uncompressed_size for rg in map(meta.row_group, range(meta.num_row_groups))
                      for j in range(rg.num_columns) if rg.column(j).path_in_schema in wanted)
        if decoded > max_decoded_bytes:
            raise BadRequest(f"the Parquet file's columns decompress to {decoded} bytes; the limit is "
                             f"{max_decoded_bytes}", 413, "PAYLOAD_TOO_LARGE")
        texts = [c for c in wanted if pa.types.is_string(schema.field(c).type) or pa.types.is_binary(schema.field(c).type)]
        batches, size = [], 0
        reading = pq.ParquetFile(io.BytesIO(body), read_dictionary=texts)  # text as written: a dictionary stays one
        for batch in reading.iter_batches(batch_size=8192, columns=wanted):
            for column in batch.columns:  # a dictionary's values count once per row that points at them
                size += (pc.sum(pc.take(pc.binary_length(column.dictionary), column.indices)).as_py() or 0
                         if pa.types.is_dictionary(column.type) else column.nbytes)
            if size > max_decoded_bytes:
                raise BadRequest(f"the Parquet file's columns decode to more than {max_decoded_bytes} bytes, the limit",
                                 413, "PAYLOAD_TOO_LARGE")
            batches.append(batch)
        table = pa.Table.from_batches(batches, schema=pa.schema([schema.field(c) for c in wanted])
                                      if not batches else None)
    except (pa.ArrowInvalid, OSError) as err:
        raise BadRequest(f"the body is not a valid Parquet file: {err}") from None
    if table.num_rows != meta.num_rows:  # a footer that lied
        raise BadRequest(f"the Parquet file's footer says {meta.num_rows} rows; its pages hold {table.num_rows}")
    present = [c for c in wanted if c in table.column_names]
    signature.check_columns(present)
    columns = {}
    for name in present:
        column = table.column(name)
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        values = column.to_pylist()
        if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
            values = [None if v is None else v.isoformat() for v in values]
        columns[name] = values
    return signature.typed(columns, table.num_rows)
