"""Shared fixtures. Every test session gets its own AIRFLOW_HOME and every test its own bucket."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="mlfactory-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_SESSION_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(Path(__file__).resolve().parents[1] / "dags")
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_SESSION_HOME / 'airflow.db'}"
os.environ["GX_ANALYTICS_ENABLED"] = "False"
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.pop("MLFACTORY_CONFIG", None)


@pytest.fixture
def bucket(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "bucket"
    monkeypatch.setenv("MLFACTORY_BUCKET", str(path))
    return path


@pytest.fixture
def cfg(bucket):
    from mlfactory.config import load_config

    return load_config()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking/registry server for the whole session (SQLite, artifacts on disk)."""
    from mlfactory.mlflow_server import LocalMlflow
    from mlfactory.processes import free_port

    home = tmp_path_factory.mktemp("mlflow")
    server = LocalMlflow(home, (home / "artifacts").as_uri(), port=free_port())
    server.start()
    yield server
    server.stop()


def with_section(cfg, section: str, **changes):
    """``cfg`` with some settings of one section changed (the models are frozen)."""
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=changes)})


def config_with_bucket(bucket: Path):
    """The sample config on its own bucket, for fixtures wider than one test (no monkeypatch there)."""
    from mlfactory.config import load_config

    os.environ["MLFACTORY_BUCKET"] = str(bucket)
    try:
        return load_config()
    finally:
        os.environ.pop("MLFACTORY_BUCKET", None)


@pytest.fixture(scope="session")
def training_set(tmp_path_factory):
    """30k curated sample rows minus the frozen holdout, as the training set folder ml_train builds."""
    from mlfactory import sample_data
    from mlfactory.training_data import prepare_training_set

    cfg = config_with_bucket(tmp_path_factory.mktemp("train-bucket"))
    sample_data.land_and_curate(cfg, 30_000)
    return prepare_training_set(cfg)
