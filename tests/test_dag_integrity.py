"""Every DAG file imports cleanly, fast, and without heavy libraries at the top."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import AWS_IMAGE, AWS_ROLE, AZURE_IMAGE, AZURE_SUBSCRIPTION, GCP_IMAGE, GCP_PROJECT

DAGS = sorted((Path(__file__).resolve().parents[1] / "dags").glob("*.py"))
HEAVY = ("torch", "mlflow", "great_expectations", "boto3", "botocore", "google.cloud.storage", "google.cloud.aiplatform", "azure.ai.ml", "azure.storage")

AWS_HOOKS = ("airflow.providers.amazon.aws.hooks.sagemaker", "airflow.providers.amazon.aws.hooks.sqs",
             "airflow.providers.amazon.aws.triggers", "airflow.providers.amazon.aws.operators")

# Each DAG file parsed alone, in a child forked from an interpreter that has imported Airflow and nothing
# else (as the DAG processor does): its parse time and the heavy modules it pulled in. A child that only
# creates an Asset on ``argv[1]`` shows what Airflow itself imports for that URI.
PROBE = """
import json, os, sys, time
import airflow.sdk
from airflow.dag_processing.dagbag import DagBag

def child(job):
    if job.startswith("asset:"):
        airflow.sdk.Asset(name="probe", uri=job[len("asset:"):])
        result = {}
    else:
        start = time.process_time()  # CPU time: what parsing costs the DAG processor, whatever else the machine runs
        bag = DagBag(dag_folder=job)
        result = {"seconds": time.process_time() - start, "errors": {k: str(v) for k, v in bag.import_errors.items()},
                  "dags": sorted(bag.dags)}
    result["heavy"] = sorted({m for m in sys.modules for h in sys.argv[3:] if m == h or m.startswith(h + ".")})
    return result

def forked(job):
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        os.write(write, json.dumps(child(job)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as out:
        result = json.loads(out.read())
    os.wait()
    return result

results = {}
for job in json.loads(sys.argv[1]):
    # the least of several parses: the file's own cost (a busy machine, as under the suite's workers, only adds to it)
    tries = [forked(job) for _ in range(1 if job.startswith("asset:") else int(sys.argv[2]))]
    results[job] = min(tries, key=lambda r: r.get("seconds", 0))
print(json.dumps(results))
"""


def parse_each(jobs: list[str], config: Path | None = None, heavy: tuple[str, ...] = HEAVY, tries: int = 1) -> dict:
    env = {**os.environ, **({"MLFACTORY_CONFIG": str(config)} if config else {})}
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(jobs), str(tries), *heavy], capture_output=True,
                         text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def parsed() -> dict:
    return parse_each([str(p) for p in DAGS], tries=3)


@pytest.mark.parametrize("path", DAGS, ids=[p.name for p in DAGS])
def test_dag_file_imports_fast_without_heavy_libraries(path, parsed):
    result = parsed[str(path)]
    assert result["errors"] == {}
    assert result["dags"] == [path.stem]
    assert result["heavy"] == []
    # ~0.25 s of CPU on a quiet machine, and up to twice that beside a busy core: the bound catches a slow import
    # or slow top-level code (one heavy library alone costs seconds), the check above names the heavy ones
    assert result["seconds"] <= 0.75, f"{path.name} took {result['seconds']:.2f} s of CPU to parse"


CLOUDS = {
    "aws": ({"role_arn": AWS_ROLE, "image_uri": AWS_IMAGE, "sqs_queue_url": "https://sqs/q"}, "s3://parse-only",
            AWS_HOOKS),
    "gcp": ({"project": GCP_PROJECT, "image_uri": GCP_IMAGE, "pubsub_subscription": "landing"}, "gs://parse-only",
            ("airflow.providers.google.cloud.hooks", "airflow.providers.google.cloud.triggers", "google.cloud.pubsub",
             "google.cloud.aiplatform_v1")),
    "azure": ({"subscription_id": AZURE_SUBSCRIPTION, "resource_group": "rg", "workspace": "mlfactory-ws",
               "storage_account": "parseonly", "image_uri": AZURE_IMAGE, "event_queue": "landing-events"},
              "abfs://parse-only", ("azure.ai.ml", "azure.mgmt.monitor", "azure.storage.queue", "azure.identity")),
}


def cloud_config(tmp_path_factory, backend: str) -> Path:
    from mlfactory.config import DEFAULT_CONFIG

    section, bucket, _ = CLOUDS[backend]
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw.update({"backend": backend, backend: section})
    raw["storage"]["bucket"] = bucket
    path = tmp_path_factory.mktemp(f"{backend}-parse") / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def aws_config(tmp_path_factory) -> Path:
    return cloud_config(tmp_path_factory, "aws")


@pytest.fixture(scope="module")
def gcp_config_file(tmp_path_factory) -> Path:
    return cloud_config(tmp_path_factory, "gcp")


@pytest.fixture(scope="module", params=sorted(CLOUDS))
def parsed_on_cloud(request, tmp_path_factory) -> tuple[str, dict]:
    _, bucket, hooks = CLOUDS[request.param]
    config = cloud_config(tmp_path_factory, request.param)
    return bucket, parse_each([f"asset:{bucket}/landing", *map(str, DAGS)], config, (*HEAVY, *hooks))


@pytest.mark.parametrize("path", DAGS, ids=[p.name for p in DAGS])
def test_dag_files_stay_light_on_a_cloud_backend_too(path, parsed_on_cloud):
    """A cloud backend's operators and triggers are built at parse time: their SDK clients and provider hooks
    wait for the tasks. (Airflow's own handling of an s3:// or gs:// Asset URI may import the cloud's
    storage hook: that much is Airflow's, and allowed.)"""
    bucket, parsed = parsed_on_cloud
    airflows_own = set(parsed[f"asset:{bucket}/landing"]["heavy"])
    result = parsed[str(path)]
    assert result["errors"] == {} and result["dags"] == [path.stem]
    assert set(result["heavy"]) - airflows_own == set()


def test_no_dag_names_a_backend_and_nothing_switches_on_one_outside_the_backend_packages():
    from mlfactory.backend_registry import names

    project = DAGS[0].parents[1]
    for path in DAGS:
        source = path.read_text()
        named = [name for name in names() if re.search(rf"\b{name}\b", source)]
        assert not named, f"{path.name} names backend(s) {named}"
    switch = re.compile(r"backend\s*(==|!=|in)\s")
    offending = [f"{path.relative_to(project)}:{n}" for folder in ("dags", "plugins", "include")
                 for path in (project / folder).rglob("*.py") if "backends" not in path.parts
                 for n, line in enumerate(path.read_text().splitlines(), 1) if switch.search(line)]
    assert offending == []


def test_every_dag_has_typed_params_for_the_trigger_form():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS[0].parent))
    assert bag.import_errors == {}
    assert {"ml_ingest", "ml_validate"} <= set(bag.dags)
    for dag in bag.dags.values():
        assert dag.params, f"{dag.dag_id} has no Params"
        for name, param in dag.params.items():
            assert param.schema.get("type"), f"{dag.dag_id}.{name} has no type"
            assert param.description, f"{dag.dag_id}.{name} has no description"


def test_a_time_schedule_first_runs_at_its_next_tick_not_when_the_dag_first_appears(monkeypatch):
    """No run for a tick just past: each DAG first parsed on Sunday 08:00:30, 5 hours after the weekly retraining's
    03:00 tick (within the tenth of its period in which Airflow would otherwise run that tick at once), waits for its
    next tick, as the scheduler computes it."""
    import pendulum
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.encoders import coerce_to_core_timetable
    from airflow.timetables import trigger
    from airflow.timetables.base import TimeRestriction

    monkeypatch.setattr(trigger, "utcnow", lambda: pendulum.datetime(2026, 12, 6, 8, 0, 30, tz="UTC"))
    first = {}
    for dag_id, dag in DagBag(dag_folder=str(DAGS[0].parent)).dags.items():
        timetable = coerce_to_core_timetable(dag.timetable)
        if timetable.periodic:
            info = timetable.next_dagrun_info(last_automated_data_interval=None,
                                              restriction=TimeRestriction(None, None, catchup=False))
            first[dag_id] = info.run_after.isoformat()
    assert first == {"ml_train": "2026-12-13T03:00:00+00:00", "ml_monitor": "2026-12-06T09:00:00+00:00",
                     "ml_batch_score": "2026-12-07T04:00:00+00:00", "ml_ingest": "2026-12-06T08:30:00+00:00",
                     "ml_validate": "2026-12-06T08:30:00+00:00"}


BAD_TRAIN_PARAMS = [
    ("epochs", 0), ("epochs", "ten"), ("learning_rate", 0), ("learning_rate", 2.0), ("batch_size", 4),
    ("hidden_sizes", []), ("hidden_sizes", [0, 64]), ("hidden_sizes", "128,64"), ("processes", 0),
    ("trials", 0), ("search", "hyperband"), ("search_space", {"momentum": [0.9]}), ("search_space", {"model": ["forest"]}),
    ("search_space", {"learning_rate": []}), ("search_space", {"learning_rate": 0.1}), ("model", "forest"),
    ("trees", 0), ("tree_leaves", 1), ("tree_learning_rate", 0), ("search_space", {"numeric_embedding": ["fourier"]}),
]


@pytest.mark.parametrize("name,value", BAD_TRAIN_PARAMS, ids=[f"{n}={v!r}" for n, v in BAD_TRAIN_PARAMS])
def test_ml_train_form_rejects_bad_values(name, value):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import ParamValidationError

    dag = DagBag(dag_folder=str(DAGS[0].parent / "ml_train.py")).dags["ml_train"]
    with pytest.raises(ParamValidationError):
        dag.params.get_param(name).resolve(value)


def test_ml_train_form_defaults_come_from_the_config_and_validate():
    from airflow.dag_processing.dagbag import DagBag

    from mlfactory.config import load_config

    training = load_config().training
    dag = DagBag(dag_folder=str(DAGS[0].parent / "ml_train.py")).dags["ml_train"]
    resolved = dag.params.validate()
    assert resolved["epochs"] == training.epochs and resolved["hidden_sizes"] == training.hidden_sizes
    assert resolved["search_space"] == training.search_space
    assert dag.params.get_param("search_space").resolve({"dropout": [0.0, 0.2], "hidden_sizes": [[32]]})


def test_the_backend_comes_from_the_config_with_the_same_task_ids_on_every_backend(aws_config, gcp_config_file,
                                                                                   tmp_path_factory, monkeypatch):
    """One `train` task mapped per trial in the configured pool, `deploy.stage` ... `deploy.full_traffic`, `score`:
    on local, aws, gcp and azure alike, each the configured backend's own operator; no branch of skipped tasks."""
    from airflow.dag_processing.dagbag import DagBag

    from mlfactory.config import load_config

    built = {}
    for config in (None, aws_config, gcp_config_file, cloud_config(tmp_path_factory, "azure")):
        if config:
            monkeypatch.setenv("MLFACTORY_CONFIG", str(config))
        cfg = load_config()
        bag = DagBag(dag_folder=str(DAGS[0].parent))
        assert bag.import_errors == {}
        train, deploy, batch = (bag.dags[d] for d in ("ml_train", "ml_deploy", "ml_batch_score"))
        assert train.task_ids == ["prepare", "plan", "train", "select_best"]
        assert train.get_task("train").pool == cfg.training.pool
        assert deploy.get_task("deploy.stage").upstream_task_ids == {"resolve"}
        assert batch.task_ids == ["plan", "score"]
        built[cfg.backend.name] = {"train": train.get_task("train").task_type,
                                   "score": batch.get_task("score").task_type}
    assert built == {"local": {"train": "LocalTrainingOperator", "score": "LocalBatchScoreOperator"},
                     "aws": {"train": "SageMakerTrainingOperator", "score": "SageMakerTransformOperator"},
                     "gcp": {"train": "VertexTrainingOperator", "score": "VertexBatchPredictionOperator"},
                     "azure": {"train": "AzureMLTrainingOperator", "score": "AzureMLBatchOperator"}}


@pytest.mark.parametrize("backend", ["local", "aws", "gcp", "azure", "toy"])
def test_ml_deploy_has_the_same_five_rollout_steps_on_every_backend(backend, tmp_path_factory, tmp_path, bucket,
                                                                     monkeypatch):
    """`deploy.stage`, `deploy.health_check`, `deploy.smoke_test`, `deploy.canary`, `deploy.full_traffic`, in this
    order and chained, each the one rollout step operator: on local, aws, gcp, azure and the toy plug-in backend."""
    from types import SimpleNamespace

    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import AirflowFailException

    from mlfactory import backend_registry
    from mlfactory.config import DEFAULT_CONFIG, load_config
    from mlfactory.serving.rollout import STEPS

    if backend == "toy":
        monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent / "backend_plugin"))
        backend_registry._entry_points.cache_clear()
        backend_registry.get.cache_clear()
        raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
        raw.update(backend="toy", toy={"region": "eu-toy-1"})
        (tmp_path / "toy.yaml").write_text(yaml.safe_dump(raw))
        monkeypatch.setenv("MLFACTORY_CONFIG", str(tmp_path / "toy.yaml"))
    elif backend != "local":
        monkeypatch.setenv("MLFACTORY_CONFIG", str(cloud_config(tmp_path_factory, backend)))
    expected = ["resolve", *(f"deploy.{step}" for step in STEPS), "rollback"]
    try:
        assert load_config().backend.name == backend
        deploy = DagBag(dag_folder=str(DAGS[0].parent / "ml_deploy.py")).dags["ml_deploy"]
        assert deploy.task_ids == expected
        for before, step in zip(expected[1:-2], expected[2:-1]):
            assert before in deploy.get_task(step).upstream_task_ids
        assert {deploy.get_task(t).task_type for t in expected[1:-1]} == {"RolloutStepOperator"}
        # `rollback`, the run's only leaf, restores through the backend and then fails: the run ends failed
        assert [t.task_id for t in deploy.leaves] == ["rollback"]
        rollback = deploy.get_task("rollback").python_callable
        monkeypatch.setattr(rollback.__globals__["backend"], "rollback", lambda version: {
            "rolled_back": version, "serving": "1", "reason": f"smoke test of v{version} failed"})
        resolved = SimpleNamespace(xcom_pull=lambda task_ids: {"model": {"version": "2"}})
        with pytest.raises(AirflowFailException, match="v2 rolled back, v1 serves: smoke test of v2 failed"):
            rollback(ti=resolved)
    finally:
        backend_registry._entry_points.cache_clear()
        backend_registry.get.cache_clear()


@pytest.mark.parametrize("approval", [False, True])
def test_ml_promote_asks_a_person_before_the_alias_moves_when_the_config_says_so(tmp_path, monkeypatch, approval):
    import yaml
    from airflow.dag_processing.dagbag import DagBag

    from mlfactory.config import DEFAULT_CONFIG

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["promotion"]["require_approval"] = approval
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MLFACTORY_CONFIG", str(tmp_path / "pipeline.yaml"))
    dag = DagBag(dag_folder=str(DAGS[0].parent / "ml_promote.py")).dags["ml_promote"]
    promote = dag.get_task("promote")
    if approval:
        approve = dag.get_task("approve")
        assert type(approve).__name__ == "ApprovalOperator"
        assert approve.upstream_task_ids == {"gate"} and promote.upstream_task_ids == {"approve", "evaluate"}
    else:
        assert "approve" not in dag.task_ids and promote.upstream_task_ids == {"gate", "evaluate"}


def test_form_fields_that_take_uris_accept_only_the_pipelines_own():
    """A URI in a trigger form names something under the pipeline's bucket (or a model its experiment logged):
    the form refuses anything else before a run starts, and the task refuses it again (``storage.under``)."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import ParamValidationError

    from mlfactory import storage
    from mlfactory.config import load_config

    cfg = load_config()
    dags = DagBag(dag_folder=str(DAGS[0].parent)).dags
    fields = {("ml_ingest", "uri"): cfg.storage.landing_uri, ("ml_validate", "snapshot_uri"): cfg.storage.raw_uri,
              ("ml_batch_score", "input_uri"): cfg.storage.bucket}
    bare = cfg.storage.landing_uri.removeprefix("file://")
    for (dag_id, name), prefix in fields.items():
        param = dags[dag_id].params.get_param(name)
        assert param.resolve(f"{prefix}/some/file.csv") == f"{prefix}/some/file.csv"
        assert param.resolve(None) is None
        for bad in (f"{prefix}/../../etc/passwd", f"{prefix}/./x", f"{prefix}x/y", "s3://someone-elses/x", "/etc/passwd",
                    f"{prefix}/"):
            with pytest.raises(ParamValidationError):
                param.resolve(bad)
            with pytest.raises(ValueError, match=r"must name something under .*no '\.' or '\.\.' segments"):
                storage.under(bad, prefix, name)
    assert storage.under(f"{bare}/a.csv", cfg.storage.landing_uri, "uri") == f"{cfg.storage.landing_uri}/a.csv"
    promote = dags["ml_promote"].params.get_param("model_uri")
    for good in ("models:/m-" + "a" * 32, "runs:/" + "0" * 32 + "/model"):
        assert promote.resolve(good) == good
    for bad in ("models:/customer_churn/1", "file:///tmp/evil", "runs:/abc/model", "s3://bucket/model",
                "runs:/" + "0" * 32 + "/../x" + "\n", "models:/m-" + "a" * 32 + "/x"):
        with pytest.raises(ParamValidationError):
            promote.resolve(bad)
