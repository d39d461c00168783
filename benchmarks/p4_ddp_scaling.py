"""P4: training throughput of the entrypoint, side by side in one run.

1. samples/s of 1 process vs 2 DDP processes (torchrun, gloo) on this CPU; goal >= 1.6x.
2. samples/s of the entrypoint vs a bare PyTorch loop (the same network — periodic numeric embeddings —,
   optimizer and learning-rate schedule as the entrypoint's defaults, the same data and batch size, one
   process; no DDP, no sampler, no validation, no checkpoints, no logging); goal >= 0.9x.

    .venv/bin/python benchmarks/p4_ddp_scaling.py [--rows 200000] [--epochs 4] [--repeat 5] [--device cpu]

Throughput is the median over epochs 2..N (epoch 1 warms up) of samples processed per second of
training loop, summed over processes. The three runs of a repeat follow one another, and each ratio is the
median over repeats of that repeat's own ratio: this shared machine's speed drifts by ±20 % from one minute to
the next (the same bare loop, run after run), and a ratio of two runs made seconds apart is far steadier than a
ratio of medians taken minutes apart. Prints one line per measurement and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def entrypoint_rate(train_uri: str, out: Path, processes: int, args) -> float:
    from mlfactory.backends.local.runtime import this_machine
    from mlfactory.training.cluster import LOOPBACK_ENV

    command = this_machine(processes).command("mlfactory.training.train", [  # as ml_train runs it
        "--train-uri", train_uri, "--output-uri", str(out), "--device", args.device,
        "--hyperparameters", json.dumps({"epochs": args.epochs, "batch_size": args.batch_size})])
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    subprocess.run(command, check=True, capture_output=True, env={**env, **LOOPBACK_ENV})
    history = json.loads((out / "metrics.json").read_text())["history"]
    return statistics.median(h["samples_per_s"] for h in history[1:])


BARE_LOOP = r"""
import json, statistics, sys, time, torch
from mlfactory.hyperparameters import Hyperparameters
from mlfactory.tabular import Preprocessor, build_net, loss_function
from mlfactory.training.train import one_cycle, read_training_set
train_uri, epochs, batch, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), torch.device(sys.argv[4])
dataset, frame, _ = read_training_set(train_uri)
pre = Preprocessor.fit(frame, dataset)
x, c = pre.encode(frame)
y = pre.encode_target(frame[dataset.target])
x, c, y = x.to(device), c.to(device), y.to(device)
hp = Hyperparameters(batch_size=batch)  # the entrypoint's defaults: the same network, optimizer and schedule
net = build_net(pre, hp.hidden_sizes, hp.dropout, hp.numeric_embedding).to(device)
opt = torch.optim.AdamW(net.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
schedule = one_cycle(opt, epochs * -(-len(y) // batch))
loss_fn = loss_function(pre)
rates = []
for epoch in range(epochs):
    order = torch.randperm(len(y), device=device)
    start, seen = time.perf_counter(), 0
    for first in range(0, len(order), batch):
        idx = order[first:first + batch]
        loss = loss_fn(net(x[idx], c[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        seen += len(idx)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rates.append(seen / (time.perf_counter() - start))
print(json.dumps(statistics.median(rates[1:])))
"""


def bare_rate(train_uri: str, args) -> float:
    out = subprocess.run([sys.executable, "-c", BARE_LOOP, train_uri, str(args.epochs), str(args.batch_size),
                          args.device], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mlfactory-p4-"))
    os.environ["MLFACTORY_BUCKET"] = str(work / "bucket")
    from mlfactory.data import sample_data
    from mlfactory.config import load_config
    from mlfactory.training.data import prepare_training_set

    cfg = load_config()
    sample_data.land_and_curate(cfg, args.rows, seed=4)
    training_set = prepare_training_set(cfg)
    print(f"training set: {training_set.rows} rows; {os.cpu_count()} cores; batch {args.batch_size} per process; "
          f"{args.epochs} epochs; device {args.device}", flush=True)

    one, two, bare = [], [], []
    for i in range(args.repeat):
        t = time.perf_counter()
        one.append(entrypoint_rate(training_set.uri, work / f"one-{i}", 1, args))
        two.append(entrypoint_rate(training_set.uri, work / f"two-{i}", 2, args))
        bare.append(bare_rate(training_set.uri, args))
        print(f"run {i + 1}: 1 process {one[-1]:.0f} samples/s, 2 DDP processes {two[-1]:.0f} samples/s, "
              f"bare loop {bare[-1]:.0f} samples/s ({time.perf_counter() - t:.0f}s)", flush=True)
    scaling = statistics.median(t / o for t, o in zip(two, one))
    efficiency = statistics.median(o / b for o, b in zip(one, bare))
    print(json.dumps({
        "benchmark": "P4",
        "device": args.device,
        "rows": training_set.rows,
        "samples_per_s_1_process": round(statistics.median(one)),
        "samples_per_s_2_ddp_processes": round(statistics.median(two)),
        "ddp_speedup": round(scaling, 2),
        "ddp_goal": 1.6,
        "ddp_goal_met": scaling >= 1.6,
        "samples_per_s_bare_loop": round(statistics.median(bare)),
        "entrypoint_vs_bare_loop": round(efficiency, 2),
        "entrypoint_goal": 0.9,
        "entrypoint_goal_met": efficiency >= 0.9,
    }))


if __name__ == "__main__":
    main()
