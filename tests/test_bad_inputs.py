"""The catalogue of what people and other systems really land, good and bad, as a table: each kind of
landed object, the outcome it must get, and, for every one of them, the invariants

- the landed object is untouched (same bytes, same kind of file), whatever happened;
- a refused object leaves no raw snapshot, and the ledger records why (no later run tries it again);
- raw rows = curated rows + quarantined rows, in the summary and in the published files' footers.

Outcomes: ``refused(pattern)`` (ingestion says no, ``IngestError``), ``failed(pattern)`` (the snapshot
fails validation as a whole, ``ValidationFailed``), ``curated(rows, quarantined)`` (published, with
these rows quarantined under these expectations).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from conftest import with_section

from mlfactory import storage

from mlfactory.data import sample_data
from mlfactory.data.etl import CURATED_FILE, QUARANTINE_FILE, ValidationFailed, curate_snapshot
from mlfactory.data.ingest import IngestError, ingest_object, ledger_uri

ROWS = 200  # dataset.min_rows is 100; validation.max_quarantine_fraction 5%: 10 bad rows pass, 11 fail
COLUMNS = [f.name for f in sample_data.generate(1).schema]
LIMITS = {"max_object_bytes": 4 * 2**20, "max_line_bytes": 64 * 2**10, "max_row_group_bytes": 2**20}


@dataclass(frozen=True)
class Outcome:
    kind: str  # refused, failed, curated
    pattern: str = ""
    rows: int = 0
    quarantined: dict = field(default_factory=dict)


def refused(pattern: str) -> Outcome:
    return Outcome("refused", pattern)


def failed(pattern: str) -> Outcome:
    return Outcome("failed", pattern)


def curated(rows: int = ROWS, **quarantined: int) -> Outcome:
    return Outcome("curated", rows=rows, quarantined=quarantined)


# --- making landed objects ------------------------------------------------------------------


def lines(rows: int = ROWS) -> list[str]:
    buf = io.BytesIO()
    pacsv.write_csv(sample_data.generate(rows, seed=7), buf)
    return buf.getvalue().decode().splitlines()


def text(rows: list[str], newline: str = "\n") -> bytes:
    return (newline.join(rows) + newline).encode()


def with_values(column: str, values: dict[int, str], rows: int = ROWS) -> bytes:
    """The sample CSV with data row i's ``column`` set to values[i] (written as given, quotes and all)."""
    out = lines(rows)
    for row, value in values.items():
        fields = out[row + 1].split(",")
        fields[COLUMNS.index(column)] = value
        out[row + 1] = ",".join(fields)
    return text(out)


def table_bytes(fmt: str, rows: int = ROWS) -> bytes:
    buf = io.BytesIO()
    table = sample_data.generate(rows, seed=7)
    if fmt == "parquet":
        pq.write_table(table, buf)
    else:
        for record in table.to_pylist():
            buf.write((json.dumps(record, default=str) + "\n").encode())
    return buf.getvalue()


def zstd(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return sink.getvalue().to_pybytes()


def file(name: str, data: bytes | Callable[[], bytes]) -> Callable[[Path], Path]:
    def make(landing: Path) -> Path:
        path = landing / name
        path.write_bytes(data() if callable(data) else data)
        return path

    return make


def symlink(landing: Path) -> Path:
    target = landing.parent / "elsewhere.csv"
    target.write_bytes(text(lines()))
    (landing / "link.csv").symlink_to(target)
    return landing / "link.csv"


def symlinked_folder(landing: Path) -> Path:
    """A folder in landing that is a link to one outside: its files are not landing's (the form took such a URI,
    and a file outside the bucket was read)."""
    outside = landing.parent / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_bytes(text(lines()))
    (landing / "linked").symlink_to(outside, target_is_directory=True)
    return landing / "linked" / "secret.csv"


def fifo(landing: Path) -> Path:
    os.mkfifo(landing / "pipe.csv")  # opening it for reading would block for ever without a writer
    return landing / "pipe.csv"


def folder(landing: Path) -> Path:
    (landing / "folder.csv").mkdir()
    return landing / "folder.csv"


def unix_socket(landing: Path) -> Path:
    """A socket file (devices are refused by the same check, on the opened descriptor)."""
    import socket

    path = landing / "socket.csv"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()
    return path


def missing(landing: Path) -> Path:
    return landing / "gone.csv"


def big_row_group(landing: Path) -> Path:
    table = pa.table({c: pa.array([f"{i:0>64}" for i in range(40_000)]) for c in COLUMNS[:1]})  # ~2.8 MB of text
    pq.write_table(table, landing / "one-row-group.parquet", row_group_size=len(table), compression="zstd")
    return landing / "one-row-group.parquet"


def wide_header(landing: Path) -> Path:
    header = ",".join(COLUMNS + [f"extra_{i}" for i in range(5000)])
    (landing / "wide.csv").write_text(header + "\n" + "\n".join(",".join(["1"] * (len(COLUMNS) + 5000)) for _ in range(3)) + "\n")
    return landing / "wide.csv"


def bomb() -> bytes:
    return gzip.compress(b"\n" * (5 * 2**20), compresslevel=9)  # 5 kB that expand to 5 MiB


def trailing_delimiters() -> bytes:
    return text([line + "," for line in lines()])


def quoted_delimiters_and_newlines() -> bytes:
    out = lines()
    for row in (0, 1, 2):
        fields = out[row + 1].split(",")
        fields[0] = f'"C,{row}\nsecond line of the key"'
        out[row + 1] = ",".join(fields)
    return text(out)


def mixed_line_endings() -> bytes:
    out = lines()
    return "".join(line + ("\r\n" if i % 2 else "\n") for i, line in enumerate(out)).encode()


def empty_lines() -> bytes:
    out = lines()
    return text(out[:50] + ["", ""] + out[50:120] + [""] + out[120:])


def spaced_header() -> bytes:
    out = lines()
    out[0] = ",".join(f"  {name} " for name in out[0].replace('"', "").split(","))
    return text(out)


def invalid_utf8() -> bytes:
    data = with_values("region", {4: "SOUTHMARK", 9: "SOUTHMARK"})
    return data.replace(b"SOUTHMARK", b"\xff\xfe")


def truncated_last_line() -> bytes:
    out = lines()
    out[-1] = ",".join(out[-1].split(",")[:5])
    return text(out)


# --- the table ------------------------------------------------------------------------------

BETWEEN = "expect_column_values_to_be_between"
TYPE = "expect_column_values_to_be_of_type"
CATALOGUE: list[tuple[str, Callable[[Path], Path], Outcome, dict]] = [
    # kind, landed object, outcome, config changes
    ("a clean CSV", file("clean.csv", lambda: text(lines())), curated(), {}),
    ("an empty object (0 bytes)", file("empty.csv", b""), refused(r"is empty \(0 bytes\)"), {}),
    ("a spreadsheet (.xlsx)", file("book.xlsx", b"PK\x03\x04"), refused("unsupported file type '.xlsx'"), {}),
    ("no extension", file("export", b"a,b\n1,2\n"), refused(r"unsupported file type '\(no extension\)'"), {}),
    ("a symbolic link", symlink, refused("is a symbolic link"), {}),
    ("a file in a symlinked folder", symlinked_folder, refused("is reached through 'linked', a symbolic link"), {}),
    ("a FIFO (named pipe)", fifo, refused(r"is a FIFO \(named pipe\)"), {}),
    ("a folder named like a file", folder, refused("is a folder"), {}),
    ("a socket file", unix_socket, refused("is a socket"), {}),
    ("an object that is gone", missing, refused("does not exist"), {}),
    ("an object over ingest.max_object_bytes", file("huge.csv", lambda: text(lines(40_000))),
     refused("over ingest.max_object_bytes"), {}),
    ("a line over ingest.max_line_bytes", file("long.csv", lambda: with_values("customer_id", {3: '"' + "x" * 70_000 + '"'})),
     refused("has a line of 7[0-9]{4} bytes, over ingest.max_line_bytes"), {}),
    ("a gzip bomb", file("bomb.csv.gz", bomb), refused("decompresses to over ingest.max_object_bytes"), {}),
    ("a corrupt gzip", file("corrupt.csv.gz", lambda: gzip.compress(text(lines()))[:200] + b"garbage"),
     refused("is not valid gzip data"), {}),
    ("a gzip of nothing", file("nothing.csv.gz", lambda: gzip.compress(b"")), refused("decompresses to nothing"), {}),
    ("a damaged Parquet file", file("broken.parquet", b"PAR1 this is not parquet"), refused("not a readable Parquet file"), {}),
    ("a Parquet row group over ingest.max_row_group_bytes", big_row_group, refused("has a row group of"), {}),
    ("a gzipped Parquet file", file("data.parquet.gz", lambda: gzip.compress(table_bytes("parquet"))),
     refused("a compressed Parquet file"), {}),
    ("a UTF-8 CSV with a byte-order mark", file("excel.csv", lambda: b"\xef\xbb\xbf" + text(lines())), curated(), {}),
    ("a .csv.gz", file("data.csv.gz", lambda: gzip.compress(text(lines()))), curated(), {}),
    ("a .csv.zst", file("data.csv.zst", lambda: zstd(text(lines()))), curated(), {}),
    ("a .csv.bz2", file("data.csv.bz2", lambda: bz2.compress(text(lines()))), curated(), {}),
    ("a .jsonl.gz", file("data.jsonl.gz", lambda: gzip.compress(table_bytes("jsonl"))), curated(), {}),
    ("a Parquet file", file("data.parquet", lambda: table_bytes("parquet")), curated(), {}),
    ("a .tsv", file("data.tsv", lambda: text([line.replace(",", "\t") for line in lines()])), curated(), {}),
    ("semicolons, with dataset.csv_delimiter ';'", file("eu.csv", lambda: text([line.replace(",", ";") for line in lines()])),
     curated(), {"dataset": {"csv_delimiter": ";"}}),
    ("semicolons, config says ','", file("eu.csv", lambda: text([line.replace(",", ";") for line in lines()])),
     failed("looks delimited by ';'"), {}),
    ("spaces around the header's names", file("spaced.csv", spaced_header), curated(), {}),
    ("a trailing delimiter on every line", file("trailing.csv", trailing_delimiters), curated(), {}),
    ("quoted delimiters and line breaks in values", file("quoted.csv", quoted_delimiters_and_newlines), curated(), {}),
    ("mixed line endings (CRLF and LF)", file("mixed.csv", mixed_line_endings), curated(), {}),
    ("empty lines between rows", file("gaps.csv", empty_lines), curated(), {}),
    ("numbers with thousands separators", file("thousands.csv", lambda: with_values("income", {i: '"12,345.60"' for i in (1, 2, 3)})),
     curated(ROWS - 3, **{f"{TYPE}(income)": 3}), {}),
    ("dates in several formats", file("dates.csv", lambda: with_values("signup_date", {1: "03/15/2024", 2: "15.03.2024", 3: "2024-03-15"})),
     curated(ROWS - 2, **{f"{TYPE}(signup_date)": 2}), {}),
    ("NUL bytes inside values", file("nul.csv", lambda: with_values("region", {4: '"so\x00uth"', 5: '"\x00"'})),
     curated(ROWS - 2, **{"invalid_utf8(region)": 2}), {}),
    ("bytes that are not UTF-8", file("latin1.csv", invalid_utf8), curated(ROWS - 2, **{"invalid_utf8(region)": 2}), {}),
    ("NaN and infinity", file("nan.csv", lambda: with_values("income", {1: "NaN", 2: "inf"})),
     curated(ROWS - 2, **{"expect_column_values_to_be_finite(income)": 2}), {}),
    ("a truncated last line", file("cut.csv", truncated_last_line), curated(ROWS - 1, **{"malformed_row()": 1}), {}),
    ("values out of range", file("ages.csv", lambda: with_values("age", {1: "150", 2: "-3"})),
     curated(ROWS - 2, **{f"{BETWEEN}(age)": 2}), {}),
    ("an unknown category", file("regions.csv", lambda: with_values("region", {1: '"atlantis"'})),
     curated(ROWS - 1, **{"expect_column_values_to_be_in_set(region)": 1}), {}),
    ("a duplicated key", file("dupes.csv", lambda: text(lines() + lines()[1:4])),
     curated(ROWS, **{"expect_column_values_to_be_unique(customer_id)": 3}), {}),
    ("a null in a required column", file("nulls.csv", lambda: with_values("age", {1: "", 2: "NULL"})),
     curated(ROWS - 2, **{"expect_column_values_to_not_be_null(age)": 2}), {}),
    ("too many bad rows", file("bad.csv", lambda: with_values("age", {i: "150" for i in range(40)})),
     failed(f"{BETWEEN} failed on column 'age' for 40 of 200 rows"), {}),
    ("a header and no rows", file("header.csv", lambda: text(lines()[:1])), failed("the batch has header only"), {}),
    ("a missing column", file("narrow.csv", lambda: text([",".join(line.split(",")[1:]) for line in lines()])),
     failed(r"missing column\(s\) \['customer_id'\]"), {}),
    ("5000 unknown columns in the header", wide_header, failed(r"unknown column\(s\) \['extra_0'.* and 4980 more"), {}),
]


def fingerprint(path: Path) -> tuple:
    """What must not change about a landed object: its kind, and for a regular file its bytes."""
    if not os.path.lexists(path):
        return ("absent",)
    info = os.lstat(path)
    if os.path.islink(path) or not os.path.isfile(path):
        return (info.st_mode, info.st_size)
    return (info.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())


@pytest.mark.parametrize(("kind", "make", "outcome", "changes"), CATALOGUE, ids=[row[0] for row in CATALOGUE])
def test_catalogue(kind, make, outcome, changes, cfg, bucket):
    cfg = with_section(cfg, "ingest", **LIMITS)
    for section, values in changes.items():
        cfg = with_section(cfg, section, **values)
    landing = bucket / "landing"
    landing.mkdir(parents=True)
    path = make(landing)
    before = fingerprint(path)
    uri = path.as_uri()

    if outcome.kind == "refused":
        with pytest.raises(IngestError, match=outcome.pattern):
            ingest_object(cfg, uri)
        assert not [o for o in storage.list_objects(cfg.storage.raw_uri) if o.key.endswith("manifest.json")]
        if os.path.lexists(path) and landing in path.parents:
            ledger = [json.loads(storage.read_bytes(o.uri)) for o in storage.list_objects(ledger_uri(cfg))]
            assert [(e["uri"], e["outcome"]) for e in ledger] == [(uri, "refused")]
        assert fingerprint(path) == before
        return

    manifest, created = ingest_object(cfg, uri)
    assert created
    if outcome.kind == "failed":
        with pytest.raises(ValidationFailed, match=outcome.pattern) as err:
            curate_snapshot(cfg, manifest.snapshot_uri)
        result = err.value.result
        assert not storage.list_objects(cfg.storage.curated_uri)
    else:
        result = curate_snapshot(cfg, manifest.snapshot_uri)
        assert result.success and result.curated_rows == outcome.rows
        assert result.failures == outcome.quarantined
        curated_file = storage.join(result.curated_uri, CURATED_FILE)
        assert pq.read_metadata(storage.local_path(curated_file)).num_rows == outcome.rows
    assert result.raw_rows == result.curated_rows + result.quarantined_rows
    quarantine = storage.join(result.quarantine_uri, QUARANTINE_FILE)
    published = pq.read_metadata(storage.local_path(quarantine)).num_rows if storage.exists(quarantine) else 0
    assert published == result.quarantined_rows
    assert fingerprint(path) == before


def test_a_zero_byte_object_replaced_by_a_full_one_is_refused_then_ingested(cfg, bucket):
    landing = bucket / "landing"
    landing.mkdir(parents=True)
    path = landing / "late.csv"
    path.write_bytes(b"")  # an upload that creates the object first and writes it after
    with pytest.raises(IngestError, match="is empty"):
        ingest_object(cfg, path.as_uri())
    path.write_bytes(text(lines()))
    manifest, created = ingest_object(cfg, path.as_uri())
    assert created and curate_snapshot(cfg, manifest.snapshot_uri).curated_rows == ROWS


def test_an_object_overwritten_while_being_read_is_refused_and_its_new_version_taken_later(cfg, bucket, monkeypatch):
    landing = bucket / "landing"
    landing.mkdir(parents=True)
    path = landing / "moving.csv"
    path.write_bytes(text(lines()))
    copy = storage.copy_hashing

    def copy_while_a_writer_replaces_it(src, dst, **kwargs):
        result = copy(src, dst, **kwargs)
        path.write_bytes(text(lines(150)))  # the other system rewrites the object as it is being read
        return result

    monkeypatch.setattr(storage, "copy_hashing", copy_while_a_writer_replaces_it)
    with pytest.raises(IngestError, match="changed while it was being read"):
        ingest_object(cfg, path.as_uri())
    assert not [o for o in storage.list_objects(cfg.storage.raw_uri) if o.key.endswith("manifest.json")]
    monkeypatch.setattr(storage, "copy_hashing", copy)
    manifest, created = ingest_object(cfg, path.as_uri())  # the new version, once it settled
    assert created and manifest.rows == 150


def test_a_5000_column_header_is_checked_in_linear_time(cfg, bucket):
    import time

    from mlfactory.data.etl import _schema_error
    from mlfactory.data.ingest import Manifest

    manifest = Manifest("raw/x/data.csv", "landing/x.csv", "csv", 1, "0" * 64, 1, "2026-01-01T00:00:00")
    for width in (5_000, 50_000):
        started = time.perf_counter()
        message = _schema_error([f"c{i}" for i in range(width)], cfg.dataset, manifest)
        assert f"and {width - 20} more" in message
        assert time.perf_counter() - started < 0.5


def test_label_files_are_read_as_landed_files_are_never_past_their_limit(cfg, bucket):
    """Label files (predictions/labels/, read by ml_monitor) were opened with no regular-file, size or
    decompression check: a link out of the bucket, a FIFO, a gzip bomb or a huge file each got read."""
    from mlfactory import BadInput
    from mlfactory.monitoring.feedback import read_label_file

    cfg = cfg.model_copy(update={"monitoring": cfg.monitoring.model_copy(update={"max_label_bytes": 64 * 1024})})
    labels = Path(storage.local_path(cfg.storage.labels_uri))
    labels.mkdir(parents=True)
    good = b"request_id,row,churned\nr1,0,true\nr2,0,false\n"
    outside = bucket.parent / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_bytes(good)
    (labels / "link.csv").symlink_to(outside / "secret.csv")
    (labels / "linked").symlink_to(outside, target_is_directory=True)
    os.mkfifo(labels / "pipe.csv")
    (labels / "bomb.csv.gz").write_bytes(gzip.compress(good + b"r3,0,true\n" * 20_000))
    (labels / "huge.csv").write_bytes(good + b"r3,0,true\n" * 20_000)
    (labels / "fine.csv.gz").write_bytes(gzip.compress(good))
    expected = {"link.csv": "is a symbolic link", "linked/secret.csv": "is reached through 'linked', a symbolic link",
                "pipe.csv": r"is a FIFO", "bomb.csv.gz": "decompresses to more than 65536 bytes",
                "huge.csv": "bytes, over monitoring.max_label_bytes"}
    for name, message in expected.items():
        info = storage.ObjectInfo(f"{cfg.storage.labels_uri}/{name}", name, 1, "", 0.0)
        with pytest.raises(BadInput, match=message):
            read_label_file(info if name != "huge.csv" else storage.stat(info.uri), cfg)
    fine = read_label_file(storage.stat(f"{cfg.storage.labels_uri}/fine.csv.gz"), cfg)
    assert fine["request_id"].tolist() == ["r1", "r2"] and fine["churned"].tolist() == [True, False]
