"""Azure clients on Airflow connections: one place that makes them, for operators and triggers alike.

- ``AzureMLHook``: azure-ai-ml's ``MLClient`` for the workspace (``get_conn()``), and Azure Monitor's
  management client for autoscale settings (``get_monitor_client()``), both with the credential of the
  ``azure`` connection ``azure.conn_id``: a service principal (login = client id, password = secret, extra ``tenantId``), else
  ``DefaultAzureCredential`` (the microsoft-azure provider's helper: managed identity with extra
  ``managed_identity_client_id``, workload identity with ``workload_identity_tenant_id``, environment, Azure
  CLI). A connection that is not defined means DefaultAzureCredential too.
- ``queue_client(conn_id, account, queue)``: a Storage Queue client from the ``wasb`` connection
  ``azure.storage_conn_id``: its ``connection_string`` extra (Azurite, or a key), else the account's queue
  URL with DefaultAzureCredential (Storage Queue Data Message Processor on the queue).
"""

from __future__ import annotations

import os

from airflow.sdk import BaseHook

from mlfactory.backends.azure import quiet_sdk_logs

quiet_sdk_logs()
MANAGEMENT = "https://management.azure.com"


def _connection(conn_id: str):
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


class AzureMLHook(BaseHook):
    """One Azure ML workspace through azure-ai-ml's ``MLClient``, on the Airflow ``azure`` connection
    ``azure_conn_id``. Its arguments are plain values (``to_dict()``), so a trigger rebuilds the same hook."""

    conn_name_attr = "azure_conn_id"
    default_conn_name = "azure_default"
    conn_type = "azure"
    hook_name = "Azure ML"

    def __init__(self, azure_conn_id: str = default_conn_name, *, subscription_id: str, resource_group: str,
                 workspace: str, management_endpoint: str = "") -> None:
        super().__init__()
        self.azure_conn_id, self.subscription_id, self.resource_group = azure_conn_id, subscription_id, resource_group
        self.workspace, self.management_endpoint = workspace, management_endpoint
        self._client = None

    @classmethod
    def of(cls, settings) -> AzureMLHook:
        """The hook of an ``azure:`` config section."""
        return cls(settings.conn_id, subscription_id=settings.subscription_id, resource_group=settings.resource_group,
                   workspace=settings.workspace, management_endpoint=settings.management_endpoint)

    def to_dict(self) -> dict:
        return {"azure_conn_id": self.azure_conn_id, "subscription_id": self.subscription_id,
                "resource_group": self.resource_group, "workspace": self.workspace,
                "management_endpoint": self.management_endpoint}

    def get_credential(self):
        return credential(self.azure_conn_id)

    def get_conn(self):
        """The workspace's MLClient (made once per hook)."""
        if self._client is None:
            from azure.ai.ml import MLClient

            if self.management_endpoint:
                # azure-ai-ml's own switch for a management front end other than Azure's (its local-debugging hook)
                os.environ["AZUREML_DEV_URL_MFE"] = self.management_endpoint.rstrip("/")
            self._client = MLClient(self.get_credential(), self.subscription_id, self.resource_group, self.workspace,
                                    show_progress=False)
        return self._client

    def get_monitor_client(self):
        """Azure Monitor's management client (autoscale settings) in the workspace's subscription."""
        from azure.mgmt.monitor import MonitorManagementClient

        base = (self.management_endpoint or MANAGEMENT).rstrip("/")
        return MonitorManagementClient(self.get_credential(), self.subscription_id, base_url=base,
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
