"""One storage layer over URIs: file://, s3://, gs:// and abfs:// through fsspec.

Code that reads and writes pipeline data goes through these functions and does not know which cloud
it runs on. Credentials come from each cloud's default chain (environment, profile, metadata server);
an endpoint override for emulators comes from the usual variables (AWS_ENDPOINT_URL,
STORAGE_EMULATOR_HOST, AZURE_STORAGE_CONNECTION_STRING).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

COPY_BLOCK = 8 * 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    """One object under a prefix, with what tells whether it changed."""

    uri: str
    key: str  # path relative to the listed prefix
    size: int
    fingerprint: str  # changes whenever the object's content may have changed (mtime/etag + size)
    modified: float  # seconds since the epoch; 0 where the store does not say


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    return url_to_fs(uri)


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    """The filesystem path of a file:// URI (or a bare path)."""
    if not is_local(uri):
        raise ValueError(f"{uri} is not a local file URI")
    return filesystem(uri)[1]


def private_file(path: str | os.PathLike, content: Callable[[], str]) -> str:
    """The text of ``path``, a file on this machine readable by its owner alone: written with ``content()``
    the first time (created 0600, never left readable by others between creation and chmod)."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(content())
    with open(path) as f:
        return f.read()


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])


def _unstrip(fs: fsspec.AbstractFileSystem, template: str, path: str) -> str:
    """Turn a filesystem path back into a URI with the template's scheme."""
    protocol = template.split("://", 1)[0] if "://" in template else "file"
    if protocol == "file":
        return "file://" + path
    return f"{protocol}://{path.lstrip('/')}"


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def is_hidden(key: str) -> bool:
    """Dot-files, ``_``-folders and in-progress uploads (.tmp, .part): never data to ingest."""
    return any(part.startswith((".", "_")) for part in key.split("/")) or key.endswith((".tmp", ".part", "/"))


def list_objects(prefix_uri: str) -> list[ObjectInfo]:
    """Every object under ``prefix_uri`` (recursively), skipping dot-files and in-progress uploads."""
    fs, root = filesystem(prefix_uri)
    if not fs.exists(root):
        return []
    found = []
    for path, info in sorted(fs.find(root, detail=True).items()):
        key = posixpath.relpath(path, root)
        if is_hidden(key):
            continue
        modified = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("last_modified")
        if hasattr(modified, "timestamp"):
            modified = modified.timestamp()
        elif isinstance(modified, str):
            from datetime import datetime

            modified = datetime.fromisoformat(modified.replace("Z", "+00:00")).timestamp()
        tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("generation") or modified
        size = int(info.get("size") or 0)
        found.append(ObjectInfo(_unstrip(fs, prefix_uri, path), key, size, f"{size}:{tag}", float(modified or 0)))
    return found


def open_uri(uri: str, mode: str = "rb", **kwargs: Any) -> IO:
    fs, path = filesystem(uri)
    if "w" in mode:
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    return fs.open(path, mode, **kwargs)


def read_bytes(uri: str) -> bytes:
    with open_uri(uri) as f:
        return f.read()


@contextmanager
def atomic_write(uri: str, mode: str = "wb") -> Iterator[IO]:
    """Write ``uri`` so that readers see the old object or the whole new one, never a part.

    Local files are written beside the target and renamed; object stores publish an object only
    when its upload completes, so there the write goes straight to the key.
    """
    fs, path = filesystem(uri)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if not is_local(uri):
        with fs.open(path, mode) as f:
            yield f
        return
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_write(uri) as f:
        f.write(data)


@dataclass(frozen=True)
class CopyResult:
    size: int
    sha256: str
    newlines: int  # b"\n" count: the record count of line-based formats
    ends_with_newline: bool


def copy_hashing(src_uri: str, dst_uri: str) -> CopyResult:
    """Stream ``src_uri`` to ``dst_uri`` in blocks, hashing and counting lines on the way.

    Never holds the whole object in memory, and never modifies the source.
    """
    digest = hashlib.sha256()
    size = newlines = 0
    last = b""
    with open_uri(src_uri, "rb") as src, atomic_write(dst_uri) as dst:
        while block := src.read(COPY_BLOCK):
            digest.update(block)
            size += len(block)
            newlines += block.count(b"\n")
            last = block[-1:]
            dst.write(block)
    return CopyResult(size, digest.hexdigest(), newlines, last == b"\n")


def move(src_uri: str, dst_uri: str) -> None:
    """Rename within one store (a rename on local disk, copy-then-delete on object stores)."""
    fs, src = filesystem(src_uri)
    _, dst = filesystem(dst_uri)
    fs.makedirs(posixpath.dirname(dst), exist_ok=True)
    if is_local(src_uri):
        os.replace(src, dst)
    else:
        fs.mv(src, dst)


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def pyarrow_filesystem(uri: str):
    """A pyarrow filesystem and path for ``uri``: native for local files, fsspec-backed otherwise."""
    import pyarrow.fs as pafs

    if is_local(uri):
        return pafs.LocalFileSystem(), local_path(uri)
    fs, path = filesystem(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
