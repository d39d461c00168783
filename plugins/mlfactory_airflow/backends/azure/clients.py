"""Azure clients on Airflow connections: one place that makes them, for operators and triggers alike.

- ``AzureMLConnection.ml_client()``: azure-ai-ml's ``MLClient`` for the workspace, and ``monitor()``: Azure
  Monitor's management client (autoscale settings), both with the credential of the ``azure`` connection
  ``azure.conn_id``: a service principal (login = client id, password = secret, extra ``tenantId``), else
  ``DefaultAzureCredential`` (the microsoft-azure provider's helper: managed identity with extra
  ``managed_identity_client_id``, workload identity with ``workload_identity_tenant_id``, environment, Azure
  CLI). A connection that is not defined means DefaultAzureCredential too.
- ``queue_client(conn_id, account, queue)``: a Storage Queue client from the ``wasb`` connection
  ``azure.storage_conn_id``: its ``connection_string`` extra (Azurite, or a key), else the account's queue
  URL with DefaultAzureCredential (Storage Queue Data Message Processor on the queue).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from mlfactory.backends.azure import quiet_sdk_logs

quiet_sdk_logs()
MANAGEMENT = "https://management.azure.com"


def _connection(conn_id: str):
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None


def credential(conn_id: str):
    """The TokenCredential of Airflow connection ``conn_id`` (see the module's docstring)."""
    from airflow.providers.microsoft.azure.utils import get_sync_default_azure_credential

    conn = _connection(conn_id)
    extra = conn.extra_dejson if conn else {}
    if conn and conn.login and conn.password:
        from azure.identity import ClientSecretCredential

        tenant = extra.get("tenantId") or extra.get("tenant_id")
        if not tenant:
            raise ValueError(f"Airflow connection {conn_id!r} has a client id and secret but no tenantId extra")
        return ClientSecretCredential(tenant_id=tenant, client_id=conn.login, client_secret=conn.password)
    return get_sync_default_azure_credential(managed_identity_client_id=extra.get("managed_identity_client_id"),
                                             workload_identity_tenant_id=extra.get("workload_identity_tenant_id"))


@dataclass(frozen=True)
class AzureMLConnection:
    """What a client needs, small enough to travel in a trigger's serialized kwargs."""

    conn_id: str
    subscription_id: str
    resource_group: str
    workspace: str
    management_endpoint: str = ""

    @classmethod
    def of(cls, settings) -> AzureMLConnection:
        return cls(settings.conn_id, settings.subscription_id, settings.resource_group, settings.workspace,
                   settings.management_endpoint)

    def to_dict(self) -> dict:
        return asdict(self)

    def ml_client(self):
        from azure.ai.ml import MLClient

        if self.management_endpoint:
            # azure-ai-ml's own switch for a management front end other than Azure's (its local-debugging hook)
            os.environ["AZUREML_DEV_URL_MFE"] = self.management_endpoint.rstrip("/")
        return MLClient(credential(self.conn_id), self.subscription_id, self.resource_group, self.workspace,
                        show_progress=False)

    def monitor(self):
        from azure.mgmt.monitor import MonitorManagementClient

        base = (self.management_endpoint or MANAGEMENT).rstrip("/")
        return MonitorManagementClient(credential(self.conn_id), self.subscription_id, base_url=base,
                                       credential_scopes=[f"{MANAGEMENT}/.default"])


def queue_client(conn_id: str, account: str, queue: str, **options):
    """``options`` go to the client (azure-core's: retry_total, raw_request_hook, ...)."""
    from azure.storage.queue import QueueClient

    conn = _connection(conn_id)
    connection_string = (conn.extra_dejson.get("connection_string") if conn else None) or None
    if connection_string:
        return QueueClient.from_connection_string(connection_string, queue, **options)
    return QueueClient(f"https://{account}.queue.core.windows.net", queue, credential=credential(conn_id), **options)


def not_found(call, *args, **kwargs):
    """``call(*args, **kwargs)``, or None when Azure answers 404."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        return call(*args, **kwargs)
    except ResourceNotFoundError:
        return None
