"""ETL + Great Expectations on each kind of good and bad input: clear errors, and no row ever lost."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from conftest import with_section

from mlfactory import storage

from mlfactory.data import sample_data
from mlfactory.data.etl import ValidationFailed, curate_snapshot, read_quarantine
from mlfactory.data.ingest import ingest_object

ROWS = 1000
COLUMNS = [f.name for f in sample_data.generate(1).schema]


def csv_lines(rows: int = ROWS, seed: int = 7) -> list[str]:
    buf = io.BytesIO()
    pacsv.write_csv(sample_data.generate(rows, seed=seed), buf)
    return buf.getvalue().decode().splitlines()


def set_field(lines: list[str], row: int, column: str, value: str) -> None:
    """Replace one value of data row ``row`` (0-based, after the header)."""
    fields = lines[row + 1].split(",")
    fields[COLUMNS.index(column)] = value
    lines[row + 1] = ",".join(fields)


def land(bucket, name: str, data: bytes | list[str]):
    if isinstance(data, list):
        data = ("\n".join(data) + "\n").encode()
    path = bucket / "landing" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def curate(cfg, bucket, name, data):
    manifest, _ = ingest_object(cfg, land(bucket, name, data).as_uri())
    return manifest, curate_snapshot(cfg, manifest.snapshot_uri)


def curated_table(result) -> pa.Table:
    parts = storage.list_objects(result.curated_uri)
    return pa.concat_tables(pq.read_table(storage.local_path(p.uri)) for p in parts)


def assert_nothing_lost(result, raw_rows: int) -> None:
    quarantined = read_quarantine(result.quarantine_uri)
    q_rows = 0 if quarantined is None else quarantined.num_rows
    curated_rows = curated_table(result).num_rows if result.curated_uri else 0
    assert result.raw_rows == raw_rows
    assert raw_rows == curated_rows + q_rows == result.curated_rows + result.quarantined_rows


def test_clean_csv_is_curated_whole_with_derived_features_and_data_docs(cfg, bucket):
    manifest, result = curate(cfg, bucket, "clean.csv", csv_lines())
    assert result.success and result.failures == {}
    assert result.curated_uri == f"{cfg.storage.curated_uri}/ingest_date={manifest.ingested_at[:10]}/snapshot={manifest.snapshot_id}"
    table = curated_table(result)
    assert table.num_rows == ROWS
    assert table.schema.field("age").type == pa.int64() and table.schema.field("signup_date").type == pa.timestamp("us")
    assert {"charges_per_month_of_tenure", "log_income", "signup_month"} <= set(table.column_names)
    assert read_quarantine(result.quarantine_uri) is None
    docs = storage.read_bytes(result.report_uri.replace("index.html", "batch-00000.html")).decode()
    assert "expect_column_values_to_be_in_set" in docs or "values must belong to this set" in docs
    assert all(e["success"] for e in result.expectations)
    assert_nothing_lost(result, ROWS)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_parquet_and_json_lines_give_the_same_curated_rows(cfg, bucket, suffix):
    path = sample_data.write(sample_data.generate(ROWS, seed=7), bucket / "landing" / f"x{suffix}")
    manifest, _ = ingest_object(cfg, path.as_uri())
    result = curate_snapshot(cfg, manifest.snapshot_uri)
    assert result.success and result.curated_rows == ROWS
    _, from_csv = curate(cfg, bucket, "same.csv", csv_lines())
    ours, theirs = curated_table(result), curated_table(from_csv)
    assert ours.column("customer_id").to_pylist() == theirs.column("customer_id").to_pylist()
    assert ours.column("income").to_pylist() == theirs.column("income").to_pylist()


@pytest.mark.parametrize("case", ["clean", "rows to quarantine in the last chunk", "keys repeated within and across chunks"])
def test_a_csv_read_typed_gives_what_reading_it_as_text_gives(cfg, bucket, monkeypatch, caplog, case):
    """A clean CSV is read with pyarrow converting numbers and datetimes as it reads; the first value that
    does not convert, or row to quarantine, sends the snapshot back to be read as text. Either way: the same
    rows, quarantine and reports."""
    from mlfactory.data import etl
    cfg = with_section(cfg, "validation", chunk_rows=300)  # four chunks: the bad rows come after three written
    lines = csv_lines()
    for row, column, value in [(17, "income", "1e5"), (18, "monthly_charges", "-0.0"), (19, "churned", "Yes"),
                               (20, "plan", "  basic ")]:
        set_field(lines, row, column, value)
    if case.startswith("keys"):  # row 10's key again in the third chunk, and row 705's twice in that chunk
        keys = [line.split(",")[COLUMNS.index("customer_id")] for line in lines[1:]]
        for row, key in [(700, keys[10]), (710, keys[705])]:
            set_field(lines, row, "customer_id", key)
    elif case.startswith("rows"):
        for row, column, value in [(950, "age", "forty"), (951, "tenure_months", " 12 "), (952, "age", ""),
                                   (953, "customer_id", "c\x00nul"), (954, "age", "130"), (960, "churned", " TRUE")]:
            set_field(lines, row, column, value)
    manifest, _ = ingest_object(cfg, land(bucket, "both.csv", lines).as_uri())

    def outcome() -> tuple[dict, pa.Table, list | None, bool]:
        caplog.clear()
        with caplog.at_level("INFO", logger="mlfactory.data.etl"):
            result = curate_snapshot(cfg, manifest.snapshot_uri)
        assert_nothing_lost(result, ROWS)
        assert not [o for o in storage.list_objects(cfg.storage.curated_uri) if "/." in o.key]  # no staged file left
        quarantined = read_quarantine(result.quarantine_uri)
        return (vars(result), curated_table(result), quarantined and quarantined.to_pylist(),
                "reading it again as text" in caplog.text)

    typed, typed_rows, typed_quarantine, read_again = outcome()
    assert read_again == (case != "clean")
    monkeypatch.setattr(etl, "CSV_TYPED_FIRST", False)
    text, text_rows, text_quarantine, _ = outcome()
    assert typed == text and typed_rows.equals(text_rows) and typed_quarantine == text_quarantine
    assert typed["failures"] == {"clean": {}, "keys": {"expect_column_values_to_be_unique(customer_id)": 2},
                                 "rows": {"expect_column_values_to_be_of_type(age)": 1, "invalid_utf8(customer_id)": 1,
                                          "expect_column_values_to_not_be_null(age)": 1,
                                          "expect_column_values_to_be_between(age)": 1}}[case.split()[0]]
    assert typed_rows.filter(pc.equal(typed_rows["customer_id"], "C007-20")).column("plan").to_pylist() == ["basic"]
    if case.startswith("rows"):  # the quarantine holds each value as it was written
        assert [(r["_row"], r["_failed_expectation"], r["age"], r["signup_date"]) for r in typed_quarantine] == [
            (951, "expect_column_values_to_be_of_type", "forty", "2022-12-05 00:00:00"),
            (953, "expect_column_values_to_not_be_null", None, "2023-03-23 00:00:00"),
            (954, "invalid_utf8", "54", "2024-03-04 00:00:00"), (955, "expect_column_values_to_be_between", "130", "2021-08-29 00:00:00")]


def failed(cfg, bucket, name, data) -> tuple[str, object]:
    manifest, _ = ingest_object(cfg, land(bucket, name, data).as_uri())
    with pytest.raises(ValidationFailed) as err:
        curate_snapshot(cfg, manifest.snapshot_uri)
    assert storage.exists(manifest.snapshot_uri)  # the raw snapshot is kept
    published = [o.key for o in storage.list_objects(cfg.storage.curated_uri) if f"snapshot={manifest.snapshot_id}" in o.key]
    assert published == []  # nothing of a failed batch is published as curated
    return str(err.value), err.value.result


def test_header_only(cfg, bucket):
    message, result = failed(cfg, bucket, "header.csv", csv_lines()[:1])
    assert "expect_table_row_count_to_be_between" in message and "header only, no data rows" in message


def test_wrong_delimiter(cfg, bucket):
    message, _ = failed(cfg, bucket, "semi.csv", [line.replace(",", ";") for line in csv_lines()])
    assert "expect_table_columns_to_match_set" in message
    assert "looks delimited by ';'" in message


def test_missing_required_column(cfg, bucket):
    table = sample_data.generate(ROWS).drop_columns(["age"])
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    message, _ = failed(cfg, bucket, "noage.csv", buf.getvalue())
    assert "missing column(s) ['age']" in message


def test_extra_unknown_column(cfg, bucket):
    table = sample_data.generate(ROWS).append_column("favourite_colour", pa.array(["blue"] * ROWS))
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    message, _ = failed(cfg, bucket, "extra.csv", buf.getvalue())
    assert "unknown column(s) ['favourite_colour'] not in the config" in message


@pytest.mark.parametrize(
    "column, value, expectation",
    [
        ("age", "forty", "expect_column_values_to_be_of_type"),
        ("signup_date", "last tuesday", "expect_column_values_to_be_of_type"),
        ("has_partner", "maybe", "expect_column_values_to_be_of_type"),
        ("income", "nan", "expect_column_values_to_be_finite"),
        ("monthly_charges", "inf", "expect_column_values_to_be_finite"),
        ("age", "", "expect_column_values_to_not_be_null"),
        ("age", "130", "expect_column_values_to_be_between"),
        ("plan", "platinum", "expect_column_values_to_be_in_set"),
    ],
)
def test_bad_values_are_quarantined_per_row_or_fail_the_batch(cfg, bucket, column, value, expectation):
    few = csv_lines()
    for row in range(0, 1000, 100):  # 10 bad rows: 1%, under the 5% limit
        set_field(few, row, column, value)
    manifest, result = curate(cfg, bucket, "few.csv", few)
    assert result.success and result.curated_rows == ROWS - 10
    assert result.failures == {f"{expectation}({column})": 10}
    quarantined = read_quarantine(result.quarantine_uri)
    assert quarantined.column("_failed_expectation").to_pylist() == [expectation] * 10
    assert quarantined.column("_failed_column").to_pylist() == [column] * 10
    assert quarantined.column("_row").to_pylist() == list(range(1, 1000, 100))
    assert set(quarantined.column(column).to_pylist()) == {value or None}  # the original text is kept
    assert_nothing_lost(result, ROWS)

    many = csv_lines(seed=8)
    for row in range(0, 1000, 10):  # 100 bad rows: 10%, over the limit
        set_field(many, row, column, value)
    message, result = failed(cfg, bucket, "many.csv", many)
    assert f"{expectation} failed on column '{column}' for 100 of 1000 rows" in message
    assert "over the limit of 5.0%" in message and result.quarantine_uri in message
    assert read_quarantine(result.quarantine_uri).num_rows == 100


def test_a_value_that_is_markup_shows_as_text_in_the_data_docs_which_run_no_script(cfg, bucket):
    """A landed category value `<img src=x onerror=alert(1)>` reached GX's Data Docs page unescaped (its templates
    do not escape), on a page that loaded scripts from CDNs under no Content-Security-Policy."""
    from html.parser import HTMLParser

    hostile = "<img src=x onerror=alert(1)>"
    lines = csv_lines()
    set_field(lines, 3, "plan", hostile)
    _, result = curate(cfg, bucket, "markup.csv", lines)
    assert result.failures == {"expect_column_values_to_be_in_set(plan)": 1}
    docs = storage.read_bytes(result.report_uri.replace("index.html", "batch-00000.html")).decode()

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.fetched, self.handlers, self.text, self.csp = set(), [], [], [], None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.tags.add(tag)
            self.fetched += [v for k, v in attrs.items() if k in ("src", "href") and v and "//" in v and tag != "a"]
            self.handlers += [k for k in attrs if k.startswith("on")]
            if tag == "meta" and attrs.get("http-equiv") == "Content-Security-Policy" and self.csp is None:
                self.csp = attrs["content"]

        def handle_data(self, data):
            self.text.append(data)

    page = Page()
    page.feed(docs)
    assert hostile in "".join(page.text)  # the value, shown as text
    assert "script" not in page.tags and not page.handlers and not page.fetched, (page.handlers, page.fetched)
    assert page.csp and "default-src 'none'" in page.csp and "script-src" not in page.csp
    index = storage.read_bytes(result.report_uri).decode()
    assert f'content="{page.csp}"' in index  # the same policy on every page the pipeline writes


def test_non_utf8_bytes_are_quarantined_with_their_bytes_escaped(cfg, bucket):
    lines = csv_lines()
    data = ("\n".join(lines) + "\n").encode()
    victim = lines[5].split(",")[COLUMNS.index("region")].encode()
    data = data.replace(b"," + victim + b",", b",\xff\xfe" + victim + b",", 3)
    _, result = curate(cfg, bucket, "latin.csv", data)
    assert result.failures == {"invalid_utf8(region)": 3}
    quarantined = read_quarantine(result.quarantine_uri)
    assert all(v.startswith("\\xff\\xfe") for v in quarantined.column("region").to_pylist())
    assert_nothing_lost(result, ROWS)


def test_duplicated_rows_keep_the_first_occurrence(cfg, bucket):
    lines = csv_lines()
    lines += lines[1:6]  # five rows landed twice
    _, result = curate(cfg, bucket, "dupes.csv", lines)
    assert result.failures == {"expect_column_values_to_be_unique(customer_id)": 5}
    assert result.curated_rows == ROWS
    assert read_quarantine(result.quarantine_uri).column("_row").to_pylist() == list(range(ROWS + 1, ROWS + 6))
    assert_nothing_lost(result, ROWS + 5)


def test_truncated_last_line_is_quarantined_as_malformed(cfg, bucket):
    lines = csv_lines()
    lines[-1] = lines[-1][:15]
    data = "\n".join(lines).encode()  # no final newline either, as when a transfer is cut
    _, result = curate(cfg, bucket, "cut.csv", data)
    assert result.failures == {"malformed_row()": 1}
    quarantined = read_quarantine(result.quarantine_uri)
    assert quarantined.column("_raw_line").to_pylist() == [lines[-1]]
    assert_nothing_lost(result, ROWS)


def test_great_expectations_counts_agree_with_the_quarantine(cfg, bucket):
    lines = csv_lines()
    for row in range(3, 1000, 97):
        set_field(lines, row, "age", "150")
    for row in range(5, 1000, 201):
        set_field(lines, row, "region", "atlantis")
    _, result = curate(cfg, bucket, "mixed.csv", lines)
    ge = {(e["expectation"], e["column"]): e["unexpected_count"] for e in result.expectations}
    assert ge[("expect_column_values_to_be_between", "age")] == result.failures["expect_column_values_to_be_between(age)"] == 11
    assert ge[("expect_column_values_to_be_in_set", "region")] == result.failures["expect_column_values_to_be_in_set(region)"] == 5


def test_snapshots_curated_one_after_another_share_one_gx_suite_and_keep_their_own_counts(cfg, bucket):
    """A process builds its GX context and suites once (``suite_runner``) and validates snapshot after snapshot
    on it: each snapshot's counts are its own, and GX holds no earlier snapshot's rows."""
    from mlfactory.data import validation

    before, counts = set(validation._RUNNERS), []
    for bad in (0, 11, 0, 3):
        lines = csv_lines(seed=20 + len(counts))
        for row in range(3, 3 + 97 * bad, 97):
            set_field(lines, row, "age", "150")
        _, result = curate(cfg, bucket, f"part-{len(counts)}.csv", lines)
        ge = {(e["expectation"], e["column"]): e["unexpected_count"] for e in result.expectations}
        counts.append(ge[("expect_column_values_to_be_between", "age")])
    assert counts == [0, 11, 0, 3]
    assert len(set(validation._RUNNERS) - before) <= 1  # one runner for the four (none if an earlier test made it)
    for runner in validation._RUNNERS.values():
        engine = runner.batch_definition.data_asset.datasource.get_execution_engine()
        assert len(engine.batch_manager.batch_data_cache) <= 1


def test_a_file_bigger_than_a_chunk_is_validated_chunk_by_chunk(cfg, bucket):
    rows, chunk = 30_000, 5_000
    cfg = with_section(cfg, "validation", chunk_rows=chunk)
    table = sample_data.generate(rows, seed=11)
    buf = io.BytesIO()
    pacsv.write_csv(pa.concat_tables([table, table.slice(0, 3)]), buf)  # 3 rows repeated chunks later
    _, result = curate(cfg, bucket, "big.csv", buf.getvalue())
    assert result.failures == {"expect_column_values_to_be_unique(customer_id)": 3}
    assert_nothing_lost(result, rows + 3)
    pages = [o.key for o in storage.list_objects(result.report_uri.rsplit("/", 1)[0]) if o.key.startswith("batch-")]
    assert len(pages) == 7  # six full chunks and the three repeated rows


STREAMING_PROBE = """
import os, sys, pyarrow as pa
from mlfactory.config import load_config
from mlfactory.data.etl import curate_snapshot
from mlfactory.data.ingest import ingest_object
cfg = load_config()
# Cross-chunk uniqueness must remember every key (~30 bytes each): leave it out to see the streaming itself.
columns = [c.model_copy(update={"unique": False}) for c in cfg.dataset.columns]
cfg = cfg.model_copy(update={"validation": cfg.validation.model_copy(update={"chunk_rows": 50_000}),
                             "dataset": cfg.dataset.model_copy(update={"columns": columns})})
path = sys.argv[1]
manifest, _ = ingest_object(cfg, "file://" + path)
result = curate_snapshot(cfg, manifest.snapshot_uri)
print(result.curated_rows, os.path.getsize(path), pa.default_memory_pool().max_memory())
"""


def test_a_large_file_is_streamed_not_loaded_whole(bucket):
    """Peak Arrow memory does not grow with the file: 4x the rows, about the same peak (fresh processes)."""
    import subprocess
    import sys

    peaks, sizes = [], []
    for rows in (300_000, 1_200_000):
        path = sample_data.write(sample_data.generate(rows, seed=rows), bucket / "landing" / f"large-{rows}.csv")
        out = subprocess.run([sys.executable, "-c", STREAMING_PROBE, str(path)], capture_output=True, text=True, check=True)
        curated, size, peak = map(int, out.stdout.split()[-3:])
        assert curated == rows
        peaks.append(peak)
        sizes.append(size)
    assert sizes[1] > 160_000_000
    assert peaks[1] < 1.5 * peaks[0], f"peak Arrow memory grew from {peaks[0] / 1e6:.0f} to {peaks[1] / 1e6:.0f} MB"
    assert peaks[1] < sizes[1] / 2, f"Arrow peak {peaks[1] / 1e6:.0f} MB for a {sizes[1] / 1e6:.0f} MB file"
