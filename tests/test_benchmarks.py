"""`make bench` runs every benchmark on a fresh clone; each must at least start: its imports resolve and its
options parse (``--help`` exits 0 before any work)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("p*.py"))


def test_make_bench_runs_every_benchmark():
    makefile = (BENCHMARKS[0].parents[1] / "Makefile").read_text()
    recipe = makefile.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    assert sorted(b.name for b in BENCHMARKS) == sorted(line.split("benchmarks/")[1].split()[0]
                                                        for line in recipe.splitlines() if "benchmarks/" in line)


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.stem)
def test_each_benchmark_imports_and_parses_its_options(path):
    proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
