"""The `aws` backend: S3 as the bucket, S3 -> SQS notifications as bucket events, SageMaker training jobs,
endpoints (blue/green with a canary, autoscaling) and batch transform; the registry stays MLflow.

| concern | how |
|---|---|
| bucket | S3 (``s3://``), through the storage layer (s3fs) |
| bucket events | S3 -> SQS notifications (``events``), or listing the prefix when no queue is set |
| training | a SageMaker training job per ``TrainingJobSpec`` (``sagemaker.create_training_job_request``) |
| real-time endpoint | SageMaker Model + EndpointConfig + Endpoint, updated blue/green; Application Auto Scaling |
| batch scoring | a SageMaker batch transform over a manifest of the snapshots not scored yet |

``sagemaker`` turns the cloud-neutral specs into requests (checked against botocore's own service
models); the Airflow side is ``mlfactory_airflow.backends.aws``; the IAM policies each part needs
are in ``deploy/aws/``.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from mlfactory.backend_registry import Backend, BackendSettings


# Settings this section had before sizing moved to the sections every backend shares.
MOVED = {"endpoint_name": "serving.endpoint_name", "endpoint_min_instances": "serving.min_replicas",
         "endpoint_max_instances": "serving.max_replicas",
         "invocations_per_instance": "serving.target_requests_per_replica", "canary_wait_s": "serving.canary_wait_s",
         "rollback_alarms": "serving.rollback_alarms", "transform_instance_count": "batch_scoring.instances"}


class AwsSettings(BackendSettings):
    """Section ``aws:`` of the pipeline config. Sizing that every backend shares (replicas, canary,
    accelerators, batch parallelism) is in ``serving`` and ``batch_scoring``; this holds what only AWS has."""

    name: Literal["aws"] = "aws"
    region: str = Field("us-east-1", min_length=1)
    conn_id: str = Field("aws_default", description="Airflow connection (credentials; extra endpoint_url for an emulator)")
    role_arn: str = Field(description="IAM role the training jobs run as (arn:aws:iam::<account>:role/...): reads training "
                                      "sets and checkpoints, writes models and checkpoints (deploy/aws/training-role-policy.json)")
    serving_role_arn: str = Field("", description="IAM role the endpoints and batch transforms run as: reads the registered "
                                                  "model and the batch input, writes predictions only "
                                                  "(deploy/aws/serving-role-policy.json); empty: role_arn")
    image_uri: str = Field(description="the project's container image in ECR: training entrypoint and model server")
    sqs_queue_url: str = Field("", description="queue that receives the bucket's ObjectCreated notifications for the "
                                               "landing prefix; empty: the landing watcher polls S3 (ListObjectsV2) "
                                               "every ingest.poll_interval_s")
    training_instance_type: str = Field("", description="overrides the catalog's choice from the job's accelerator")
    endpoint_instance_type: str = Field("", description="overrides the catalog's choice from serving.accelerator "
                                                        "(cpu: ml.m5.large)")
    transform_instance_type: str = Field("", description="overrides the catalog's choice from batch_scoring.accelerator "
                                                         "(cpu: ml.m5.xlarge)")
    volume_size_gb: int = Field(50, ge=1, le=16384)
    spot: bool = Field(True, description="managed spot training; preempted jobs resume from their checkpoints")
    max_wait_s: int | None = Field(None, ge=1, description="spot: longest wait + run time; default 2 x max runtime")
    budget_usd: float = Field(100.0, gt=0, description="a training job whose worst-case cost is above this is refused")
    prices_usd_per_hour: dict[str, float] = Field(
        default_factory=dict, description="instance type -> USD/hour; overrides the catalog's on-demand list prices")
    subnets: list[str] = []
    security_group_ids: list[str] = []
    kms_key_id: str = Field("", description="KMS key for job volumes, outputs and endpoint storage; empty: AWS-managed")
    tags: dict[str, str] = {}
    poll_interval_s: int = Field(30, ge=1, le=3600, description="how often a deferred SageMaker job or endpoint "
                                                               "is checked (from the triggerer: no worker slot held)")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        moved = [f"aws.{key} is now {MOVED[key]}" for key in data if key in MOVED] if isinstance(data, dict) else []
        if moved:
            raise ValueError("; ".join(moved) + " (endpoint and batch sizing are declared once, for every backend)")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> AwsSettings:
        for field in ("role_arn", "serving_role_arn"):
            arn = getattr(self, field)
            if (arn or field == "role_arn") and not re.fullmatch(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+", arn):
                raise ValueError(f"{field} {arn!r} is not an IAM role ARN (arn:aws:iam::<12-digit account>:role/<name>)")
        if bool(self.subnets) != bool(self.security_group_ids):
            raise ValueError("a VPC config needs both subnets and security_group_ids")
        return self

    @property
    def serving_role(self) -> str:
        """The role a SageMaker Model (an endpoint's variant, a batch transform) runs as."""
        return self.serving_role_arn or self.role_arn

    def check_pipeline(self, cfg) -> None:
        if not cfg.storage.bucket.startswith("s3://"):
            raise ValueError(f"backend aws needs an s3:// bucket, got {cfg.storage.bucket!r}")


BACKEND = Backend("aws", AwsSettings, airflow="mlfactory_airflow.backends.aws:AwsBackend",
                  runtime="mlfactory.backends.aws.runtime")
