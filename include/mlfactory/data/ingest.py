"""Ingestion: copy a landed object into an immutable raw snapshot addressed by its content hash.

The landed object is only ever read. The snapshot lives at ``raw/<sha256>/data.<format>`` (``.csv.gz``
and the like keep their compression) with a ``manifest.json`` beside it, written last, so a snapshot
with a manifest is complete. The same bytes landed twice (under any name) are ingested once. Both files are
written once (``storage.created``), never over an object: the clouds' policies refuse any other write there.

The landing area is written by other systems, so an object is checked before it is trusted: only a
regular file (no symlink, FIFO or device), at most ``ingest.max_object_bytes`` (compressed and
decompressed), lines of at most ``ingest.max_line_bytes``, Parquet row groups of at most
``ingest.max_row_group_bytes``, and unchanged while it was read. A refused object gets an
``IngestError`` naming the problem and is left as it is.

Every landed object version (URI + fingerprint) that ingestion has handled, ingested or refused, is
recorded in the ledger ``raw/_landed/``. ``pending_objects`` is the landing listing less that ledger:
what an ml_ingest run takes, whatever events started it, so an object announced by an event that no
run consumed is still ingested by the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from mlfactory import BadInput, storage
from mlfactory.config import PipelineConfig

FORMATS = {".csv": "csv", ".tsv": "csv", ".tab": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl",
           ".ndjson": "jsonl"}
TAB_SEPARATED = (".tsv", ".tab")
COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd"}
LEFT = "The landed object was left as it is."

log = logging.getLogger(__name__)



class IngestError(BadInput):
    """A landed object that cannot be ingested; the landed object is left untouched."""


@dataclass(frozen=True)
class LandedFormat:
    format: str  # csv, parquet or jsonl
    compression: str | None  # gzip, bz2, zstd: read through a decompressing stream
    delimiter: str | None  # a tab for .tsv/.tab; None: the config's dataset.csv_delimiter
    suffix: str  # the snapshot file's: .csv, .tsv.gz, ...


@dataclass(frozen=True)
class Manifest:
    snapshot_uri: str
    source_uri: str
    format: str
    size: int
    sha256: str
    rows: int
    ingested_at: str
    compression: str | None = None
    delimiter: str | None = None
    source_fingerprint: str = field(default="", compare=False)

    @property
    def snapshot_id(self) -> str:
        return self.sha256[:16]

    def to_dict(self) -> dict:
        return {**asdict(self), "snapshot_id": self.snapshot_id}

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def detect_format(uri: str) -> LandedFormat:
    name = posixpath.basename(uri.rstrip("/")).lower()
    stem, ext = posixpath.splitext(name)
    compression = COMPRESSIONS.get(ext)
    if compression:
        stem, ext = posixpath.splitext(stem)
    if ext not in FORMATS:
        raise IngestError(
            f"{uri}: unsupported file type {name[len(stem):] or '(no extension)'!r}; mlfactory ingests "
            f"{', '.join(sorted(FORMATS))}, and the text formats also compressed ({', '.join(sorted(COMPRESSIONS))}). {LEFT}"
        )
    if compression and FORMATS[ext] == "parquet":
        raise IngestError(f"{uri}: a compressed Parquet file; Parquet compresses its own pages, land the .parquet "
                          f"file as it is. {LEFT}")
    return LandedFormat(FORMATS[ext], compression, "\t" if ext in TAB_SEPARATED else None, name[len(stem):])


def snapshot_dir(cfg: PipelineConfig, sha256: str) -> str:
    return storage.join(cfg.storage.raw_uri, sha256)


def incoming_uri(cfg: PipelineConfig) -> str:
    """Where objects are copied (and hashed) before they become a snapshot."""
    return storage.join(cfg.storage.raw_uri, "_incoming")


def manifest_uri(snapshot_uri: str) -> str:
    return posixpath.join(posixpath.dirname(snapshot_uri), "manifest.json")


def read_manifest(snapshot_uri: str) -> Manifest:
    try:
        return Manifest.from_dict(json.loads(storage.read_bytes(manifest_uri(snapshot_uri))))
    except FileNotFoundError:
        raise IngestError(f"{snapshot_uri} is not a complete raw snapshot: it has no manifest.json") from None


def snapshots(cfg: PipelineConfig) -> list[storage.ObjectInfo]:
    """The data file of every complete raw snapshot (one with a manifest), in the order of their names."""
    by_dir: dict[str, dict[str, storage.ObjectInfo]] = {}
    for obj in storage.list_objects(cfg.storage.raw_uri):
        folder, _, name = obj.key.rpartition("/")
        by_dir.setdefault(folder, {})[name] = obj
    return [obj for _, files in sorted(by_dir.items()) if "manifest.json" in files
            for name, obj in files.items() if name.startswith("data.")]


# --- the ledger of handled landed objects ----------------------------------------------------


def ledger_uri(cfg: PipelineConfig) -> str:
    return storage.join(cfg.storage.raw_uri, "_landed")


def _ledger_key(uri: str, fingerprint: str) -> str:
    return hashlib.sha256(f"{uri}\n{fingerprint}".encode()).hexdigest()[:40] + ".json"


def _record(cfg: PipelineConfig, obj: storage.ObjectInfo, outcome: str, **detail) -> None:
    entry = {"uri": obj.uri, "fingerprint": obj.fingerprint, "outcome": outcome,
             "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **detail}
    storage.write_bytes(storage.join(ledger_uri(cfg), _ledger_key(obj.uri, obj.fingerprint)),
                        json.dumps(entry, indent=2).encode())


def pending_objects(cfg: PipelineConfig, now: float | None = None) -> list[storage.ObjectInfo]:
    """Every landed object version not ingested or refused yet, and unchanged for ``ingest.settle_s``
    (one still being written is taken by a later run, which its own event starts)."""
    return waiting_objects(cfg.storage.landing_uri, ledger_uri(cfg), cfg.ingest.settle_s, now)


def waiting_objects(landing_uri: str, ledger: str, settle_s: float, now: float | None = None) -> list[storage.ObjectInfo]:
    """``pending_objects`` from the URIs themselves (what a landing trigger is given)."""
    now = time.time() if now is None else now
    done = {o.key for o in storage.list_objects(ledger)}
    return [o for o in storage.list_objects(landing_uri)
            if _ledger_key(o.uri, o.fingerprint) not in done and o.settled(settle_s, now)]


# --- one object ---------------------------------------------------------------------------------


def spread(items: list[tuple[str, int]], parts: int) -> list[list[str]]:
    """``items`` (name, size) in at most ``parts`` lists of about equal total size: the biggest first,
    each to the lightest list so far. What a run's mapped tasks take, side by side."""
    lists: list[tuple[int, list[str]]] = [(0, []) for _ in range(min(parts, len(items)))]
    for name, size in sorted(items, key=lambda item: -item[1]):
        lightest = min(range(len(lists)), key=lambda i: lists[i][0])
        lists[lightest] = (lists[lightest][0] + max(size, 1), [*lists[lightest][1], name])
    return [names for _, names in lists]


def ingest_objects(cfg: PipelineConfig, uris: list[str], retry_refused: bool = False) -> dict:
    """Ingest each of ``uris`` in turn; a refused one does not stop the others. Returns
    {"ingested": [manifest dicts of new snapshots], "duplicates": [uri], "refused": {uri: why}}."""
    outcome: dict = {"ingested": [], "duplicates": [], "refused": {}}
    for uri in uris:
        try:
            manifest, created = ingest_object(cfg, uri, retry_refused)
        except IngestError as err:
            log.warning("refused %s: %s", uri, err)
            outcome["refused"][uri] = str(err)
            continue
        if created:
            log.info("ingested %s -> %s (%d rows)", uri, manifest.snapshot_uri, manifest.rows)
            outcome["ingested"].append(manifest.to_dict())
        else:
            log.info("%s: the same bytes as snapshot %s, ingested already", uri, manifest.snapshot_uri)
            outcome["duplicates"].append(uri)
    return outcome


def ingest_object(cfg: PipelineConfig, source_uri: str, retry_refused: bool = False) -> tuple[Manifest, bool]:
    """Snapshot ``source_uri``; returns the manifest and whether this call created the snapshot. The
    outcome, a snapshot or an ``IngestError``, is recorded in the ledger for the version read; a version
    handled before gets that outcome again (a refusal is tried again with ``retry_refused``)."""
    try:
        before = storage.stat(source_uri)
    except FileNotFoundError:
        raise IngestError(f"{source_uri} does not exist (was it moved before ingestion?)") from None
    try:  # a retried task, or a second run, reaching an object already handled
        previous = json.loads(storage.read_bytes(storage.join(ledger_uri(cfg), _ledger_key(before.uri, before.fingerprint))))
    except FileNotFoundError:
        previous = None
    if previous is not None:
        if previous["outcome"] != "refused":
            return read_manifest(previous["snapshot_uri"]), False
        if not retry_refused:
            raise IngestError(previous["error"])
    try:
        manifest, created = _ingest(cfg, source_uri, before)
    except IngestError as err:
        _record(cfg, before, "refused", error=str(err))
        raise
    _record(cfg, before, "ingested" if created else "duplicate", snapshot_uri=manifest.snapshot_uri)
    return manifest, created


def _ingest(cfg: PipelineConfig, source_uri: str, before: storage.ObjectInfo) -> tuple[Manifest, bool]:
    kind = detect_format(source_uri)
    limit = cfg.ingest.max_object_bytes
    if before.size > limit:
        raise IngestError(f"{source_uri} is {before.size} bytes, over ingest.max_object_bytes ({limit}). {LEFT}")
    storage.remove_temporaries(incoming_uri(cfg), cfg.ingest.task_timeout_s)
    incoming = storage.temporary_uri(storage.join(incoming_uri(cfg), f"data{kind.suffix}"))
    try:
        try:
            copied = storage.copy_hashing(source_uri, incoming, max_bytes=limit, within=cfg.storage.landing_uri)
        except storage.NotARegularFile as err:
            raise IngestError(f"{err}: only regular files are ingested. {LEFT}") from None
        except ValueError as err:  # it grew past the limit while being read
            raise IngestError(f"{err} (ingest.max_object_bytes). {LEFT}") from None
        _unchanged(source_uri, before, copied.size)
        if copied.size == 0:
            raise IngestError(f"{source_uri} is empty (0 bytes): nothing to ingest. {LEFT}")
        lines = _decompressed_lines(incoming, source_uri, kind, limit) if kind.compression else copied.lines
        if kind.format != "parquet" and lines.longest_line > cfg.ingest.max_line_bytes:
            raise IngestError(f"{source_uri} has a line of {lines.longest_line} bytes, over ingest.max_line_bytes "
                              f"({cfg.ingest.max_line_bytes}): not a {kind.format.upper()} file of rows? {LEFT}")
        rows = _count_rows(cfg, kind, lines, incoming, source_uri)
        final = storage.join(snapshot_dir(cfg, copied.sha256), f"data{kind.suffix}")
        if storage.exists(manifest_uri(final)):
            return read_manifest(final), False
        try:
            storage.copy_once(incoming, final)
        except FileExistsError:  # an earlier or a concurrent try published these bytes (the name is their hash)
            pass
    finally:
        storage.remove(incoming)
    manifest = Manifest(
        snapshot_uri=final,
        source_uri=source_uri,
        format=kind.format,
        size=copied.size,
        sha256=copied.sha256,
        rows=rows,
        ingested_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        compression=kind.compression,
        delimiter=kind.delimiter,
        source_fingerprint=before.fingerprint,
    )
    try:
        storage.write_once(manifest_uri(final), json.dumps(manifest.to_dict(), indent=2).encode())
    except FileExistsError:  # a run ingesting the same bytes at the same time finished first
        return read_manifest(final), False
    return manifest, True


def _unchanged(source_uri: str, before: storage.ObjectInfo, copied: int) -> None:
    """The object read is the one listed: not rewritten, replaced or removed while it was copied."""
    try:
        after = storage.stat(source_uri)
    except FileNotFoundError:
        raise IngestError(f"{source_uri} was removed while it was being read; nothing was ingested") from None
    if after.fingerprint != before.fingerprint or copied != before.size:
        raise IngestError(
            f"{source_uri} changed while it was being read ({before.size} bytes when listed, {copied} read, "
            f"{after.size} now): nothing was ingested; its new version is ingested once it stays unchanged for "
            f"ingest.settle_s. {LEFT}"
        )


def _decompressed_lines(uri: str, source_uri: str, kind: LandedFormat, limit: int) -> storage.LineStats:
    """Stream the decompressed bytes once: their lines, the size limit (a small archive can expand to
    anything), and whether the data is valid at all."""
    import pyarrow as pa

    fs, path = storage.pyarrow_filesystem(uri)
    lines = storage.LineStats()
    try:
        with fs.open_input_stream(path, compression=kind.compression) as stream:
            while block := stream.read(storage.COPY_BLOCK):
                lines.feed(block)
                if lines.size > limit:
                    raise IngestError(f"{source_uri} decompresses to over ingest.max_object_bytes ({limit} bytes). {LEFT}")
    except (OSError, pa.ArrowInvalid) as err:
        raise IngestError(f"{source_uri} is not valid {kind.compression} data ({err}). {LEFT}") from None
    if lines.size == 0:
        raise IngestError(f"{source_uri} decompresses to nothing (0 bytes): nothing to ingest. {LEFT}")
    return lines


def _count_rows(cfg: PipelineConfig, kind: LandedFormat, lines: storage.LineStats, uri: str, source_uri: str) -> int:
    if kind.format != "parquet":
        count = lines.newlines + (0 if lines.ends_with_newline else 1)
        return max(count - 1, 0) if kind.format == "csv" else count  # a CSV's first line is its header
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_filesystem(uri)
    try:
        metadata = pq.ParquetFile(fs.open_input_file(path)).metadata
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError variants for a damaged footer
        raise IngestError(f"{source_uri}: not a readable Parquet file ({err}). {LEFT}") from err
    biggest = max((metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)), default=0)
    if biggest > cfg.ingest.max_row_group_bytes:
        raise IngestError(
            f"{source_uri} has a row group of {biggest} bytes decompressed, over ingest.max_row_group_bytes "
            f"({cfg.ingest.max_row_group_bytes}): ETL reads a row group at a time; write the file with smaller row "
            f"groups (pyarrow: row_group_size). {LEFT}"
        )
    return metadata.num_rows
