"""A realistic customer-churn table for demos, tests and benchmarks (matches include/pipeline.yaml).

Numeric, categorical, boolean and datetime features; the target depends on them through a logistic
model with noise, so a model can learn it but not perfectly. ``drift`` shifts the feature
distributions (older, richer customers, more support calls, other plans) to simulate data drift.

    python -m mlfactory.data.sample_data --rows 1000000 --drift 0.0 landing/customers.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PLANS = ["basic", "standard", "premium"]
REGIONS = ["north", "south", "east", "west", "central"]
DEVICES = ["android", "ios", "web", "desktop"]
PAYMENTS = ["card", "bank_transfer", "paypal", "invoice"]
CONTRACTS = ["monthly", "annual", "two_year"]


def _mix(p: list[float], q: list[float], drift: float) -> np.ndarray:
    w = min(max(drift, 0.0), 1.0)
    mixed = (1 - w) * np.asarray(p) + w * np.asarray(q)
    return mixed / mixed.sum()


def _dictionary(rng: np.random.Generator, values: list[str], p: np.ndarray, n: int) -> pa.Array:
    codes = rng.choice(len(values), size=n, p=p).astype(np.int32)
    return pa.DictionaryArray.from_arrays(codes, pa.array(values)).cast(pa.string())


def generate(rows: int, seed: int = 0, drift: float = 0.0, id_offset: int = 0) -> pa.Table:
    """``rows`` customers; the same seed and drift give the same table."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    rng = np.random.default_rng(seed)
    n = rows
    age = np.clip(rng.normal(42 + 8 * drift, 13, n), 18, 95).round().astype(np.int64)
    income = np.clip(rng.lognormal(10.8 + 0.25 * drift, 0.55, n), 0, 999_000).round(2)
    tenure = np.clip(rng.gamma(2.0, 14.0, n), 0, 240).astype(np.int64)
    contract_codes = rng.choice(3, size=n, p=_mix([0.55, 0.30, 0.15], [0.75, 0.18, 0.07], drift))
    plan_codes = rng.choice(3, size=n, p=_mix([0.45, 0.35, 0.20], [0.25, 0.35, 0.40], drift))
    monthly = np.clip(rng.normal(35 + 25 * plan_codes + 12 * drift, 9, n), 5, 990).round(2)
    total = np.clip(monthly * np.maximum(tenure, 1) * rng.normal(1.0, 0.05, n), 0, 249_000).round(2)
    support = rng.poisson(1.2 * (1 + drift) + 0.8 * (contract_codes == 0), n).clip(0, 100)
    satisfaction = np.clip(rng.normal(7 - 0.6 * support, 1.6, n), 1, 10).round().astype(np.int64)
    session = np.clip(rng.gamma(3.0, 9.0 * (1 + 0.2 * drift), n), 0, 1440).round(1)
    usage = np.clip(rng.lognormal(2.5 + 0.3 * plan_codes, 0.8, n), 0, 9_999).round(2)
    partner = rng.random(n) < 0.48
    dependents = rng.random(n) < np.where(partner, 0.45, 0.12)
    paperless = rng.random(n) < 0.6
    signup_days = (np.datetime64("2025-06-01") - tenure * 30 - rng.integers(0, 30, n)).astype("datetime64[s]")

    logit = (
        -1.6
        + 1.4 * (contract_codes == 0)
        - 0.6 * (contract_codes == 2)
        - 0.035 * tenure
        + 0.018 * (monthly - 60)
        + 0.45 * support
        - 0.30 * (satisfaction - 6)
        + 0.35 * paperless
        - 0.25 * partner
        + 0.004 * (session < 10) * 100
        + rng.normal(0, 0.8, n)
    )
    churned = rng.random(n) < 1 / (1 + np.exp(-logit))

    # Optional columns have a few gaps, as real exports do.
    session_arr = pa.array(session, mask=rng.random(n) < 0.01)
    usage_arr = pa.array(usage, mask=rng.random(n) < 0.01)
    satisfaction_arr = pa.array(satisfaction, mask=rng.random(n) < 0.02)

    ids = pc.binary_join_element_wise(
        pa.array(np.full(n, f"C{seed % 1000:03d}")), pa.array(np.arange(id_offset, id_offset + n)).cast(pa.string()), "-"
    )
    plans = pa.DictionaryArray.from_arrays(plan_codes.astype(np.int32), pa.array(PLANS)).cast(pa.string())
    contracts = pa.DictionaryArray.from_arrays(contract_codes.astype(np.int32), pa.array(CONTRACTS)).cast(pa.string())
    return pa.table(
        {
            "customer_id": ids,
            "signup_date": pa.array(signup_days, type=pa.timestamp("s")),
            "age": age,
            "income": income,
            "tenure_months": tenure,
            "monthly_charges": monthly,
            "total_charges": total,
            "support_calls": support.astype(np.int64),
            "plan": plans,
            "region": _dictionary(rng, REGIONS, _mix([0.2] * 5, [0.1, 0.1, 0.2, 0.2, 0.4], drift), n),
            "device": _dictionary(rng, DEVICES, _mix([0.4, 0.35, 0.15, 0.1], [0.2, 0.3, 0.3, 0.2], drift), n),
            "payment_method": _dictionary(rng, PAYMENTS, np.array([0.45, 0.25, 0.2, 0.1]), n),
            "contract": contracts,
            "has_partner": partner,
            "has_dependents": dependents,
            "paperless_billing": paperless,
            "avg_session_minutes": session_arr,
            "data_usage_gb": usage_arr,
            "satisfaction": satisfaction_arr,
            "churned": churned,
        }
    )


def write(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` as CSV, Parquet or JSON Lines, chosen by the file extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    tmp = path.with_name(f".{path.name}.tmp")  # the landing watcher ignores dot-files
    if suffix == ".csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, tmp)
    elif suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        pq.write_table(table, tmp)
    elif suffix in (".jsonl", ".ndjson"):
        table.to_pandas().to_json(tmp, orient="records", lines=True, date_format="iso")
    else:
        raise ValueError(f"unknown extension {suffix!r}: use .csv, .parquet or .jsonl")
    tmp.replace(path)  # appears whole in the landing folder
    return path


def land_and_curate(cfg, rows: int, seed: int = 1) -> None:
    """Land ``rows`` sample rows in ``cfg``'s bucket (local or an object store) and run them through ingest
    and ETL, in process, into the curated prefix (for tests and benchmarks that start from curated data)."""
    import tempfile

    from mlfactory import storage
    from mlfactory.data.etl import curate_snapshot
    from mlfactory.data.ingest import ingest_object

    landed = storage.join(cfg.storage.landing_uri, f"sample-{seed}.csv")
    if storage.is_local(landed):
        write(generate(rows, seed=seed), storage.local_path(landed))
    else:
        with tempfile.TemporaryDirectory() as folder:
            storage.write_bytes(landed, write(generate(rows, seed=seed), Path(folder) / "sample.csv").read_bytes())
    manifest, _ = ingest_object(cfg, landed)
    curate_snapshot(cfg, manifest.snapshot_uri)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="file to write: .csv, .parquet or .jsonl")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drift", type=float, default=0.0, help="0 = reference distribution; 1 = strongly shifted")
    args = parser.parse_args(argv)
    path = write(generate(args.rows, seed=args.seed, drift=args.drift, id_offset=args.seed * 10**9), args.output)
    print(f"wrote {args.rows} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
