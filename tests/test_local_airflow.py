"""LocalAirflow, the harness of `make run` and the end-to-end tests: what it leaves behind when a start fails."""

from __future__ import annotations

import psutil
import pytest

from mlfactory.backends.local.local_airflow import LocalAirflow
from mlfactory.backends.local.processes import free_port

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


def test_any_bind_but_loopback_requires_a_login_and_secrets_stay_private(tmp_path):
    """`make run` on 127.0.0.1 may go without a login; on any other interface (MLFACTORY_HOST, or an override of
    AIRFLOW__API__HOST) every process requires one. The JWT secret and the passwords are the owner's alone."""
    import stat

    from mlfactory.backends.local.local_airflow import LocalAirflow

    local = LocalAirflow(tmp_path / "a").env()
    assert local["AIRFLOW__API__HOST"] == "127.0.0.1" and local["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "True"
    for airflow in (LocalAirflow(tmp_path / "b", host="0.0.0.0"), LocalAirflow(tmp_path / "c", host="192.0.2.7"),
                    LocalAirflow(tmp_path / "d", host="airflow.example.com"),
                    LocalAirflow(tmp_path / "e", env_overrides={"AIRFLOW__API__HOST": "::"})):
        env = airflow.env()
        assert airflow.login and env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "False", airflow.host
        assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == "admin:admin"
        assert len(airflow.admin_password) >= 16
        for name in ("jwt_secret", "passwords.json", "airflow.cfg"):
            assert stat.S_IMODE((airflow.home / name).stat().st_mode) == 0o600, name
    assert LocalAirflow(tmp_path / "f", host="::1").login is False
    # a secret file opened up since (a copy, an editor) is closed again on the next start
    secret = tmp_path / "a" / "jwt_secret"
    secret.chmod(0o644)
    LocalAirflow(tmp_path / "a").env()
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
