"""Training sets and the frozen holdout, built from curated data.

The holdout is carved once, from the first curated data ml_train sees, before any model is trained,
and never changes: every challenger and champion is compared on the same rows, and no training set
ever contains one of them (rows are matched by a hash of their content, so the same rows landed
again in a later file stay out of training too).

The frozen holdout looks back: it is the first season's data. Once a champion exists, a training set
also keeps out a **recent window**: ``promotion.recent_fraction`` of the curated rows the champion's
training set does not hold (chosen by a hash of their content, so the same rows are chosen every
time), written beside the training set. Neither model trained on it, so the gate can also compare
them on the newest data (``registry.decide``).

A training set is one folder, content-addressed by the SHA-256 of its Parquet file, holding the
rows and ``dataset.json`` (the dataset spec): everything the training entrypoint needs, on any cloud.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mlfactory import storage
from mlfactory.config import PipelineConfig
from mlfactory.specs import DATASET_FILE

log = logging.getLogger(__name__)

ROW_HASH = "_row_hash"
HOLDOUT_FILE = "holdout.parquet"
HOLDOUT_MANIFEST = "holdout.json"


class NoTrainingData(RuntimeError):
    """There is no curated data to train on yet."""


@dataclass(frozen=True)
class Holdout:
    uri: str  # the Parquet file
    sha256: str
    rows: int
    created_at: str


@dataclass(frozen=True)
class TrainingSet:
    uri: str  # the folder the entrypoint reads
    digest: str  # sha256 of its Parquet file
    rows: int
    holdout: Holdout
    recent: Holdout | None = None  # the recent window (rows new since the champion's training set), if any

    def to_dict(self) -> dict:
        return asdict(self)


def holdout_uri(cfg: PipelineConfig) -> str:
    return storage.join(cfg.storage.models_uri, "holdout")


def require_curated(cfg: PipelineConfig) -> None:
    if not any(o.key.endswith(".parquet") for o in storage.list_objects(cfg.storage.curated_uri)):
        raise NoTrainingData(f"no curated data under {cfg.storage.curated_uri} yet: land a file first")


def read_curated(cfg: PipelineConfig, columns: list[str]) -> pd.DataFrame:
    """Every curated row of every snapshot (staging folders, starting with '_' or '.', are skipped)."""
    require_curated(cfg)
    fs, root = storage.pyarrow_filesystem(cfg.storage.curated_uri)
    return pq.read_table(root, filesystem=fs, columns=columns).to_pandas()


def curated_snapshots(cfg: PipelineConfig) -> dict[str, str]:
    """Snapshot id -> folder URI of every curated snapshot, oldest ingest date first."""
    folders: dict[str, str] = {}
    for obj in storage.list_objects(cfg.storage.curated_uri):
        parts = obj.key.split("/")
        if len(parts) >= 3 and parts[-1].endswith(".parquet") and parts[-2].startswith("snapshot="):
            folders.setdefault(parts[-2].split("=", 1)[1], storage.join(cfg.storage.curated_uri, *parts[:-1]))
    return dict(sorted(folders.items(), key=lambda item: item[1]))


def row_hashes(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    return pd.util.hash_pandas_object(frame[columns], index=False).to_numpy()


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer)
    return buffer.getvalue()


def frozen_holdout(cfg: PipelineConfig) -> Holdout | None:
    """The holdout frozen in the bucket, if ml_train has frozen one yet."""
    manifest_uri = storage.join(holdout_uri(cfg), HOLDOUT_MANIFEST)
    return Holdout(**json.loads(storage.read_bytes(manifest_uri))) if storage.exists(manifest_uri) else None


def ensure_holdout(cfg: PipelineConfig, curated: pd.DataFrame, columns: list[str]) -> Holdout:
    """The frozen holdout: read it if it exists, otherwise carve it from ``curated`` once."""
    existing = frozen_holdout(cfg)
    if existing is not None:
        return existing
    folder = holdout_uri(cfg)
    spec = cfg.promotion
    n = min(spec.holdout_max_rows, max(1, int(round(len(curated) * spec.holdout_fraction))))
    if len(curated) - n < 2:
        raise NoTrainingData(f"only {len(curated)} curated rows: too few to freeze a holdout and still train")
    chosen = np.sort(np.random.default_rng(cfg.training.seed).choice(len(curated), size=n, replace=False))
    rows = curated.iloc[chosen][columns].reset_index(drop=True)
    rows[ROW_HASH] = row_hashes(rows, columns)
    data, uri = _parquet_bytes(rows), storage.join(folder, HOLDOUT_FILE)
    try:  # written once, as the manifest (storage.created): the clouds' policies refuse any other write there
        storage.write_once(uri, data)
    except FileExistsError:  # an earlier try froze its rows and stopped before the manifest: those are the holdout
        data = storage.read_bytes(uri)
        n = pq.read_metadata(io.BytesIO(data)).num_rows
    holdout = Holdout(uri, hashlib.sha256(data).hexdigest(), n, datetime.now(timezone.utc).isoformat(timespec="seconds"))
    try:  # last: marks it complete
        storage.write_once(storage.join(folder, HOLDOUT_MANIFEST), json.dumps(asdict(holdout), indent=2).encode())
    except FileExistsError:  # a run training at the same time froze it first
        return frozen_holdout(cfg)
    log.info("froze a holdout of %d rows at %s (sha256 %s)", n, holdout.uri, holdout.sha256[:12])
    return holdout


def read_holdout(uri: str, sha256: str | None = None) -> pd.DataFrame:
    """The holdout rows; with ``sha256``, refuse a holdout that changed since it was frozen."""
    data = storage.read_bytes(uri)
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"holdout {uri} changed since it was frozen (sha256 {sha256[:12]}…): refusing to compare on it")
    return pq.read_table(io.BytesIO(data)).to_pandas().drop(columns=[ROW_HASH])


RECENT_FILE = "recent.parquet"
MIN_RECENT_ROWS = 100  # fewer new rows: no recent window (they train instead)


def prepare_training_set(cfg: PipelineConfig, champion_training_set: str | None = None) -> TrainingSet:
    """Curated data minus the holdout (and, given the champion's training set, minus the recent window),
    written once as a content-addressed training set folder."""
    columns = [c.name for c in cfg.dataset.columns] + [f.name for f in cfg.dataset.derived]
    curated = read_curated(cfg, columns)
    holdout = ensure_holdout(cfg, curated, columns)
    held = pq.read_table(io.BytesIO(storage.read_bytes(holdout.uri)), columns=[ROW_HASH]).column(0).to_numpy()
    hashes = row_hashes(curated, columns)
    keep = ~np.isin(hashes, held)
    recent = None
    if champion_training_set and cfg.promotion.recent_fraction > 0:
        recent, keep = _recent_window(cfg, curated, columns, hashes, keep, champion_training_set)
    rows = curated.loc[keep, columns].reset_index(drop=True)
    if len(rows) < 2:
        raise NoTrainingData(f"{len(rows)} curated rows left after the holdout: land more data")
    data = _parquet_bytes(rows)
    digest = hashlib.sha256(data).hexdigest()
    folder = storage.join(cfg.storage.models_uri, "training_sets", digest[:16])
    if not storage.exists(storage.join(folder, DATASET_FILE)):
        storage.write_bytes(storage.join(folder, "part-0.parquet"), data)
        storage.write_bytes(storage.join(folder, DATASET_FILE), cfg.dataset.model_dump_json().encode())
    log.info("training set %s: %d rows (%d curated, %d in the holdout, %d in the recent window)", folder, len(rows),
             len(curated), int(np.isin(hashes, held).sum()), recent.rows if recent else 0)
    return TrainingSet(folder, digest, len(rows), holdout, recent)


def _recent_window(cfg: PipelineConfig, curated: pd.DataFrame, columns: list[str], hashes: np.ndarray,
                   keep: np.ndarray, champion_training_set: str) -> tuple[Holdout | None, np.ndarray]:
    """The recent window out of the rows ``keep`` selects: ``recent_fraction`` of those the champion's
    training set lacks, by content hash; written content-addressed under ``models/recent/``."""
    parts = [o.uri for o in storage.list_objects(champion_training_set) if o.key.endswith(".parquet")]
    seen = np.concatenate([row_hashes(pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns).to_pandas(),
                                      columns) for uri in parts]) if parts else np.empty(0, np.uint64)
    new = keep & ~np.isin(hashes, seen)
    chosen = new & (hashes % 10_000 < round(cfg.promotion.recent_fraction * 10_000))
    if chosen.sum() < MIN_RECENT_ROWS:
        log.info("%d rows new since the champion's training set: too few for a recent window", int(new.sum()))
        return None, keep
    rows = curated.loc[chosen, columns].reset_index(drop=True)
    rows[ROW_HASH] = hashes[chosen]
    data = _parquet_bytes(rows)
    sha = hashlib.sha256(data).hexdigest()
    window = Holdout(storage.join(cfg.storage.models_uri, "recent", sha[:16], RECENT_FILE), sha, len(rows),
                     datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if not storage.exists(window.uri):
        storage.write_bytes(window.uri, data)
    log.info("recent window %s: %d of the %d rows new since the champion's training set", window.uri, len(rows),
             int(new.sum()))
    return window, keep & ~chosen
