"""P3: 1M rows x 20 columns of landed CSV -> curated Parquet + Great Expectations validation,
against the floor of pyarrow reading the same CSV and writing Parquet, side by side in one run.

    .venv/bin/python benchmarks/p3_etl_vs_pyarrow.py [--rows 1000000] [--repeat 3]

Two files of the same rows: a clean one, and a dirty one (1.1% of its rows quarantined), whose first
failing row sends ETL back to read it as text. For each: the ratio to the floor, and GX's unexpected
counts against the quarantine's.

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
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from mlfactory.data import sample_data
    from mlfactory.config import load_config
    from mlfactory.data.etl import ValidationFailed, curate_snapshot
    from mlfactory.data.ingest import ingest_object
    from mlfactory.data.validation import ROW_LEVEL

    cfg = load_config()
    table = sample_data.generate(args.rows, seed=42)
    # The same rows with 1% out of range (age 150: quarantined by a row check) and 0.1% not numbers
    # (income "unknown": quarantined as it is parsed): such a file is read a second time, as text.
    index = pa.array(range(args.rows))
    dirty = table.set_column(table.schema.get_field_index("age"), "age", pc.if_else(
        pc.equal(pc.bit_wise_and(index, 127), 0), pa.scalar("150"), pc.cast(table["age"], pa.string())))
    dirty = dirty.set_column(dirty.schema.get_field_index("income"), "income", pc.if_else(
        pc.equal(pc.bit_wise_and(index, 1023), 5), pa.scalar("unknown"), pc.cast(dirty["income"], pa.string())))
    snapshots = {}
    for name, rows in (("clean", table), ("dirty", dirty)):
        landed = sample_data.write(rows, work / "bucket" / "landing" / f"{name}.csv")
        manifest, _ = ingest_object(cfg, landed.as_uri())
        snapshots[name] = manifest.snapshot_uri
        size = Path(manifest.snapshot_uri.removeprefix("file://")).stat().st_size
        print(f"{name}: {args.rows} rows x {table.num_columns} columns, {size / 1e6:.0f} MB of CSV", flush=True)

    def curate(uri: str):
        try:
            return curate_snapshot(cfg, uri)
        except ValidationFailed as failed:  # the dirty file: over the quarantine limit is fine here
            return failed.result

    figures = {}
    for name, uri in snapshots.items():
        csv_path = Path(uri.removeprefix("file://"))
        floor, ours = [], []
        for i in range(args.repeat):
            t = time.perf_counter()
            pq.write_table(pacsv.read_csv(csv_path), work / "floor.parquet")
            floor.append(time.perf_counter() - t)
            t = time.perf_counter()
            result = curate(uri)
            ours.append(time.perf_counter() - t)
            print(f"{name} run {i + 1}: pyarrow floor {floor[-1]:.2f}s, mlfactory ETL+GX {ours[-1]:.2f}s", flush=True)
        assert result.raw_rows == args.rows, result
        # GX's unexpected counts are the quarantine's, expectation by expectation
        gx = {f"{e['expectation']}({e['column']})": e["unexpected_count"] for e in result.expectations
              if e["unexpected_count"]}
        row_level = {k: v for k, v in result.failures.items() if k.split("(")[0] in ROW_LEVEL}
        assert gx == row_level, (gx, result.failures)
        figures[name] = {
            "floor_s_median": round(statistics.median(floor), 3),
            "mlfactory_s_median": round(statistics.median(ours), 3),
            "ratio": round(statistics.median(ours) / statistics.median(floor), 2),
            "curated_rows": result.curated_rows, "quarantined_rows": result.quarantined_rows,
            "quarantine_counts": result.failures, "gx_unexpected_counts": gx,
        }
    print(json.dumps({"benchmark": "P3", "rows": args.rows, "columns": table.num_columns, "goal_ratio": 2.0,
                      "ratio": figures["clean"]["ratio"], **figures, "gx_import_s_excluded": round(gx_import, 2)}))


if __name__ == "__main__":
    main()
