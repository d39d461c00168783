"""The `azure` backend's operators: deferrable Azure ML training, the online endpoint rollout and batch
endpoints (the microsoft-azure provider has no Azure ML operator).

Every call goes through azure-ai-ml's ``MLClient`` (and Azure Monitor's client for autoscale) on an Airflow
connection (``hooks.AzureMLHook``). Operators prepare, submit and defer: a job defers on an
``AzureMLJobTrigger``, an endpoint or deployment being provisioned (or deleted) on an
``AzureMLResourceTrigger`` that resumes the operator's ``execute``, which looks at what exists and starts
the next step, so a retry (or a resumed try) takes over where the last one stopped.

ml_train: ``AzureMLTrainingOperator`` (``train``) runs a ``TrainingJobSpec`` as a command job.

ml_deploy (an ``EndpointSpec``):

- ``deploy.stage``: the version registered as an Azure ML model (its files stay where MLflow keeps them)
  and the managed online endpoint created if it does not exist. The plan (what serves now) is kept in the
  endpoint state for a rollback.
- ``deploy.canary``: the version's ``ManagedOnlineDeployment`` created beside the served one (blue/green),
  its autoscale setting in place, ``serving.canary_percent`` of the endpoint's traffic; after
  ``serving.canary_wait_s`` (deferred), ``canary_requests`` holdout rows sent to it (``azureml-model-deployment``
  header): their error rate must stay under ``max_error_rate``, and every prediction must be sane.
- ``deploy.full_traffic``: all traffic to the version, the old deployments deleted.
- ``rollback`` (after a failed step): the old traffic back, the new deployment deleted.

ml_batch_score: ``AzureMLBatchOperator`` (``score``) runs a ``BatchJobSpec`` on a batch endpoint.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from mlfactory_airflow.backends import CloudSpecOperator

DONE = ("succeeded", "deleted")


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
        from mlfactory_airflow.backends.azure.triggers import AzureMLResourceTrigger

        self.log.info("%s: waiting for %s %s", what, kind, name)
        extra = {"kind": kind, **({"endpoint": endpoint} if endpoint else {})}
        self.defer(trigger=AzureMLResourceTrigger(name, self.hook.to_dict(), poll_interval=self.poll_interval,
                                                  timeout_s=timeout_s, **extra),
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

    def ensure_datastore(self) -> None:
        """The bucket's container as the workspace datastore ``azure.datastore`` (identity-based), once."""
        from mlfactory.backends.azure.azureml import container_of, datastore
        from mlfactory_airflow.backends.azure.hooks import not_found

        if not_found(self.ml.datastores.get, self.settings.datastore) is None:
            container = container_of(self.config.storage.bucket)
            self.ml.datastores.create_or_update(datastore(self.settings, container))
            self.log.info("registered datastore %s on container %s", self.settings.datastore, container)

    def model_asset(self, model) -> str:
        """The Azure ML model of a registered version (created once); its ARM id."""
        from mlfactory.backends.azure.azureml import model_asset
        from mlfactory_airflow.backends.azure.hooks import not_found

        asset = model_asset(model, self.settings)
        found = not_found(self.ml.models.get, asset.name, asset.version)
        if found is None:
            self.ensure_datastore()
            found = self.ml.models.create_or_update(asset)
            self.log.info("registered v%s as Azure ML model %s:%s (%s)", model.version, asset.name, asset.version,
                          asset.path)
        return found.id


class AzureMLTrainingOperator(AzureMLBaseOperator):
    """A TrainingJobSpec as an Azure ML command job; returns the entrypoint's metrics.json (from its ``model`` output).

    - The cost guard refuses a job whose worst case is over ``azure.budget_usd`` before anything is created.
    - Try N runs job ``<spec>-tN``; a retry whose earlier job runs or succeeded takes it over, one whose job
      failed or was cancelled starts another on the same checkpoints output (so it resumes).
    - Killing the task cancels the job (the trigger's ``on_kill`` while deferred, ``on_kill`` on a worker).
    - A failed job fails the task with Azure ML's status and error.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.job_name: str | None = None

    def execute(self, context, **_) -> None:
        from mlfactory.backends.azure.azureml import check_training_budget, command_job, job_name, job_status
        from mlfactory.specs import TrainingJobSpec
        from mlfactory_airflow.backends.azure.hooks import not_found
        from mlfactory_airflow.outcomes import task_outcome

        spec = TrainingJobSpec.model_validate(self.spec)
        try_number = context["ti"].try_number
        with task_outcome():  # over budget, or an entity the SDK refuses: retrying cannot help
            estimate = check_training_budget(spec, self.settings)
            job = command_job(spec, self.settings, job_name(spec.name, try_number))
        for attempt in range(try_number - 1, 0, -1):
            earlier = not_found(self.ml.jobs.get, job_name(spec.name, attempt))
            if earlier is None:
                continue
            status = job_status(earlier)
            if status.state in ("running", "succeeded"):
                self.log.info("job %s (an earlier try's) is %s: taking it over", earlier.name, status.detail)
                self.job_name = earlier.name
                return self.wait_for_job(earlier.name, 3 * spec.max_runtime_s)
            self.log.info("the earlier job %s ended %s: starting %s", earlier.name, status.detail, job.name)
            break
        self.ensure_datastore()
        self.job_name = self.ml.jobs.create_or_update(job).name
        self.log.info("Azure ML job %s: %s (%s)", self.job_name, estimate,
                      f"{self.settings.job_tier} tier" if not self.settings.compute else f"cluster {self.settings.compute}")
        # Spot jobs may wait for capacity and be requeued: poll for up to 3 x the max runtime
        self.wait_for_job(self.job_name, 3 * spec.max_runtime_s)

    def execute_complete(self, context, event: dict[str, Any] | None = None, job: str = "") -> dict:
        from airflow.sdk.exceptions import AirflowException

        from mlfactory import storage
        from mlfactory.backends.azure.azureml import job_status, training_result
        from mlfactory.specs import METRICS_FILE, TrainingJobSpec

        self.job_name = job
        status = job_status(self.ml.jobs.get(job))
        if status.state != "succeeded":
            raise AirflowException(f"Azure ML job {job} {status.state}: {status.detail}")
        spec = TrainingJobSpec.model_validate(self.spec)
        metrics = storage.join(spec.output_uri, METRICS_FILE)
        if not storage.exists(metrics):
            raise FileNotFoundError(f"Azure ML job {job} completed but left no {metrics}: did it run the "
                                    "mlfactory.train entrypoint?")
        result = training_result(storage.read_bytes(metrics), spec, job)
        self.log.info("job %s: %s %s; model bundle %s", job, result["metric"], result["value"], result["model_bundle_uri"])
        return result

    def on_kill(self) -> None:
        from mlfactory_airflow.backends.azure.triggers import cancel_job

        if self.job_name:
            cancel_job(self.ml, self.job_name, self.log)


class AzureMLStageOperator(AzureMLBaseOperator):
    """The version as an Azure ML model and the online endpoint in place; returns the rollout plan."""

    def execute(self, context, event: dict | None = None, waited_for: str | None = None) -> dict | None:
        from mlfactory.backends.azure import azureml
        from mlfactory.deployment import write_endpoint_state
        from mlfactory.specs import EndpointSpec
        from mlfactory_airflow.backends.azure.hooks import not_found

        self.raise_for(event, waited_for)
        spec = EndpointSpec.model_validate(self.spec)
        model_id = self.model_asset(spec.model)
        name = azureml.resource_name(spec.name)
        endpoint = not_found(self.ml.online_endpoints.get, name)
        if endpoint is None or (endpoint.provisioning_state or "").lower() != "succeeded":
            if endpoint is None:
                self.ml.online_endpoints.begin_create_or_update(azureml.online_endpoint(spec, self.settings))
            return self.wait_for("online_endpoints", name, f"creation of online endpoint {name}")
        new = azureml.deployment_name(spec.model.version)
        traffic = {k: int(v) for k, v in (endpoint.traffic or {}).items()}
        plan = {"endpoint": name, "deployment": new, "model_id": model_id, "version": spec.model.version,
                "serving": {k: v for k, v in traffic.items() if k != new and v > 0},
                "already_served": traffic.get(new, 0) == 100}
        write_endpoint_state(self.config, rollout=plan)
        self.log.info("online endpoint %s: traffic %s; v%s is %s", name, traffic or "none", spec.model.version,
                      "served already" if plan["already_served"] else "staged")
        return plan


class AzureMLCanaryOperator(AzureMLBaseOperator):
    """The version's deployment beside the served one, autoscaled, with ``canary_percent`` of the traffic; then checked."""

    template_fields = ("spec", "plan")

    def __init__(self, *, plan: dict[str, Any], **kwargs) -> None:
        super().__init__(**kwargs)
        self.plan = plan

    def execute(self, context, event: dict | None = None, waited_for: str | None = None, check: bool = False) -> dict | None:
        from mlfactory.backends.azure import azureml
        from mlfactory.specs import EndpointSpec
        from mlfactory_airflow.backends.azure.hooks import not_found

        self.raise_for(event, waited_for)
        spec, plan = EndpointSpec.model_validate(self.spec), self.plan
        endpoint_name, new = plan["endpoint"], plan["deployment"]
        if plan["already_served"]:
            return {"skipped": f"v{spec.model.version} serves all traffic already", "deployment": new}
        deployment = not_found(self.ml.online_deployments.get, new, endpoint_name)
        if deployment is None or (deployment.provisioning_state or "").lower() != "succeeded":
            if deployment is None:
                environment = {"MLFACTORY_PREDICTION_LOG_URI": self.config.storage.prediction_log_uri}
                self.ml.online_deployments.begin_create_or_update(
                    azureml.online_deployment(spec, self.settings, plan["model_id"], environment),
                    skip_script_validation=True)
                self.log.info("creating deployment %s of v%s on %s (%d instance(s) to start)", new, spec.model.version,
                              endpoint_name, spec.min_replicas)
            return self.wait_for("online_deployments", new, f"deployment {new}", endpoint=endpoint_name,
                                 timeout_s=2 * 3600)
        self._autoscale(spec, deployment.id)
        endpoint = self.ml.online_endpoints.get(endpoint_name)
        wanted = azureml.canary_traffic(plan["serving"], new, spec.canary_percent)
        if {k: int(v) for k, v in (endpoint.traffic or {}).items() if v} != wanted:
            endpoint.traffic = wanted
            self.ml.online_endpoints.begin_create_or_update(endpoint)
            self.log.info("traffic of %s: %s", endpoint_name, wanted)
            return self.wait_for("online_endpoints", endpoint_name, f"traffic update of {endpoint_name}")
        if not check and plan["serving"] and spec.canary_wait_s:
            from datetime import timedelta

            from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger

            self.log.info("v%s (%s) has %s%% of the traffic; checking it in %ss", spec.model.version, new,
                          wanted[new], spec.canary_wait_s)
            return self.defer(trigger=TimeDeltaTrigger(timedelta(seconds=spec.canary_wait_s)), method_name="execute",
                              kwargs={"check": True})
        return self._check(spec, plan, endpoint, wanted)

    def _autoscale(self, spec, deployment_id: str) -> None:
        from mlfactory.backends.azure.azureml import autoscale_name, autoscale_setting

        name = autoscale_name(deployment_id)
        self.hook.get_monitor_client().autoscale_settings.create_or_update(
            self.settings.resource_group, name, autoscale_setting(spec, self.settings, deployment_id))
        self.log.info("autoscale %s: %d-%d instances at %d%% CPU", name, spec.min_replicas, spec.max_replicas,
                      self.settings.autoscale_target_cpu)

    def _check(self, spec, plan: dict, endpoint, traffic: dict) -> dict:
        """``canary_requests`` (at least ``smoke_rows``) holdout rows sent to the new deployment, one per request."""
        import requests

        from mlfactory.deployment import DeploymentFailed, holdout_requests, record_failure, sane_prediction

        rows = holdout_requests(self.config, spec.smoke_rows)
        key = self.ml.online_endpoints.get_keys(plan["endpoint"]).primary_key
        headers = {"Authorization": f"Bearer {key}", "azureml-model-deployment": plan["deployment"]}
        errors, samples, requests_sent = 0, [], max(spec.canary_requests, len(rows))
        with requests.Session() as session:
            for i in range(requests_sent):
                row = rows[i % len(rows)]
                try:
                    reply = session.post(endpoint.scoring_uri, headers=headers, timeout=60,
                                         json={"input_data": {"columns": list(row), "data": [list(row.values())]}})
                    reply.raise_for_status()
                    (prediction,) = reply.json()["predictions"]
                    if not sane_prediction(prediction):
                        raise ValueError(f"not a usable prediction: {prediction}")
                except Exception as err:  # noqa: BLE001 - every failed request counts against the canary
                    errors += 1
                    samples.append(str(err)[:300])
        rate = errors / requests_sent
        result = {"requests": requests_sent, "errors": errors, "error_rate": rate, "deployment": plan["deployment"],
                  "traffic": traffic}
        self.log.info("canary of v%s: %s", spec.model.version, result)
        if rate > spec.max_error_rate:
            reason = (f"canary of v{spec.model.version} on {plan['endpoint']}: {errors} of {requests_sent} requests "
                      f"failed ({rate:.1%} > {spec.max_error_rate:.1%}), e.g. {samples[:2]}")
            record_failure(self.config, "canary", spec.model.version, reason)
            raise DeploymentFailed(reason)
        return result


class AzureMLFullTrafficOperator(AzureMLBaseOperator):
    """All traffic to the new deployment; the others deleted; the endpoint state written."""

    template_fields = ("spec", "plan", "canary")

    def __init__(self, *, plan: dict[str, Any], canary: dict[str, Any], **kwargs) -> None:
        super().__init__(**kwargs)
        self.plan, self.canary = plan, canary

    def execute(self, context, event: dict | None = None, waited_for: str | None = None) -> dict | None:
        from mlfactory.deployment import served
        from mlfactory.specs import EndpointSpec

        self.raise_for(event, waited_for)
        spec, plan = EndpointSpec.model_validate(self.spec), self.plan
        name, new = plan["endpoint"], plan["deployment"]
        endpoint = self.ml.online_endpoints.get(name)
        if {k: int(v) for k, v in (endpoint.traffic or {}).items() if v} != {new: 100}:
            endpoint.traffic = {new: 100}
            endpoint.mirror_traffic = {}
            self.ml.online_endpoints.begin_create_or_update(endpoint)
            self.log.info("v%s (%s) has all the traffic of %s", spec.model.version, new, name)
            return self.wait_for("online_endpoints", name, f"traffic update of {name}")
        old = [d.name for d in self.ml.online_deployments.list(name) if d.name != new]
        if old:
            self.ml.online_deployments.begin_delete(old[0], name)
            self.log.info("deleting deployment %s of %s", old[0], name)
            return self.wait_for("online_deployments", old[0], f"deletion of deployment {old[0]}", endpoint=name)
        deployment = self.ml.online_deployments.get(new, name)
        return served(self.config, spec.model.version, endpoint=name, tags={"mlfactory.azureml_deployment": new},
                      backend="azure", deployment=new, model_id=plan["model_id"], model_uri=spec.model.uri,
                      scoring_uri=endpoint.scoring_uri, instance_type=deployment.instance_type,
                      autoscale={"min_replicas": spec.min_replicas, "max_replicas": spec.max_replicas,
                                 "target_cpu_percent": self.settings.autoscale_target_cpu})


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
                    spec, self.settings, endpoint.name, self.model_asset(spec.model), self._driver_code()))
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
            self.ensure_datastore()
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
