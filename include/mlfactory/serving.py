"""The model server: one HTTP server, one container image, every platform this project deploys to.

    python -m mlfactory.serving --model-uri models:/customer_churn@champion --port 8080

It loads a model from the MLflow registry (or any MLflow model URI) and answers on one port:

| platform | health | predict |
|---|---|---|
| MLflow scoring protocol | `GET /ping`, `GET /health`, `GET /version` | `POST /invocations`: `dataframe_split`, `dataframe_records`, `instances`, `inputs` (JSON) or CSV |
| SageMaker container contract | `GET /ping` | `POST /invocations` (port 8080); batch transform sends each Parquet file whole (`application/vnd.apache.parquet`) |
| Vertex AI custom container | `AIP_HEALTH_ROUTE` | `AIP_PREDICT_ROUTE`, port `AIP_HTTP_PORT`: `{"instances": [...]}` → `{"predictions": [...]}` |
| Azure ML online endpoint | liveness `GET /`, readiness `GET /ready` | `POST /score` (`input_data` as split or records, or any of the above) |

In a container, ``MLFACTORY_MODEL_URI`` names the model (a SageMaker Model points it at the
version's files in S3) and ``MLFACTORY_MODEL_VERSION`` the registered version it is.

Every predict route takes every body format and answers ``{"predictions": [{...}, ...]}``, one
object per row, as the MLflow pyfunc's output columns.

- **Input is checked against the model signature**: a missing or unknown column, a value of the wrong
  type, a null in a required column, an empty batch, a body over ``--max-body-bytes`` or malformed
  JSON/CSV get a 4xx whose message names the problem. A model that raises gets a 500 that says so.
- **Auth**: with a token (env ``MLFACTORY_SERVING_TOKEN``, never a command-line argument) every route
  but health needs ``Authorization: Bearer <token>``. The admin API needs a token to exist at all.
- **Metrics** in Prometheus format on ``GET /metrics``: requests by route and status, latency
  histogram, predicted rows, model errors, and the version each variant serves.
- **Prediction log**: inputs, outputs, model version, variant and time, appended in batches as
  Parquet under ``--log-uri`` by a background thread (never on the request path), for ml_monitor.
- **Variants** (blue/green and canary on one endpoint, as SageMaker production variants, Vertex AI
  traffic splits and Azure ML deployments do): ``PUT /admin/variants/{name}`` loads a model version,
  ``PUT /admin/traffic`` sets the weights, ``DELETE /admin/variants/{name}`` unloads one; the
  ``X-Target-Variant`` header sends a request to one variant whatever its weight (smoke tests).
- **Speed**: concurrent requests to a variant are micro-batched into one forward pass on a worker
  thread while the event loop keeps parsing; the model is loaded once, never per request.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hmac
import io
import json
import logging
import math
import os
import random
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

from mlfactory.features import FALSE_WORDS, TRUE_WORDS

log = logging.getLogger("mlfactory.serving")

TOKEN_ENV = "MLFACTORY_SERVING_TOKEN"
TARGET_HEADER = b"x-target-variant"
DEFAULT_MAX_BODY = 10 * 1024 * 1024
MAX_BATCH_ROWS = 10_000  # rows of concurrent requests joined into one forward pass


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


# ---------------------------------------------------------------------------------------------
# A loaded model version


class ServedModel:
    """An MLflow model loaded once: its signature, and predict over checked columns."""

    def __init__(self, model_uri: str, version: str | None = None):
        import mlflow.pyfunc

        from mlfactory.tabular import TabularPyfunc

        # a cloud endpoint loads the files (s3://...) and is told the registered version beside them
        self.model_uri, self.version = model_uri, version or _resolve_version(model_uri)
        self.pyfunc = mlflow.pyfunc.load_model(model_uri)
        python_model = getattr(self.pyfunc, "unwrap_python_model", lambda: None)()
        # Our tabular models take the checked columns straight into Arrow and numpy: no pyfunc schema
        # enforcement and no DataFrame on the hot path (the request was already checked against the
        # signature, with messages that say why). Any other pyfunc gets a DataFrame.
        self.tabular = python_model.model if isinstance(python_model, TabularPyfunc) else None
        dataset = self.tabular.dataset if self.tabular else None
        self.signature = _signature(self.pyfunc.metadata.get_input_schema(), dataset)

    def predict(self, columns: dict[str, list]) -> dict[str, list]:
        """Checked input columns -> output columns (lists of plain Python values)."""
        if self.tabular is not None:
            outputs = self.tabular.predict_wire(columns)
            return {name: [None if isinstance(v, float) and math.isnan(v) else v for v in values]
                    for name, values in outputs.items()}
        import pandas as pd

        output = self.pyfunc.predict(pd.DataFrame(columns))
        if not isinstance(output, pd.DataFrame):
            output = pd.DataFrame({"prediction": list(output)})
        # JSON has no NaN: a missing output value is null
        return {name: (values.astype(object).where(values.notna(), None) if values.hasnans else values).tolist()
                for name, values in output.items()}


def _signature(schema, dataset) -> Signature:
    if schema is None:
        raise ValueError("the model has no input signature; log it with one so requests can be checked")
    datetimes = {c.name for c in dataset.columns if c.type == "datetime"} if dataset else set()
    return Signature([
        InputColumn(spec.name, spec.type.name if hasattr(spec.type, "name") else str(spec.type),
                    getattr(spec, "required", True), spec.name in datetimes)
        for spec in schema.inputs
    ])


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


# ---------------------------------------------------------------------------------------------
# The prediction log


class PredictionLog:
    """Served rows buffered in memory and written as Parquet parts by a background thread."""

    def __init__(self, uri: str | None, flush_seconds: float = 10.0, flush_rows: int = 5000, max_rows: int = 1_000_000):
        self.uri, self.flush_seconds, self.flush_rows, self.max_rows = uri, flush_seconds, flush_rows, max_rows
        self.chunks: list[dict[str, list]] = []
        self.rows = self.dropped = self.written = 0
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)

    def start(self) -> None:
        if self.uri:
            self.thread.start()

    def append(self, inputs: dict[str, list], outputs: dict[str, list], version: str, variant: str, request_ids: list[str]) -> None:
        """Cheap on the request path: the rows are added to per-column lists; Arrow sees them at flush."""
        if not self.uri:
            return
        n = len(request_ids)
        rows = {**inputs, **outputs, "model_version": [version] * n, "variant": [variant] * n,
                "request_id": request_ids, "served_at": [time.time_ns() // 1000] * n}
        with self.lock:
            if self.rows + n > self.max_rows:  # the bucket is unreachable for long: drop, count, never block
                self.dropped += n
                return
            last = self.chunks[-1] if self.chunks else None
            if last is not None and last.keys() == rows.keys():  # the same columns (one signature): one segment
                for name, values in rows.items():
                    last[name].extend(values)
            else:
                self.chunks.append({name: list(values) for name, values in rows.items()})
            self.rows += n
        if self.rows >= self.flush_rows:
            self.wake.set()

    def _run(self) -> None:
        while not self.stopping:
            self.wake.wait(self.flush_seconds)
            self.wake.clear()
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        from mlfactory import storage

        with self.lock:
            chunks, self.chunks, rows, self.rows = self.chunks, [], self.rows, 0
        if not chunks:
            return
        try:
            served_at = pa.timestamp("us", tz="UTC")
            table = pa.concat_tables([pa.Table.from_pydict({**c, "served_at": pa.array(c["served_at"], pa.int64()).cast(served_at)})
                                      for c in chunks], promote_options="permissive")
            now = datetime.now(timezone.utc)
            name = f"date={now:%Y-%m-%d}/part-{now:%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
            import pyarrow.parquet as pq

            with storage.atomic_write(storage.join(self.uri, name)) as f:
                pq.write_table(table, f)
            self.written += rows
        except Exception:  # noqa: BLE001 - keep the rows for the next try rather than lose them
            log.exception("could not write %d logged predictions to %s; will retry", rows, self.uri)
            with self.lock:
                self.chunks = chunks + self.chunks
                self.rows += rows

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        self.flush()


# ---------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("mlfactory_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("mlfactory_request_latency_seconds", "request latency by route", ["route"],
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                 registry=self.registry)
        self.rows = Counter("mlfactory_predicted_rows", "rows predicted", ["variant", "version"], registry=self.registry)
        self.model_errors = Counter("mlfactory_model_errors", "predict calls where the model raised", ["variant", "version"],
                                    registry=self.registry)
        self.model = Gauge("mlfactory_model_version", "1 for each (variant, version) loaded; the weight is its traffic share",
                           ["variant", "version", "model_uri"], registry=self.registry)
        self.weight = Gauge("mlfactory_variant_weight", "traffic weight of each variant", ["variant"], registry=self.registry)
        self.log_dropped = Gauge("mlfactory_prediction_log_dropped_rows", "rows the prediction log could not keep",
                                 registry=self.registry)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---------------------------------------------------------------------------------------------
# Variants and the micro-batcher


@dataclass
class Variant:
    name: str
    model: ServedModel
    weight: float = 0.0
    requests: int = 0
    errors: int = 0  # predict calls where the model raised (not the caller's 4xx)
    pending: list = field(default_factory=list)  # (columns, rows, future) waiting for the worker
    busy: bool = False

    def describe(self) -> dict:
        return {"name": self.name, "version": self.model.version, "model_uri": self.model.model_uri,
                "weight": self.weight, "requests": self.requests, "errors": self.errors, "state": "ready"}


class ModelServer:
    """The ASGI application."""

    def __init__(self, token: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
                 prediction_log: PredictionLog | None = None, health_route: str = "/health",
                 predict_route: str = "/predict"):
        self.token = token or None
        self.max_body_bytes = max_body_bytes
        self.variants: dict[str, Variant] = {}
        self.loading: set[str] = set()
        self.log = prediction_log or PredictionLog(None)
        self.metrics = Metrics()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")  # one forward pass at a time
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        self.health_routes = {"/ping", "/health", health_route, "/ready"}
        self.predict_routes = {"/invocations": "invocations", "/score": "score", "/predict": "predict",
                               predict_route: "predict"}

    # --- variants ---------------------------------------------------------------------------

    def add_variant(self, name: str, model: ServedModel, weight: float) -> Variant:
        old = self.variants.get(name)
        if old is not None:
            self.metrics.model.remove(name, old.model.version, old.model.model_uri)
        variant = self.variants[name] = Variant(name, model, weight)
        self.metrics.model.labels(name, model.version, model.model_uri).set(1)
        self.metrics.weight.labels(name).set(weight)
        return variant

    def set_weights(self, weights: dict[str, float]) -> None:
        unknown = sorted(set(weights) - set(self.variants))
        if unknown:
            raise BadRequest(f"unknown variant(s) {unknown}; loaded: {sorted(self.variants)}", 404, "NOT_FOUND")
        if any(not isinstance(w, int | float) or isinstance(w, bool) or w < 0 for w in weights.values()):
            raise BadRequest(f"weights must be numbers >= 0, got {weights}")
        for name, variant in self.variants.items():
            variant.weight = float(weights.get(name, 0.0))
            self.metrics.weight.labels(name).set(variant.weight)

    def choose(self, target: str | None) -> Variant:
        if target:
            if target not in self.variants:
                raise BadRequest(f"unknown variant {target!r} in {TARGET_HEADER.decode()}; loaded: {sorted(self.variants)}",
                                 404, "NOT_FOUND")
            return self.variants[target]
        live = [v for v in self.variants.values() if v.weight > 0]
        if not live:
            raise BadRequest("no model is deployed on this endpoint yet", 503, "UNAVAILABLE")
        return live[0] if len(live) == 1 else random.choices(live, weights=[v.weight for v in live])[0]

    @property
    def ready(self) -> bool:
        return any(v.weight > 0 for v in self.variants.values())

    async def predict(self, variant: Variant, columns: dict[str, list], rows: int) -> dict[str, list]:
        """Queue the rows for the variant's next forward pass; concurrent requests share it."""
        future = asyncio.get_running_loop().create_future()
        variant.pending.append((columns, rows, future))
        if not variant.busy:
            variant.busy = True
            asyncio.get_running_loop().create_task(self._drain(variant))
        return await future

    async def _drain(self, variant: Variant) -> None:
        loop = asyncio.get_running_loop()
        try:
            while variant.pending:
                batch, total = [], 0
                while variant.pending and (not batch or total + variant.pending[0][1] <= MAX_BATCH_ROWS):
                    item = variant.pending.pop(0)
                    batch.append(item)
                    total += item[1]
                joined = batch[0][0] if len(batch) == 1 else {
                    name: [v for columns, _, _ in batch for v in columns[name]] for name in batch[0][0]}
                try:
                    outputs = await loop.run_in_executor(self.worker, variant.model.predict, joined)
                except Exception as err:  # noqa: BLE001 - the model's failure is reported to each caller
                    variant.errors += len(batch)
                    self.metrics.model_errors.labels(variant.name, variant.model.version).inc(len(batch))
                    log.exception("variant %s (version %s) failed to predict", variant.name, variant.model.version)
                    for _, _, future in batch:
                        future.set_exception(ModelError(f"the model (version {variant.model.version}) failed: "
                                                        f"{type(err).__name__}: {err}"))
                    continue
                start = 0
                for _, rows, future in batch:
                    if not future.cancelled():
                        future.set_result({k: v[start:start + rows] for k, v in outputs.items()})
                    start += rows
        finally:
            variant.busy = False

    # --- HTTP ---------------------------------------------------------------------------------

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        method, path = scope["method"], scope["path"]
        headers = dict(scope["headers"])
        route = self._route_label(path)
        extra_headers: list[tuple[bytes, bytes]] = []
        try:
            status, payload, extra_headers = await self._handle(method, path, headers, receive)
        except BadRequest as err:
            status, payload = err.status, {"error_code": err.code, "message": err.message}
            if status == 401:
                extra_headers = [(b"www-authenticate", b"Bearer")]
        except ModelError as err:
            status, payload = 500, {"error_code": "MODEL_ERROR", "message": str(err)}
        except ClientGone:
            return
        except Exception as err:  # noqa: BLE001 - a bug here must not take the endpoint down
            log.exception("unexpected error on %s %s", method, path)
            status, payload = 500, {"error_code": "INTERNAL_ERROR", "message": f"{type(err).__name__}: {err}"}
        if isinstance(payload, bytes):
            body, media = payload, b"text/plain; version=0.0.4"
        else:
            body, media = json.dumps(payload, allow_nan=False, default=_jsonable).encode(), b"application/json"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", media), (b"content-length", str(len(body)).encode()), *extra_headers]})
        await send({"type": "http.response.body", "body": body})
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    def _route_label(self, path: str) -> str:
        """The metrics label of a path: a fixed set, whatever paths clients send."""
        if path in self.health_routes or path in ("/", "/live"):
            return "health"
        if path in self.predict_routes:
            return self.predict_routes[path]
        if path in ("/version", "/metrics"):
            return path[1:]
        return "admin" if path.startswith("/admin/") else "other"

    async def _handle(self, method: str, path: str, headers: dict, receive):
        if path in self.health_routes or path in ("/", "/live"):
            if method != "GET":
                raise BadRequest(f"{path} takes GET", 405, "METHOD_NOT_ALLOWED")
            if path in ("/", "/live"):  # liveness: the process answers
                return 200, {"status": "alive"}, []
            if not self.ready:
                raise BadRequest("no model is deployed on this endpoint yet", 503, "UNAVAILABLE")
            return 200, {"status": "ready", "versions": {v.name: v.model.version for v in self.variants.values()}}, []
        if path == "/version":
            return 200, self._version(), []
        self._authorize(headers)
        if path in self.predict_routes:
            if method != "POST":
                raise BadRequest(f"{path} takes POST", 405, "METHOD_NOT_ALLOWED")
            return await self._predict(headers, receive)
        if path == "/metrics":
            self.metrics.log_dropped.set(self.log.dropped)
            return 200, self.metrics.exposition(), []
        if path.startswith("/admin/"):
            return await self._admin(method, path, headers, receive)
        raise BadRequest(f"no route {method} {path}; predict with POST /invocations", 404, "NOT_FOUND")

    def _authorize(self, headers: dict) -> None:
        if self.token is None:
            return
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, credential = given.partition(" ")
        if not given:
            raise BadRequest("missing 'Authorization: Bearer <token>'", 401, "UNAUTHENTICATED")
        if scheme.lower() != "bearer" or not hmac.compare_digest(credential.strip().encode(), self.token.encode()):
            raise BadRequest("the bearer token is not valid for this endpoint", 401, "UNAUTHENTICATED")

    async def _predict(self, headers: dict, receive):
        body = await self._body(headers, receive)
        target = headers.get(TARGET_HEADER, b"").decode() or None
        variant = self.choose(target)
        columns = parse_body(body, headers.get(b"content-type", b"application/json").decode("latin-1"), variant.model.signature)
        rows = len(next(iter(columns.values())))
        variant.requests += 1
        outputs = await self.predict(variant, columns, rows)
        request_id = headers.get(b"x-request-id", b"").decode() or uuid.uuid4().hex
        self.metrics.rows.labels(variant.name, variant.model.version).inc(rows)
        self.log.append(columns, outputs, variant.model.version, variant.name, [request_id] * rows)
        names = list(outputs)
        predictions = [dict(zip(names, values, strict=True)) for values in zip(*outputs.values(), strict=True)]
        return 200, {"predictions": predictions}, [(b"x-model-version", variant.model.version.encode()),
                                                    (b"x-variant", variant.name.encode()),
                                                    (b"x-request-id", request_id.encode())]

    async def _body(self, headers: dict, receive) -> bytes:
        length = headers.get(b"content-length")
        declared = int(length) if length is not None and length.isdigit() else None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.max_body_bytes:
                chunks.append(chunk)
            elif size > 4 * self.max_body_bytes:  # far over: answer now rather than read it all
                break
            if not message.get("more_body"):
                break
        if size > self.max_body_bytes or (declared or 0) > self.max_body_bytes:
            # (a body a little over the limit is read to its end first, so the client sees the 413
            # instead of a connection reset in the middle of its upload)
            raise BadRequest(f"the body has {max(size, declared or 0)} bytes; the limit is {self.max_body_bytes}",
                             413, "PAYLOAD_TOO_LARGE")
        return b"".join(chunks)

    async def _admin(self, method: str, path: str, headers: dict, receive):
        if self.token is None:
            raise BadRequest("the admin API is off: start the server with a token (env MLFACTORY_SERVING_TOKEN)", 403, "FORBIDDEN")
        parts = path.strip("/").split("/")
        if parts == ["admin", "variants"] and method == "GET":
            return 200, {"variants": [v.describe() for v in self.variants.values()], "loading": sorted(self.loading)}, []
        if parts == ["admin", "traffic"] and method == "PUT":
            weights = _json_object(await self._body(headers, receive))
            self.set_weights(weights)
            return 200, {"variants": [v.describe() for v in self.variants.values()]}, []
        if len(parts) == 3 and parts[:2] == ["admin", "variants"]:
            name = parts[2]
            if method == "GET":
                if name not in self.variants:
                    raise BadRequest(f"no variant {name!r}; loaded: {sorted(self.variants)}", 404, "NOT_FOUND")
                return 200, self.variants[name].describe(), []
            if method == "DELETE":
                variant = self.variants.pop(name, None)
                if variant is None:
                    raise BadRequest(f"no variant {name!r}; loaded: {sorted(self.variants)}", 404, "NOT_FOUND")
                self.metrics.model.remove(name, variant.model.version, variant.model.model_uri)
                self.metrics.weight.remove(name)
                return 200, {"removed": variant.describe()}, []
            if method == "PUT":
                spec = _json_object(await self._body(headers, receive))
                if not isinstance(spec.get("model_uri"), str):
                    raise BadRequest("PUT /admin/variants/{name} takes {\"model_uri\": \"models:/...\", \"weight\": 0}")
                if name in self.loading:
                    raise BadRequest(f"variant {name!r} is already loading", 409, "CONFLICT")
                self.loading.add(name)
                try:
                    model = await asyncio.get_running_loop().run_in_executor(self.loader, ServedModel, spec["model_uri"])
                except Exception as err:  # noqa: BLE001 - a model that cannot load is the caller's to know
                    raise BadRequest(f"could not load {spec['model_uri']}: {type(err).__name__}: {err}", 422,
                                     "MODEL_LOAD_FAILED") from None
                finally:
                    self.loading.discard(name)
                variant = self.add_variant(name, model, float(spec.get("weight", 0)))
                log.info("variant %s: loaded %s (version %s), weight %s", name, model.model_uri, model.version, variant.weight)
                return 201, variant.describe(), []
        raise BadRequest(f"no admin route {method} {path}", 404, "NOT_FOUND")

    def _version(self) -> dict:
        from importlib.metadata import version

        return {"server": "mlfactory", "mlflow": version("mlflow"),
                "variants": {v.name: {"version": v.model.version, "weight": v.weight} for v in self.variants.values()}}

    async def _lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.log.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await asyncio.get_running_loop().run_in_executor(None, self.log.stop)
                await send({"type": "lifespan.shutdown.complete"})
                return


class ModelError(Exception):
    """The model raised while predicting: a 500 that names the model version."""


class ClientGone(Exception):
    """The client disconnected before sending the whole body."""


def _json_object(body: bytes) -> dict:
    try:
        value = json.loads(body or b"{}")
    except json.JSONDecodeError as err:
        raise BadRequest(f"the body is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise BadRequest("expected a JSON object")
    return value


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# The command line (the container's entrypoint)


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-uri", default=env.get("MLFACTORY_MODEL_URI"),
                   help="MLflow model to serve as variant 'primary' with all traffic (models:/name@champion, a path, ...); "
                        "without it the server starts empty and takes variants through its admin API")
    p.add_argument("--host", default=env.get("MLFACTORY_SERVING_HOST", "0.0.0.0"),
                   help="interface to listen on (containers: 0.0.0.0; on a workstation use 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(env.get("AIP_HTTP_PORT") or env.get("PORT") or 8080))
    p.add_argument("--log-uri", default=env.get("MLFACTORY_PREDICTION_LOG_URI"),
                   help="bucket prefix for the prediction log (file://, s3://, gs://, abfs://); none: no log")
    p.add_argument("--log-flush-seconds", type=float, default=10.0)
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY)
    p.add_argument("--threads", type=int, default=1, help="torch threads per forward pass")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch
    import uvicorn

    torch.set_num_threads(args.threads)
    server = ModelServer(
        token=env.get(TOKEN_ENV),
        max_body_bytes=args.max_body_bytes,
        prediction_log=PredictionLog(args.log_uri, flush_seconds=args.log_flush_seconds),
        health_route=env.get("AIP_HEALTH_ROUTE", "/health"),
        predict_route=env.get("AIP_PREDICT_ROUTE", "/predict"),
    )
    if args.model_uri:
        server.add_variant("primary", ServedModel(args.model_uri, env.get("MLFACTORY_MODEL_VERSION")), 100.0)
        log.info("serving %s (version %s) on %s:%d", args.model_uri, server.variants["primary"].model.version,
                 args.host, args.port)
    uvicorn.run(server, host=args.host, port=args.port, log_level="warning", access_log=False, lifespan="on",
                loop="uvloop", http="httptools", timeout_graceful_shutdown=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
