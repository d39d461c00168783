"""The `azure` backend's operators: deferrable Azure ML training and batch endpoints (the microsoft-azure
provider has no Azure ML operator).

Every call goes through azure-ai-ml's ``MLClient`` (and Azure Monitor's client for autoscale) on an Airflow
connection (``hooks.AzureMLHook``). Operators prepare, submit and defer: a job defers on an
``AzureMLJobTrigger``, an endpoint or deployment being provisioned (or deleted) on an
``AzureMLResourceTrigger`` that resumes the operator's ``execute``, which looks at what exists and starts
the next step, so a retry (or a resumed try) takes over where the last one stopped.

ml_train: ``AzureMLTrainingOperator`` (``train``) runs a ``TrainingJobSpec`` as a command job.

ml_batch_score: ``AzureMLBatchOperator`` (``score``) runs a ``BatchJobSpec`` on a batch endpoint.
"""

from __future__ import annotations

from functools import cached_property

from mlfactory_airflow.backends import CloudSpecOperator
from mlfactory_airflow.backends.azure import links
from mlfactory_airflow.backends.azure.hooks import AzureMLHook, AzureMLJobs, ensure_datastore, registered_model
from mlfactory_airflow.backends.azure.triggers import DONE, resource_trigger
from mlfactory_airflow.training import CloudTrainingOperator


class AzureMLBaseOperator(CloudSpecOperator):
    """The `azure` config section, the MLClient, and deferring on Azure ML's jobs and resources."""

    ui_color = "#cce4f6"
    backend, platform = "azure", "an Azure ML operator"

    @cached_property
    def hook(self):
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

    @staticmethod
    def raise_for(event: dict | None, what: str | None) -> None:
        """After a deferral: fail on provisioning that failed or timed out, naming it."""
        from airflow.sdk.exceptions import AirflowException

        if event and event.get("state") not in (None, *DONE):
            raise AirflowException(f"{what or 'an Azure ML operation'} {event['state']} ({event['name']}): "
                                   f"{event.get('detail')}")


class AzureMLTrainingOperator(CloudTrainingOperator, AzureMLBaseOperator):
    """A TrainingJobSpec as an Azure ML command job (``mlfactory_airflow.training``'s life cycle); returns the
    entrypoint's metrics.json (from its ``model`` output)."""

    adapter_class = AzureMLJobs


class AzureMLBatchOperator(AzureMLBaseOperator):
    """A BatchJobSpec on the model's batch endpoint: one manifest per snapshot, scored by the version's
    ``ModelBatchDeployment`` (the project's batch driver on its image) into the run's output folder."""

    def execute(self, context, event: dict | None = None, waited_for: str | None = None) -> None:
        from azure.ai.ml import Input
        from azure.ai.ml.constants import AssetTypes
        from mlfactory import storage
        from mlfactory.backends.azure import azureml
        from mlfactory.backends.azure.batch_driver import manifest
        from mlfactory.serving.batch import batch_uri, key_columns, model_columns
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
        self.show_job(context, links.job(self.settings, job.name))
        self.defer(trigger=AzureMLJobs(self).trigger(job.name, spec.max_runtime_s), method_name="execute_complete",
                   kwargs={"job": job.name})

    def _driver_code(self) -> str:
        """The deployment's code asset: a one-line scoring script importing the project's batch driver, in the
        bucket beside the batch predictions (content-addressed), registered once; its ARM id."""
        import hashlib

        from azure.ai.ml.entities._assets import Code
        from mlfactory import storage
        from mlfactory.backends.azure.azureml import BATCH_DRIVER, datastore_uri
        from mlfactory.serving.batch import batch_uri

        from mlfactory_airflow.backends.azure.hooks import not_found

        script = b"from mlfactory.backends.azure.batch_driver import init, run  # noqa: F401\n"
        version = hashlib.sha256(script).hexdigest()[:16]
        folder = storage.join(batch_uri(self.config), "_code", version)  # where the serving identity reads
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
        from mlfactory.serving.batch import complete
        from mlfactory.specs import BatchJobSpec

        spec = BatchJobSpec.model_validate(self.spec)
        status = job_status(self.ml.jobs.get(job))
        if status.state != "succeeded":
            raise AirflowException(f"Azure ML batch job {job} {status.state}: {status.detail}")
        complete(self.config, spec)
        return {"uri": spec.output_uri, "version": spec.model.version, "job": job, "snapshots": spec.snapshots,
                "inputs": spec.inputs}

