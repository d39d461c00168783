"""P2: drift of 1M rows per side x 20 features, mlfactory.monitoring.drift vs Evidently's DataDriftPreset.

The same Parquet files (15 stable features; 3 numeric features shifted by 0.2-0.3 sd and 2
categorical ones with moved shares) are read by two fresh processes, one per tool, each timing its
drift computation and reporting its peak memory (max RSS). Evidently 0.7.23 needs pandas < 3, so it
runs in its own virtualenv, made here on first use under .bench/ (not in the project's lock).
Goal: at least 20x faster, at most half its peak memory, the same per-feature verdicts.
Last line: JSON.

    python benchmarks/p2_drift_vs_evidently.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVIDENTLY = "0.7.23"
VENV = ROOT / ".bench" / f"evidently-{EVIDENTLY}"
NUMERIC_SHIFTS = {f"num_{i:02d}": 0.0 for i in range(11)} | {"shift_a": 0.2, "shift_b": 0.25, "shift_c": 0.3}
CATEGORIES = ["a", "b", "c", "d", "e"]
STABLE_P = [0.35, 0.25, 0.2, 0.12, 0.08]
MOVED_P = [0.2, 0.2, 0.2, 0.2, 0.2]
CATEGORICAL = {"cat_0": False, "cat_1": False, "cat_2": False, "flag": False, "moved_a": True, "moved_b": True}


def write_data(folder: Path, rows: int) -> None:
    import numpy as np
    import pandas as pd

    for name, seed, current in (("reference", 1, False), ("current", 2, True)):
        rng = np.random.default_rng(seed)
        frame = {}
        for i, (col, shift) in enumerate(NUMERIC_SHIFTS.items()):
            base = rng.normal(shift if current else 0.0, 1.0, rows)
            frame[col] = np.exp(base / 2) * 100 if i % 3 == 1 else base  # some skewed columns too
        for col, moved in CATEGORICAL.items():
            if col == "flag":
                frame[col] = np.where(rng.random(rows) < 0.3, "yes", "no")
            else:
                frame[col] = rng.choice(CATEGORIES, rows, p=MOVED_P if (moved and current) else STABLE_P)
        pd.DataFrame(frame).to_parquet(folder / f"{name}.parquet")


CHILD = r"""
import json, resource, sys, time
import pandas as pd
tool, folder = sys.argv[1], sys.argv[2]
numeric, categorical = json.loads(sys.argv[3]), json.loads(sys.argv[4])
ref = pd.read_parquet(f"{folder}/reference.parquet")
cur = pd.read_parquet(f"{folder}/current.parquet")
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
if tool == "mlfactory":
    from mlfactory.monitoring.drift import Columns, categorical_values, compare
    def columns(frame):
        return Columns({c: frame[c].to_numpy(dtype="float64") for c in numeric},
                       {c: categorical_values(frame[c]) for c in categorical})
    report = compare(columns(ref), columns(cur), threshold=0.1)
    verdicts = {f.feature: f.drifted for f in report.features}
    scores = {f.feature: round(f.score, 4) for f in report.features}
else:
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset
    definition = DataDefinition(numerical_columns=numeric, categorical_columns=categorical)
    snapshot = Report([DataDriftPreset()]).run(Dataset.from_pandas(cur, data_definition=definition),
                                               Dataset.from_pandas(ref, data_definition=definition))
    verdicts, scores = {}, {}
    for metric in snapshot.dict()["metrics"]:
        config = metric.get("config", {})
        column = config.get("column")
        if column and "ValueDrift" in metric.get("metric_name", ""):
            scores[column] = round(float(metric["value"]), 4)
            verdicts[column] = float(metric["value"]) >= float(config.get("threshold") or 0.1)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mb": round(peak), "peak_over_loaded_mb": round(peak - loaded),
                  "verdicts": verdicts, "scores": scores}))
"""


def evidently_python() -> str:
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"making {VENV} with evidently=={EVIDENTLY} (pandas<3) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"evidently=={EVIDENTLY}", "pandas<3", "pyarrow"],
                       check=True)
    return str(python)


def run(python: str, tool: str, folder: Path) -> dict:
    numeric, categorical = list(NUMERIC_SHIFTS), list(CATEGORICAL)
    out = subprocess.run([python, "-c", CHILD, tool, str(folder), json.dumps(numeric), json.dumps(categorical)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{tool} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="mlfactory-p2-"))
    write_data(folder, args.rows)
    ours = run(sys.executable, "mlfactory", folder)
    print("mlfactory", {k: v for k, v in ours.items() if k != "scores"}, flush=True)
    theirs = run(evidently_python(), "evidently", folder)
    print("evidently", {k: v for k, v in theirs.items() if k != "scores"}, flush=True)
    truth = {c: s > 0 for c, s in NUMERIC_SHIFTS.items()} | CATEGORICAL
    speedup = theirs["seconds"] / max(ours["seconds"], 1e-9)
    memory = ours["peak_rss_mb"] / max(theirs["peak_rss_mb"], 1)
    same = ours["verdicts"] == theirs["verdicts"]
    print(json.dumps({
        "benchmark": "P2 drift, 1M rows per side x 20 features", "rows": args.rows, "features": len(truth),
        "mlfactory": ours, "evidently": {**theirs, "version": EVIDENTLY},
        "speedup": round(speedup, 1), "peak_memory_ratio": round(memory, 3), "same_verdicts": same,
        "verdicts_match_truth": {"mlfactory": ours["verdicts"] == truth, "evidently": theirs["verdicts"] == truth},
        "goal": ">= 20x faster, <= 1/2 peak memory, same verdicts",
        "goal_met": speedup >= 20 and memory <= 0.5 and same,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
