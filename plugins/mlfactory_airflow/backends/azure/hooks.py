"""The `azure` backend's clients on Airflow connections, and the adapters built on them.

- ``AzureMLHook``: azure-ai-ml's ``MLClient`` for the workspace (``get_conn()``), and Azure Monitor's
  management client for autoscale settings (``get_monitor_client()``), both with the credential of the
  ``azure`` connection ``azure.conn_id``: a service principal (login = client id, password = secret, extra ``tenantId``), else
  ``DefaultAzureCredential`` (the microsoft-azure provider's helper: managed identity with extra
  ``managed_identity_client_id``, workload identity with ``workload_identity_tenant_id``, environment, Azure
  CLI). A connection that is not defined means DefaultAzureCredential too.
- ``queue_client(conn_id, account, queue)``: a Storage Queue client from the ``wasb`` connection
  ``azure.storage_conn_id``: its ``connection_string`` extra (Azurite, or a key), else the account's queue
  URL with DefaultAzureCredential (Storage Queue Data Message Processor on the queue).

``AzureMLJobs``: ml_train's training job life cycle (``mlfactory_airflow.training``) as an Azure ML command job.

ml_deploy's rollout (``mlfactory.serving.rollout``: the same five steps and verdict as on every backend) on the managed
online endpoint, through ``AzureMLEndpointAdapter``:

- ``stage``: the version registered as an Azure ML model (its files stay where MLflow keeps them), the
  endpoint created if it does not exist, and the version's ``ManagedOnlineDeployment`` created beside the
  served one (blue/green) with no traffic, its Azure Monitor autoscale setting in place. The plan (what
  serves now) is kept in the endpoint state for a rollback before the deployment is created.
- ``health_check``: the deployment provisioned; ``smoke_test``: holdout rows sent to it alone
  (``azureml-model-deployment`` header).
- ``canary``: ``serving.canary_percent`` of the endpoint's traffic on it; after ``serving.canary_wait_s``
  (deferred), ``canary_requests`` holdout rows through the scoring URI (the traffic decides who answers).
- ``full_traffic``: all traffic to the version, the old deployments deleted.
- ``restore`` (ml_deploy's ``rollback``): the old traffic back, the new deployment deleted.
"""

from __future__ import annotations

import os

from airflow.sdk import BaseHook
from mlfactory.backends.azure import quiet_sdk_logs
from mlfactory.serving.rollout import EndpointAdapter, Wait

from mlfactory_airflow.backends.azure.triggers import resource_trigger
from mlfactory_airflow.backends.azure import links
from mlfactory_airflow.training import JobAdapter

quiet_sdk_logs()


MANAGEMENT = "https://management.azure.com"
SCORING_SCOPE = "https://ml.azure.com/.default"  # the audience of an online endpoint's Entra tokens (auth_mode aad_token)


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


def ensure_datastore(ml, cfg, log) -> None:
    """The bucket's container as the workspace datastore ``azure.datastore`` (identity-based), once."""
    from mlfactory.backends.azure.azureml import container_of, datastore

    from mlfactory_airflow.backends.azure.hooks import not_found

    if not_found(ml.datastores.get, cfg.backend.datastore) is None:
        container = container_of(cfg.storage.bucket)
        ml.datastores.create_or_update(datastore(cfg.backend, container))
        log.info("registered datastore %s on container %s", cfg.backend.datastore, container)


def registered_model(ml, cfg, model, log) -> str:
    """The Azure ML model of a registered version (created once); its ARM id."""
    from mlfactory.backends.azure.azureml import model_asset

    from mlfactory_airflow.backends.azure.hooks import not_found

    asset = model_asset(model, cfg.backend)
    found = not_found(ml.models.get, asset.name, asset.version)
    if found is None:
        ensure_datastore(ml, cfg, log)
        found = ml.models.create_or_update(asset)
        log.info("registered v%s as Azure ML model %s:%s (%s)", model.version, asset.name, asset.version, asset.path)
    return found.id


class AzureMLJobs(JobAdapter):
    """Azure ML command jobs: try N runs job ``<spec>-tN``; a retry after a failed or cancelled one starts another on
    the same checkpoints output (so it resumes)."""

    platform = "Azure ML job"

    def prepare(self, spec, try_number: int) -> str:
        from mlfactory.backends.azure.azureml import check_training_budget, command_job, job_name

        estimate = check_training_budget(spec, self.settings)
        self.job = command_job(spec, self.settings, job_name(spec.name, try_number))
        return f"{estimate} ({f'{self.settings.job_tier} tier' if not self.settings.compute else f'cluster {self.settings.compute}'})"

    def find_earlier(self, spec, try_number: int):
        from mlfactory.backends.azure.azureml import job_name, job_status

        from mlfactory_airflow.backends.azure.hooks import not_found

        for attempt in range(try_number - 1, 0, -1):
            earlier = not_found(self.operator.ml.jobs.get, job_name(spec.name, attempt))
            if earlier is not None:
                return earlier.name, job_status(earlier)
        return None

    def submit(self, spec, try_number: int, earlier: str | None) -> str:
        ml = self.operator.ml
        ensure_datastore(ml, self.operator.config, self.log)
        return ml.jobs.create_or_update(self.job).name

    def trigger(self, job: str, timeout_s: int):
        from mlfactory_airflow.backends.azure.triggers import AzureMLJobTrigger

        return AzureMLJobTrigger(job, self.operator.hook.to_dict(), poll_interval=self.operator.poll_interval,
                                 timeout_s=timeout_s)

    def status(self, job: str):
        from mlfactory.backends.azure.azureml import job_status

        return job_status(self.operator.ml.jobs.get(job))

    def result(self, job: str, spec, event: dict | None) -> dict:
        from mlfactory import storage
        from mlfactory.backends.azure.azureml import training_result
        from mlfactory.specs import METRICS_FILE

        metrics = storage.join(spec.output_uri, METRICS_FILE)
        if not storage.exists(metrics):
            raise FileNotFoundError(f"Azure ML job {job} completed but left no {metrics}: did it run the "
                                    "mlfactory.training.train entrypoint?")
        return training_result(storage.read_bytes(metrics), spec, job)

    def console_url(self, job: str) -> str:
        return links.job(self.settings, job)

    def cancel(self, job: str) -> None:
        from mlfactory_airflow.backends.azure.triggers import cancel_job

        cancel_job(self.operator.ml, job, self.log)


class AzureMLEndpointAdapter(EndpointAdapter):
    """ml_deploy's rollout on the pipeline's managed online endpoint (see the module's docstring); one deployment
    per version (``version-<n>``)."""

    def __init__(self, cfg, spec, poll_interval: int | None = None) -> None:
        super().__init__(cfg, spec, poll_interval)
        self.hook = AzureMLHook.of(self.settings)
        self._scoring = self._token = None  # (the scoring URI, a session) and an Entra token, on the first predict

    def console_url(self, plan: dict) -> str:
        return links.online_endpoint(self.settings, plan["endpoint"])

    @property
    def ml(self):
        return self.hook.get_conn()

    def wait(self, kind: str, name: str, what: str, endpoint: str | None = None, timeout_s: int = 3600) -> Wait:
        return Wait(what, operation=resource_trigger(self.hook, kind, name, self.poll_interval, endpoint, timeout_s))

    def traffic(self, endpoint) -> dict[str, int]:
        return {k: int(v) for k, v in (endpoint.traffic or {}).items() if v}

    def stage(self, keep) -> dict | Wait:
        from mlfactory.backends.azure import azureml

        from mlfactory_airflow.backends.azure.hooks import not_found

        spec = self.spec
        model_id = registered_model(self.ml, self.cfg, spec.model, self.log)
        name = azureml.resource_name(spec.name)
        endpoint = not_found(self.ml.online_endpoints.get, name)
        if endpoint is None or (endpoint.provisioning_state or "").lower() != "succeeded":
            if endpoint is None:
                self.ml.online_endpoints.begin_create_or_update(azureml.online_endpoint(spec, self.settings))
            return self.wait("online_endpoints", name, f"creation of online endpoint {name}")
        new, traffic = azureml.deployment_name(spec.model.version), self.traffic(endpoint)
        serving = {k: v for k, v in traffic.items() if k != new}
        plan = {"endpoint": name, "deployment": new, "new": new, "model_id": model_id, "version": spec.model.version,
                "serving": serving, "old": max(serving, key=serving.get) if serving else None,
                "already_served": traffic.get(new, 0) == 100}
        keep(plan)
        self.log.info("online endpoint %s: traffic %s; v%s is %s", name, traffic or "none", spec.model.version,
                      "served already" if plan["already_served"] else "staged")
        if plan["already_served"]:
            return plan
        deployment = not_found(self.ml.online_deployments.get, new, name)
        if deployment is None or (deployment.provisioning_state or "").lower() != "succeeded":
            if deployment is None:
                environment = {"MLFACTORY_PREDICTION_LOG_URI": self.cfg.storage.prediction_log_uri}
                self.ml.online_deployments.begin_create_or_update(
                    azureml.online_deployment(spec, self.settings, model_id, environment), skip_script_validation=True)
                self.log.info("creating deployment %s of v%s on %s (%d instance(s) to start), no traffic yet", new,
                              spec.model.version, name, spec.min_replicas)
            return self.wait("online_deployments", new, f"deployment {new}", endpoint=name, timeout_s=2 * 3600)
        self._autoscale(deployment.id)
        return plan

    def _autoscale(self, deployment_id: str) -> None:
        from mlfactory.backends.azure.azureml import autoscale_name, autoscale_setting

        name = autoscale_name(deployment_id)
        self.hook.get_monitor_client().autoscale_settings.create_or_update(
            self.settings.resource_group, name, autoscale_setting(self.spec, self.settings, deployment_id))
        self.log.info("autoscale %s: %d-%d instances at %d%% CPU", name, self.spec.min_replicas, self.spec.max_replicas,
                      self.settings.autoscale_target_cpu)

    def ready(self, plan: dict) -> str | None:
        from mlfactory_airflow.backends.azure.hooks import not_found

        deployment = not_found(self.ml.online_deployments.get, plan["new"], plan["endpoint"])
        state = (deployment.provisioning_state or "").lower() if deployment else "missing"
        return None if state == "succeeded" else f"deployment {plan['new']} of {plan['endpoint']} is {state}"

    def predict(self, plan: dict, rows: list[dict], variant: str | None) -> tuple[str, list]:
        """``rows`` as the documented ``{"input_data": ...}`` body to the scoring URI with a Microsoft Entra token of
        Airflow's identity (the endpoint takes no key; ``azureml-model-deployment`` names the deployment, in the
        request and in the answer)."""
        import time

        if self._scoring is None:
            import requests

            self._scoring = self.ml.online_endpoints.get(plan["endpoint"]).scoring_uri, requests.Session()
        uri, session = self._scoring
        if self._token is None or self._token.expires_on - time.time() < 300:  # a new one before it runs out
            self._token = self.hook.get_credential().get_token(SCORING_SCOPE)
        headers = {"Authorization": f"Bearer {self._token.token}",
                   **({"azureml-model-deployment": variant} if variant else {})}
        reply = session.post(uri, headers=headers, timeout=60, json={"input_data": {
            "columns": list(rows[0]), "data": [list(row.values()) for row in rows]}})
        reply.raise_for_status()
        return reply.headers.get("azureml-model-deployment", variant or ""), reply.json()["predictions"]

    def firing_alarms(self, plan: dict, names: list[str]) -> list[str]:
        """The Azure Monitor metric alert rules of ``names`` (in the workspace's resource group) that fire: a status
        other than Healthy for any of their dimensions."""
        from azure.core.exceptions import ResourceNotFoundError

        from mlfactory.serving.deployment import DeploymentFailed

        monitor, firing = self.hook.get_monitor_client(), []
        for name in names:
            try:
                statuses = monitor.metric_alerts_status.list(self.settings.resource_group, name).value or []
            except ResourceNotFoundError:
                raise DeploymentFailed(f"serving.rollback_alarms names {name!r}, but resource group "
                                       f"{self.settings.resource_group} has no metric alert rule of that name") from None
            if any(s.properties and s.properties.status != "Healthy" for s in statuses):
                firing.append(name)
        return sorted(firing)

    def set_weights(self, plan: dict, weights: dict[str, float]) -> Wait | None:
        from mlfactory.backends.azure.azureml import canary_traffic

        endpoint = self.ml.online_endpoints.get(plan["endpoint"])
        wanted = canary_traffic(plan["serving"], plan["new"], weights[plan["new"]])
        if self.traffic(endpoint) == wanted:
            return None
        endpoint.traffic = wanted
        self.ml.online_endpoints.begin_create_or_update(endpoint)
        self.log.info("traffic of %s: %s", plan["endpoint"], wanted)
        return self.wait("online_endpoints", plan["endpoint"], f"traffic update of {plan['endpoint']}")

    def finalise(self, plan: dict) -> dict | Wait:
        name, new = plan["endpoint"], plan["new"]
        endpoint = self.ml.online_endpoints.get(name)
        if self.traffic(endpoint) != {new: 100}:
            endpoint.traffic = {new: 100}
            endpoint.mirror_traffic = {}
            self.ml.online_endpoints.begin_create_or_update(endpoint)
            self.log.info("v%s (%s) has all the traffic of %s", plan["version"], new, name)
            return self.wait("online_endpoints", name, f"traffic update of {name}")
        old = [d.name for d in self.ml.online_deployments.list(name) if d.name != new]
        if old:
            self.ml.online_deployments.begin_delete(old[0], name)
            self.log.info("deleting deployment %s of %s", old[0], name)
            return self.wait("online_deployments", old[0], f"deletion of deployment {old[0]}", endpoint=name)
        deployment = self.ml.online_deployments.get(new, name)
        return {"endpoint": name, "tags": {"mlfactory.azureml_deployment": new}, "backend": "azure", "deployment": new,
                "model_id": plan["model_id"], "model_uri": self.spec.model.uri, "scoring_uri": endpoint.scoring_uri,
                "instance_type": deployment.instance_type,
                "autoscale": {"min_replicas": self.spec.min_replicas, "max_replicas": self.spec.max_replicas,
                              "target_cpu_percent": self.settings.autoscale_target_cpu}}

    def restore(self, plan: dict) -> None:
        """The traffic of before the rollout, and the new deployment deleted (not waited for)."""
        from mlfactory_airflow.backends.azure.hooks import not_found

        if not plan.get("endpoint") or plan.get("already_served"):
            return
        endpoint = self.ml.online_endpoints.get(plan["endpoint"])
        before = plan["serving"]  # {} when nothing was served: the new deployment must lose its traffic to go
        if self.traffic(endpoint) != before:
            endpoint.traffic = before or {plan["new"]: 0}
            self.ml.online_endpoints.begin_create_or_update(endpoint).result()
            self.log.info("traffic of %s back to %s", plan["endpoint"], before or "none")
        if not_found(self.ml.online_deployments.get, plan["new"], plan["endpoint"]) is not None:
            self.ml.online_deployments.begin_delete(plan["new"], plan["endpoint"])
            self.log.info("deleting the new deployment %s", plan["new"])

