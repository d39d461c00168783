"""P6: batch scoring rows/s (read curated Parquet, predict, write the predictions table) vs the bare
model forward pass on already-encoded tensors, same model, same rows, same chunk size, one process.
Goal: at least 50% of the bare forward pass. Last line: JSON.

    python benchmarks/p6_batch_scoring.py [--rows 500000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _served_model import served_model  # noqa: E402

from mlfactory import sample_data  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=500_000)
    args = parser.parse_args()
    import torch

    from mlfactory.batch_scoring import load_tabular_model, score
    from mlfactory.registry import CHAMPION, Registry
    from mlfactory.training_data import read_curated

    with served_model(rows=20_000) as (cfg, work):
        version = Registry(cfg).alias_version(CHAMPION)
        score(cfg, "warm-up", version)  # scores the training rows; the measured run scores only the new batch
        sample_data.land_and_curate(cfg, args.rows, seed=7)
        started = time.perf_counter()
        result = score(cfg, "measured", version)
        batch_rows_per_s = result["rows"] / (time.perf_counter() - started)

        model = load_tabular_model(cfg, version)
        columns = [c.name for c in cfg.dataset.columns] + [f.name for f in cfg.dataset.derived]
        frame = read_curated(cfg, columns).tail(args.rows)
        chunk = cfg.batch_scoring.chunk_rows
        encoded = [model.pre.encode(frame.iloc[i:i + chunk]) for i in range(0, len(frame), chunk)]
        started = time.perf_counter()
        with torch.no_grad():
            for dense, cats in encoded:
                model.net(dense, cats)
        bare_rows_per_s = len(frame) / (time.perf_counter() - started)
    ratio = batch_rows_per_s / bare_rows_per_s
    print(json.dumps({
        "benchmark": "P6 batch scoring vs bare forward pass", "rows": result["rows"], "chunk_rows": chunk,
        "batch_scoring_rows_per_s": round(batch_rows_per_s), "bare_forward_rows_per_s": round(bare_rows_per_s),
        "ratio": round(ratio, 3), "goal": ">= 0.5", "goal_met": ratio >= 0.5,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
