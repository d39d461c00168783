"""What Airflow's processes actually send to Cloud Storage and Pub/Sub, as IAM permissions.

fake-gcs-server and the Pub/Sub emulator keep no request log, so each gets a recording proxy in
front of it (127.0.0.1 only), and Airflow is pointed at the proxies (STORAGE_EMULATOR_HOST,
PUBSUB_EMULATOR_HOST) while every other client keeps talking to the emulators directly:

- ``GcsRecorder``: an HTTP/1.1 proxy for the JSON API (uploads, downloads, batch requests); each
  request becomes the ``storage.*`` permission Cloud Storage checks for it, on its bucket.
- ``PubSubRecorder``: a gRPC proxy (raw bytes, any method, unary or streaming); each call becomes its
  ``pubsub.*`` permission, on the subscription or topic named in the request.

``permissions()`` -> {permission: {resources}}; anything it cannot map is kept as ``unknown <what>`` so
that a test comparing it with a role fails on it instead of missing it.
"""

from __future__ import annotations

import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler

from loopback_http import LoopbackServer

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "proxy-connection", "te", "upgrade"}


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.seen: dict[str, set[str]] = {}

    def record(self, permission: str, resource: str) -> None:
        with self.lock:
            self.seen.setdefault(permission, set()).add(resource)

    def permissions(self) -> dict[str, set[str]]:
        with self.lock:
            return {k: set(v) for k, v in self.seen.items()}


def gcs_permissions(method: str, path: str, query: dict) -> list[tuple[str, str]]:
    """One JSON-API request -> [(permission, bucket)] (Cloud Storage's own table of what each method needs)."""
    path = urllib.parse.unquote(path)
    upload = re.match(r"^/upload/storage/v1/b/([^/]+)/o$", path)
    if upload:
        return [("storage.objects.create", upload[1])]
    if path.startswith("/upload/resumable/"):  # fake-gcs-server's resumable session URL: a create under way
        return [("storage.objects.create", "(resumable session)")]
    download = re.match(r"^/download/storage/v1/b/([^/]+)/o/.+$", path)
    if download:
        return [("storage.objects.get", download[1])]
    move = re.match(r"^/storage/v1/b/([^/]+)/o/.+/moveTo/o/.+$", path)
    if move:  # the atomic rename; it replaces an existing destination
        return [(f"storage.objects.{p}", move[1]) for p in ("move", "create", "delete")]
    two = re.match(r"^/storage/v1/b/([^/]+)/o/(.+)/(rewriteTo|copyTo)/b/([^/]+)/o/.+$", path)
    if two:
        return [("storage.objects.get", two[1]), ("storage.objects.create", two[4])]
    compose = re.match(r"^/storage/v1/b/([^/]+)/o/.+/compose$", path)
    if compose:
        return [("storage.objects.get", compose[1]), ("storage.objects.create", compose[1])]
    obj = re.match(r"^/storage/v1/b/([^/]+)/o/.+$", path)
    if obj:
        action = {"GET": "get", "HEAD": "get", "DELETE": "delete", "PATCH": "update", "PUT": "update"}.get(method)
        return [(f"storage.objects.{action}" if action else f"unknown {method} {path}", obj[1])]
    listing = re.match(r"^/storage/v1/b/([^/]+)/o$", path)
    if listing and method == "GET":
        return [("storage.objects.list", listing[1])]
    bucket = re.match(r"^/storage/v1/b/([^/]+)$", path)
    if bucket and method == "GET":
        return [("storage.buckets.get", bucket[1])]
    return [(f"unknown {method} {path}", "?")]


class GcsRecorder(Recorder):
    def __init__(self, upstream: str):
        super().__init__()
        self.upstream = upstream.rstrip("/")
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - http.server's names
                recorder.forward(self)

            do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.http = LoopbackServer(Handler).start()
        self.url = self.http.url

    def forward(self, request: BaseHTTPRequestHandler) -> None:
        body = self._body(request)
        url = urllib.parse.urlsplit(request.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path.startswith("/batch/"):  # a batch: each part is a request of its own
            for method, path in re.findall(rb"\r?\n(GET|POST|PUT|PATCH|DELETE) (/\S+) HTTP/1\.1", body):
                inner = urllib.parse.urlsplit(path.decode())
                for permission, bucket in gcs_permissions(method.decode(), inner.path,
                                                          dict(urllib.parse.parse_qsl(inner.query))):
                    self.record(permission, bucket)
        else:
            for permission, bucket in gcs_permissions(request.command, url.path, query):
                self.record(permission, bucket)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        upstream = urllib.request.Request(self.upstream + request.path, data=body if body or request.command in (
            "POST", "PUT", "PATCH") else None, method=request.command, headers=headers)
        try:
            with urllib.request.urlopen(upstream, timeout=300) as answer:
                status, answer_headers, data = answer.status, answer.headers, answer.read()
        except urllib.error.HTTPError as err:
            status, answer_headers, data = err.code, err.headers, err.read()
        mine, theirs = self.url.encode(), self.upstream.encode()
        data = data.replace(theirs, mine)  # links in JSON answers point back through the proxy
        try:
            request.send_response(status)
            for key, value in answer_headers.items():
                if key.lower() not in HOP:
                    request.send_header(key, value.replace(self.upstream, self.url))
            request.send_header("Content-Length", str(len(data)))
            request.end_headers()
            if request.command != "HEAD":
                request.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client went away (as clients do on shutdown)
            request.close_connection = True

    @staticmethod
    def _body(request: BaseHTTPRequestHandler) -> bytes:
        if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(request.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    request.rfile.readline()
                    return b"".join(chunks)
                chunks.append(request.rfile.read(size))
                request.rfile.readline()
        return request.rfile.read(int(request.headers.get("Content-Length") or 0))

    def stop(self) -> None:
        self.http.stop()


PUBSUB = {  # method -> (permission, request field naming the resource)
    "Subscriber/Pull": ("pubsub.subscriptions.consume", "subscription"),
    "Subscriber/StreamingPull": ("pubsub.subscriptions.consume", "subscription"),
    "Subscriber/Acknowledge": ("pubsub.subscriptions.consume", "subscription"),
    "Subscriber/ModifyAckDeadline": ("pubsub.subscriptions.consume", "subscription"),
    "Subscriber/GetSubscription": ("pubsub.subscriptions.get", "subscription"),
    "Subscriber/CreateSubscription": ("pubsub.subscriptions.create", "name"),
    "Subscriber/DeleteSubscription": ("pubsub.subscriptions.delete", "subscription"),
    "Publisher/Publish": ("pubsub.topics.publish", "topic"),
    "Publisher/GetTopic": ("pubsub.topics.get", "topic"),
    "Publisher/CreateTopic": ("pubsub.topics.create", "name"),
}


class PubSubRecorder(Recorder):
    def __init__(self, upstream: str):
        import grpc

        super().__init__()
        self.channel = grpc.insecure_channel(upstream)
        self.failures: dict[str, list] = {}  # "Subscriber/Acknowledge" -> status codes to answer its next calls with
        recorder = self

        class Handler(grpc.GenericRpcHandler):
            def service(self, details):
                return recorder.handler(details)

        self.server = grpc.server(ThreadPoolExecutor(max_workers=16))
        self.server.add_generic_rpc_handlers([Handler()])
        self.host = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def note(self, method: str, request: bytes) -> None:
        from google.pubsub_v1 import types

        name = method.rsplit(".", 1)[-1]  # "Subscriber/Pull"
        permission, field = PUBSUB.get(name, (f"unknown {method}", None))
        resource = "?"
        if field:
            message = getattr(types, name.split("/")[1] + "Request", None)
            if name == "Publisher/CreateTopic":
                message = types.Topic
            elif name == "Subscriber/CreateSubscription":
                message = types.Subscription
            if message is not None:
                resource = getattr(message.deserialize(request), field)
        self.record(permission, resource)

    def handler(self, details):
        import grpc

        method = details.method  # "/google.pubsub.v1.Subscriber/Pull"
        metadata = [(k, v) for k, v in details.invocation_metadata if not k.startswith(":")]

        def unary(request, context):
            self.note(method, request)
            with self.lock:
                failures = self.failures.get(method.rsplit(".", 1)[-1])
                code = failures.pop(0) if failures else None
            if code is not None:
                context.abort(code, f"{code.name}, played by the test")
            try:  # (time_remaining() is 0 when the caller set no deadline: then none upstream either)
                return self.channel.unary_unary(method)(request, metadata=metadata,
                                                        timeout=context.time_remaining() or None)
            except grpc.RpcError as err:
                context.abort(err.code(), err.details())

        def stream(requests, context):
            def noted():
                for request in requests:
                    self.note(method, request)
                    yield request
            try:
                yield from self.channel.stream_stream(method)(noted(), metadata=metadata)
            except grpc.RpcError as err:
                context.abort(err.code(), err.details())

        if method.endswith("/StreamingPull"):
            return grpc.stream_stream_rpc_method_handler(stream)
        return grpc.unary_unary_rpc_method_handler(unary)

    def fail(self, method: str, code, times: int = 1) -> None:
        """Answer the next ``times`` calls of ``method`` (e.g. "Subscriber/Acknowledge") with ``code``
        instead of forwarding them: a Pub/Sub hiccup."""
        with self.lock:
            self.failures.setdefault(method, []).extend([code] * times)

    def stop(self) -> None:
        self.server.stop(grace=1).wait()
        self.channel.close()
