"""P1: requests/s and latency of the mlfactory model server vs `mlflow models serve`, side by side.

The same registered model, one worker process each, the same load generator (wrk from Debian:
`apt-get install wrk`) POSTing the same JSON (`dataframe_split`) at 8 and 32 connections with 1-row
and 100-row bodies. Goal: at least 10x mlflow's requests/s and at most 1/5 of its p99.
Last line: JSON with every measurement and the ratios.

    python benchmarks/p1_serving_vs_mlflow.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _served_model import served_model  # noqa: E402

from mlfactory.features import to_wire  # noqa: E402
from mlfactory.backends.local.processes import answers, free_port, start, stop_group  # noqa: E402
from mlfactory.training.data import frozen_holdout, read_holdout  # noqa: E402

LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = io.open("{body}"):read("*a")
"""


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, body_file: str, connections: int, seconds: int) -> dict:
    script = Path(tempfile.mkdtemp()) / "post.lua"
    script.write_text(LUA.format(body=body_file))
    # --timeout 30s: wrk's default (2 s) counts slower answers as socket errors and leaves them out of
    # the percentiles, which would flatter a slow server's p99
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "--latency", "-s", str(script),
                          url + "/invocations"], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    errors = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)) else 0
    sock = re.search(r"Socket errors:.*", out)
    return {"rps": round(rps, 1), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2), "non_2xx": errors,
            "socket_errors": sock.group(0) if sock else ""}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk is not installed: apt-get install wrk")
        return 2
    with served_model(rows=20_000) as (cfg, work):
        holdout = frozen_holdout(cfg)
        rows = to_wire(read_holdout(holdout.uri, holdout.sha256), cfg.dataset)
        bodies = {}
        for n in (1, 100):
            part = rows.head(n)
            data = [[None if v != v else v for v in r] for r in part.itertuples(index=False)]
            path = work / f"body-{n}.json"
            path.write_text(json.dumps({"dataframe_split": {"columns": list(part.columns), "data": data}}))
            bodies[n] = str(path)
        model_uri = f"models:/{cfg.model_name}@champion"
        bin_dir = str(Path(sys.executable).parent)  # mlflow models serve starts `uvicorn` from PATH
        env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        ports = {"mlfactory": free_port(), "mlflow": free_port()}
        commands = {
            "mlfactory": [sys.executable, "-m", "mlfactory.serving", "--model-uri", model_uri, "--host", "127.0.0.1",
                          "--port", str(ports["mlfactory"]), "--log-uri", (work / "bucket" / "predictions" / "serving").as_uri()],
            "mlflow": [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                       "-h", "127.0.0.1", "-p", str(ports["mlflow"]), "-w", "1"],
        }
        results: dict = {}
        for name, command in commands.items():  # one server at a time: each gets the same 2 cores
            url = f"http://127.0.0.1:{ports[name]}"
            proc = start(command, work / f"{name}.log", lambda: answers(url + "/ping", ok_only=True), f"{name}'s server",
                         timeout=180, env=env)
            try:
                wrk(url, bodies[1], 8, 2)  # warm-up
                for n, body in bodies.items():
                    for connections in (8, 32):
                        results.setdefault(f"{n}row_{connections}conn", {})[name] = wrk(url, body, connections, args.seconds)
                        print(name, n, connections, results[f"{n}row_{connections}conn"][name], flush=True)
            finally:
                stop_group(proc)
    for case in results.values():
        case["rps_ratio"] = round(case["mlfactory"]["rps"] / max(case["mlflow"]["rps"], 1e-9), 1)
        case["p99_ratio"] = round(case["mlfactory"]["p99_ms"] / max(case["mlflow"]["p99_ms"], 1e-9), 3)
    goal_met = all(c["rps_ratio"] >= 10 and c["p99_ratio"] <= 0.2 for c in results.values())
    print(json.dumps({"benchmark": "P1 model server vs mlflow models serve", "workers": 1, "seconds": args.seconds,
                      "cases": results, "goal": "rps >= 10x and p99 <= 1/5 of mlflow's", "goal_met": goal_met}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
