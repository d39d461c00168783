"""What one client may ask of the model server: body sizes per content type, decoded sizes, header bytes,
request ids, concurrency and time. Each limit is a clear 4xx/5xx that names it, never a worker held or
the process out of memory."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, replace

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mlfactory.serving.payloads import PARQUET_TYPES, BadRequest

MiB = 1024 * 1024
REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 10 * MiB  # JSON, JSON lines, CSV (a real-time request)
    max_batch_body_bytes: int = 100 * MiB  # Parquet files, and every type in a SageMaker batch transform
    max_decoded_bytes: int = 512 * MiB  # a Parquet body's uncompressed columns, or a gzip body once inflated
    max_rows: int = 1_000_000
    max_header_bytes: int = 16 * 1024
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
            limits = replace(limits, max_body_bytes=limits.max_batch_body_bytes)
        return limits

    def body_limit(self, media: str) -> int:
        return self.max_batch_body_bytes if media in PARQUET_TYPES else self.max_body_bytes

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
    """uvicorn's httptools protocol with a cap on the request line and headers: httptools buffers a header
    of any size, so a client could grow the process without one (h11 has this cap, httptools has not)."""

    max_head_bytes = Limits.max_header_bytes

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open = True

    def on_headers_complete(self) -> None:
        self._head_open = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        if getattr(self, "_head_open", None) is not False:
            self._head_bytes = getattr(self, "_head_bytes", 0) + len(data)
        super().data_received(data)
        if getattr(self, "_head_open", None) is False:
            self._head_bytes = 0
        elif self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
                                 b"connection: close\r\ncontent-length: 47\r\n\r\n"
                                 b"request line and headers over the 16 KiB limit\n")
            self.transport.close()
