"""The ASGI model server: routes of every platform's contract, auth, variants and traffic weights,
micro-batched prediction, the admin API."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import math
import os
import random
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from mlfactory.serving.auth import Credentials
from mlfactory.serving.limits import Limits, inflate
from mlfactory.serving.metrics import Metrics
from mlfactory.serving.model import ServedModel
from mlfactory.serving.payloads import JSONLINES_TYPES, PARQUET_TYPES, BadRequest, parse_body
from mlfactory.serving.prediction_log import PredictionLog

log = logging.getLogger("mlfactory.serving")

TARGET_HEADER = b"x-target-variant"
MAX_BATCH_ROWS = 10_000  # rows of concurrent requests joined into one forward pass
INLINE_PARSE_BYTES = 64 * 1024  # text bodies up to this are parsed on the event loop (cheaper than a hand-off)



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


def _behind(step: int = 10) -> None:
    """Lower the calling thread's CPU priority by ``step`` (Linux niceness is per thread): on a busy core, the event
    loop and the forward passes run first. Only for a thread whose work holds no GIL (zlib's inflate releases it),
    else a thread kept waiting for the core would keep the loop waiting for the GIL. (Lowering a priority needs no
    privilege; where it fails, nothing changes.)"""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0) + step))
    except (AttributeError, OSError):  # not Linux-like
        pass


class ModelServer:
    """The ASGI application."""

    def __init__(self, credentials: Credentials | None = None, limits: Limits | None = None,
                 prediction_log: PredictionLog | None = None, health_route: str = "/health",
                 predict_route: str = "/predict", admin_port: int | None = None, allowed_model: str | None = None):
        self.credentials = credentials or Credentials()
        self.limits = limits or Limits()
        # the admin API answers only on this port's listener (where ml_deploy reaches it), with the admin token
        self.admin_port = admin_port if self.credentials.admin_digest else None
        # PUT /admin/variants loads only models:/<allowed_model>/<version>: never a path, a run or another model
        self.allowed_model = allowed_model
        self.allowed = re.compile(rf"models:/{re.escape(allowed_model)}/[0-9]+") if allowed_model else None
        self.in_flight = 0
        self.body_bytes = 0  # bytes of request bodies held now, all requests together (Limits.max_inflight_bytes)
        self.variants: dict[str, Variant] = {}
        self.loading: set[str] = set()
        self.log = prediction_log or PredictionLog(None)
        self.metrics = Metrics()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")  # one forward pass at a time
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        # big or compressed bodies are inflated and parsed here, off the event loop, so one of them (a 100 MB
        # batch-transform file, a gzip bomb) never stalls the small requests around it; inflating holds no GIL and
        # runs behind everything else in the CPU's queue, so a gzip bomb costs the others not even its core time
        self.decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        self.inflater = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inflate", initializer=_behind)
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
        try:
            return await asyncio.wait_for(future, self.limits.predict_timeout_s)
        except TimeoutError:
            raise BadRequest(f"the model (version {variant.model.version}) did not answer within "
                             f"{self.limits.predict_timeout_s:g}s", 504, "MODEL_TIMEOUT") from None

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
                        if not future.cancelled():  # (a caller that timed out has gone)
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
        on_admin = self.admin_port is not None and (scope.get("server") or (None, None))[1] == self.admin_port
        route = self._route_label(path)
        extra_headers: list[tuple[bytes, bytes]] = []
        try:
            head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
                len(k) + len(v) for k, v in scope["headers"])
            if head > self.limits.max_header_bytes:  # (a head that never ends is cut short by BoundedHttpToolsProtocol)
                raise BadRequest(f"the request line and headers have {head} bytes; the limit is "
                                 f"{self.limits.max_header_bytes}", 431, "HEADERS_TOO_LARGE")
            status, payload, extra_headers = await self._handle(method, path, headers, receive, on_admin)
        except BadRequest as err:
            status, payload = err.status, {"error_code": err.code, "message": err.message}
            if status == 401:
                extra_headers = [(b"www-authenticate", b"Bearer")]
            elif status == 503:  # (its body unread: hang up, and let the client come back)
                extra_headers = [(b"retry-after", b"1"), (b"connection", b"close")]
            elif status in (408, 413, 431):  # a body left unread, or a client that will not stop: hang up
                extra_headers = [(b"connection", b"close")]
        except ModelError as err:
            status, payload = 500, {"error_code": "MODEL_ERROR", "message": str(err)}
        except ClientGone:
            return
        except Exception as err:  # noqa: BLE001 - a bug here must not take the endpoint down
            log.exception("unexpected error on %s %s", method, path)
            status, payload = 500, {"error_code": "INTERNAL_ERROR", "message": f"{type(err).__name__}: {err}"}
        if isinstance(payload, tuple):  # (media type, bytes): metrics, CSV and JSON lines answers
            media, body = payload
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

    async def _handle(self, method: str, path: str, headers: dict, receive, on_admin: bool):
        if path in self.health_routes or path in ("/", "/live"):
            if method != "GET":
                raise BadRequest(f"{path} takes GET", 405, "METHOD_NOT_ALLOWED")
            if path in ("/", "/live"):  # liveness: the process answers
                return 200, {"status": "alive"}, []
            if not self.ready:
                raise BadRequest("no model is deployed on this endpoint yet", 503, "UNAVAILABLE")
            return 200, {"status": "ready"}, []  # (which versions run is for authenticated callers: /version)
        self._authorize(headers, on_admin)
        if path == "/version":
            return 200, self._version(), []
        if path in self.predict_routes:
            if method != "POST":
                raise BadRequest(f"{path} takes POST", 405, "METHOD_NOT_ALLOWED")
            return await self._predict(headers, receive)
        if path == "/metrics":
            self.metrics.log_dropped.set(self.log.dropped)
            return 200, (b"text/plain; version=0.0.4", self.metrics.exposition()), []
        if path.startswith("/admin/") and on_admin:
            return await self._admin(method, path, headers, receive)
        raise BadRequest(f"no route {method} {path}; predict with POST /invocations", 404, "NOT_FOUND")

    def _authorize(self, headers: dict, on_admin: bool) -> None:
        """The admin port takes only the admin token; the public port only client tokens (when any is set)."""
        if not on_admin and not self.credentials.clients_required:
            return
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, credential = given.partition(" ")
        if not given:
            raise BadRequest("missing 'Authorization: Bearer <token>'", 401, "UNAUTHENTICATED")
        credential = credential.strip()
        valid = scheme.lower() == "bearer" and (self.credentials.admin(credential) if on_admin
                                                else self.credentials.client(credential) is not None)
        if not valid:
            raise BadRequest("the bearer token is not valid for this endpoint", 401, "UNAUTHENTICATED")

    async def _predict(self, headers: dict, receive):
        """A request's body is read first (bounded in time, size and, with the others', bytes held), then it counts
        as in flight while it is decoded and predicted: a client that sends its body slowly holds no slot of
        ``max_concurrent``, only a connection (16 such clients took all 16 slots, and everyone got a 503)."""
        held = [0]  # this request's share of self.body_bytes, given back once its body is decoded
        try:
            request_id = self.limits.request_id(headers.get(b"x-request-id", b"")) or uuid.uuid4().hex
            content_type = headers.get(b"content-type", b"application/json").decode("latin-1")
            media = content_type.split(";", 1)[0].strip().lower()
            body = await self._body(headers, receive, self.limits.body_limit(media), held)
            if self.in_flight >= self.limits.max_concurrent:
                raise BadRequest(f"the server is at its limit of {self.limits.max_concurrent} requests in flight; "
                                 "retry after the Retry-After seconds", 503, "OVERLOADED")
            self.in_flight += 1
            try:
                target = headers.get(TARGET_HEADER, b"").decode("latin-1") or None
                variant = self.choose(target)
                args = (body, content_type, variant.model.signature, self.limits.row_limit(media),
                        self.limits.max_decoded_bytes)
                # (a Parquet body is decoded off the loop whatever its size: a few KiB can decompress to much more)
                columns = (await asyncio.get_running_loop().run_in_executor(self.decoder, parse_body, *args)
                           if len(body) > INLINE_PARSE_BYTES or media in PARQUET_TYPES else parse_body(*args))
                del body, args
                self.body_bytes -= held[0]
                held[0] = 0
                echoed = {name: columns.pop(name) for name in variant.model.signature.echo if name in columns}
                rows = len(next(iter(columns.values())))
                variant.requests += 1
                outputs = await self.predict(variant, columns, rows)
            finally:
                self.in_flight -= 1
        finally:
            self.body_bytes -= held[0]
        self.metrics.rows.labels(variant.name, variant.model.version).inc(rows)
        self.log.append(columns, outputs, variant.model.version, variant.name, [request_id] * rows)
        outputs = echoed | outputs  # each prediction names its row
        reply = [(b"x-model-version", variant.model.version.encode()), (b"x-variant", variant.name.encode()),
                 (b"x-request-id", request_id.encode())]
        return 200, _answer(outputs, headers.get(b"accept", b"").decode("latin-1")), reply

    async def _body(self, headers: dict, receive, limit: int, held: list[int] | None = None) -> bytes:
        """The whole body within ``body_timeout_s`` (a slow client gets a 408, not a worker) and ``limit``
        bytes (a 413), inflated when it has a Content-Encoding. With ``held``, what it keeps is counted in
        ``body_bytes`` (and in ``held[0]``, for the caller to give back): past ``max_inflight_bytes``, all
        requests together, a 503."""
        length = headers.get(b"content-length")
        declared = int(length) if length is not None and length.isdigit() else None
        if (declared or 0) > 4 * limit:  # far over: answer now rather than read it at all
            raise BadRequest(f"the body has {declared} bytes; the limit is {limit}", 413, "PAYLOAD_TOO_LARGE")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ClientGone
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size <= limit:
                        if held is not None:
                            if self.body_bytes + len(chunk) > self.limits.max_inflight_bytes:
                                raise BadRequest(f"the server holds {self.body_bytes} bytes of request bodies, its limit "
                                                 f"is {self.limits.max_inflight_bytes}; retry after the Retry-After "
                                                 "seconds", 503, "OVERLOADED")
                            self.body_bytes += len(chunk)
                            held[0] += len(chunk)
                        chunks.append(chunk)
                    elif size > 4 * limit:
                        break
                    if not message.get("more_body"):
                        break
        except TimeoutError:
            raise BadRequest(f"the body did not arrive within {self.limits.body_timeout_s:g}s ({size} bytes came)",
                             408, "REQUEST_TIMEOUT") from None
        if size > limit or (declared or 0) > limit:
            # (a body a little over the limit is read to its end first, so the client sees the 413
            # instead of a connection reset in the middle of its upload)
            raise BadRequest(f"the body has {max(size, declared or 0)} bytes; the limit is {limit}",
                             413, "PAYLOAD_TOO_LARGE")
        body = b"".join(chunks)
        encoding = headers.get(b"content-encoding", b"").decode("latin-1").strip().lower()
        if not encoding or encoding == "identity":
            return body
        return await asyncio.get_running_loop().run_in_executor(
            self.inflater, inflate, body, encoding, min(limit, self.limits.max_decoded_bytes))

    async def _admin(self, method: str, path: str, headers: dict, receive):
        parts = path.strip("/").split("/")
        limit = self.limits.max_body_bytes
        if parts == ["admin", "variants"] and method == "GET":
            return 200, {"variants": [v.describe() for v in self.variants.values()], "loading": sorted(self.loading)}, []
        if parts == ["admin", "traffic"] and method == "PUT":
            weights = _json_object(await self._body(headers, receive, limit))
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
                spec = _json_object(await self._body(headers, receive, limit))
                uri = spec.get("model_uri")
                if not isinstance(uri, str):
                    raise BadRequest("PUT /admin/variants/{name} takes {\"model_uri\": \"models:/<model>/<version>\", \"weight\": 0}")
                if self.allowed is None or not self.allowed.fullmatch(uri):
                    allowed = f"models:/{self.allowed_model}/<version>" if self.allowed else "nothing"
                    raise BadRequest(f"{uri!r} is not a model this server may load: it loads only {allowed} "
                                     "(--allowed-model)", 403, "FORBIDDEN")
                if name in self.loading:
                    raise BadRequest(f"variant {name!r} is already loading", 409, "CONFLICT")
                self.loading.add(name)
                try:
                    model = await asyncio.get_running_loop().run_in_executor(self.loader, ServedModel, uri)
                except Exception as err:  # noqa: BLE001 - a model that cannot load is the caller's to know
                    raise BadRequest(f"could not load {uri}: {type(err).__name__}: {err}", 422,
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


def _answer(outputs: dict[str, list], accept: str):
    """The predictions as the caller asked (``Accept``): JSON ``{"predictions": [...]}`` by default; JSON lines
    or CSV (no header, output columns in order) one line per row, as SageMaker batch transform assembles
    them with ``AssembleWith: Line``."""
    names = list(outputs)
    rows = zip(*outputs.values(), strict=True)
    media = accept.split(",", 1)[0].split(";", 1)[0].strip().lower()
    if media in JSONLINES_TYPES:
        lines = (json.dumps(dict(zip(names, r, strict=True)), allow_nan=False, default=_jsonable) for r in rows)
        return media.encode(), ("\n".join(lines) + "\n").encode()
    if media in ("text/csv", "application/csv"):
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows)
        return b"text/csv", out.getvalue().encode()
    return {"predictions": [dict(zip(names, r, strict=True)) for r in rows]}


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
