"""What one client may ask of the model server: body sizes per content type, decoded sizes, header bytes,
request ids, concurrency and time. Each limit is a clear 4xx/5xx that names it, never a worker held or
the process out of memory."""

from __future__ import annotations

import logging
import re
import zlib
from dataclasses import dataclass, replace

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mlfactory.serving.payloads import PARQUET_TYPES, BadRequest

log = logging.getLogger("mlfactory.serving")
MiB = 1024 * 1024
REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 10 * MiB  # JSON, JSON lines, CSV (a real-time request)
    max_batch_body_bytes: int = 100 * MiB  # Parquet files, and every type in a SageMaker batch transform
    max_decoded_bytes: int = 512 * MiB  # a Parquet body's columns once decoded, or a gzip body once inflated
    max_rows: int = 1_000_000  # rows of a Parquet body, and of any body in a platform's batch job
    max_request_rows: int = 100_000  # rows of a JSON, JSON lines or CSV body (a real-time request)
    max_inflight_bytes: int = 256 * MiB  # bodies held at once, all requests together; past it: 503 + Retry-After
    max_header_bytes: int = 16 * 1024
    head_timeout_s: float = 10.0  # the request line and headers must arrive within this (then a 408 and close)
    max_concurrent: int = 128  # predict requests in flight; past it: 503 + Retry-After
    body_timeout_s: float = 30.0  # the whole body must arrive within this (slow clients get a 408)
    predict_timeout_s: float = 60.0  # the model must answer within this (a hung model: 504)

    @classmethod
    def for_platform(cls, platform, **overrides) -> Limits:
        """A platform may say how big its payloads are (a ``mlfactory.runtime.ServingDefaults``: SageMaker batch
        transform's ``MaxPayloadInMB``, up to 100): Parquet bodies may be that big, and in a batch job every
        content type may."""
        limits = cls(**overrides)
        if platform.max_batch_body_bytes:
            limits = replace(limits, max_batch_body_bytes=max(limits.max_batch_body_bytes, platform.max_batch_body_bytes))
        if platform.batch:
            limits = replace(limits, max_body_bytes=limits.max_batch_body_bytes, max_request_rows=limits.max_rows)
        # two of the biggest bodies can always be held at once
        return replace(limits, max_inflight_bytes=max(limits.max_inflight_bytes, 2 * limits.max_batch_body_bytes))

    def body_limit(self, media: str) -> int:
        return self.max_batch_body_bytes if media in PARQUET_TYPES else self.max_body_bytes

    def row_limit(self, media: str) -> int:
        return self.max_rows if media in PARQUET_TYPES else self.max_request_rows

    @property
    def max_connections(self) -> int:
        """Open connections at once: well above the requests in flight, so that sockets that never send a whole
        head (each cut at ``head_timeout_s``) cannot crowd out the clients that do; within the open-files limit."""
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return min(max(1024, 8 * self.max_concurrent), (soft if soft != resource.RLIM_INFINITY else 1 << 20) // 2)

    def request_id(self, given: bytes) -> str | None:
        if not given:
            return None
        text = given.decode("latin-1")
        if not REQUEST_ID.fullmatch(text):
            raise BadRequest("X-Request-Id must be 1-128 characters of letters, digits and ._:@/+=-", 400,
                             "BAD_REQUEST_ID")
        return text


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A ``Content-Encoding: gzip``/``deflate`` body, inflated to at most ``limit`` bytes (a bomb is a 413).
    (An identity body never comes here: ``ModelServer._body`` returns it as it is.)"""
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise BadRequest(f"unsupported Content-Encoding {encoding!r}: send gzip, deflate or none", 415,
                         "UNSUPPORTED_MEDIA_TYPE")
    inflater = zlib.decompressobj(wbits=31 if "gzip" in encoding else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as err:
        raise BadRequest(f"the body is not valid {encoding}: {err}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise BadRequest(f"the {encoding} body inflates to more than {limit} bytes, the limit", 413, "PAYLOAD_TOO_LARGE")
    return out


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with what it lacks against clients that never finish a request's head:

    - a cap on the request line and headers (httptools buffers a head of any size; h11 has this cap);
    - a deadline for the head (uvicorn arms none: a socket that sends ``GET / HTTP/1.1`` and stops stays open
      for ever), from the connection's start or the first byte of its next request: then a 408 and close;
    - a cap on open connections (``Limits.max_connections``): past it, the connection that has waited longest
      for its head is closed, so the newcomer is served. (uvicorn's own ``limit_concurrency`` counts those
      waiting sockets too, and answered every request 503 while ~80 of them stayed open.)"""

    limits = Limits()
    max_connections = limits.max_connections  # (reads the open-files limit: once per class, not per connection)
    waiting: dict = {}  # protocol -> when its head began, for every connection still waiting for a whole head
    warned = float("-inf")

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_bytes, self._head_open, self._head_timer = 0, True, None
        self._await_head()
        if len(self.connections) > self.max_connections:  # (this one waits too: there is always one)
            min(self.waiting, key=self.waiting.get)._close_waiting(None)
            if self.loop.time() - self.warned > 10:
                type(self).warned = self.loop.time()
                log.warning("%d connections open, the limit: closing those waiting longest for their request "
                            "line and headers", self.max_connections)

    def _await_head(self) -> None:
        if self._head_timer is None:
            self.waiting[self] = self.loop.time()
            self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._close_waiting,
                                                    b"408 Request Timeout", b"request line and headers did not arrive in time\n")

    def _head_done(self) -> None:
        self.waiting.pop(self, None)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _close_waiting(self, status: bytes | None, text: bytes = b"") -> None:
        self._head_done()
        if not self.transport.is_closing():
            if status:
                self.transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain\r\nconnection: close\r\n"
                                     b"content-length: " + str(len(text)).encode() + b"\r\n\r\n" + text)
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self._head_done()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open = True
        self._await_head()

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._head_done()
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        if self._head_open:
            self._head_bytes += len(data)
        super().data_received(data)
        if not self._head_open:
            self._head_bytes = 0
        elif self._head_bytes > self.limits.max_header_bytes:
            self._close_waiting(b"431 Request Header Fields Too Large",
                                f"request line and headers over the {self.limits.max_header_bytes // 1024} KiB limit\n".encode())

    @classmethod
    def bounded_by(cls, limits: Limits) -> type[BoundedHttpToolsProtocol]:
        """This protocol with ``limits`` (uvicorn makes one instance per connection from the class)."""
        return type(cls.__name__, (cls,), {"limits": limits, "max_connections": limits.max_connections, "waiting": {}})
