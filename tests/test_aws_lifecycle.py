"""The lifecycle with `backend: aws` under a REAL Airflow 3 (scheduler, DAG processor, triggerer, API
server), a real MLflow server keeping its artifacts in S3, and moto's server over HTTP for S3, SQS,
S3 -> SQS notifications, SageMaker and Application Auto Scaling.

An object put in the bucket must reach SQS as a notification, start ml_ingest through the
AssetWatcher, then ml_validate, ml_train (a SageMaker training job), ml_promote, ml_deploy (a
SageMaker endpoint with autoscaling) and ml_batch_score (a batch transform job), by themselves. Then, on
the same Airflow, a burst of 50 objects announced in one SQS message is ingested and curated once each.

moto completes a training job the moment it is created and runs nothing, so the test plays the
container's part: a thread watches moto's jobs and, for each one, runs the training entrypoint with
SageMaker's environment and uploads its model.tar.gz to the job's output path. The operator's first
try finds no artifact yet and says so; Airflow retries the task, and the retry takes the completed
job over and collects its model.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
import yaml
from aws_iam import ACCOUNT, REGION, Call, Recording, policy, refused
from conftest import aws_config_on_moto, play_sagemaker_training_job
from intake_bursts import Burst, burst_files, intake_only
from sagemaker_runtime import SageMakerRuntime

from mlfactory import storage

from mlfactory.data import sample_data
from mlfactory.config import load_config
from mlfactory.backends.local.local_airflow import LocalAirflow
from mlfactory.backends.local.mlflow_server import LocalMlflow
from mlfactory.backends.local.processes import free_port

pytestmark = pytest.mark.scheduler

BUCKET = "mlfactory-lifecycle"
STAGES = ["ml_ingest", "ml_validate", "ml_train", "ml_promote", "ml_deploy", "ml_batch_score"]
AIRFLOW_KEY = "AKIDAIRFLOWTASKS0001"  # what Airflow's processes sign with: their requests in moto's recording


class SageMakerCompute(threading.Thread):
    """Plays the container of every training job moto reports, once each."""

    def __init__(self, endpoint: str, workdir: Path, environment: dict):
        super().__init__(daemon=True)
        self.environment = environment  # the job's Environment (moto's DescribeTrainingJob drops it)
        self.sagemaker = boto3.client("sagemaker", endpoint_url=endpoint, region_name="us-east-1")
        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self.workdir, self.played, self.errors = workdir, [], []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(1):
            for summary in self.sagemaker.list_training_jobs()["TrainingJobSummaries"]:
                name = summary["TrainingJobName"]
                if name in self.played:
                    continue
                self.played.append(name)
                try:
                    job = self.sagemaker.describe_training_job(TrainingJobName=name)
                    play_sagemaker_training_job(self.s3, job, self.workdir / name, self.environment)
                except Exception as err:  # noqa: BLE001 - reported by the test
                    self.errors.append(f"{name}: {err}")


def test_an_object_put_in_s3_runs_the_lifecycle_on_sagemaker(tmp_path, moto_server, monkeypatch, airflow_db_template):
    from mlflow import MlflowClient

    from mlfactory.serving.deployment import read_endpoint_state
    from mlfactory.registry import CHAMPION, Registry

    path = tmp_path / "pipeline.yaml"
    # the endpoint's containers (ml_deploy's smoke test invokes it): the model server on the version's files in S3
    runtime = SageMakerRuntime(moto_server, tmp_path / "endpoint", environment={
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_server, "MLFLOW_S3_ENDPOINT_URL": moto_server})
    raw = aws_config_on_moto(moto_server, BUCKET, path, monkeypatch, conn_id="aws_default",
                             serving={"endpoint_name": "churn-lifecycle"}, access_key=AIRFLOW_KEY,
                             runtime_url=runtime.url, budget_usd=50, poll_interval_s=2)
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    sqs = boto3.client("sqs", endpoint_url=moto_server, region_name="us-east-1")
    queue = sqs.create_queue(QueueName="mlfactory-landing")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(Bucket=BUCKET, NotificationConfiguration={"QueueConfigurations": [{
        "QueueArn": arn, "Events": ["s3:ObjectCreated:*"],
        "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "landing/"}]}}}]})

    # The MLflow server keeps run artifacts and registered models in the bucket (S3).
    for name, value in {"AWS_ENDPOINT_URL": moto_server, "MLFLOW_S3_ENDPOINT_URL": moto_server}.items():
        monkeypatch.setenv(name, value)
    mlflow_server = LocalMlflow(tmp_path / "mlflow", f"s3://{BUCKET}/mlflow", port=free_port()).launch()

    raw["aws"]["sqs_queue_url"] = queue
    # the first tries of `train` find moto's job completed with no model yet (see the docstring)
    raw["training"].update(epochs=2, trials=1, processes=1, search_space={}, retries=10)
    raw["promotion"].update(floor=0.6)
    raw["mlflow"].update(tracking_uri=mlflow_server.url, experiment="aws-lifecycle", model_name="churn_aws")
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config()
    airflow = LocalAirflow(tmp_path / "airflow", api_port=free_port(), env_overrides={  # inherits AIRFLOW_CONN_AWS_DEFAULT
        "MLFACTORY_CONFIG": cfg.source, "AWS_ACCESS_KEY_ID": AIRFLOW_KEY,  # the bucket's client (s3fs) too
        "AIRFLOW__CORE__DEFAULT_TASK_RETRIES": "10", "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "5"},
        db_template=airflow_db_template)
    compute = SageMakerCompute(moto_server, tmp_path / "sagemaker", {"MLFLOW_TRACKING_URI": mlflow_server.url,
                                                                     "MLFLOW_EXPERIMENT_NAME": "aws-lifecycle"})
    compute.start()
    recording = Recording(moto_server)
    try:
        airflow.start()
        mlflow_server.wait_ready()
        airflow.wait_for_dags(STAGES)  # raises on any DAG import error (the aws branches of every DAG)

        # An object put in S3 -> a notification on SQS -> the AssetWatcher -> ml_ingest.
        local = sample_data.write(sample_data.generate(3000, seed=31), tmp_path / "june batch.csv")
        s3.upload_file(str(local), BUCKET, "landing/june batch.csv")
        ingest = airflow.wait_for_run("ml_ingest", 1, timeout=180, run_type="asset_triggered")
        assert ingest["state"] == "success" and ingest["run_type"] == "asset_triggered"
        assert sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["ApproximateNumberOfMessages"])[
            "Attributes"]["ApproximateNumberOfMessages"] == "0"  # deleted once its event was emitted
        validate = airflow.wait_for_run("ml_validate", 1, timeout=240, run_type="asset_triggered")
        assert validate["state"] == "success"
        parts = [o for o in storage.list_objects(cfg.storage.curated_uri) if o.key.endswith(".parquet")]
        assert len(parts) == 1
        with storage.open_uri(parts[0].uri) as f:
            assert pq.read_metadata(f).num_rows == 3000

        # `curated` -> ml_train: one SageMaker training job, submitted with the right request.
        train = airflow.wait_for_run("ml_train", 1, timeout=600, run_type="asset_triggered")
        assert not compute.errors, compute.errors
        assert train["state"] == "success", airflow.task_log("ml_train", train["dag_run_id"], "train", map_index=0)
        (job_name,) = compute.played
        job = compute.sagemaker.describe_training_job(TrainingJobName=job_name)
        assert job["AlgorithmSpecification"]["ContainerEntrypoint"] == ["python", "-m", "mlfactory.training.train"]
        assert job["InputDataConfig"][0]["ChannelName"] == "train"
        assert job["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"].startswith(f"s3://{BUCKET}/models/training_sets/")
        assert (job["ResourceConfig"]["InstanceType"], job["ResourceConfig"]["InstanceCount"]) == ("ml.m5.xlarge", 1)
        assert job["EnableManagedSpotTraining"] is True and job["CheckpointConfig"]["S3Uri"].startswith(f"s3://{BUCKET}/models/checkpoints/")
        assert job["StoppingCondition"]["MaxWaitTimeInSeconds"] >= job["StoppingCondition"]["MaxRuntimeInSeconds"]
        tries = {t["try_number"] for t in airflow.task_instances("ml_train", train["dag_run_id"]) if t["task_id"] == "train"}
        candidate = airflow.xcom("ml_train", train["dag_run_id"], "select_best")
        console = f"https://{cfg.backend.region}.console.aws.amazon.com/sagemaker/home?region={cfg.backend.region}#"
        assert airflow.links("ml_train", train["dag_run_id"], "train", 0) == {"Job in the console": f"{console}/jobs/{job_name}"}
        assert candidate["model_bundle_uri"].startswith(f"s3://{BUCKET}/models/runs/") and candidate["model_uri"]

        # `candidate` -> ml_promote: the registry stays MLflow; the model's files are in S3.
        promote = airflow.wait_for_run("ml_promote", 1, timeout=300)
        assert promote["state"] == "success"
        registry = Registry(cfg)
        champion = registry.alias_version(CHAMPION)
        model_uri = registry.model_storage_uri(champion)
        assert model_uri.startswith(f"s3://{BUCKET}/mlflow/") and storage.exists(storage.join(model_uri, "MLmodel"))

        # `champion` -> ml_deploy: Model, EndpointConfig, Endpoint, a smoke test on it, autoscaling.
        deploy = airflow.wait_for_run("ml_deploy", 1, timeout=300)
        assert deploy["state"] == "success"
        endpoint = compute.sagemaker.describe_endpoint(EndpointName="churn-lifecycle")
        assert endpoint["EndpointStatus"] == "InService"
        model = compute.sagemaker.describe_model(ModelName=f"churn-aws-v{champion}")  # of registered model churn_aws
        assert model["PrimaryContainer"]["Environment"]["MLFACTORY_MODEL_URI"] == model_uri
        state = read_endpoint_state(cfg)
        assert state["served_version"] == champion and state["endpoint_config"] == endpoint["EndpointConfigName"]
        scaling = boto3.client("application-autoscaling", endpoint_url=moto_server, region_name="us-east-1")
        (target,) = scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
        assert target["ResourceId"] == f"endpoint/churn-lifecycle/variant/v{champion}"
        invoked = [i for i in runtime.invocations if i["endpoint"] == "churn-lifecycle"]
        smoke = [i for i in invoked if i["target"]]
        assert smoke and all(i["target"] == f"v{champion}" and i["status"] == 200 for i in smoke), runtime.invocations
        canary = [i for i in invoked if not i["target"]]  # a first deployment's canary: all the traffic is its own
        assert len(canary) >= cfg.serving.canary_requests and all(
            i["status"] == 200 and i["variant"] == f"v{champion}" for i in canary), canary[:3]
        assert MlflowClient(mlflow_server.url).get_model_version("churn_aws", champion).tags["mlfactory.deployment"] == "serving"
        assert airflow.links("ml_deploy", deploy["dag_run_id"], "deploy.full_traffic") == {
            "Endpoint in the console": f"{console}/endpoints/churn-lifecycle"}

        # `champion` -> ml_batch_score: a transform job over the unscored curated snapshot.
        batch = airflow.wait_for_run("ml_batch_score", 1, timeout=300, run_type="asset_triggered")
        assert batch["state"] == "success"
        scored = airflow.xcom("ml_batch_score", batch["dag_run_id"], "score")
        transform = compute.sagemaker.describe_transform_job(TransformJobName=scored["job"])
        assert airflow.links("ml_batch_score", batch["dag_run_id"], "score") == {
            "Job in the console": f"{console}/transform-jobs/{scored['job']}"}
        assert transform["ModelName"] == f"churn-aws-v{champion}"
        assert transform["TransformInput"]["DataSource"]["S3DataSource"]["S3DataType"] == "ManifestFile"
        assert len(scored["snapshots"]) == 1 and parts[0].uri.split("/snapshot=")[1].startswith(scored["snapshots"][0])
        print(f"train tries: {sorted(tries)}; jobs played: {compute.played}")

        # Least privilege, from what Airflow actually sent: every request its processes signed is granted by
        # deploy/aws/airflow-policy.json, resource by resource
        calls = Recording.calls(recording.stop(), AIRFLOW_KEY) + [  # and the played runtime's InvokeEndpoint
            Call("sagemaker:InvokeEndpoint", (f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/{i['endpoint']}",),
                 "InvokeEndpoint") for i in runtime.invocations]
        granted = policy("airflow-policy.json", MLFACTORY_BUCKET=BUCKET, MLFACTORY_LANDING_QUEUE="mlfactory-landing",
                         MLFACTORY_TRAINING_ROLE="mlfactory-training", MLFACTORY_SERVING_ROLE="mlfactory-serving",
                         MLFACTORY_MODEL="churn-aws", MLFACTORY_ENDPOINT="churn-lifecycle")
        actions = {c.action for c in calls}
        assert {"sagemaker:CreateTrainingJob", "sagemaker:CreateEndpoint", "sagemaker:CreateTransformJob", "s3:PutObject",
                "sqs:DeleteMessage", "application-autoscaling:RegisterScalableTarget"} <= actions, sorted(actions)
        print(f"{len(calls)} calls by Airflow, {len(actions)} actions: {sorted(actions)}")
        assert refused(granted, calls) == []

        # Then the intake alone, on the same Airflow: 50 objects whose ObjectCreated records arrive in ONE message
        # of the queue (one receive); every object ingested and curated once, from S3, and the message deleted.
        intake_only(airflow)
        s3.put_bucket_notification_configuration(Bucket=BUCKET, NotificationConfiguration={})  # the test's message alone
        burst, bodies, records = Burst(cfg), burst_files(tmp_path / "burst", 50), []
        for name, body in bodies.items():
            key = f"landing/{name}"
            etag = s3.put_object(Bucket=BUCKET, Key=key, Body=body)["ETag"]
            records.append({"eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                            "s3": {"bucket": {"name": BUCKET}, "object": {"key": key.replace(" ", "+"),
                                                                           "size": len(body), "eTag": etag}}})
        started = time.monotonic()
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"Records": records}))
        elapsed = burst.wait_each_curated_once(airflow, [f"s3://{BUCKET}/landing/{name}" for name in bodies]) - started
        assert sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["ApproximateNumberOfMessages"])[
            "Attributes"]["ApproximateNumberOfMessages"] == "0"
        print(f"aws: 50 objects in one SQS message -> last curated in {elapsed:.1f} s; stranded: 0")
    finally:
        compute.stopping.set()
        runtime.stop()
        airflow.stop()
        mlflow_server.stop()
