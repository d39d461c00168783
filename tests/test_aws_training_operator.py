"""The aws training operator against moto's server over HTTP, playing the container's part: when
moto reports the job Completed (at once, with no artifact), the training entrypoint runs here with
SageMaker's environment (SM_CHANNEL_TRAIN, SM_MODEL_DIR, SM_HOSTS) and its SM_MODEL_DIR is uploaded
as the job's model.tar.gz. Calls moto does not implement (StopTrainingJob) or states it cannot
reach (Failed) go through botocore's Stubber, which validates requests and responses against the
service model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from cloud_copies import copy_tree, training_job_spec
from task_runs import context
from conftest import aws_config_on_moto, play_sagemaker_training_job

BUCKET = "mlfactory-data"


@pytest.fixture
def aws_env(moto_server, training_set, tmp_path, monkeypatch):
    """Config with backend aws on moto; the training set uploaded where ml_train would put it."""
    import boto3

    aws_config_on_moto(moto_server, BUCKET, tmp_path / "pipeline.yaml", monkeypatch, budget_usd=20)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)  # the storage layer (s3fs) on moto too
    copy_tree(Path(training_set.uri.removeprefix("file://")), f"s3://{BUCKET}/models/training_sets/ts1")
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    sagemaker = boto3.client("sagemaker", endpoint_url=moto_server, region_name="us-east-1")
    return SimpleNamespace(s3=s3, sagemaker=sagemaker)


def job_spec(**changes) -> dict:
    return training_job_spec(f"s3://{BUCKET}", **{
        "checkpoint_uri": f"s3://{BUCKET}/models/checkpoints/run-1/trial-0",
        "hyperparameters": {"epochs": 1, "learning_rate": 0.003, "batch_size": 512, "hidden_sizes": [32]}, **changes})


def test_the_job_is_created_deferred_and_its_model_collected(aws_env, training_set, tmp_path):
    from airflow.exceptions import TaskDeferred

    from mlfactory_airflow.backends.aws.operators import SageMakerTrainingOperator
    from mlfactory_airflow.backends.aws.sagemaker_triggers import SageMakerTrainingJobTrigger

    operator = SageMakerTrainingOperator(task_id="train", spec=job_spec(), waiter_delay=1)
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context(1))
    trigger, kwargs = deferred.value.trigger, deferred.value.kwargs
    assert isinstance(trigger, SageMakerTrainingJobTrigger) and kwargs == {"job_name": "run-1-t0"}
    assert deferred.value.method_name == "execute_complete"
    classpath, fields = trigger.serialize()
    assert classpath == "mlfactory_airflow.backends.aws.sagemaker_triggers.SageMakerTrainingJobTrigger"
    assert SageMakerTrainingJobTrigger(**fields).job_name == "run-1-t0"  # what the triggerer rebuilds

    job = aws_env.sagemaker.describe_training_job(TrainingJobName="run-1-t0")
    assert job["ResourceConfig"]["InstanceType"] == "ml.m5.xlarge" and job["EnableManagedSpotTraining"] is True
    assert job["CheckpointConfig"]["S3Uri"] == f"s3://{BUCKET}/models/checkpoints/run-1/trial-0"

    async def wait():  # the provider's waiter, through the trigger, over HTTP
        return [event async for event in trigger.run()]

    (event,) = asyncio.run(wait())
    assert event.payload["status"] == "success"

    # moto completes the job before any container ran: the task says so, and a retry looks again
    with pytest.raises(FileNotFoundError, match="run-1-t0 completed, but its model artifact s3://.*model.tar.gz is not in S3"):
        SageMakerTrainingOperator(task_id="train", spec=job_spec()).execute_complete({}, event.payload, **kwargs)
    play_sagemaker_training_job(aws_env.s3, job, tmp_path)
    result = SageMakerTrainingOperator(task_id="train", spec=job_spec()).execute_complete(
        {}, event.payload, job_name=kwargs["job_name"])
    assert result["metric"] == "val_roc_auc" and 0.5 < result["value"] <= 1
    assert result["model_bundle_uri"] == f"s3://{BUCKET}/models/runs/run-1/trial-0/model.pt"
    assert result["sagemaker_job"] == "run-1-t0" and result["epochs"] == 1
    stored = aws_env.s3.get_object(Bucket=BUCKET, Key="models/runs/run-1/trial-0/metrics.json")["Body"].read()
    assert json.loads(stored)["model_bundle_uri"] == result["model_bundle_uri"]
    assert aws_env.s3.head_object(Bucket=BUCKET, Key="models/runs/run-1/trial-0/model.pt")["ContentLength"] > 1000
    import io

    import numpy as np

    validation = aws_env.s3.get_object(Bucket=BUCKET, Key="models/runs/run-1/trial-0/validation.npz")["Body"].read()
    assert len(np.load(io.BytesIO(validation))["scores"]) == round(training_set.rows * 0.15)  # for ml_train's blend

    # a retried task finds its completed job and takes its result, creating nothing
    retry = SageMakerTrainingOperator(task_id="train", spec=job_spec())
    with pytest.raises(TaskDeferred) as deferred:
        retry.execute(context(2))
    assert deferred.value.kwargs == {"job_name": "run-1-t0"}
    again = retry.execute_complete({}, {"status": "success"}, **deferred.value.kwargs)
    assert again["value"] == result["value"]
    assert [j["TrainingJobName"] for j in aws_env.sagemaker.list_training_jobs()["TrainingJobSummaries"]] == ["run-1-t0"]


def first_try_on_moto(aws_env, name: str):
    """The operator's first try, creating job ``name`` on moto: (the operator, moto's DescribeTrainingJob
    answer as a starting point for the states moto cannot reach)."""
    from airflow.exceptions import TaskDeferred

    from mlfactory_airflow.backends.aws.operators import SageMakerTrainingOperator

    operator = SageMakerTrainingOperator(task_id="train", spec=job_spec(name=name))
    with pytest.raises(TaskDeferred):
        operator.execute(context(1))
    described = aws_env.sagemaker.describe_training_job(TrainingJobName=name)
    described.pop("ResponseMetadata")
    return operator, described


def absent(stub, name: str) -> None:
    """SageMaker's answer to DescribeTrainingJob for a job that does not exist."""
    stub.add_client_error("describe_training_job", "ValidationException", "Requested resource not found.", 400,
                          expected_params={"TrainingJobName": name})


def test_a_failed_job_fails_the_task_with_sagemakers_reason(aws_env):
    from airflow.exceptions import AirflowException
    from botocore.stub import Stubber

    operator, described = first_try_on_moto(aws_env, "run-2-t0")
    failed = {**described, "TrainingJobStatus": "Failed", "SecondaryStatus": "Failed",
              "FailureReason": "AlgorithmError: CUDA out of memory (exit code 1)"}
    with Stubber(operator.hook.conn) as stub:  # moto cannot fail a job; the Stubber checks this answer's shape
        stub.add_response("describe_training_job", failed, {"TrainingJobName": "run-2-t0"})
        with pytest.raises(AirflowException, match="run-2-t0 failed: AlgorithmError: CUDA out of memory"):
            operator.execute_complete({}, {"status": "failed", "message": "waiter"}, job_name="run-2-t0")


def test_a_retry_after_a_failed_job_starts_a_new_one_on_the_same_checkpoints(aws_env):
    from airflow.exceptions import TaskDeferred
    from botocore.stub import Stubber

    from mlfactory.backends.aws.sagemaker import create_training_job_request
    from mlfactory.specs import TrainingJobSpec
    from mlfactory_airflow.backends.aws.operators import SageMakerTrainingOperator

    _, described = first_try_on_moto(aws_env, "run-3-t0")
    retry = SageMakerTrainingOperator(task_id="train", spec=job_spec(name="run-3-t0"))
    with Stubber(retry.hook.conn) as stub:
        absent(stub, "run-3-t0-a2")
        stub.add_response("describe_training_job", {**described, "TrainingJobStatus": "Stopped", "SecondaryStatus": "Stopped"},
                          {"TrainingJobName": "run-3-t0"})
        expected = {**create_training_job_request(TrainingJobSpec(**job_spec(name="run-3-t0")), retry.settings),
                    "TrainingJobName": "run-3-t0-a2"}  # same checkpoints, new name
        stub.add_response("create_training_job", {"TrainingJobArn": described["TrainingJobArn"] + "-a2"}, expected)
        with pytest.raises(TaskDeferred) as deferred:
            retry.execute(context(2))
    assert deferred.value.kwargs == {"job_name": "run-3-t0-a2"}

    # a third try while -a2 still runs takes -a2 over: the latest earlier job counts, nothing is created
    third = SageMakerTrainingOperator(task_id="train", spec=job_spec(name="run-3-t0"))
    with Stubber(third.hook.conn) as stub:
        absent(stub, "run-3-t0-a3")
        stub.add_response("describe_training_job", {**described, "TrainingJobName": "run-3-t0-a2",
                                                    "TrainingJobStatus": "InProgress", "SecondaryStatus": "Training"},
                          {"TrainingJobName": "run-3-t0-a2"})
        with pytest.raises(TaskDeferred) as deferred:
            third.execute(context(3))
        stub.assert_no_pending_responses()
    assert deferred.value.kwargs == {"job_name": "run-3-t0-a2"}


def test_killing_the_task_stops_the_job(aws_env):
    from botocore.stub import Stubber

    from mlfactory_airflow.backends.aws.sagemaker_triggers import SageMakerTrainingJobTrigger

    trigger = SageMakerTrainingJobTrigger(job_name="run-4-t0", aws_conn_id="moto", region_name="us-east-1")
    hook = trigger.hook()
    trigger.hook = lambda: hook
    with Stubber(hook.conn) as stub:  # moto answers StopTrainingJob with HTTP 500: the Stubber checks the request
        stub.add_response("stop_training_job", {}, {"TrainingJobName": "run-4-t0"})
        asyncio.run(trigger.on_kill())
        stub.assert_no_pending_responses()


def test_the_cost_guard_refuses_before_anything_is_created(aws_env):
    from airflow.sdk.exceptions import AirflowFailException

    from mlfactory_airflow.backends.aws.operators import SageMakerTrainingOperator

    spec = job_spec(name="run-5-t0", nodes=2, accelerator={"kind": "gpu", "model": "nvidia-a10g", "count": 8})
    with pytest.raises(AirflowFailException, match=r"up to \$20\.36 .*above aws.budget_usd \$20\.00"):
        SageMakerTrainingOperator(task_id="train", spec=spec).execute(context(1))
    assert aws_env.sagemaker.list_training_jobs()["TrainingJobSummaries"] == []
