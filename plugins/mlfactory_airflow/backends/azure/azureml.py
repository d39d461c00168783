"""The `azure` backend's operators: deferrable Azure ML training, the online endpoint rollout and batch
endpoints (the microsoft-azure provider has no Azure ML operator).

Every call goes through azure-ai-ml's ``MLClient`` (and Azure Monitor's client for autoscale) on an Airflow
connection (``hooks.AzureMLHook``). Operators prepare, submit and defer: a job defers on an
``AzureMLJobTrigger``, an endpoint or deployment being provisioned (or deleted) on an
``AzureMLResourceTrigger`` that resumes the operator's ``execute``, which looks at what exists and starts
the next step, so a retry (or a resumed try) takes over where the last one stopped.

ml_train: ``AzureMLTrainingOperator`` (``train``) runs a ``TrainingJobSpec`` as a command job.

ml_deploy's rollout (``mlfactory.rollout``: the same five steps and verdict as on every backend) on the managed
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

ml_batch_score: ``AzureMLBatchOperator`` (``score``) runs a ``BatchJobSpec`` on a batch endpoint.
"""

from __future__ import annotations

from functools import cached_property

from mlfactory.rollout import EndpointAdapter, Wait
from mlfactory_airflow.backends import CloudSpecOperator
from mlfactory_airflow.training import CloudTrainingOperator, JobAdapter

DONE = ("succeeded", "deleted")


def resource_trigger(hook, kind: str, name: str, poll_interval: int, endpoint: str | None = None,
                     timeout_s: int = 3600):
    """An ``AzureMLResourceTrigger`` on the ``kind`` resource ``name`` (of ``endpoint``, for a deployment)."""
    from mlfactory_airflow.backends.azure.triggers import AzureMLResourceTrigger

    extra = {"kind": kind, **({"endpoint": endpoint} if endpoint else {})}
    return AzureMLResourceTrigger(name, hook.to_dict(), poll_interval=poll_interval, timeout_s=timeout_s, **extra)


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


class AzureMLBaseOperator(CloudSpecOperator):
    """The `azure` config section, the MLClient, and deferring on Azure ML's jobs and resources."""

    ui_color = "#cce4f6"
    backend, platform = "azure", "an Azure ML operator"

    @cached_property
    def hook(self):
        from mlfactory_airflow.backends.azure.hooks import AzureMLHook

        return AzureMLHook.of(self.settings)

    @property
    def ml(self):
        return self.hook.get_conn()

    def wait_for(self, kind: str, name: str, what: str, endpoint: str | None = None, timeout_s: int = 3600,
                 **resume) -> None:
        """Defer until the ``kind`` resource ``name`` is provisioned (or gone), then resume ``execute(**resume)``."""
        self.log.info("%s: waiting for %s %s", what, kind, name)
        self.defer(trigger=resource_trigger(self.hook, kind, name, self.poll_interval, endpoint, timeout_s),
                   method_name="execute", kwargs={**resume, "waited_for": what})

    def wait_for_job(self, name: str, timeout_s: int, **resume) -> None:
        from mlfactory_airflow.backends.azure.triggers import AzureMLJobTrigger

        self.defer(trigger=AzureMLJobTrigger(name, self.hook.to_dict(), poll_interval=self.poll_interval,
                                             timeout_s=timeout_s),
                   method_name="execute_complete", kwargs={"job": name, **resume})

    @staticmethod
    def raise_for(event: dict | None, what: str | None) -> None:
        """After a deferral: fail on provisioning that failed or timed out, naming it."""
        from airflow.sdk.exceptions import AirflowException

        if event and event.get("state") not in (None, *DONE):
            raise AirflowException(f"{what or 'an Azure ML operation'} {event['state']} ({event['name']}): "
                                   f"{event.get('detail')}")


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
                                    "mlfactory.train entrypoint?")
        return training_result(storage.read_bytes(metrics), spec, job)

    def cancel(self, job: str) -> None:
        from mlfactory_airflow.backends.azure.triggers import cancel_job

        cancel_job(self.operator.ml, job, self.log)


class AzureMLTrainingOperator(CloudTrainingOperator, AzureMLBaseOperator):
    """A TrainingJobSpec as an Azure ML command job (``mlfactory_airflow.training``'s life cycle); returns the
    entrypoint's metrics.json (from its ``model`` output)."""

    adapter_class = AzureMLJobs


class AzureMLEndpointAdapter(EndpointAdapter):
    """ml_deploy's rollout on the pipeline's managed online endpoint (see the module's docstring); one deployment
    per version (``version-<n>``)."""

    def __init__(self, cfg, spec, poll_interval: int | None = None) -> None:
        from mlfactory_airflow.backends.azure.hooks import AzureMLHook

        super().__init__(cfg, spec, poll_interval)
        self.hook = AzureMLHook.of(self.settings)

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
        """``rows`` as the documented ``{"input_data": ...}`` body to the scoring URI with the endpoint's key
        (``azureml-model-deployment`` names the deployment, in the request and in the answer)."""
        if not hasattr(self, "_scoring"):
            import requests

            self._scoring = (self.ml.online_endpoints.get(plan["endpoint"]).scoring_uri,
                             self.ml.online_endpoints.get_keys(plan["endpoint"]).primary_key, requests.Session())
        uri, key, session = self._scoring
        headers = {"Authorization": f"Bearer {key}", **({"azureml-model-deployment": variant} if variant else {})}
        reply = session.post(uri, headers=headers, timeout=60, json={"input_data": {
            "columns": list(rows[0]), "data": [list(row.values()) for row in rows]}})
        reply.raise_for_status()
        return reply.headers.get("azureml-model-deployment", variant or ""), reply.json()["predictions"]

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


class AzureMLBatchOperator(AzureMLBaseOperator):
    """A BatchJobSpec on the model's batch endpoint: one manifest per snapshot, scored by the version's
    ``ModelBatchDeployment`` (the project's batch driver on its image) into the run's output folder."""

    def execute(self, context, event: dict | None = None, waited_for: str | None = None) -> None:
        from azure.ai.ml import Input
        from azure.ai.ml.constants import AssetTypes

        from mlfactory import storage
        from mlfactory.backends.azure import azureml
        from mlfactory.backends.azure.batch_driver import manifest
        from mlfactory.batch_scoring import batch_uri, key_columns, model_columns
        from mlfactory.specs import BatchJobSpec
        from mlfactory_airflow.backends.azure.hooks import not_found

        self.raise_for(event, waited_for)
        spec, cfg = BatchJobSpec.model_validate(self.spec), self.config
        endpoint = azureml.batch_endpoint(spec, self.settings)
        found = not_found(self.ml.batch_endpoints.get, endpoint.name)
        if found is None or (found.provisioning_state or "").lower() != "succeeded":
            if found is None:
                self.ml.batch_endpoints.begin_create_or_update(endpoint)
            return self.wait_for("batch_endpoints", endpoint.name, f"creation of batch endpoint {endpoint.name}")
        name = azureml.deployment_name(spec.model.version)
        deployment = not_found(self.ml.batch_deployments.get, name, endpoint.name)
        if deployment is None or (deployment.provisioning_state or "").lower() != "succeeded":
            if deployment is None:
                self.ml.batch_deployments.begin_create_or_update(azureml.batch_deployment(
                    spec, self.settings, endpoint.name, registered_model(self.ml, cfg, spec.model, self.log), self._driver_code()))
            return self.wait_for("batch_deployments", name, f"batch deployment {name}", endpoint=endpoint.name)
        folder = storage.join(batch_uri(cfg), "_manifests", f"run={spec.name}")
        if storage.exists(folder):
            storage.remove(folder)
        for i, (label, uri) in enumerate(sorted(spec.inputs.items())):
            out = storage.join(spec.output_uri, f"source={azureml.resource_name(label, 200)}")
            storage.write_bytes(storage.join(folder, f"{i:05d}.json"), manifest(
                {label: uri}, model_columns(cfg), key_columns(cfg), spec.chunk_rows, spec.model.version, out))
        job = self.ml.batch_endpoints.invoke(
            endpoint_name=endpoint.name, deployment_name=name,
            inputs={"manifests": Input(type=AssetTypes.URI_FOLDER, path=azureml.datastore_uri(folder, self.settings))})
        self.log.info("batch job %s: v%s over %d snapshot(s) -> %s", job.name, spec.model.version, len(spec.inputs),
                      spec.output_uri)
        self.wait_for_job(job.name, spec.max_runtime_s)

    def _driver_code(self) -> str:
        """The deployment's code asset: a one-line scoring script importing the project's batch driver, in the
        bucket (content-addressed), registered once; its ARM id."""
        import hashlib

        from azure.ai.ml.entities._assets import Code

        from mlfactory import storage
        from mlfactory.backends.azure.azureml import BATCH_DRIVER, datastore_uri
        from mlfactory_airflow.backends.azure.hooks import not_found

        script = b"from mlfactory.backends.azure.batch_driver import init, run  # noqa: F401\n"
        version = hashlib.sha256(script).hexdigest()[:16]
        folder = storage.join(self.config.storage.bucket, "_azureml", "code", version)
        storage.write_bytes(storage.join(folder, BATCH_DRIVER), script)
        operations = self.ml._code  # MLClient registers code assets through this (no public accessor)
        found = not_found(operations.get, "mlfactory-batch-driver", version)
        if found is None:
            ensure_datastore(self.ml, self.config, self.log)
            found = operations.create_or_update(Code(name="mlfactory-batch-driver", version=version,
                                                     path=datastore_uri(folder, self.settings)))
        return found.id

    def execute_complete(self, context, event: dict | None = None, job: str = "") -> dict:
        from airflow.sdk.exceptions import AirflowException

        from mlfactory.backends.azure.azureml import job_status
        from mlfactory.batch_scoring import complete
        from mlfactory.specs import BatchJobSpec

        spec = BatchJobSpec.model_validate(self.spec)
        status = job_status(self.ml.jobs.get(job))
        if status.state != "succeeded":
            raise AirflowException(f"Azure ML batch job {job} {status.state}: {status.detail}")
        complete(self.config, spec)
        return {"uri": spec.output_uri, "version": spec.model.version, "job": job, "snapshots": spec.snapshots,
                "inputs": spec.inputs}
