"""`mlfactory init`: a pipeline config for the user's own files, inferred from them.

Reads up to ``sample_rows`` rows of each file with the readers ETL uses (CSV, TSV, Parquet, JSON
Lines, also .gz/.bz2/.zst), and gives each column the narrowest type whose ETL parser takes every
value seen: boolean, integer, float, datetime, else text. Text with repeated values becomes a
``category`` with an open vocabulary (no ``categories`` list: the model learns the frequent values,
and a value never seen in training is encoded as "other" instead of quarantining its row); text
whose values are mostly distinct, and integer row numbers, become ``string`` (a key or free text:
not a feature). A column with no missing value in the sample is ``required``. Ranges and the values
seen are written as comments, not as checks: a sample's extremes are not the data's contract.

The task follows the target: a boolean, text or integer target with few values is a classification
(its classes listed from a full read of the target column), a numeric one a regression.

    python -m mlfactory init FILE_OR_FOLDER... --target COLUMN [--task ...] [--name ...] [--output pipeline.yaml]
"""

from __future__ import annotations

import argparse
import math
import os
import posixpath
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from mlfactory import BadInput, storage
from mlfactory.dataset import ColumnSpec, DatasetSpec
from mlfactory.data.ingest import Manifest, detect_format
from mlfactory.config import PROJECT

SAMPLE_ROWS = 200_000
MAX_CLASSES = 50  # a target with more distinct values than this is not taken for a classification label
UNLABELLED_SHARE = 0.03  # rows without a label above this share: the config raises validation.max_quarantine_fraction
INTEGER_CLASSES = 10  # an integer target with at most this many values is taken for class labels
KEY_NAMES = re.compile(r"(^|[_\s-])(id|key|uuid)$|^unnamed_\d+$|^index$", re.IGNORECASE)
DELIMITERS = (",", ";", "\t", "|")
BOOLEAN_WORDS = {"true", "false", "t", "f", "yes", "no", "y", "n"}  # and 0/1 beside them; 0/1 alone is a number


@dataclass
class Column:
    """What the sample says about one column."""

    name: str
    rows: int = 0
    nulls: int = 0
    distinct: list = field(default_factory=list)  # (value, count), most frequent first
    type: str = "string"
    low: object = None  # numeric and datetime columns: the smallest and largest values seen
    high: object = None
    note: str = ""

    @property
    def required(self) -> bool:
        return self.nulls == 0 and self.rows > 0


def data_files(paths: list[str]) -> list[str]:
    """The data files named, folders expanded to the files in them that ingestion takes (hidden ones
    skipped, as ingestion does); a file of a format ingestion refuses is an error that names it."""
    files: list[str] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file()
                           and not storage.is_hidden(str(p.relative_to(path))))
            if not found:
                raise BadInput(f"{path}: no data file in this folder")
            files += found
        elif path.is_file():
            files.append(str(path))
        else:
            raise BadInput(f"{path}: no such file or folder")
    for name in files:
        detect_format(name)  # raises naming the file and the formats taken
    return files


def sniff_delimiter(path: str) -> str:
    """A .csv file's delimiter: of , ; tab |, the one that splits its header into the most fields."""
    import pyarrow.fs as pafs

    kind = detect_format(path)
    with pafs.LocalFileSystem().open_input_stream(path, compression=kind.compression) as f:
        header = f.read(1 << 20).split(b"\n", 1)[0]
    return max(DELIMITERS, key=lambda d: (header.count(d.encode()), d == ","))


def _manifest(path: str, delimiter: str | None) -> Manifest:
    kind = detect_format(path)
    uri = str(Path(path).resolve())
    return Manifest(uri, uri, kind.format, 0, "", 0, "", kind.compression, kind.delimiter or delimiter)


def read_sample(files: list[str], rows: int, delimiter: str) -> dict[str, pa.ChunkedArray]:
    """Up to ``rows`` rows of each file, by column (the union of the files' columns, in first-seen order)."""
    from mlfactory.data.etl import READERS, ReadOptions

    columns: dict[str, list[pa.Array]] = {}
    for path in files:
        manifest = _manifest(path, delimiter)
        header, chunks = READERS[manifest.format](manifest, ReadOptions(chunk_rows=rows, delimiter=delimiter))
        chunk = next(chunks)
        for name in header:
            if chunk.table is not None and name in chunk.table.column_names:
                columns.setdefault(name, []).extend(chunk.table.column(name).chunks)
    return {name: pa.chunked_array(parts) if len({p.type for p in parts}) == 1
            else pa.chunked_array([pc.cast(p, pa.string()) for p in parts]) for name, parts in columns.items()}


def _parses_as(text: pa.Array, kind: str) -> bool:
    from mlfactory.data.etl import parse_column

    _, problems = parse_column(text, ColumnSpec(name="x", type=kind))
    return not any(mask.any() for mask in problems.values())


def _typed_kind(arrow_type: pa.DataType) -> str | None:
    """A Parquet column's type, when its storage type says it."""
    if pa.types.is_boolean(arrow_type):
        return "boolean"
    if pa.types.is_integer(arrow_type):
        return "integer"
    if pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type):
        return "float"
    if pa.types.is_timestamp(arrow_type) or pa.types.is_date(arrow_type):
        return "datetime"
    return None


def profile(name: str, values: pa.ChunkedArray) -> Column:
    """The column's type, nullability and distinct values, from its sample."""
    column = Column(name, rows=len(values), nulls=values.null_count)
    present = values.drop_null() if values.null_count else values
    if pa.types.is_binary(present.type) or pa.types.is_large_binary(present.type):
        present = pc.cast(present, pa.string(), safe=False) if _valid_utf8(present) else present
    counts = pc.value_counts(present.combine_chunks() if present.num_chunks else pa.array([], present.type))
    pairs = sorted(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()),
                   key=lambda vc: (-vc[1], str(vc[0])))
    column.distinct = pairs
    kind = _typed_kind(values.type)
    unique = pa.array([v for v, _ in pairs], present.type)
    if kind is None:
        text = unique if pa.types.is_string(unique.type) or pa.types.is_binary(unique.type) else pc.cast(unique, pa.string())
        if not len(text):
            kind, column.note = "string", "no value in the sample"
        elif _boolean_words({str(v).strip().lower() for v, _ in pairs}) and _parses_as(text, "boolean"):
            kind = "boolean"
        else:
            kind = next((k for k in ("integer", "float", "datetime") if _parses_as(text, k)), "text")
    if kind == "text":
        kind = "category" if _repeats(column) else "string"
        if kind == "string":
            column.note = "mostly distinct values: a key or free text, not a feature"
    if kind == "integer" and _is_row_number(column):
        kind, column.note = "string", "an identifier (every value distinct): not a feature"
    column.type = kind
    if kind in ("integer", "float", "datetime") and pairs:
        from mlfactory.data.etl import parse_column

        typed = unique if _typed_kind(unique.type) else parse_column(unique, ColumnSpec(name=name, type=kind))[0]
        bounds = pc.min_max(typed)
        column.low, column.high = bounds["min"].as_py(), bounds["max"].as_py()
    return column


def _boolean_words(spellings: set[str]) -> bool:
    return spellings <= BOOLEAN_WORDS | {"0", "1"} and bool(spellings & BOOLEAN_WORDS)


def _valid_utf8(values: pa.ChunkedArray) -> bool:
    try:
        pc.cast(values, pa.string())
        return True
    except pa.ArrowInvalid:
        return False


def _repeats(column: Column) -> bool:
    """Text worth a category: values that repeat (on average at least twice each) and not too many."""
    present = column.rows - column.nulls
    return len(column.distinct) <= max(1000, present // 100) and len(column.distinct) * 2 <= present


def _is_row_number(column: Column) -> bool:
    present = column.rows - column.nulls
    if present < 20 or len(column.distinct) < present:
        return False
    values = np.array([float(v) for v, _ in column.distinct], dtype=np.float64)  # text too: "12.0", " 7", "1e3"
    dense = (values.max() - values.min() + 1) <= 2 * present  # a sequence, not a measurement
    return dense or bool(KEY_NAMES.search(column.name))


def _all_values(files: list[str], name: str, delimiter: str) -> list:
    """Every distinct value of one column over the whole of every file (the target's classes)."""
    from mlfactory.data.etl import READERS, ReadOptions

    seen: set = set()
    for path in files:
        manifest = _manifest(path, delimiter)
        _, chunks = READERS[manifest.format](manifest, ReadOptions(chunk_rows=SAMPLE_ROWS, delimiter=delimiter))
        for chunk in chunks:
            if chunk.table is not None and name in chunk.table.column_names:
                values = chunk.table.column(name)
                if pa.types.is_binary(values.type):
                    values = pc.cast(values, pa.string(), safe=False)
                seen.update(v.strip() if isinstance(v, str) else v for v in pc.unique(values).to_pylist() if v is not None)
    return sorted(seen, key=str)


@dataclass
class Proposal:
    dataset: DatasetSpec
    columns: list[Column]
    files: list[str]
    notes: list[str]


def infer(files: list[str], target: str, task: str | None = None, name: str | None = None,
          sample_rows: int = SAMPLE_ROWS, max_categories: int = 1000) -> Proposal:
    """The dataset section of a pipeline config for ``files``, with ``target`` as the label."""
    formats = {detect_format(f).format for f in files}
    csvs = [f for f in files if detect_format(f).format == "csv" and not detect_format(f).delimiter]
    delimiters = {sniff_delimiter(f) for f in csvs}
    if len(delimiters) > 1:
        raise BadInput(f"the .csv files use different delimiters {sorted(delimiters)}: give them one, or init them apart")
    delimiter = delimiters.pop() if delimiters else ","
    sample = read_sample(files, sample_rows, delimiter)
    if target not in sample:
        raise BadInput(f"target {target!r} is not a column of {files[0]}{' ...' if len(files) > 1 else ''}; "
                       f"the columns are {list(sample)}")
    columns = [profile(n, values) for n, values in sample.items()]
    label = next(c for c in columns if c.name == target)
    notes: list[str] = []
    task = task or _task(label)
    specs = []
    for column in columns:
        spec: dict = {"name": column.name, "type": column.type}
        if column.name == target:
            spec.update(_target(label, task, files, delimiter, notes))
        elif column.type == "category":
            spec["max_categories"] = max_categories
        if not column.required and column.name != target:
            spec["required"] = False
        specs.append(spec)
    derived = [{"name": f"{c.name}_{kind}", "kind": kind, "inputs": [c.name]}
               for c in columns if c.type == "datetime" and c.name != target for kind in ("month", "day_of_week")]
    taken = {c.name for c in columns}
    derived = [d for d in derived if d["name"] not in taken]
    features = [s for s in specs if s["name"] != target and s["type"] != "string"]
    if not features:
        raise BadInput(f"no column but {target!r} can feed a model: every other column is a key or free text "
                       f"({[c.name for c in columns if c.name != target]})")
    dataset = DatasetSpec.model_validate({
        "name": name or _dataset_name(files), "task": task, "target": target, "columns": specs, "derived": derived,
        **({"csv_delimiter": delimiter} if delimiter != "," and "csv" in formats else {})})
    return Proposal(dataset, columns, files, notes)


def _task(label: Column) -> str:
    if label.type in ("boolean", "category"):
        return "classification"
    if label.type == "integer" and len(label.distinct) <= INTEGER_CLASSES:
        return "classification"
    if label.type in ("integer", "float"):
        return "regression"
    raise BadInput(f"target {label.name!r} holds {label.type} values ({label.note or 'e.g. ' + str(label.distinct[:3])}); "
                   "a classification target takes a few labels, a regression target numbers")


def _target(label: Column, task: str, files: list[str], delimiter: str, notes: list[str]) -> dict:
    """The target's column settings for ``task``."""
    if label.nulls:
        share = label.nulls / label.rows
        notes.append(f"{label.nulls} of {label.rows} sampled rows ({share:.1%}) have no {label.name!r}: ETL "
                     f"quarantines them (a row without a label cannot train)")
    if task == "regression":
        if label.type not in ("integer", "float"):
            raise BadInput(f"target {label.name!r} is {label.type}: a regression target must be numeric")
        return {"type": label.type}
    if label.type == "boolean":
        return {"type": "boolean"}
    classes = [str(v) for v in _all_values(files, label.name, delimiter)]
    if label.type == "integer" and set(classes) <= {"0", "1"}:
        return {"type": "boolean"}
    if len(classes) > MAX_CLASSES:
        raise BadInput(f"target {label.name!r} has {len(classes)} distinct values, more than {MAX_CLASSES} classes: "
                       "for a numeric target use --task regression")
    if len(classes) < 2:
        raise BadInput(f"target {label.name!r} has a single value {classes}: nothing to classify")
    return {"type": "category", "categories": classes}


def _dataset_name(files: list[str]) -> str:
    stem = Path(files[0]).name.split(".")[0] if len(files) == 1 else Path(posixpath.commonpath(files)).name
    name = re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_")
    return name if name and name[0].isalpha() else f"data_{name}" if name else "my_data"


# ---------------------------------------------------------------------------------------------
# The config file


def _flow(mapping: dict | list) -> str:
    return yaml.safe_dump(mapping, default_flow_style=True, width=1 << 20, sort_keys=False).strip()


def _scalar(value: str) -> str:
    """``value`` as one YAML scalar, quoted as it needs."""
    return _flow([value])[1:-1]


# What ends a YAML comment early (a line break, PyYAML's NEL and Unicode line and paragraph separators) or hides
# in it (other control and format characters): written as escapes, so text from the data stays in its comment.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def _comment_text(text: str) -> str:
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _comment(column: Column, spec: ColumnSpec) -> str:
    seen = column.rows - column.nulls
    parts = [f"{column.nulls} missing" if column.nulls else ""]
    if spec.type in ("integer", "float", "datetime") and column.low is not None:
        parts.append(f"seen {column.low} to {column.high}")
    elif spec.type == "category" and not spec.categories:
        top = ", ".join(str(v) for v, _ in column.distinct[:8])
        parts.append(f"{len(column.distinct)} values seen ({top}{', ...' if len(column.distinct) > 8 else ''})")
    if column.note:
        parts.append(column.note)
    if not seen:
        parts.append("empty in the sample")
    return "; ".join(p for p in parts if p)


def render(proposal: Proposal, sample_rows: int, bucket: str) -> str:
    """The pipeline config, commented: what was inferred and from what. ``bucket``: the local bucket,
    absolute or relative to the config file."""
    ds = proposal.dataset
    files = proposal.files
    by_name = {c.name: c for c in proposal.columns}
    rows = max(c.rows for c in proposal.columns)
    lines = [
        f"# mlfactory pipeline config for {ds.name}, written by `mlfactory init` from {len(files)} file(s):",
        *[f"#   {_comment_text(f)}" for f in files[:10]], *(["#   ..."] if len(files) > 10 else []),
        f"# Inferred from {rows} sampled rows (up to {sample_rows} per file). Review it, then run it with",
        "#   make run DATA=<the files> CONFIG=<this file>",
        "# Every setting left out has its default: include/pipeline.yaml and include/mlfactory/config.py say them.",
        *[f"# NOTE: {_comment_text(n)}" for n in proposal.notes],
        "backend: ${MLFACTORY_BACKEND:-local}",
        "",
        "dataset:",
        f"  name: {_scalar(ds.name)}",
        f"  task: {ds.task}              # {'or: regression' if ds.task == 'classification' else 'or: classification'}",
        f"  target: {_scalar(ds.target)}",
    ]
    if ds.csv_delimiter != ",":
        lines.append(f"  csv_delimiter: {_scalar(ds.csv_delimiter)}")
    lines += [
        "  min_rows: 100                 # a smaller batch fails as a whole",
        "  # type: integer | float | boolean | datetime | category | string (string: a key or free text, not a feature)",
        "  # category without `categories`: an open vocabulary (its max_categories most frequent values seen twice in",
        "  # training; others are 'other'). List `categories` to quarantine rows with any other value instead.",
        "  # Add min/max to quarantine out-of-range rows; `required: false` lets a column be missing.",
        "  columns:",
    ]
    for spec in ds.columns:
        fields = {k: v for k, v in spec.model_dump(exclude_defaults=True).items()}
        if spec.type == "category" and not spec.categories:
            fields["max_categories"] = spec.max_categories
        note = _comment(by_name[spec.name], spec)
        lines.append(f"    - {_flow(fields)}" + (f"   # {_comment_text(note)}" if note else ""))
    if ds.derived:
        lines.append("  derived:                      # computed in ETL and at prediction time: ratio, log1p, month, day_of_week, days_since")
        lines += [f"    - {_flow(d.model_dump())}" for d in ds.derived]
    floor = 0.5 if ds.task == "classification" else 0.0
    metric = "ROC AUC" if ds.task == "classification" else "R²"
    label = by_name[ds.target]
    unlabelled = label.nulls / label.rows if label.rows else 0.0
    if unlabelled > UNLABELLED_SHARE:  # quarantined rows: over the default 5% every batch would fail
        lines += ["", "validation:",
                  f"  max_quarantine_fraction: {math.ceil(unlabelled * 150) / 100}   # {unlabelled:.1%} of the rows have "
                  f"no {_comment_text(repr(ds.target))} (quarantined); the default 0.05 would fail every batch"]
    lines += [
        "",
        "storage:",
        f"  bucket: ${{MLFACTORY_BUCKET:-{bucket}}}   # a folder (relative: to this file); s3://, gs://, abfs:// on a cloud",
        "",
        "training:",
        "  model: gbdt                   # gradient-boosted trees; mlp: the PyTorch network (epochs, learning_rate, ...)",
        "  epochs: 40                    # mlp: at most; it stops after `patience` (6) epochs without a better validation metric",
        "  processes: 1                  # processes per trial (a cloud: GPUs per node)",
        "  trials: 2                     # hyperparameter search, one mapped task per trial",
        "  concurrent_jobs: 2            # trials side by side (make run creates the pool)",
        "  search_space:                 # the search picks the family too: the better on the validation rows wins,",
        "    model: [gbdt, mlp]          # or their blend (training.blend) when it beats both there",
        "",
        f"promotion:                      # ml_promote's gate on the frozen holdout ({metric})",
        f"  floor: {floor}                    # the first model must beat {'chance' if floor == 0.5 else 'predicting the mean'}; raise it to your bar",
        "",
        "mlflow:",
        "  tracking_uri: ${MLFLOW_TRACKING_URI:-http://127.0.0.1:5000}",
        f"  experiment: {_scalar(ds.name)}",
        f"  model_name: {_scalar(ds.name)}",
        "",
    ]
    text = "\n".join(lines)
    _check_written(text, ds)
    return text


def _check_written(text: str, dataset: DatasetSpec) -> None:
    """The file says what init meant to write, and nothing else: the sections it writes, and this dataset."""
    written = yaml.safe_load(text)
    extra = sorted(set(written) - {"backend", "dataset", "validation", "storage", "training", "promotion", "mlflow"})
    if extra or DatasetSpec.model_validate(written["dataset"]).model_copy(update={"min_rows": dataset.min_rows}) != dataset:
        raise ValueError(f"the config written would hold {'keys ' + str(extra) if extra else 'another dataset'} than "
                         "init meant: a value from the data broke out of its place; nothing was written")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlfactory init", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="+", help="data files or folders (CSV, TSV, Parquet, JSON Lines; .gz/.bz2/.zst)")
    parser.add_argument("--target", required=True, help="the column to predict")
    parser.add_argument("--task", choices=["classification", "regression"], help="default: from the target's values")
    parser.add_argument("--name", help="the dataset's name (MLflow experiment and model); default: from the file name")
    parser.add_argument("--output", "-o", default="pipeline.yaml", help="the config to write (default: %(default)s)")
    parser.add_argument("--sample-rows", type=int, default=SAMPLE_ROWS, help="rows read per file (default: %(default)s)")
    parser.add_argument("--max-categories", type=int, default=1000, help="open-vocabulary size (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    args = parser.parse_args(argv)
    output = Path(args.output).expanduser()
    if output.exists() and not args.force:
        print(f"mlfactory init: {output} exists; --force overwrites it", file=sys.stderr)
        return 2
    try:
        files = data_files(args.data)
        proposal = infer(files, args.target, args.task, args.name, args.sample_rows, args.max_categories)
    except (BadInput, ValueError) as err:
        print(f"mlfactory init: {err}", file=sys.stderr)
        return 2
    bucket = PROJECT / ".mlfactory" / proposal.dataset.name / "bucket"  # beside make run's other state
    if output.resolve().is_relative_to(PROJECT):
        bucket = os.path.relpath(bucket, output.resolve().parent)
    try:
        text = render(proposal, args.sample_rows, bucket)
    except ValueError as err:
        print(f"mlfactory init: {err}", file=sys.stderr)
        return 2
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    ds = proposal.dataset
    kinds = {}
    for column in ds.columns:
        kinds.setdefault(column.type, []).append(column.name)
    print(f"wrote {output}: {ds.name}, a {ds.task} of {ds.target!r} on {len(ds.columns) - 1} columns")
    for kind, names in kinds.items():
        print(f"  {kind:<11} {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
    for note in proposal.notes:
        print(f"  note: {note}")
    print(f"next: make run DATA={' '.join(args.data)} CONFIG={output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
