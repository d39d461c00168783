"""One storage layer over URIs: file://, s3://, gs:// and abfs:// through fsspec.

Code that reads and writes pipeline data goes through these functions and does not know which cloud
it runs on. Credentials come from each cloud's default chain (environment, profile, metadata server);
an endpoint override for emulators comes from the usual variables (AWS_ENDPOINT_URL,
STORAGE_EMULATOR_HOST, AZURE_STORAGE_CONNECTION_STRING).
"""

from __future__ import annotations

import errno
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

    def settled(self, settle_s: float, now: float) -> bool:
        """Unchanged for ``settle_s`` (fully written), or the store does not say when it changed."""
        return not self.modified or now - self.modified >= settle_s


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it.

    Object stores are listed afresh every time: other processes (triggers, tasks, the cloud's jobs)
    write the bucket, and fsspec's listings cache would answer "no such object" from an old listing.
    An S3 endpoint override is passed explicitly: fsspec caches filesystems by their arguments, and one
    made before the variable was set must not be reused after."""
    if is_local(uri):
        return url_to_fs(uri)
    options: dict[str, Any] = {"use_listings_cache": False}
    if uri.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    if uri.startswith(("gs://", "gcs://")) and os.environ.get("STORAGE_EMULATOR_HOST"):
        # an emulator (fake-gcs-server) speaks the JSON API only: gcsfs's default class would first ask the
        # storage-control gRPC API for the bucket's layout and wait a minute per bucket for an answer
        from gcsfs.core import GCSFileSystem

        fs = GCSFileSystem(token="anon", endpoint_url=os.environ["STORAGE_EMULATOR_HOST"], **options)
        return fs, fs._strip_protocol(uri)
    return url_to_fs(uri, **options)


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
    elif os.stat(path).st_mode & 0o077:  # one made readable by others since (a copy, an editor): closed again
        os.chmod(path, 0o600)
    with open(path) as f:
        return f.read()


def under(uri: str, prefix: str, what: str) -> str:
    """``uri`` (a bare absolute path is taken as file://) when it names something below ``prefix``, with no
    ``.`` or ``..`` segment; else a ValueError naming ``what``. Form fields that take URIs go through this, so
    a run never reads or writes outside the pipeline's bucket."""
    given = uri.strip()
    if "://" not in given and given.startswith("/"):
        given = "file://" + given
    segments = given.split("://", 1)[-1].split("/")
    top = prefix.rstrip("/") + "/"
    if any(s in (".", "..") for s in segments) or not given.startswith(top) or given == top:
        raise ValueError(f"{what} must name something under {top} (no '.' or '..' segments); got {uri!r}")
    return given


def prefix_pattern(prefix: str) -> str:
    """A JSON-schema ``pattern`` (the same in Python and in the browser) for what ``under`` accepts, so the
    trigger form refuses other URIs before a run starts."""
    def literal(c: str) -> str:
        return c if c.isalnum() or c in "/:_" else ("\\" + c if c in "\\]^" else f"[{c}]")

    top = prefix.rstrip("/") + "/"
    head = "(file://)?" + "".join(map(literal, top[len("file://"):])) if top.startswith("file://") else "".join(map(literal, top))
    return "^(?!.*/[.]{1,2}(/|$))" + head + ".+"


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


def _object_info(uri: str, key: str, info: dict) -> ObjectInfo:
    modified = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("last_modified")
    if hasattr(modified, "timestamp"):
        modified = modified.timestamp()
    elif isinstance(modified, str):
        from datetime import datetime

        modified = datetime.fromisoformat(modified.replace("Z", "+00:00")).timestamp()
    # GCS: the object generation (each upload of a key is a new one); S3 and Azure: the ETag
    tag = info.get("generation") or info.get("ETag") or info.get("etag") or info.get("md5Hash") or modified
    size = int(info.get("size") or 0)
    return ObjectInfo(uri, key, size, f"{size}:{str(tag).strip(chr(34))}", float(modified or 0))


def _find(fs, root: str) -> dict[str, dict]:
    """Every object under ``root`` with its details; none where there is nothing (no existence check first: on
    an object store that would be one more request)."""
    try:
        return fs.find(root, detail=True)
    except FileNotFoundError:
        return {}


def list_objects(prefix_uri: str) -> list[ObjectInfo]:
    """Every object under ``prefix_uri`` (recursively), skipping dot-files and in-progress uploads."""
    fs, root = filesystem(prefix_uri)
    found = []
    for path, info in sorted(_find(fs, root).items()):
        key = posixpath.relpath(path, root)
        if not is_hidden(key):
            found.append(_object_info(_unstrip(fs, prefix_uri, path), key, info))
    return found


def stat(uri: str) -> ObjectInfo:
    """One object's ObjectInfo (its key is its base name), with the fingerprint ``list_objects`` gives it.
    Raises FileNotFoundError when there is none."""
    fs, path = filesystem(uri)
    return _object_info(uri, posixpath.basename(path), fs.info(path))


class NotARegularFile(OSError):
    """A local landed path that is a symlink, FIFO, device, socket or folder: never opened for reading."""


def _not_regular(uri: str, mode: int) -> NotARegularFile | None:
    import stat as stat_

    if stat_.S_ISREG(mode):
        return None
    kind = {stat_.S_IFLNK: "a symbolic link", stat_.S_IFIFO: "a FIFO (named pipe)", stat_.S_IFCHR: "a character device",
            stat_.S_IFBLK: "a block device", stat_.S_IFSOCK: "a socket", stat_.S_IFDIR: "a folder"}
    return NotARegularFile(f"{uri} is {kind.get(stat_.S_IFMT(mode), 'not a regular file')}")


def open_regular(uri: str, within: str | None = None) -> IO:
    """Open ``uri`` for reading; on this machine, only a regular file: a symlink is not followed, a FIFO
    or device never opened (a FIFO would block), and the opened descriptor is checked again, so a swap
    between check and open cannot slip another file in. With ``within`` (a folder above it), no folder between
    the two may be a symlink either: each is entered from the one above without following one, so a linked
    folder cannot lead outside. Object-store objects are always plain objects."""
    import fcntl

    if not is_local(uri):
        return open_uri(uri)
    path = local_path(uri)
    if problem := _not_regular(uri, os.lstat(path).st_mode):
        raise problem
    try:
        fd = _open_nofollow(uri, path, local_path(within) if within and is_local(within) else None)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENXIO):  # replaced by a link or a socket since the check
            raise _not_regular(uri, os.lstat(path).st_mode) or err from None
        raise
    if problem := _not_regular(uri, os.fstat(fd).st_mode):
        os.close(fd)
        raise problem
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return os.fdopen(fd, "rb")


def _open_nofollow(uri: str, path: str, root: str | None) -> int:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
    relative = os.path.relpath(path, root) if root else ""
    if not root or relative.startswith(".."):
        return os.open(path, flags)
    *folders, name = relative.split(os.sep)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for folder in folders:
            try:
                below = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise NotARegularFile(f"{uri} is reached through {folder!r}, a symbolic link or not a folder: "
                                          f"only files in the folders of {root} are read") from None
                raise
            os.close(fd)
            fd = below
        return os.open(name, flags, dir_fd=fd)
    finally:
        os.close(fd)


def _make_parent_folder(uri: str) -> None:
    """The folder a local file goes in, made where missing. Object stores have no folders: a key needs
    none, and asking for them costs a request per write (the bucket's existence) and would create a
    bucket that the config names wrongly."""
    if is_local(uri):
        os.makedirs(os.path.dirname(local_path(uri)), exist_ok=True)


def open_uri(uri: str, mode: str = "rb", **kwargs: Any) -> IO:
    fs, path = filesystem(uri)
    if "w" in mode:
        _make_parent_folder(uri)
    return fs.open(path, mode, **kwargs)


def read_bytes(uri: str) -> bytes:
    with open_uri(uri) as f:
        return f.read()


def temporary_uri(uri: str) -> str:
    """A hidden name beside ``uri`` (``.<name>.<random>.tmp``: listings and pyarrow datasets skip it),
    unique to this writer, to write before ``publish``."""
    head, name = uri.rstrip("/").rsplit("/", 1)
    return f"{head}/.{name}.{uuid.uuid4().hex}.tmp"


def remove_temporaries(folder_uri: str, older_than_s: float) -> int:
    """Remove the ``temporary_uri`` files under ``folder_uri`` last written over ``older_than_s`` ago:
    what writers killed mid-write left (no live writer is that old). Returns how many."""
    import time

    fs, root = filesystem(folder_uri)
    stale = [path for path, info in _find(fs, root).items()
             if posixpath.basename(path).startswith(".") and path.endswith(".tmp")
             and time.time() - _object_info(path, path, info).modified > older_than_s]
    for path in stale:
        fs.rm(path)
    return len(stale)


def publish(tmp_uri: str, uri: str) -> None:
    """Make the complete object at ``tmp_uri`` the object at ``uri`` in one step: a rename on local disk,
    a server-side copy on object stores. Readers see the old object or the new one, never a part."""
    move(tmp_uri, uri)


@contextmanager
def atomic_write(uri: str, mode: str = "wb") -> Iterator[IO]:
    """Write ``uri`` so that readers see the old object or the whole new one, never a part, and a write
    that fails leaves it as it was: written to ``temporary_uri(uri)``, published when complete.

    (On object stores a plain write is not enough: fsspec commits an upload when its file is closed,
    also when the with-block that wrote it raised.)"""
    tmp = temporary_uri(uri)
    fs, tmp_path = filesystem(tmp)
    _make_parent_folder(tmp)
    try:
        if is_local(uri):
            with open(tmp_path, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        else:
            with fs.open(tmp_path, mode) as f:
                yield f
        publish(tmp, uri)
    except BaseException:
        remove(tmp)
        raise


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_write(uri) as f:
        f.write(data)


@contextmanager
def created(uri: str) -> Iterator[IO]:
    """Write ``uri`` once, never over an object: FileExistsError when one is there (the raw snapshots and the
    frozen holdout are written so, and the clouds' policies refuse Airflow any other write to them). Readers see
    no object or the whole new one, and a write that fails leaves none: a local file is written aside and
    hard-linked into place; an object store takes one create-only upload (S3 ``If-None-Match: *``, GCS
    ``ifGenerationMatch=0``, Azure ``If-None-Match: *``), cancelled when the block raises."""
    fs, path = filesystem(uri)
    if is_local(uri):
        tmp = local_path(temporary_uri(uri))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(tmp, "xb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)  # refuses an existing name, as rename would not
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    f = fs.open(path, "xb")
    try:
        yield f
    except BaseException:
        f.discard()  # the upload is cancelled, never committed by close
        f.closed = True
        raise
    f.close()


def write_once(uri: str, data: bytes) -> None:
    with created(uri) as f:
        f.write(data)


@dataclass
class LineStats:
    """Lines of a byte stream fed block by block: their count and the longest one."""

    size: int = 0
    newlines: int = 0  # b"\n" count: the record count of line-based formats
    longest_line: int = 0
    ends_with_newline: bool = False
    _open_line: int = 0  # bytes since the last newline

    def feed(self, block: bytes) -> None:
        import numpy as np

        ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
        self.size += len(block)
        self.newlines += len(ends)
        if len(ends):
            lengths = np.diff(ends, prepend=-1) - 1
            lengths[0] += self._open_line
            self.longest_line = max(self.longest_line, int(lengths.max()))
            self._open_line = len(block) - 1 - int(ends[-1])
        else:
            self._open_line += len(block)
        self.longest_line = max(self.longest_line, self._open_line)
        self.ends_with_newline = block.endswith(b"\n")


@dataclass(frozen=True)
class CopyResult:
    sha256: str
    lines: LineStats

    @property
    def size(self) -> int:
        return self.lines.size


def copy_hashing(src_uri: str, dst_uri: str, max_bytes: int | None = None, within: str | None = None) -> CopyResult:
    """Stream ``src_uri`` (a regular file in ``within``, see ``open_regular``) to ``dst_uri`` in blocks, hashing and
    counting lines on the way. Never holds the whole object in memory, and never modifies the source.
    Stops with ValueError past ``max_bytes``. ``dst_uri`` is a temporary name (it may hold a part after
    a failure): ``publish`` it."""
    digest = hashlib.sha256()
    lines = LineStats()
    with open_regular(src_uri, within) as src, open_uri(dst_uri, "wb") as dst:
        while block := src.read(COPY_BLOCK):
            digest.update(block)
            lines.feed(block)
            if max_bytes is not None and lines.size > max_bytes:
                raise ValueError(f"{src_uri} is over {max_bytes} bytes")
            dst.write(block)
    return CopyResult(digest.hexdigest(), lines)


def copy_once(src_uri: str, dst_uri: str) -> None:
    """``src_uri``'s bytes as a new object ``dst_uri`` (FileExistsError when there is one). On local disk a hard
    link (no copy, as create-only as ``created``); on an object store a streamed upload (``created``): a
    server-side copy could replace an object, and the clouds' create-only conditions take uploads alone."""
    if is_local(src_uri) and is_local(dst_uri):
        dst = local_path(dst_uri)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.link(local_path(src_uri), dst)
            return
        except OSError as err:
            if err.errno != errno.EXDEV:  # FileExistsError included; another file system: copied below
                raise
    with open_uri(src_uri) as src, created(dst_uri) as dst:
        while block := src.read(COPY_BLOCK):
            dst.write(block)


def move(src_uri: str, dst_uri: str) -> None:
    """Rename within one store: a rename on local disk; on object stores the store's own move of the one object
    (GCS moves it in one request; S3 and Azure copy it, then delete the source)."""
    fs, src = filesystem(src_uri)
    _, dst = filesystem(dst_uri)
    _make_parent_folder(dst_uri)
    if is_local(src_uri):
        os.replace(src, dst)
    else:  # one object: fsspec's mv would list both keys first (what a folder would need)
        from fsspec.asyn import AsyncFileSystem, sync

        if isinstance(fs, AsyncFileSystem):  # s3fs, gcsfs, adlfs
            sync(fs.loop, fs._mv_file, src, dst)
        else:
            fs.mv(src, dst)


def remove(uri: str) -> None:
    """Remove the object (or folder) at ``uri``, if there is one."""
    fs, path = filesystem(uri)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def pyarrow_filesystem(uri: str):
    """A pyarrow filesystem and path for ``uri``: native for local files, fsspec-backed otherwise."""
    import pyarrow.fs as pafs

    if is_local(uri):
        return pafs.LocalFileSystem(), local_path(uri)
    fs, path = filesystem(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
