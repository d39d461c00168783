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

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def check_columns(self, given: list[str]) -> None:
        unknown = [c for c in given if c not in self.names]
        if unknown:
            raise BadRequest(f"unknown column(s) {unknown}; the model takes {self.names}")
        missing = [c.name for c in self.columns if c.required and c.name not in given]
        if missing:
            raise BadRequest(f"missing required column(s) {missing}; the model takes {self.names}")

    def typed(self, columns: dict[str, list], rows: int) -> dict[str, list]:
        """Every signature column, checked value by value; an absent optional column is all null."""
        if rows == 0:
            raise BadRequest("the batch is empty: send at least one row")
        out = {}
        for col in self.columns:
            values = columns.get(col.name)
            if values is None:
                out[col.name] = [None] * rows
            else:
                fast = _check_fast(col, values)
                out[col.name] = fast if fast is not None else [_check(col, v, i) for i, v in enumerate(values)]
        return out


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


def parse_body(body: bytes, content_type: str, signature: Signature) -> dict[str, list]:
    """A request body in any supported format -> checked columns (signature order)."""
    if not body.strip():
        raise BadRequest("the request body is empty")
    media = content_type.split(";", 1)[0].strip().lower()
    if media in ("text/csv", "application/csv"):
        return _parse_csv(body, signature)
    if media in PARQUET_TYPES:
        return _parse_parquet(body, signature)
    if media and media not in ("application/json", "application/jsonlines", "*/*"):
        raise BadRequest(f"unsupported content type {media!r}: send application/json, text/csv or "
                         f"{PARQUET_TYPES[0]}", 415, "UNSUPPORTED_MEDIA_TYPE")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"the body is not valid JSON: {err}") from None
    return _parse_json(payload, signature)


FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs", "input_data", "data")


def _parse_json(payload, signature: Signature) -> dict[str, list]:
    if not isinstance(payload, dict):
        raise BadRequest(f"expected a JSON object with one of the keys {list(FORMATS)}, got a {type(payload).__name__}")
    keys = [k for k in FORMATS if k in payload]
    extra = sorted(set(payload) - set(FORMATS) - {"params", "parameters"})
    if len(keys) != 1 or extra:
        raise BadRequest(f"expected exactly one of the keys {list(FORMATS)} (and optionally 'params'), got {sorted(payload)}")
    key, value = keys[0], payload[keys[0]]
    if key == "dataframe_split" or (key == "input_data" and isinstance(value, dict) and "columns" in value):
        return _split(value, signature)
    if isinstance(value, dict):  # {"instances": {"col": [values]}}: MLflow's columnar form
        signature.check_columns(list(value))
        lengths = {len(v) if isinstance(v, list) else -1 for v in value.values()}
        if -1 in lengths or len(lengths) > 1:
            raise BadRequest(f"'{key}' as an object must map each column to a list of values of one length")
        return signature.typed(value, lengths.pop() if lengths else 0)
    if not isinstance(value, list):
        raise BadRequest(f"'{key}' must be a list of rows, got {type(value).__name__}")
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


def _split(value, signature: Signature) -> dict[str, list]:
    if not isinstance(value, dict) or not isinstance(value.get("columns"), list) or not isinstance(value.get("data"), list):
        raise BadRequest("'dataframe_split' must be an object with 'columns' (a list) and 'data' (a list of rows)")
    columns, data = value["columns"], value["data"]
    signature.check_columns(columns)
    bad = next((i for i, r in enumerate(data) if not isinstance(r, list) or len(r) != len(columns)), None)
    if bad is not None:
        raise BadRequest(f"row {bad} of 'data' must be a list of {len(columns)} values (one per column)")
    return signature.typed({c: [r[j] for r in data] for j, c in enumerate(columns)}, len(data))


def _parse_csv(body: bytes, signature: Signature) -> dict[str, list]:
    try:
        rows = list(csv.reader(io.StringIO(body.decode("utf-8-sig"))))
    except (UnicodeDecodeError, csv.Error) as err:
        raise BadRequest(f"the body is not valid CSV: {err}") from None
    header, data = rows[0], [r for r in rows[1:] if r]
    signature.check_columns(header)
    by_name = {c.name: c for c in signature.columns}
    bad = next((i for i, r in enumerate(data) if len(r) != len(header)), None)
    if bad is not None:
        raise BadRequest(f"CSV row {bad} has {len(data[bad])} fields; the header has {len(header)}")
    columns = {c: [_csv_value(by_name[c], r[j], i) for i, r in enumerate(data)] for j, c in enumerate(header)}
    return signature.typed(columns, len(data))


PARQUET_TYPES = ("application/vnd.apache.parquet", "application/x-parquet")


def _parse_parquet(body: bytes, signature: Signature) -> dict[str, list]:
    """A Parquet file (a batch transform sends each curated file whole): the signature's columns are
    taken, any other column (keys, the target) is ignored, and timestamps become ISO 8601 strings as
    a JSON caller sends them. The answers come back in the file's row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(body), columns=None)
    except (pa.ArrowInvalid, OSError) as err:
        raise BadRequest(f"the body is not a valid Parquet file: {err}") from None
    present = [c.name for c in signature.columns if c.name in table.column_names]
    signature.check_columns(present)
    columns = {}
    for name in present:
        column = table.column(name)
        values = column.to_pylist()
        if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
            values = [None if v is None else v.isoformat() for v in values]
        columns[name] = values
    return signature.typed(columns, table.num_rows)
