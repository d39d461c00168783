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


def with_validation(cfg, **changes):
    """``cfg`` with some ``validation`` settings changed (the models are frozen)."""
    return cfg.model_copy(update={"validation": cfg.validation.model_copy(update=changes)})
