"""The ASGI model server: routes of every platform's contract, auth, variants and traffic weights,
micro-batched prediction, the admin API."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from mlfactory.serving.metrics import Metrics
from mlfactory.serving.model import ServedModel
from mlfactory.serving.payloads import BadRequest, parse_body
from mlfactory.serving.prediction_log import PredictionLog

log = logging.getLogger("mlfactory.serving")

TOKEN_ENV = "MLFACTORY_SERVING_TOKEN"
TARGET_HEADER = b"x-target-variant"
DEFAULT_MAX_BODY = 10 * 1024 * 1024
MAX_BATCH_ROWS = 10_000  # rows of concurrent requests joined into one forward pass



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
