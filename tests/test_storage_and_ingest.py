import hashlib
import json
import os
import time

import pytest

from mlfactory import storage

from mlfactory.data import sample_data
from mlfactory.data.ingest import IngestError, ingest_object, read_manifest


def test_list_objects_skips_hidden_and_partial_files(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.csv").write_text("yy")
    (tmp_path / ".c.csv.tmp").write_text("partial")
    (tmp_path / "_state").write_text("{}")
    found = {o.key: o for o in storage.list_objects(tmp_path.as_uri())}
    assert sorted(found) == ["a.csv", "sub/b.csv"]
    assert found["sub/b.csv"].size == 2 and found["sub/b.csv"].uri == (tmp_path / "sub" / "b.csv").as_uri()
    before = found["a.csv"].fingerprint
    (tmp_path / "a.csv").write_text("changed")
    assert {o.key: o for o in storage.list_objects(tmp_path.as_uri())}["a.csv"].fingerprint != before


def test_atomic_write_leaves_no_partial_file_on_error(tmp_path):
    target = (tmp_path / "out.json").as_uri()
    storage.write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with storage.atomic_write(target) as f:
            f.write(b"half")
            raise RuntimeError("disk full")
    assert storage.read_bytes(target) == b"old"
    assert os.listdir(tmp_path) == ["out.json"]


@pytest.mark.parametrize("name", ["customers.csv", "customers.parquet", "customers.jsonl"])
def test_ingest_snapshots_by_content_and_never_touches_the_landed_file(cfg, bucket, name):
    landed = sample_data.write(sample_data.generate(300, seed=3), bucket / "landing" / name)
    before = (landed.read_bytes(), landed.stat().st_mtime_ns)
    manifest, created = ingest_object(cfg, landed.as_uri())
    assert created
    digest = hashlib.sha256(before[0]).hexdigest()
    assert manifest.sha256 == digest and manifest.size == len(before[0]) and manifest.rows == 300
    assert manifest.snapshot_uri == f"{cfg.storage.raw_uri}/{digest}/data.{name.split('.')[1]}"
    assert storage.read_bytes(manifest.snapshot_uri) == before[0]
    assert read_manifest(manifest.snapshot_uri) == manifest
    assert json.loads(storage.read_bytes(manifest.snapshot_uri.rsplit("/", 1)[0] + "/manifest.json"))["source_uri"] == landed.as_uri()
    assert (landed.read_bytes(), landed.stat().st_mtime_ns) == before  # the landed object is never rewritten
    # The same bytes under another name are ingested once.
    copy = bucket / "landing" / f"again-{name}"
    copy.write_bytes(before[0])
    again, created_again = ingest_object(cfg, copy.as_uri())
    assert not created_again and again.snapshot_uri == manifest.snapshot_uri
    assert len([o for o in storage.list_objects(cfg.storage.raw_uri)]) == 2  # data + manifest, nothing else


def test_a_try_that_stopped_after_publishing_the_data_is_finished_without_rewriting_it(cfg, bucket):
    """The snapshot's data file is written once: a retry of a try that published it and died before the manifest
    finishes the snapshot around it (the same bytes: the name is their hash), never writing it again."""
    landed = sample_data.write(sample_data.generate(50, seed=4), bucket / "landing" / "a.csv")
    digest = hashlib.sha256(landed.read_bytes()).hexdigest()
    published = f"{cfg.storage.raw_uri}/{digest}/data.csv"
    storage.write_once(published, landed.read_bytes())
    inode = os.stat(storage.local_path(published)).st_ino
    manifest, created = ingest_object(cfg, landed.as_uri())
    assert created and manifest.snapshot_uri == published and read_manifest(published) == manifest
    assert os.stat(storage.local_path(published)).st_ino == inode  # the same file, not a rewrite


def test_ingest_rejects_empty_and_unknown_files_and_keeps_them(cfg, bucket):
    (bucket / "landing").mkdir(parents=True)
    empty = bucket / "landing" / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(IngestError, match="is empty \\(0 bytes\\)"):
        ingest_object(cfg, empty.as_uri())
    sheet = bucket / "landing" / "book.xlsx"
    sheet.write_bytes(b"PK")
    with pytest.raises(IngestError, match="unsupported file type '.xlsx'"):
        ingest_object(cfg, sheet.as_uri())
    with pytest.raises(IngestError, match="does not exist"):
        ingest_object(cfg, (bucket / "landing" / "gone.csv").as_uri())
    assert empty.exists() and sheet.read_bytes() == b"PK"
    assert storage.list_objects(cfg.storage.raw_uri) == []


def test_a_damaged_parquet_is_refused_recorded_and_left_as_it_is(cfg, bucket):
    from mlfactory.data.ingest import pending_objects

    bad = bucket / "landing" / "broken.parquet"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"PAR1 this is not parquet")
    assert [o.key for o in pending_objects(cfg, now=time.time() + 60)] == ["broken.parquet"]
    with pytest.raises(IngestError, match="not a readable Parquet file"):
        ingest_object(cfg, bad.as_uri())
    assert storage.list_objects(cfg.storage.raw_uri) == [] and bad.read_bytes() == b"PAR1 this is not parquet"
    assert pending_objects(cfg, now=time.time() + 60) == []  # refused once: no later run tries it again
    bad.write_bytes(b"PAR1 still not parquet")  # a new version is a new object to ingest
    assert [o.key for o in pending_objects(cfg, now=time.time() + 60)] == ["broken.parquet"]


def test_sample_data_is_deterministic_and_drift_shifts_it():
    a, b = sample_data.generate(2000, seed=1), sample_data.generate(2000, seed=1)
    assert a.equals(b)
    drifted = sample_data.generate(2000, seed=1, drift=1.0)
    assert drifted["age"].to_numpy().mean() > a["age"].to_numpy().mean() + 5
    assert a.num_columns == 20 and 0.1 < a["churned"].to_numpy().mean() < 0.6


def test_a_failed_write_leaves_the_old_object_and_stale_temporaries_are_swept(tmp_path):
    target = (tmp_path / "out" / "data.bin").as_uri()
    storage.write_bytes(target, b"old")
    with pytest.raises(RuntimeError), storage.atomic_write(target) as f:
        f.write(b"half of the new")
        raise RuntimeError("the writer dies")
    assert storage.read_bytes(target) == b"old" and [o.key for o in storage.list_objects((tmp_path / "out").as_uri())] == ["data.bin"]
    killed = storage.temporary_uri(target)  # what a kill -9 leaves: the writer never reaches its cleanup
    storage.open_uri(killed, "wb").close()
    assert storage.remove_temporaries((tmp_path / "out").as_uri(), older_than_s=3600) == 0  # may be a live writer
    past = time.time() - 7200
    os.utime(storage.local_path(killed), (past, past))
    assert storage.remove_temporaries((tmp_path / "out").as_uri(), older_than_s=3600) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["data.bin"]


@pytest.mark.parametrize("store", ["file", "s3"])
def test_a_write_once_object_is_never_replaced_and_a_failed_one_never_appears(tmp_path, store, request, monkeypatch):
    """The raw snapshots and the frozen holdout are written create-only (S3 If-None-Match: *; the Airflow policy
    denies any other write there): a second write is refused, the first stays, and a write that fails leaves
    nothing, neither the object nor a temporary."""
    root = tmp_path.as_uri()
    if store == "s3":
        import boto3

        moto = request.getfixturevalue("moto_server")
        monkeypatch.setenv("AWS_ENDPOINT_URL", moto)
        boto3.client("s3", endpoint_url=moto).create_bucket(Bucket="once")
        root = "s3://once"
    snapshot, holdout = storage.join(root, "raw/abc/data.csv"), storage.join(root, "models/holdout/holdout.parquet")
    storage.write_once(snapshot, b"first")
    with pytest.raises(FileExistsError):
        storage.write_once(snapshot, b"second")
    with pytest.raises(FileExistsError):
        storage.copy_once(snapshot, snapshot)
    with pytest.raises(RuntimeError), storage.created(holdout) as f:
        f.write(b"half of the rows")
        raise RuntimeError("the writer dies")
    assert storage.read_bytes(snapshot) == b"first" and not storage.exists(holdout)
    fs, path = storage.filesystem(root)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find(path)) == ["data.csv"]  # no temporary either


def test_an_object_store_write_neither_asks_for_folders_nor_creates_a_missing_bucket(moto_server, monkeypatch):
    """A key needs no folders: a published write is its upload, one copy and one delete (no request for the bucket
    or a folder), and a bucket the config names wrongly is an error, not a new bucket."""
    import boto3
    import s3fs.core

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.create_bucket(Bucket="calls")
    sent = []
    call_s3 = s3fs.core.S3FileSystem._call_s3

    async def recorded(self, method, *args, **kwargs):
        sent.append(method)
        return await call_s3(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.core.S3FileSystem, "_call_s3", recorded)
    storage.write_bytes("s3://calls/reports/a/summary.json", b"{}")
    # (the upload itself goes through the file object's own bound call, not recorded here; the HEAD is the copy's
    # size check)
    assert sorted(sent) == ["copy_object", "delete_object", "head_object"], sent
    assert storage.read_bytes("s3://calls/reports/a/summary.json") == b"{}"
    storage.remove("s3://calls/reports/a/missing.json")  # nothing there: nothing to do
    with pytest.raises(FileNotFoundError):
        storage.write_bytes("s3://no-such-bucket-here/reports/summary.json", b"{}")
    assert "no-such-bucket-here" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}


def test_curating_on_s3_asks_nothing_of_a_file_it_never_wrote_or_a_temporary_it_published(moto_server, monkeypatch):
    """A clean snapshot's curation on an object store: the quarantine has no row, so its file is neither written
    nor asked about; the curated file's temporary is copied onto its name, deleted, and named by no later request
    (each remove of a missing key lists, asks and lists again: 56 requests a snapshot became 41)."""
    import io

    import boto3
    import pyarrow.csv as pacsv
    import s3fs.core

    from mlfactory.config import load_config
    from mlfactory.data.etl import curate_snapshot

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("MLFACTORY_BUCKET", "s3://curation-calls")
    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.create_bucket(Bucket="curation-calls")
    body = io.BytesIO()
    pacsv.write_csv(sample_data.generate(300, seed=3), body)
    s3.put_object(Bucket="curation-calls", Key="landing/a.csv", Body=body.getvalue())
    cfg = load_config()
    manifest, _ = ingest_object(cfg, "s3://curation-calls/landing/a.csv")
    sent = []
    call_s3 = s3fs.core.S3FileSystem._call_s3

    async def recorded(self, method, *args, **kwargs):
        sent.append((method, repr(kwargs)))
        return await call_s3(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.core.S3FileSystem, "_call_s3", recorded)
    result = curate_snapshot(cfg, manifest.snapshot_uri)
    assert (result.curated_rows, result.quarantined_rows) == (300, 0)
    assert not [call for call in sent if "rows.parquet" in call[1]], sent  # the quarantine's file, never written
    staged = [i for i, (_, kwargs) in enumerate(sent) if "/.data.parquet." in kwargs]
    deleted = [i for i in staged if sent[i][0] == "delete_object"]
    assert deleted and staged[-1] == deleted[-1], [sent[i] for i in staged]  # nothing asked of it once deleted
    assert [o.key for o in storage.list_objects("s3://curation-calls/curated")] == [
        f"ingest_date={manifest.ingested_at[:10]}/snapshot={manifest.snapshot_id}/data.parquet"]
