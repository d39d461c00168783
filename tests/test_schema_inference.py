"""`mlfactory init` (schema inference into a pipeline config) and open-vocabulary categories.

The config init writes for a file must load, and ETL must take every row of that same file: no
column needs a hand edit. A category column without `categories` learns its vocabulary from the
training rows, and a value never seen (a new airport) is encoded as "other", not quarantined.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mlfactory import BadInput
from mlfactory.config import ConfigError, load_config
from mlfactory.dataset import DatasetSpec
from mlfactory.data.etl import curate_snapshot, read_quarantine
from mlfactory.data.ingest import ingest_object
from mlfactory.data.schema_inference import data_files, infer, main

AIRPORTS = [f"{a}{b}{c}" for a in "ABCDE" for b in "FGHIJKL" for c in "MNO"]  # 105 codes


def flights(rows: int, seed: int = 3) -> pd.DataFrame:
    """A flights-like table with every kind of column init must tell apart."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "flight_id": np.arange(10_000, 10_000 + rows),                      # a row number: a key
        "date": pd.date_range("2024-01-01", periods=rows, freq="37min").strftime("%Y-%m-%d %H:%M:%S"),
        "origin": rng.choice(AIRPORTS, rows),                                # 105 codes: open vocabulary
        "carrier": rng.choice(["AA", "DL", "UA", "WN"], rows),
        "distance": rng.integers(100, 3000, rows),
        "dep_delay": np.round(rng.normal(5, 20, rows), 1),
        "weekend": rng.choice(["yes", "no"], rows),
        "remark": [f"note {i} {rng.integers(1e9)}" for i in range(rows)],   # free text
        "tail_temp": np.where(rng.random(rows) < 0.1, np.nan, rng.normal(10, 5, rows)),  # nulls
    })
    frame["late"] = ((frame["dep_delay"] > 15) | (rng.random(rows) < 0.1)).astype(int)  # 0/1 -> boolean
    return frame


def test_init_infers_each_kind_of_column_and_etl_takes_every_row_of_the_file(tmp_path, monkeypatch):
    data = tmp_path / "flights.csv.gz"
    frame = flights(3000)
    with gzip.open(data, "wt") as f:
        frame.to_csv(f, sep=";", index=False)  # a European export: ; delimited
    out = tmp_path / "pipeline.yaml"
    assert main([str(data), "--target", "late", "-o", str(out)]) == 0
    text = out.read_text()
    raw = yaml.safe_load(text.replace("${MLFACTORY_BACKEND:-local}", "local"))
    columns = {c["name"]: c for c in raw["dataset"]["columns"]}
    assert raw["dataset"]["task"] == "classification" and raw["dataset"]["csv_delimiter"] == ";"
    assert {n: c["type"] for n, c in columns.items()} == {
        "flight_id": "string", "date": "datetime", "origin": "category", "carrier": "category",
        "distance": "integer", "dep_delay": "float", "weekend": "boolean", "remark": "string",
        "tail_temp": "float", "late": "boolean"}
    assert "categories" not in columns["origin"]  # open: the 105 codes are not listed by hand
    assert columns["tail_temp"]["required"] is False and "required" not in columns["distance"]
    assert "105 values seen" in text and re.search(r"distance, type: integer}   # seen 1\d\d to 29\d\d", text)
    assert {d["kind"] for d in raw["dataset"]["derived"]} == {"month", "day_of_week"}

    # the config runs as written: it loads, and ETL curates every row of the same file
    monkeypatch.setenv("MLFACTORY_BUCKET", str(tmp_path / "bucket"))
    cfg = load_config(out)
    landing = tmp_path / "bucket" / "landing"
    landing.mkdir(parents=True)
    (landing / data.name).write_bytes(data.read_bytes())
    manifest, _ = ingest_object(cfg, (landing / data.name).as_uri())
    result = curate_snapshot(cfg, manifest.snapshot_uri)
    assert (result.curated_rows, result.quarantined_rows) == (3000, 0)
    assert read_quarantine(result.quarantine_uri) is None


def test_a_row_name_column_without_a_header_name_is_a_key_and_etl_takes_the_file(tmp_path, monkeypatch):
    """R's write.csv and pandas' to_csv write the row names as a first column named "": ETL names it
    unnamed_1, and init makes it a key (not a feature), so the file runs as it is."""
    data = tmp_path / "landing" / "r.csv"
    data.parent.mkdir()
    flights(500).to_csv(data, index=True)  # header starts with ","
    assert data.read_text().startswith(",flight_id,")
    out = tmp_path / "p.yaml"
    assert main([str(data), "--target", "late", "-o", str(out)]) == 0
    monkeypatch.setenv("MLFACTORY_BUCKET", str(tmp_path))
    cfg = load_config(out)
    assert cfg.dataset.columns[0].model_dump(include={"name", "type"}) == {"name": "unnamed_1", "type": "string"}
    manifest, _ = ingest_object(cfg, data.as_uri())
    assert curate_snapshot(cfg, manifest.snapshot_uri).curated_rows == 500


def test_init_reads_parquet_and_json_lines_and_folders(tmp_path):
    frame = flights(400)
    folder = tmp_path / "drop"
    folder.mkdir()
    table = pa.Table.from_pandas(frame.assign(date=pd.to_datetime(frame["date"]), late=frame["late"] > 0))
    pq.write_table(table.slice(0, 200), folder / "a.parquet")
    (folder / "b.jsonl").write_text("\n".join(json.dumps(r) for r in frame.iloc[200:].to_dict("records")) + "\n")
    (folder / ".hidden.csv").write_text("x\n1\n")  # skipped, as ingestion skips it
    files = data_files([str(folder)])
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.parquet", "b.jsonl"]
    dataset = infer(files, "dep_delay").dataset
    assert dataset.task == "regression"
    kinds = {c.name: c.type for c in dataset.columns}
    assert kinds["date"] == "datetime" and kinds["origin"] == "category" and kinds["distance"] == "integer"
    assert kinds["late"] == "boolean"


@pytest.mark.parametrize(("values", "task", "target"), [
    (["0", "1"], "classification", {"type": "boolean"}),
    (["low", "mid", "high"], "classification", {"type": "category", "categories": ["high", "low", "mid"]}),
    (["1", "2", "3"], "classification", {"type": "category", "categories": ["1", "2", "3"]}),
    ([str(v) for v in range(40)], "regression", {"type": "integer"}),
    (["1.5", "2.25", "3.0", "4.5"], "regression", {"type": "float"}),
])
def test_the_task_follows_the_target(tmp_path, values, task, target):
    rng = np.random.default_rng(0)
    rows = 500
    data = tmp_path / "d.csv"
    pd.DataFrame({"x": rng.normal(size=rows), "y": rng.choice(values, rows)}).to_csv(data, index=False)
    dataset = infer([str(data)], "y").dataset
    assert dataset.task == task
    spec = dataset.column("y").model_dump(exclude_defaults=True)
    assert {k: v for k, v in spec.items() if k in ("type", "categories")} == target


def test_target_classes_come_from_the_whole_file_not_only_the_sample(tmp_path):
    data = tmp_path / "d.csv"
    frame = pd.DataFrame({"x": np.random.default_rng(1).normal(size=1000), "kind": ["a", "b"] * 499 + ["rare", "rare"]})
    frame.to_csv(data, index=False)
    dataset = infer([str(data)], "kind", sample_rows=100).dataset
    assert dataset.column("kind").categories == ["a", "b", "rare"]


@pytest.mark.parametrize(("content", "args", "message"), [
    ("a,b\n1,2\n", ["--target", "c"], "target 'c' is not a column of"),
    ("id,b\n" + "".join(f"k{i},{'xy'[i % 2]}\n" for i in range(30)), ["--target", "b"],
     "no column but 'b' can feed a model: every other column is a key or free text (['id'])"),
    ("id,y\n" + "".join(f"k{i},t{i}\n" for i in range(300)), ["--target", "y"], "holds string values"),
])
def test_init_refuses_what_it_cannot_infer_and_names_it(tmp_path, capsys, content, args, message):
    data = tmp_path / "d.csv"
    data.write_text(content)
    assert main([str(data), *args, "-o", str(tmp_path / "p.yaml")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


def test_init_keeps_an_existing_config_and_refuses_a_format_it_cannot_ingest(tmp_path, capsys):
    (tmp_path / "d.xlsx").write_bytes(b"PK")
    assert main([str(tmp_path / "d.xlsx"), "--target", "y", "-o", str(tmp_path / "p.yaml")]) == 2
    assert "unsupported file type '.xlsx'" in capsys.readouterr().err
    (tmp_path / "p.yaml").write_text("mine")
    (tmp_path / "d.csv").write_text("a,y\n1,true\n2,false\n")
    assert main([str(tmp_path / "d.csv"), "--target", "y", "-o", str(tmp_path / "p.yaml")]) == 2
    assert (tmp_path / "p.yaml").read_text() == "mine"


def test_the_console_entry_point_runs_init(tmp_path):
    data = tmp_path / "d.csv"
    pd.DataFrame({"x": np.random.default_rng(1).normal(size=100), "y": [True, False] * 50}).to_csv(data, index=False)
    out = subprocess.run([sys.executable, "-m", "mlfactory", "init", str(data), "--target", "y", "-o",
                          str(tmp_path / "p.yaml")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "a classification of 'y'" in out.stdout and (tmp_path / "p.yaml").exists()


def _dataset(**category) -> DatasetSpec:
    return DatasetSpec.model_validate({"name": "d", "task": "classification", "target": "y", "columns": [
        {"name": "airport", "type": "category", **category}, {"name": "x", "type": "float"},
        {"name": "y", "type": "boolean"}]})


def test_an_open_vocabulary_learns_the_frequent_values_and_encodes_any_other_as_other():
    from mlfactory.features import typed_features, wire_table
    from mlfactory.tabular import Preprocessor

    dataset = _dataset(max_categories=3)
    train = pd.DataFrame({"airport": ["JFK"] * 5 + ["LAX"] * 4 + ["SFO"] * 3 + ["ORD"] * 2 + ["BOS"] + [None],
                          "x": 1.0, "y": True})
    pre = Preprocessor.fit(typed_features(train, dataset), dataset)
    assert pre.categorical == {"airport": ["JFK", "LAX", "SFO"]}  # the 3 most frequent; BOS once: not learned
    new = pd.DataFrame({"airport": ["LAX", "ORD", "XYZ", None], "x": 1.0})
    _, codes = pre.encode(typed_features(new, dataset))
    assert codes[:, 0].tolist() == [2, 0, 0, 0]  # ORD (beyond the cap), XYZ (never seen), missing: "other"
    _, table_codes = pre.encode_table(wire_table({"airport": ["LAX", "ORD", "XYZ", None], "x": [1.0] * 4}, dataset))
    assert table_codes.tolist() == codes.tolist()  # serving encodes as training does


def test_an_open_vocabulary_column_quarantines_no_new_value_and_a_closed_one_does(bucket, cfg):
    from mlfactory.data import sample_data
    frame = sample_data.generate(200, seed=5).to_pandas()
    frame.loc[:9, "region"] = "atlantis"
    data = bucket / "landing" / "new-region.csv"
    data.parent.mkdir(parents=True)
    frame.to_csv(data, index=False)
    spec = cfg.dataset.model_dump()
    spec["columns"] = [{**c, "categories": None} if c["name"] == "region" else c for c in spec["columns"]]
    opened = cfg.model_copy(update={"dataset": DatasetSpec.model_validate(spec)})
    for config, quarantined in ((cfg, 10), (opened, 0)):
        manifest, _ = ingest_object(config, data.as_uri(), retry_refused=True)
        assert curate_snapshot(config, manifest.snapshot_uri).quarantined_rows == quarantined


def test_a_category_target_must_list_its_classes():
    with pytest.raises(ValueError, match="a category target lists its classes"):
        DatasetSpec.model_validate({"name": "d", "task": "classification", "target": "y", "columns": [
            {"name": "x", "type": "float"}, {"name": "y", "type": "category"}]})
    with pytest.raises(ValueError, match="'categories' is empty"):
        _dataset(categories=[])



def test_a_target_often_missing_raises_the_quarantine_bound_so_batches_pass(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    y = rng.normal(size=2000)
    y[rng.random(2000) < 0.1] = np.nan  # 10% unlabelled: over the default 5% quarantine bound
    data = tmp_path / "landing" / "d.csv"
    data.parent.mkdir()
    pd.DataFrame({"x": rng.normal(size=2000), "y": y}).to_csv(data, index=False)
    out = tmp_path / "p.yaml"
    assert main([str(data), "--target", "y", "-o", str(out)]) == 0
    monkeypatch.setenv("MLFACTORY_BUCKET", str(tmp_path))
    cfg = load_config(out)
    assert 0.15 <= cfg.validation.max_quarantine_fraction <= 0.2
    manifest, _ = ingest_object(cfg, data.as_uri())
    result = curate_snapshot(cfg, manifest.snapshot_uri)  # raises ValidationFailed with the default bound
    assert result.quarantined_rows == int(np.isnan(y).sum())


def test_make_run_never_lands_the_sample_into_another_dataset_and_checks_the_files_first(tmp_path, monkeypatch, cfg):
    from mlfactory.backends.local.run import check_data

    assert check_data(cfg, "") == []  # the sample's own config: the sample is landed
    data = tmp_path / "my flights.csv"
    flights(300).to_csv(data, index=False)
    out = tmp_path / "p.yaml"
    assert main([str(data), "--target", "late", "-o", str(out)]) == 0
    mine = load_config(out)
    with pytest.raises(BadInput, match="describes dataset 'my_flights', not the sample's: name your files"):
        check_data(mine, "")
    assert check_data(mine, f"'{data}'") == [str(data)]  # quoted: a path with a space
    other = tmp_path / "other.csv"
    flights(50).drop(columns=["carrier"]).assign(extra=1).to_csv(other, index=False)
    with pytest.raises(BadInput, match=r"other.csv does not match dataset 'my_flights' of .*: missing column\(s\) "
                                       r"\['carrier'\]; column\(s\) \['extra'\] not in the config"):
        check_data(mine, f"'{data}' {other}")


def test_integers_written_as_floats_that_number_the_rows_are_a_key_not_a_crash(tmp_path):
    data = tmp_path / "d.csv"
    rows = ["n,x,y"] + [f"{i}.0,{(i * 7) % 13},{'ab'[i % 2]}" for i in range(50)]
    data.write_text("\n".join(rows) + "\n")
    dataset = infer([str(data)], "y").dataset
    assert dataset.column("n").type == "string" and dataset.column("x").type == "integer"


def test_text_from_the_data_stays_in_its_place_in_the_config_init_writes(tmp_path, monkeypatch):
    """A cell that ends its comment (a newline, or the line breaks YAML also takes) would add keys to the config;
    a `${VAR}` in a name or a value would be filled from the environment (the admin URL then received the admin
    token). Both stay text."""
    from mlfactory.data.schema_inference import _check_written

    monkeypatch.setenv("MLFACTORY_SERVING_ADMIN_TOKEN", "s3cret-admin-token")
    injected = "local:\n  endpoint_url: http://evil.example:8080\n  admin_url: http://evil.example/${MLFACTORY_SERVING_ADMIN_TOKEN}\n#"
    rng = np.random.default_rng(5)
    frame = pd.DataFrame({
        "${MLFACTORY_SERVING_ADMIN_TOKEN}": rng.normal(size=400),
        "kind": rng.choice([f"x\n{injected}", "y\u2028backend: toy", "z\x85mlflow: {}", "plain"], 400, p=[.4, .3, .2, .1]),
        "label": rng.choice(["yes", "no"], 400),
    })
    data = tmp_path / "hostile.csv"
    frame.to_csv(data, index=False)
    out = tmp_path / "pipeline.yaml"
    assert main([str(data), "--target", "label", "-o", str(out)]) == 0
    text = out.read_text()
    assert "\\u000a" in text and "\\u2028" in text and "\\u0085" in text  # the line breaks, escaped in their comment
    monkeypatch.setenv("MLFACTORY_BUCKET", str(tmp_path / "bucket"))
    cfg = load_config(out)
    assert cfg.backend.name == "local" and cfg.backend.endpoint_url == "" and cfg.backend.admin_url == ""
    assert [c.name for c in cfg.dataset.columns][0] == "${MLFACTORY_SERVING_ADMIN_TOKEN}"  # a name, not a secret
    assert "s3cret" not in json.dumps(cfg.model_dump(mode="json"))
    # and had a value got out, init would have refused to write the file
    with pytest.raises(ValueError, match=r"keys \['local'\]"):
        _check_written(text + "local: {admin_url: 'http://evil.example'}\n", cfg.dataset)

    # an environment variable's value is a value: YAML in it adds no key (it made a `local:` section here)
    monkeypatch.setenv("MLFACTORY_BACKEND", "local\nlocal: {admin_url: 'http://evil.example'}")
    with pytest.raises(ConfigError, match="is not a registered backend"):
        load_config(out)
