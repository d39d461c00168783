"""Ingestion: copy a landed object into an immutable raw snapshot addressed by its content hash.

The landed object is only ever read. The snapshot lives at ``raw/<sha256>/data.<format>`` with a
``manifest.json`` beside it, written last, so a snapshot with a manifest is complete. The same bytes
landed twice (under any name) are ingested once.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from mlfactory import BadInput, storage
from mlfactory.config import PipelineConfig

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class IngestError(BadInput):
    """A landed object that cannot be ingested; the landed object is left untouched."""


@dataclass(frozen=True)
class Manifest:
    snapshot_uri: str
    source_uri: str
    format: str
    size: int
    sha256: str
    rows: int
    ingested_at: str

    @property
    def snapshot_id(self) -> str:
        return self.sha256[:16]

    def to_dict(self) -> dict:
        return {**asdict(self), "snapshot_id": self.snapshot_id}

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def detect_format(uri: str) -> str:
    ext = posixpath.splitext(uri.rstrip("/"))[1].lower()
    if ext not in FORMATS:
        raise IngestError(
            f"{uri}: unsupported file type {ext or '(no extension)'!r}; "
            f"mlfactory ingests {', '.join(sorted(FORMATS))}. The landed file was left as it is."
        )
    return FORMATS[ext]


def snapshot_dir(cfg: PipelineConfig, sha256: str) -> str:
    return storage.join(cfg.storage.raw_uri, sha256)


def manifest_uri(snapshot_uri: str) -> str:
    return posixpath.join(posixpath.dirname(snapshot_uri), "manifest.json")


def read_manifest(snapshot_uri: str) -> Manifest:
    try:
        return Manifest.from_dict(json.loads(storage.read_bytes(manifest_uri(snapshot_uri))))
    except FileNotFoundError:
        raise IngestError(f"{snapshot_uri} is not a complete raw snapshot: it has no manifest.json") from None


def _count_rows(fmt: str, copied: storage.CopyResult, snapshot_uri: str) -> int:
    lines = copied.newlines + (0 if copied.ends_with_newline else 1)
    if fmt == "csv":
        return max(lines - 1, 0)  # less the header
    if fmt == "jsonl":
        return lines
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_filesystem(snapshot_uri)
    try:
        return pq.ParquetFile(fs.open_input_file(path)).metadata.num_rows
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError variants for a damaged footer
        raise IngestError(
            f"{snapshot_uri}: not a readable Parquet file ({err}); the raw snapshot is kept for inspection"
        ) from err


def ingest_object(cfg: PipelineConfig, source_uri: str) -> tuple[Manifest, bool]:
    """Snapshot ``source_uri``; returns the manifest and whether this call created the snapshot."""
    fmt = detect_format(source_uri)
    if not storage.exists(source_uri):
        raise IngestError(f"{source_uri} does not exist (was it moved before ingestion?)")
    incoming = storage.join(cfg.storage.raw_uri, "_incoming", f"{uuid.uuid4().hex}.{fmt}")
    try:
        copied = storage.copy_hashing(source_uri, incoming)
        if copied.size == 0:
            raise IngestError(f"{source_uri} is empty (0 bytes): nothing to ingest. The landed file was left as it is.")
        final = storage.join(snapshot_dir(cfg, copied.sha256), f"data.{fmt}")
        if storage.exists(manifest_uri(final)):
            return read_manifest(final), False
        storage.move(incoming, final)
    finally:
        storage.remove(incoming)
    manifest = Manifest(
        snapshot_uri=final,
        source_uri=source_uri,
        format=fmt,
        size=copied.size,
        sha256=copied.sha256,
        rows=_count_rows(fmt, copied, final),
        ingested_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    storage.write_bytes(manifest_uri(final), json.dumps(manifest.to_dict(), indent=2).encode())
    return manifest, True
