"""The `gcp` backend: GCS as the bucket, GCS -> Pub/Sub notifications as bucket events, Vertex AI custom
jobs (GPU or TPU, spot by default), Vertex endpoints (a canary by traffic split, autoscaling) and batch
prediction jobs; the registry stays MLflow.

| concern | how |
|---|---|
| bucket | GCS (``gs://``), through the storage layer (gcsfs) |
| bucket events | GCS -> Pub/Sub notifications (``OBJECT_FINALIZE``, ``events``), or listing the prefix when no subscription is set |
| training | a Vertex AI ``CustomJob`` per ``TrainingJobSpec`` (``vertex.custom_job``): chief pool + worker pool, GPU or TPU |
| real-time endpoint | the version uploaded to the Vertex Model Registry (its files stay in GCS), deployed to a Vertex endpoint beside the served one with a traffic split, then alone |
| batch scoring | a Vertex ``BatchPredictionJob`` over the curated snapshots not scored yet |

``vertex`` turns the cloud-neutral specs into ``aiplatform_v1`` request messages (the protos reject an
unknown field or enum value before anything is sent); the Airflow side is
``mlfactory_airflow.backends.gcp``; the service-account roles each part needs are in ``deploy/gcp/``.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from mlfactory.backend_registry import Backend, BackendSettings


class GcpSettings(BackendSettings):
    """Section ``gcp:`` of the pipeline config. Sizing every backend shares (replicas, canary, accelerators,
    batch instances) is in ``serving`` and ``batch_scoring``; this holds what only Google Cloud has."""

    name: Literal["gcp"] = "gcp"
    project: str = Field(pattern=r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$", description="the Google Cloud project id")
    region: str = Field("us-central1", pattern=r"^[a-z]+-[a-z]+\d+$", description="Vertex AI region (bucket nearby)")
    conn_id: str = Field("google_cloud_default", description="Airflow google connection: credentials (a key file, "
                                                             "workload identity or ADC); is_anonymous for emulators")
    image_uri: str = Field(min_length=1, description="the project's container in Artifact Registry "
                                                     "(REGION-docker.pkg.dev/PROJECT/REPO/mlfactory:TAG): training "
                                                     "entrypoint and model server")
    service_account: str = Field("", description="service account the training jobs run as: reads training sets and "
                                                 "checkpoints, writes models and checkpoints (deploy/gcp/terraform binds "
                                                 "its roles); empty: Vertex's default service agent")
    serving_service_account: str = Field("", description="service account the endpoints, their model uploads and the "
                                                         "batch prediction jobs run as: reads the registered model and "
                                                         "the batch instances, writes predictions only; empty: "
                                                         "service_account")
    pubsub_subscription: str = Field("", description="subscription id on the topic that receives the bucket's "
                                                     "OBJECT_FINALIZE notifications; empty: the landing watcher lists "
                                                     "the prefix every ingest.poll_interval_s")
    api_endpoint: str = Field("", description="Vertex AI API host; empty: REGION-aiplatform.googleapis.com "
                                              "(http://127.0.0.1:PORT for a local fake)")
    training_machine_type: str = Field("", description="overrides the catalog's choice from the job's accelerator")
    endpoint_machine_type: str = Field("", description="overrides the catalog's choice from serving.accelerator "
                                                       "(cpu: n1-standard-4)")
    batch_machine_type: str = Field("", description="overrides the catalog's choice from batch_scoring.accelerator "
                                                    "(cpu: n1-standard-4)")
    boot_disk_gb: int = Field(100, ge=10, le=65536)
    spot: bool = Field(True, description="Spot VMs for training (scheduling strategy SPOT); a preempted job "
                                         "restarts and resumes from AIP_CHECKPOINT_DIR")
    flex_start: bool = Field(False, description="with spot false: Dynamic Workload Scheduler (FLEX_START), waiting "
                                                "up to max_wait_s for GPUs")
    max_wait_s: int | None = Field(None, ge=60, description="FLEX_START: longest wait for capacity; default 2 x max runtime")
    autoscaling_target_utilization: int = Field(60, ge=1, le=100, description="endpoint autoscaling target: CPU "
                                                                             "utilization (cpu replicas) or GPU duty "
                                                                             "cycle (gpu replicas), in percent")
    network: str = Field("", description="VPC peered with Vertex AI (projects/NUMBER/global/networks/NAME)")
    kms_key_name: str = Field("", description="CMEK for jobs, models and endpoints "
                                              "(projects/P/locations/L/keyRings/R/cryptoKeys/K); empty: Google-managed")
    budget_usd: float = Field(100.0, gt=0, description="a training job whose worst-case cost is above this is refused")
    prices_usd_per_hour: dict[str, float] = Field(
        default_factory=dict, description="machine type (or accelerator type) -> USD/hour; overrides the catalog's "
                                          "approximate us-central1 list prices")
    labels: dict[str, str] = {}
    poll_interval_s: int = Field(30, ge=1, le=3600, description="how often a deferred Vertex job or operation is "
                                                               "checked (from the triggerer: no worker slot held)")

    @model_validator(mode="after")
    def _consistent(self) -> GcpSettings:
        for field in ("service_account", "serving_service_account"):
            email = getattr(self, field)
            if email and not re.fullmatch(r"[a-z0-9-]+@[a-z0-9.-]+\.iam\.gserviceaccount\.com|[\w.+-]+@[\w.-]+", email):
                raise ValueError(f"{field} {email!r} is not a service account email")
        if self.kms_key_name and not re.fullmatch(r"projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+",
                                                  self.kms_key_name):
            raise ValueError(f"kms_key_name {self.kms_key_name!r} is not projects/P/locations/L/keyRings/R/cryptoKeys/K")
        if self.spot and self.flex_start:
            raise ValueError("spot and flex_start are two scheduling strategies: choose one")
        bad = [k for k in self.labels if not re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", k)]
        if bad:
            raise ValueError(f"labels {bad}: keys are lowercase letters, digits, '_' and '-', starting with a letter")
        return self

    @property
    def serving_account(self) -> str:
        """The service account an endpoint's deployed models, their upload and batch prediction run as ("": Vertex's
        default)."""
        return self.serving_service_account or self.service_account

    def check_pipeline(self, cfg) -> None:
        if not cfg.storage.bucket.startswith("gs://"):
            raise ValueError(f"backend gcp needs a gs:// bucket, got {cfg.storage.bucket!r}")
        if cfg.serving.rollback_alarms:
            raise ValueError("serving.rollback_alarms: the gcp backend reads no alert state (Cloud Monitoring's client "
                             "library, google-cloud-monitoring 2.32, has no call that says whether an alerting policy "
                             "has an open incident); leave it empty: serving.max_error_rate and serving.max_latency_ms "
                             "judge the canary on every backend")


BACKEND = Backend("gcp", GcpSettings, airflow="mlfactory_airflow.backends.gcp:GcpBackend",
                  runtime="mlfactory.backends.gcp.runtime")
