"""docker-compose.yaml, the Dockerfiles and .env, checked without a Docker engine: rendered by a real compose
implementation (Debian's docker-compose 1.29, `config`), then held to what the docs say about them
(docs/operations.md, "docker-compose")."""

from __future__ import annotations

import os
import sys
import re
import shutil
import subprocess

import pytest
import yaml
from conftest import mlflow_search_status

from mlfactory.config import TRAINING_QUEUE_ENV, load_config
from mlfactory.backends.local.local_airflow import PROJECT

OPERATIONS = (PROJECT / "docs" / "operations.md").read_text()  # the docs page of the compose stack
AIRFLOW_SERVICES = {"airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-worker", "airflow-worker-gpu"}
SECRETS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "AIRFLOW_ADMIN_PASSWORD",
           "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY", "MLFACTORY_SERVING_TOKEN")


def compose_config(env_file=None, extra_env=None) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is not installed: `make test` installs Debian's docker-compose (docs/getting-started.md)"
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}  # only what the env file says
    env.update(extra_env or {})
    args = [binary, "--project-directory", str(PROJECT), "-f", str(PROJECT / "docker-compose.yaml")]
    if env_file:
        args += ["--env-file", str(env_file)]
    return subprocess.run([*args, "config"], capture_output=True, text=True, env=env, cwd=PROJECT)


@pytest.fixture(scope="module")
def env_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("compose") / ".env"
    subprocess.run(["python3", str(PROJECT / "docker" / "compose_env.py"), "--example", str(PROJECT / ".env.example"),
                    "--out", str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def rendered(env_file) -> dict:
    proc = compose_config(env_file)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def published_port(entry) -> tuple[str, str]:
    """(host address, published port) of a rendered `ports` entry: `127.0.0.1:8080:8080/tcp` (compose 1.29)."""
    host, published, _ = entry.rsplit(":", 2)
    return host, published


def documented_services() -> dict[str, str]:
    """The docs' table of the compose services (docs/operations.md): name -> published port ('' for none)."""
    section = OPERATIONS.split("\n## docker-compose\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| ([^|]*) \|", section, flags=re.M)
    return {name: port.strip().strip("`") for name, port in rows}


def test_env_file_generates_every_secret_and_none_is_committed(env_file):
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line and not line.startswith("#"))
    assert all(len(values[name]) >= 16 for name in SECRETS)
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    example = dict(line.split("=", 1) for line in (PROJECT / ".env.example").read_text().splitlines()
                   if "=" in line and not line.startswith("#"))
    assert all(example[name] == "" for name in SECRETS)  # the example holds no secret
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=PROJECT, check=True).stdout.split()
    assert ".env" not in tracked and ".env" in (PROJECT / ".gitignore").read_text().split()
    # a second run keeps the secrets in use (the database volume was initialised with them)
    before = env_file.read_text()
    subprocess.run(["python3", str(PROJECT / "docker" / "compose_env.py"), "--out", str(env_file)], check=True,
                   capture_output=True, cwd=PROJECT)
    assert env_file.read_text() == before


def test_without_env_compose_refuses_naming_the_missing_secret(tmp_path):
    empty = tmp_path / ".env"
    empty.write_text("")
    proc = compose_config(empty)
    assert proc.returncode != 0
    assert re.search(r"(POSTGRES_PASSWORD|REDIS_PASSWORD|AIRFLOW_FERNET_KEY|AIRFLOW_JWT_SECRET|MLFACTORY_SERVING_TOKEN|"
                     r"AIRFLOW_ADMIN_PASSWORD).*set in \.env", proc.stderr), proc.stderr


def test_the_services_volumes_and_networks_are_the_documented_ones(rendered):
    services = rendered["services"]
    documented = documented_services()
    assert set(services) == set(documented), "docs/operations.md's compose table and docker-compose.yaml differ"
    for name, port in documented.items():
        published = [published_port(p) for p in services[name].get("ports", [])]
        assert [p for _, p in published] == ([port] if port else []), (name, published)
        assert all(host == "127.0.0.1" for host, _ in published), (name, published)  # loopback unless asked
    assert set(rendered["volumes"]) == {"postgres-db", "mlflow-auth", "airflow-logs", "airflow-config", "bucket"}
    for name, service in services.items():
        assert set(service["networks"]) == {"mlfactory"}, name
        if name != "airflow-init":
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
            assert service.get("restart") == "always", name
    # nothing of ours runs as root (MLflow and the model server did): each runs as $AIRFLOW_UID (50000 unless .env
    # says), but airflow-init, which hands the volumes to that user; PostgreSQL's and Redis's images drop root themselves
    declared = yaml.safe_load((PROJECT / "docker-compose.yaml").read_text())["services"]
    ours = {name for name, service in declared.items() if "mlfactory" in str(service.get("image", ""))}
    assert {"mlflow", "model-server", "airflow-scheduler"} <= ours
    assert {name: declared[name].get("user") for name in ours - {"airflow-init"}} == dict.fromkeys(
        ours - {"airflow-init"}, "${AIRFLOW_UID:-50000}:0")
    assert services["mlflow"]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"



def test_mlflow_asks_for_a_login_that_the_pipelines_services_carry(rendered, tmp_path):
    """compose's mlflow command, run for real (its PostgreSQL store swapped for SQLite, its port for a free one):
    every request but /health needs a login, and the services that use MLflow log in as its admin."""
    from mlfactory.backends.local.processes import free_port, start, stop_group

    services = rendered["services"]
    mlflow = services["mlflow"]
    port = free_port()
    args = list(mlflow["command"])
    for flag, value in (("--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db"), ("--artifacts-destination",
                        str(tmp_path / "artifacts")), ("--host", "127.0.0.1"), ("--port", str(port)),
                        ("--allowed-hosts", f"127.0.0.1:{port}")):
        args[args.index(flag) + 1] = value
    assert args[:3] == ["python", "-m", "mlflow"] and args[args.index("--app-name") + 1] == "basic-auth"
    password = mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"]
    for name in ("airflow-scheduler", "airflow-worker", "airflow-worker-gpu", "model-server"):
        env = services[name]["environment"]
        assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == ("admin", password), name
    url = f"http://127.0.0.1:{port}"
    server = start([sys.executable, *args[1:]], tmp_path / "mlflow.log", f"{url}/health", "mlflow",
                   env={**os.environ, **mlflow["environment"]}, cwd=tmp_path)
    try:
        assert [mlflow_search_status(url, login) for login in (None, "admin:wrong-password", f"admin:{password}")] == [
            401, 401, 200]
    finally:
        stop_group(server)

def test_every_airflow_process_shares_the_executor_secrets_and_execution_api(rendered):
    services = rendered["services"]
    envs = {name: services[name]["environment"] for name in AIRFLOW_SERVICES}
    shared = ("AIRFLOW__CORE__EXECUTOR", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY",
              "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
              "AIRFLOW__CORE__AUTH_MANAGER", "MLFLOW_TRACKING_URI", TRAINING_QUEUE_ENV)
    for key in shared:
        values = {name: env.get(key) for name, env in envs.items()}
        assert len(set(values.values())) == 1 and None not in values.values(), (key, values)
    some = envs["airflow-scheduler"]
    assert some["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert some["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert some["AIRFLOW__CORE__AUTH_MANAGER"].endswith("SimpleAuthManager")  # a login, not all-admins
    assert "SIMPLE_AUTH_MANAGER_ALL_ADMINS" not in " ".join(some)
    assert some[TRAINING_QUEUE_ENV] == "gpu"
    assert rendered["services"]["airflow-init"]["environment"]["_AIRFLOW_DB_MIGRATE"] == "true"


def test_training_goes_to_the_gpu_worker_which_reserves_the_gpus(rendered, monkeypatch):
    services = rendered["services"]
    assert re.search(r"--queues default\b", services["airflow-worker"]["command"])
    gpu = services["airflow-worker-gpu"]
    assert re.search(r"--queues gpu\b", gpu["command"])
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "cu" in gpu["build"]["args"]["TORCH_INDEX"]  # the CUDA build of torch
    # the pipeline config, read with the containers' environment, routes training to that queue and deploys
    # into the model-server service
    env = services["airflow-scheduler"]["environment"]
    patched = {k: env[k] for k in ("MLFACTORY_BACKEND", "MLFACTORY_BUCKET", "MLFLOW_TRACKING_URI", "MLFACTORY_ENDPOINT_URL",
                                   "MLFACTORY_ENDPOINT_ADMIN_URL", "MLFACTORY_SERVING_ADMIN_TOKEN", TRAINING_QUEUE_ENV)}
    for name, value in patched.items():
        monkeypatch.setenv(name, value)
    cfg = load_config(PROJECT / "include" / "pipeline.yaml")
    assert cfg.training.queue == "gpu" and cfg.backend.endpoint_url == "http://model-server:8080"
    assert cfg.mlflow.tracking_uri == "http://mlflow:5000" and cfg.storage.bucket.endswith("/opt/mlfactory/bucket")
    # Airflow holds the admin credential only; the server's admin API listens on a port that is never published
    # and loads only the pipeline's registered model
    server = services["model-server"]
    assert "MLFACTORY_SERVING_TOKEN" not in env and cfg.backend.admin_url == "http://model-server:8081"
    assert server["environment"]["MLFACTORY_SERVING_ADMIN_TOKEN"] == env["MLFACTORY_SERVING_ADMIN_TOKEN"] == cfg.backend.admin_token
    assert server["environment"]["MLFACTORY_SERVING_TOKEN"] != cfg.backend.admin_token
    command = server["command"]
    assert command[command.index("--admin-port") + 1] == "8081" and command[command.index("--port") + 1] == "8080"
    assert all(not port.endswith(":8081") for port in server["ports"])
    assert server["environment"]["MLFACTORY_SERVING_ALLOWED_MODEL"] == cfg.model_name


def test_the_images_install_the_lock_and_run_the_cloud_entrypoints():
    lock = (PROJECT / "requirements.txt").read_text()
    airflow_version = re.search(r"^apache-airflow==(\S+)", lock, flags=re.M).group(1)
    airflow_image = (PROJECT / "Dockerfile").read_text()
    assert f"FROM apache/airflow:{airflow_version}-python3.11" in airflow_image
    runtime = (PROJECT / "docker" / "runtime.Dockerfile").read_text()
    assert "FROM python:3.11" in runtime
    for text in (airflow_image, runtime):
        assert "-r /opt/mlfactory/requirements.txt" in text and "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    # the entrypoint: `serve` is the model server (SageMaker's convention), anything else runs as given
    entrypoint = PROJECT / "docker" / "entrypoint.sh"
    env = {**os.environ, "PATH": f"{PROJECT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    serve = subprocess.run(["sh", str(entrypoint), "serve", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert serve.returncode == 0 and "The mlfactory model server" in serve.stdout
    train = subprocess.run(["sh", str(entrypoint), "python", "-m", "mlfactory.training.train", "--help"], capture_output=True,
                           text=True, env=env, timeout=120)
    assert train.returncode == 0 and "--checkpoint-uri" in train.stdout
