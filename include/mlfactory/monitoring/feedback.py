"""Labels of served traffic that arrive later, joined to what the endpoint served.

Whoever learns the truth about a served prediction (the flight was late, the customer churned) writes a
label file under ``<bucket>/predictions/labels/`` (``cfg.storage.labels_uri``): CSV (also .csv.gz),
Parquet or JSON Lines, with the columns

- ``request_id``: the ``X-Request-Id`` of the request (the endpoint answers with it, and takes the
  caller's own);
- ``row``: the row's position in that request, from 0 (may be left out for one-row requests);
- the dataset's target column, by its name in the config.

ml_monitor joins each label to the served row it names in the prediction log (``predictions/serving/``,
which records ``request_id`` and ``request_row`` of every served row) and judges the champion on the joined rows
(``monitoring.judge_performance``), as it does on newly curated batches. A file is taken once every one of
its labels has found its served row, or once it has waited ``monitoring.label_wait_hours`` (the rest are
then reported as unmatched); a file that cannot be read, or lacks a column, is refused with the reason.
Either way it is recorded in ml_monitor's state with its fingerprint, so it is taken once, and a file
written again under the same name is read again. Nothing is deleted.
"""

from __future__ import annotations

import gzip
import io
import time
import zlib
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mlfactory import BadInput, storage
from mlfactory.config import PipelineConfig
from mlfactory.features import FeatureSet, typed_features

REQUEST_ID, ROW = "request_id", "row"
LOGGED_ROW = "request_row"  # the prediction log's name for a row's position in its request
FORMATS = (".csv", ".csv.gz", ".parquet", ".jsonl", ".jsonl.gz")


def read_label_file(obj: storage.ObjectInfo, cfg: PipelineConfig) -> pd.DataFrame:
    """One label file as (request_id, row, target typed as in curated data); rows whose label is missing or
    does not parse are dropped and counted in ``frame.attrs["invalid"]``. Raises ``BadInput`` naming the problem."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    from mlfactory.data.etl import parse_column

    target = cfg.dataset.column(cfg.dataset.target)
    name = obj.key.lower()
    if not name.endswith(FORMATS):
        raise BadInput(f"{obj.uri}: a label file is one of {', '.join(FORMATS)}")
    limit = cfg.monitoring.max_label_bytes
    over = f"over monitoring.max_label_bytes ({limit})"
    if obj.size > limit:
        raise BadInput(f"{obj.uri} is {obj.size} bytes, {over}")
    try:  # (a regular file, reached through no symlinked folder: see storage.open_regular)
        with storage.open_regular(obj.uri, within=cfg.storage.labels_uri) as f:
            data = f.read(limit + 1)
        if name.endswith(".gz"):
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as inflating:
                data = inflating.read(limit + 1)
        if len(data) > limit:
            raise BadInput(f"{obj.uri} decompresses to more than {limit} bytes, {over}")
        if name.endswith(".parquet"):
            parquet = pq.ParquetFile(io.BytesIO(data))
            meta = parquet.metadata
            decoded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
            if decoded > limit:
                raise BadInput(f"{obj.uri}'s columns decode to {decoded} bytes, {over}")
            table = parquet.read()
        elif ".jsonl" in name:
            table = pajson.read_json(io.BytesIO(data))
        else:
            table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
                column_types={REQUEST_ID: pa.string(), target.name: pa.string()}, strings_can_be_null=True))
    except storage.NotARegularFile as err:
        raise BadInput(f"{err}: only regular files are read as label files") from None
    except (pa.ArrowInvalid, OSError, EOFError, zlib.error) as err:
        raise BadInput(f"{obj.uri}: not readable as a label file: {err}") from None
    missing = [c for c in (REQUEST_ID, target.name) if c not in table.column_names]
    if missing:
        raise BadInput(f"{obj.uri}: a label file needs the columns {REQUEST_ID!r}, {target.name!r} (the target) and, "
                       f"for requests of several rows, {ROW!r}; it has no {missing} (its columns: {table.column_names})")
    labels, problems = parse_column(table.column(target.name).combine_chunks(), target)
    request_ids = pc.cast(table.column(REQUEST_ID), pa.string()).to_numpy(zero_copy_only=False)
    rows = (pd.to_numeric(table.column(ROW).to_pandas(), errors="coerce") if ROW in table.column_names
            else pd.Series(np.zeros(table.num_rows)))
    frame = pd.DataFrame({REQUEST_ID: request_ids, ROW: rows.to_numpy(), target.name: labels.to_pandas()})
    bad = np.zeros(len(frame), bool)
    for mask in problems.values():
        bad |= mask
    bad |= frame[target.name].isna().to_numpy() | frame[REQUEST_ID].isna().to_numpy()
    bad |= ~np.isfinite(frame[ROW].to_numpy(dtype=float)) | (frame[ROW].to_numpy(dtype=float) < 0)
    if target.categories:
        bad |= ~frame[target.name].astype("string").isin(list(target.categories)).fillna(False).to_numpy()
    frame = frame[~bad].astype({ROW: "int64"})
    frame = frame.drop_duplicates([REQUEST_ID, ROW], keep="last").reset_index(drop=True)  # a label corrected later wins
    frame.attrs["invalid"] = int(bad.sum())
    return frame


def served_rows(cfg: PipelineConfig, request_ids: set[str], now: datetime) -> pd.DataFrame:
    """The prediction log's rows (raw features, request_id, row, served_at) of ``request_ids``, served in the
    last ``monitoring.label_lookback_days`` days; a request id served twice (a caller reusing its id) keeps
    its latest rows."""
    import pyarrow.parquet as pq

    raw = FeatureSet.of(cfg.dataset).raw_inputs
    oldest = f"date={(now - timedelta(days=cfg.monitoring.label_lookback_days)):%Y-%m-%d}"
    wanted = pa.array(sorted(request_ids), pa.string())
    tables = []
    for part in storage.list_objects(cfg.storage.prediction_log_uri):
        if not part.key.endswith(".parquet") or part.key.split("/", 1)[0] < oldest:
            continue
        with storage.open_uri(part.uri) as f:
            table = pq.read_table(f)
        table = table.filter(pc.is_in(table.column(REQUEST_ID), value_set=wanted))
        if not table.num_rows:
            continue
        if LOGGED_ROW in table.column_names:
            positions = table.column(LOGGED_ROW)
        else:  # logged before positions were: a request's rows are appended together, in order
            ids = table.column(REQUEST_ID).to_pandas()
            positions = pa.array(ids.groupby(ids).cumcount().to_numpy(), pa.int64())
        tables.append(table.select([*raw, REQUEST_ID, "served_at"]).append_column(ROW, positions))
    if not tables:
        return pd.DataFrame(columns=[*raw, REQUEST_ID, ROW, "served_at"])
    frame = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    frame = frame.sort_values("served_at", kind="stable").drop_duplicates([REQUEST_ID, ROW], keep="last")
    return frame.astype({ROW: "int64"})


def labelled_traffic(cfg: PipelineConfig, done: dict[str, str]) -> tuple[pd.DataFrame, dict]:
    """The served rows whose labels arrived, typed as curated data with the target (what ml_monitor judges
    the champion on), from the label files ready to be taken; and what happened to each file.
    ``done``: label file key -> fingerprint already taken (ml_monitor's state)."""
    target = cfg.dataset.target
    now_s = time.time()
    now = datetime.fromtimestamp(now_s, timezone.utc)
    wait_s = cfg.monitoring.label_wait_hours * 3600
    files = {}
    for obj in storage.list_objects(cfg.storage.labels_uri):
        if obj.key.rsplit("/", 1)[-1].startswith((".", "_")) or done.get(obj.key) == obj.fingerprint:
            continue
        if not obj.settled(cfg.ingest.settle_s, now_s):
            continue  # still being written
        files[obj.key] = obj
    report: dict[str, dict] = {}
    labels: dict[str, pd.DataFrame] = {}
    for key, obj in files.items():
        try:
            labels[key] = read_label_file(obj, cfg)
        except BadInput as err:
            report[key] = {"status": "refused", "why": str(err), "fingerprint": obj.fingerprint}
    wanted = {rid for frame in labels.values() for rid in frame[REQUEST_ID]}
    served = served_rows(cfg, wanted, now) if wanted else None
    joined = []
    for key, frame in labels.items():
        matched = frame.iloc[:0] if served is None or served.empty else frame.merge(served, on=[REQUEST_ID, ROW])
        waited = now_s - (files[key].modified or now_s)
        entry = {"labels": len(frame), "matched": len(matched), "invalid": frame.attrs["invalid"],
                 "fingerprint": files[key].fingerprint}
        if len(matched) < len(frame) and waited < wait_s:
            report[key] = {**entry, "status": "waiting",
                           "why": f"{len(frame) - len(matched)} label(s) not matched to a served row yet; waits up to "
                                  f"monitoring.label_wait_hours ({cfg.monitoring.label_wait_hours} h)"}
            continue
        report[key] = {**entry, "status": "taken"}
        if len(matched) < len(frame):
            unmatched = frame[~frame.set_index([REQUEST_ID, ROW]).index.isin(matched.set_index([REQUEST_ID, ROW]).index)]
            report[key]["unmatched_examples"] = unmatched[[REQUEST_ID, ROW]].head(5).to_dict("records")
        joined.append(matched)
    raw = FeatureSet.of(cfg.dataset).raw_inputs
    if not joined or not sum(len(j) for j in joined):
        return pd.DataFrame(columns=[*raw, target]), report
    rows = pd.concat(joined, ignore_index=True)
    typed = typed_features(rows[raw], cfg.dataset)
    typed[target] = rows[target].to_numpy()
    return typed[[*raw, target]], report
