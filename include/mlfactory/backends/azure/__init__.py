"""The `azure` backend: Blob Storage as the bucket, Blob created -> Event Grid -> Storage Queue as bucket
events, Azure ML command jobs (PyTorch distribution, Spot), managed online endpoints (a canary by traffic
split, autoscale) and batch endpoints; the registry stays MLflow.

| concern | how |
|---|---|
| bucket | Blob Storage / ADLS Gen2 (``abfs://container/...``), through the storage layer (adlfs) |
| bucket events | ``Microsoft.Storage.BlobCreated`` events that an Event Grid subscription delivers to a Storage Queue, or listing the prefix when no queue is set |
| training | an Azure ML ``command()`` job per ``TrainingJobSpec`` (``azureml.command_job``): ``PyTorchDistribution``, serverless GPU VMs (Spot by default) or a compute cluster |
| real-time endpoint | a ``ManagedOnlineEndpoint`` with one ``ManagedOnlineDeployment`` per version (blue/green by traffic, autoscale from azure-mgmt-monitor) |
| batch scoring | a ``BatchEndpoint`` + ``ModelBatchDeployment`` per version, invoked over the curated snapshots not scored yet |

``azureml`` turns the cloud-neutral specs into ``azure-ai-ml`` entities (their own validation and
``_to_rest_object()`` check them before anything is sent); the Airflow side is
``mlfactory_airflow.backends.azure``; the custom roles each part needs are in ``deploy/azure/``.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from mlfactory.backend_registry import Backend, BackendSettings


class AzureSettings(BackendSettings):
    """Section ``azure:`` of the pipeline config. Sizing every backend shares (replicas, canary, accelerators,
    batch instances) is in ``serving`` and ``batch_scoring``; this holds what only Azure has."""

    name: Literal["azure"] = "azure"
    subscription_id: str = Field(pattern=r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
    resource_group: str = Field(pattern=r"^[-\w.()]{1,90}$")
    workspace: str = Field(pattern=r"^[a-zA-Z0-9][\w-]{2,32}$", description="the Azure ML workspace")
    location: str = Field("eastus", pattern=r"^[a-z0-9]+$", description="the workspace's region (autoscale settings live there)")
    conn_id: str = Field("azure_default", description="Airflow `azure` connection for Azure ML and Azure Monitor: a "
                                                      "service principal (login, password, tenantId) or, empty, "
                                                      "DefaultAzureCredential (managed or workload identity)")
    storage_account: str = Field(pattern=r"^[a-z0-9]{3,24}$", description="the account of storage.bucket")
    storage_conn_id: str = Field("wasb_default", description="Airflow `wasb` connection for the event queue (a "
                                                             "connection_string, or the account's identity)")
    datastore: str = Field("mlfactory", pattern=r"^[a-z0-9_]{1,255}$",
                           description="Azure ML datastore on the bucket's container (created if missing, identity-based)")
    image_uri: str = Field(min_length=1, description="the project's container in Azure Container Registry "
                                                     "(REGISTRY.azurecr.io/mlfactory:TAG): training entrypoint and model server")
    event_queue: str = Field("", description="Storage Queue that the Event Grid subscription delivers BlobCreated "
                                             "events to; empty: the landing watcher lists the prefix every "
                                             "ingest.poll_interval_s")
    compute: str = Field("", description="compute cluster for training; empty: serverless compute (the catalog's VM)")
    batch_compute: str = Field("cpu-cluster", min_length=2, description="compute cluster the batch deployments run on, "
                                                                       "as the cluster's managed identity: give it "
                                                                       "serving_identity")
    training_identity: str = Field("", description="resource id of the user-assigned managed identity the training jobs "
                                                   "run as (.../Microsoft.ManagedIdentity/userAssignedIdentities/NAME, "
                                                   "attached to the workspace): reads training sets and checkpoints, "
                                                   "writes models and checkpoints; empty: the job's default identity")
    serving_identity: str = Field("", description="resource id of the user-assigned managed identity the online "
                                                  "endpoints run as: reads the registered model, writes predictions "
                                                  "only; empty: training_identity (both empty: the endpoint's "
                                                  "system-assigned identity)")
    job_tier: Literal["Spot", "Standard"] = Field("Spot", description="serverless training capacity: Spot (preemptible, "
                                                                      "resumes from checkpoints) or Standard")
    training_instance_type: str = Field("", description="overrides the catalog's VM from the job's accelerator")
    endpoint_instance_type: str = Field("", description="overrides the catalog's VM from serving.accelerator "
                                                        "(cpu: Standard_DS3_v2)")
    autoscale_target_cpu: int = Field(70, ge=1, le=100, description="endpoint autoscale: scale out above this mean CPU %")
    experiment: str = Field("mlfactory", min_length=1)
    budget_usd: float = Field(100.0, gt=0, description="a training job whose worst-case cost is above this is refused")
    prices_usd_per_hour: dict[str, float] = Field(default_factory=dict, description="VM size -> USD/hour; overrides "
                                                  "the catalog's approximate East US list prices")
    tags: dict[str, str] = {}
    management_endpoint: str = Field("", description="Azure Resource Manager URL; empty: https://management.azure.com "
                                                     "(https://127.0.0.1:PORT for a local fake)")
    blob_endpoint: str = Field("", description="the account's blob URL; empty: https://ACCOUNT.blob.core.windows.net")
    poll_interval_s: int = Field(30, ge=1, le=3600, description="how often a deferred job or deployment is checked "
                                                               "(from the triggerer: no worker slot held)")

    @model_validator(mode="after")
    def _consistent(self) -> AzureSettings:
        for field in ("training_identity", "serving_identity"):
            identity = getattr(self, field)
            if identity and not re.fullmatch(r"/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.ManagedIdentity/"
                                             r"userAssignedIdentities/[^/]+", identity, re.IGNORECASE):
                raise ValueError(f"{field} {identity!r} is not the resource id of a user-assigned managed identity "
                                 "(/subscriptions/S/resourceGroups/G/providers/Microsoft.ManagedIdentity/"
                                 "userAssignedIdentities/NAME)")
        bad = [k for k in self.tags if not re.fullmatch(r"[^<>%&\\?/]{1,512}", k)]
        if bad:
            raise ValueError(f"tags {bad}: Azure tag names have at most 512 characters and none of < > % & \\ ? /")
        return self

    @property
    def endpoint_identity(self) -> str:
        """The identity an online endpoint runs as ("": its system-assigned one)."""
        return self.serving_identity or self.training_identity

    def check_pipeline(self, cfg) -> None:
        if not cfg.storage.bucket.startswith(("abfs://", "az://")):
            raise ValueError(f"backend azure needs an abfs:// (or az://) bucket, got {cfg.storage.bucket!r}")


def quiet_sdk_logs() -> None:
    """The Azure SDKs log every HTTP request and response at INFO, and azure-ai-ml warns on each experimental
    class it touches (QueueSettings among them): task logs keep their warnings and errors only."""
    import logging

    logging.getLogger("azure").setLevel(logging.WARNING)
    logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)


BACKEND = Backend("azure", AzureSettings, airflow="mlfactory_airflow.backends.azure:AzureBackend",
                  runtime="mlfactory.backends.azure.runtime")
