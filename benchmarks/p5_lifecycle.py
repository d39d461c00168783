"""P5 (lifecycle): landing → champion serving on the endpoint, on the 100k-row sample, 2 cores.

Runs the whole `make run` story (``MLFACTORY_EXIT_WHEN_DONE=1``) on a temporary bucket and state
folder, with the ports of `make run` (so not beside a running `make run`), and reads its summary.
Goal: landing → served champion in at most 45 s. Last line: JSON.

    python benchmarks/p5_lifecycle.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlfactory-p5-"))
    env = {**os.environ, "MLFACTORY_EXIT_WHEN_DONE": "1", "MLFACTORY_ROWS": str(args.rows),
           "MLFACTORY_STATE_DIR": str(work), "MLFACTORY_BUCKET": str(work / "bucket")}
    code = subprocess.run([sys.executable, "-m", "mlfactory.backends.local.run"], env=env).returncode
    summary = json.loads((work / ".mlfactory" / "run-summary.json").read_text())
    first = [r for r in summary.get("runs", [])][:6]
    seconds = summary.get("timings", {}).get("landing_to_serving_s")
    print(json.dumps({
        "benchmark": "P5 landing -> champion serving", "rows": args.rows, "exit_code": code, "story_ok": summary.get("ok"),
        "landing_to_serving_s": seconds, "stages_s": {r["dag"]: r["seconds"] for r in first},
        "drift_to_decision_s": summary.get("timings", {}).get("drift_to_decision_s"),
        "goal_s": 45, "goal_met": bool(seconds and seconds <= 45 and summary.get("ok")),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
