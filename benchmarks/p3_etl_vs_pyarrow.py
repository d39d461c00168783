"""P3: 1M rows x 20 columns of landed CSV -> curated Parquet + Great Expectations validation,
against the floor of pyarrow reading the same CSV and writing Parquet, side by side in one run.

    .venv/bin/python benchmarks/p3_etl_vs_pyarrow.py [--rows 1000000] [--repeat 3]

Prints one line per measurement and a final JSON line. Imports (GX takes ~7 s) are done once before
timing and reported apart: a long-lived worker pays them once, and the floor pays pyarrow's likewise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mlfactory-p3-"))
    os.environ["MLFACTORY_BUCKET"] = str(work / "bucket")
    os.environ["GX_ANALYTICS_ENABLED"] = "False"
    start = time.perf_counter()
    import great_expectations  # noqa: F401

    gx_import = time.perf_counter() - start
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from mlfactory import sample_data
    from mlfactory.config import load_config
    from mlfactory.etl import curate_snapshot
    from mlfactory.ingest import ingest_object

    cfg = load_config()
    table = sample_data.generate(args.rows, seed=42)
    landed = sample_data.write(table, work / "bucket" / "landing" / "customers.csv")
    manifest, _ = ingest_object(cfg, landed.as_uri())
    csv_path = Path(manifest.snapshot_uri.removeprefix("file://"))
    print(f"{args.rows} rows x {table.num_columns} columns, {csv_path.stat().st_size / 1e6:.0f} MB of CSV", flush=True)

    floor, ours = [], []
    for i in range(args.repeat):
        t = time.perf_counter()
        pq.write_table(pacsv.read_csv(csv_path), work / "floor.parquet")
        floor.append(time.perf_counter() - t)
        t = time.perf_counter()
        result = curate_snapshot(cfg, manifest.snapshot_uri)
        ours.append(time.perf_counter() - t)
        assert result.curated_rows == args.rows, result
        print(f"run {i + 1}: pyarrow floor {floor[-1]:.2f}s, mlfactory ETL+GX {ours[-1]:.2f}s", flush=True)
    ratio = statistics.median(ours) / statistics.median(floor)
    print(
        json.dumps(
            {
                "benchmark": "P3",
                "rows": args.rows,
                "columns": table.num_columns,
                "floor_s_median": round(statistics.median(floor), 3),
                "mlfactory_s_median": round(statistics.median(ours), 3),
                "ratio": round(ratio, 2),
                "goal_ratio": 2.0,
                "gx_import_s_excluded": round(gx_import, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
