"""LocalAirflow, the harness of `make run` and the end-to-end tests: what it leaves behind when a start fails."""

from __future__ import annotations

import psutil
import pytest

from mlfactory.local_airflow import LocalAirflow
from mlfactory.processes import free_port

pytestmark = pytest.mark.scheduler


def test_a_component_that_dies_at_start_takes_the_others_down(tmp_path, airflow_db_template):
    home = tmp_path / "airflow"
    airflow = LocalAirflow(home, api_port=free_port(), db_template=airflow_db_template,
                           env_overrides={"AIRFLOW__API__PORT": "not-a-port"})  # the API server refuses it and exits
    with pytest.raises(RuntimeError, match="airflow api-server exited"):
        airflow.start()
    assert airflow.processes == {}
    # no scheduler, DAG processor or triggerer (nor their workers) running on: the ones killed last may take
    # a moment to be reaped
    ours = [p for p in psutil.process_iter(["cwd"]) if p.info["cwd"] == str(home)]
    _, alive = psutil.wait_procs(ours, timeout=15)
    assert [(p.pid, p.status()) for p in alive] == []
    for secret in ("airflow.cfg", "jwt_secret"):  # the Fernet key and the JWT secret: the owner's alone
        assert (home / secret).stat().st_mode & 0o777 == 0o600
