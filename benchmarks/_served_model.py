"""A trained and registered sample model behind a real MLflow server, for the serving and scoring
benchmarks (P1, P6). Not a benchmark itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))

from mlfactory import storage  # noqa: E402
from mlfactory.data import sample_data  # noqa: E402
from mlfactory.config import load_config  # noqa: E402
from mlfactory.backends.local.mlflow_server import LocalMlflow  # noqa: E402
from mlfactory.backends.local.processes import free_port  # noqa: E402


@contextmanager
def served_model(rows: int, epochs: int = 2):
    """Yields (cfg, work dir) with `champion` = a model trained on ``rows`` curated sample rows."""
    work = Path(tempfile.mkdtemp(prefix="mlfactory-bench-"))
    mlflow = LocalMlflow(work / "mlflow", (work / "artifacts").as_uri(), port=free_port())
    mlflow.start()
    try:
        os.environ["MLFACTORY_BUCKET"] = str(work / "bucket")
        os.environ["MLFLOW_TRACKING_URI"] = mlflow.url
        cfg = load_config()
        from mlfactory.registry import Registry
        from mlfactory.training.data import prepare_training_set

        sample_data.land_and_curate(cfg, rows, seed=3)
        training_set = prepare_training_set(cfg)
        out = storage.join(cfg.storage.models_uri, "runs", "bench")
        trained = subprocess.run([sys.executable, "-m", "mlfactory.training.train", "--train-uri", training_set.uri, "--output-uri",
                                  out, "--hyperparameters", json.dumps({"epochs": epochs}), "--mlflow-tracking-uri",
                                  mlflow.url, "--experiment", "bench"],
                                 capture_output=True, text=True)
        if trained.returncode != 0:
            raise RuntimeError(f"training failed:\n{trained.stderr[-3000:]}")
        trained = json.loads(storage.read_bytes(storage.join(out, "metrics.json")))
        registry = Registry(cfg)
        version = registry.register(trained["model_uri"], trained["mlflow_run_id"], {})
        registry.promote(version, training_set.holdout.uri, training_set.holdout.sha256)
        yield cfg, work
    finally:
        mlflow.stop()
