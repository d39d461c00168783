"""The aws batch operator against moto's server over HTTP (SageMaker Model, transform jobs) and a real
MLflow registry. ml_deploy's aws rollout is in test_aws_rollout.py."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from task_runs import context
import yaml
from conftest import aws_config_on_moto

BUCKET = "mlfactory-serving"


@pytest.fixture
def aws_cfg(moto_server, champion, tmp_path, monkeypatch):
    """backend aws on moto, with the `champion` fixture's MLflow registry (model versions 1 and 2)."""
    import boto3

    from mlfactory.config import load_config
    from mlfactory.registry import CHAMPION, Registry

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)  # the storage layer (s3fs) on moto too
    served = champion[0]
    path = tmp_path / "pipeline.yaml"
    raw = aws_config_on_moto(moto_server, BUCKET, path, monkeypatch, serving={
        "endpoint_name": "churn", "rollback_alarms": ["churn-5xx"], "canary_wait_s": 120, "max_replicas": 3})
    raw["mlflow"] = served.mlflow.model_dump()
    path.write_text(yaml.safe_dump(raw))
    registry = Registry(served)
    registry.client.set_registered_model_alias(served.model_name, CHAMPION, "1")
    if registry.alias_version("second") is None:
        first = registry.client.get_model_version(served.model_name, "1")
        second = registry.register(first.source, first.run_id, {})
        registry.client.set_registered_model_alias(served.model_name, "second", second)
    cfg = load_config()
    return SimpleNamespace(cfg=cfg, registry=registry, second=registry.alias_version("second"),
                           sagemaker=boto3.client("sagemaker", endpoint_url=moto_server, region_name="us-east-1"),
                           scaling=boto3.client("application-autoscaling", endpoint_url=moto_server, region_name="us-east-1"))


def run_trigger(trigger) -> dict:
    async def wait():
        return [event async for event in trigger.run()]

    (event,) = asyncio.run(wait())
    return event.payload


MODEL = "churn-served-v1"  # the SageMaker Model of version 1 of registered model churn_served


def write_curated(cfg, snapshot: str, rows: pa.Table) -> str:
    from mlfactory import storage

    uri = storage.join(cfg.storage.curated_uri, "ingest_date=2026-11-22", f"snapshot={snapshot}", "part-0.parquet")
    with storage.atomic_write(uri) as f:
        pq.write_table(rows, f)
    return uri


def test_batch_transform_scores_the_unscored_snapshots_through_a_manifest(aws_cfg, champion):
    from airflow.exceptions import TaskDeferred

    from mlfactory import NothingToDo, storage
    from mlfactory.serving.batch import plan
    from mlfactory_airflow.backends.aws.operators import SageMakerTransformOperator

    rows = pa.Table.from_pandas(champion[2].head(50), preserve_index=False)
    files = [write_curated(aws_cfg.cfg, sid, rows) for sid in ("aaaa", "bbbb")]
    run_id = "scheduled__2026-11-22T04:00:00+00:00"
    task = {"run_id": run_id, **context()}
    spec = plan(aws_cfg.cfg, run_id, "1")  # ml_batch_score's `plan`: the snapshots not scored yet
    assert spec.snapshots == ["aaaa", "bbbb"] and spec.output_uri.endswith("/predictions/batch/run=scheduled__2026-11-22T04-00-00-00-00")
    operator = SageMakerTransformOperator(task_id="score", spec=spec.model_dump(), waiter_delay=1)
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(task)
    kwargs = deferred.value.kwargs
    job = aws_cfg.sagemaker.describe_transform_job(TransformJobName=kwargs["job"])
    source = job["TransformInput"]["DataSource"]["S3DataSource"]
    assert source["S3DataType"] == "ManifestFile" and job["TransformInput"]["ContentType"] == "application/vnd.apache.parquet"
    assert job["TransformOutput"]["S3OutputPath"] == spec.output_uri and job["ModelName"] == MODEL
    manifest = json.loads(storage.read_bytes(source["S3Uri"]))
    assert [manifest[0]["prefix"] + key for key in manifest[1:]] == files

    region = aws_cfg.cfg.backend.region  # the task's button to the job in the SageMaker console
    assert task["ti"].xcoms["_link_JobConsoleLink"] == (
        f"https://{region}.console.aws.amazon.com/sagemaker/home?region={region}#/transform-jobs/{kwargs['job']}")
    result = operator.execute_complete(task, run_trigger(deferred.value.trigger), **kwargs)
    assert result["version"] == "1" and result["snapshots"] == ["aaaa", "bbbb"] and result["uri"] == spec.output_uri
    with pytest.raises(NothingToDo, match="scored already"):  # the next run has nothing new
        plan(aws_cfg.cfg, "scheduled__2026-11-23T04:00:00+00:00", "1")
