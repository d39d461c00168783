"""The pipeline's registered champion as MLflow's own tools use it, outside the project: in a virtual environment
that holds only the model's ``requirements.txt`` (no mlfactory, no Airflow), ``mlflow.pyfunc.load_model`` loads
``models:/<name>@champion`` and ``mlflow models serve`` serves it, and both give the pipeline's own predictions.
(The logged ``code/`` once lacked a module that prediction imports, and every tool failed to load the model.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from model_venv import model_venv

from mlfactory.backends.local.processes import answers, free_port, start, stop_group

LOAD = """
import importlib.util, json, sys
import pandas as pd
assert importlib.util.find_spec("mlfactory") is None and importlib.util.find_spec("airflow") is None
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
rows = pd.read_json(sys.argv[2], orient="split", dtype=False)
print(json.dumps(model.predict(rows).to_dict(orient="list")))
"""


def test_mlflow_loads_and_serves_the_champion_with_only_its_own_requirements(champion, tmp_path):
    import mlflow.artifacts

    from mlfactory.tabular import load_logged_model

    cfg, wire, _ = champion
    uri = f"models:/{cfg.model_name}@champion"
    local = mlflow.artifacts.download_artifacts(uri)
    python = model_venv(Path(local) / "requirements.txt", tmp_path / "venv")
    rows = wire.head(20).reset_index(drop=True)
    ours = load_logged_model(uri)[0].predict_wire(rows.astype(object).where(rows.notna(), None).to_dict(orient="list"))
    env = {"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri,
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    (tmp_path / "rows.json").write_text(rows.to_json(orient="split", index=False))
    loaded = subprocess.run([str(python), "-c", LOAD, uri, str(tmp_path / "rows.json")], env=env, capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert_same(json.loads(loaded.stdout.strip().splitlines()[-1]), ours)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start([str(python), "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
                    "-p", str(port)], tmp_path / "serve.log", lambda: answers(f"{url}/ping", ok_only=True),
                   "mlflow models serve", env=env, cwd=tmp_path)
    try:
        import urllib.request

        body = json.dumps({"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = pd.DataFrame(json.loads(response.read())["predictions"]).to_dict(orient="list")
        assert_same(served, ours)
    finally:
        stop_group(server)


def assert_same(got: dict[str, list], want: dict[str, list]) -> None:
    assert list(got) == list(want) and got["prediction"] == list(want["prediction"])
    assert got["probability"] == pytest.approx(list(want["probability"]), abs=1e-6)
