"""The `gcp` backend's operators: Vertex AI training and batch prediction.

Every Vertex call goes through an ``aiplatform_v1`` client on the google provider's credentials
(``hooks.VertexConnection``). Long work never holds a worker slot: a job defers on a
``VertexJobTrigger``, a long-running operation (model upload, endpoint creation, deploy, undeploy) on a
``VertexOperationTrigger`` that resumes the operator's ``execute``, which looks at what exists and
starts the next step, so a retry (or a resumed try) takes over where the last one stopped.

ml_train: ``VertexTrainingOperator`` (``train``) runs a ``TrainingJobSpec`` as a CustomJob.

ml_batch_score: ``VertexBatchPredictionOperator`` (``score``) runs a ``BatchJobSpec`` as a BatchPredictionJob.
"""

from __future__ import annotations

from functools import cached_property

from mlfactory_airflow.backends import CloudSpecOperator
from mlfactory_airflow.backends.gcp import links
from mlfactory_airflow.backends.gcp.hooks import VertexConnection, VertexJobs, model_name, upload_model
from mlfactory_airflow.training import CloudTrainingOperator, taken_over


class VertexBaseOperator(CloudSpecOperator):
    """The `gcp` config section, Vertex clients, and deferring on Vertex's jobs and operations."""

    ui_color = "#d2e3fc"
    backend, platform = "gcp", "a Vertex AI operator"

    @cached_property
    def connection(self):
        return VertexConnection.of(self.settings)

    def client(self, service: str):
        return self.connection.client(service)

    def wait_for_operation(self, operation, service: str, what: str, timeout_s: int = 3600, **resume) -> None:
        """Defer until ``operation`` (a google.api_core Operation) is done, then resume ``execute(**resume)``."""
        from mlfactory_airflow.backends.gcp.triggers import VertexOperationTrigger

        name = operation.operation.name
        self.log.info("%s: waiting for operation %s", what, name)
        self.defer(trigger=VertexOperationTrigger(name, self.connection.to_dict(), service=service,
                                                  poll_interval=self.poll_interval, timeout_s=timeout_s),
                   method_name="execute", kwargs={**resume, "waited_for": what})

    @staticmethod
    def raise_for(event: dict | None, what: str | None) -> None:
        """After a deferral: fail on an operation that failed or timed out, naming it and Vertex's error."""
        from airflow.sdk.exceptions import AirflowException

        if event and event.get("state") not in (None, "succeeded"):
            raise AirflowException(f"{what or 'a Vertex AI operation'} {event['state']} ({event['name']}): "
                                   f"{event.get('detail')}")

    def earlier_job(self, list_jobs, name: str):
        """The latest job an earlier try started for ``name`` (found by its label): (its name, its JobStatus) or None."""
        from mlfactory.backends.gcp.vertex import job_filter, job_status, parent

        earlier = sorted(list_jobs(request={"parent": parent(self.settings), "filter": job_filter(name)}),
                         key=lambda j: j.create_time.timestamp() if j.create_time else 0)
        return (earlier[-1].name, job_status(earlier[-1])) if earlier else None

    def start_or_take_over(self, create, list_jobs, name: str, try_number: int) -> str:
        """The job an earlier try started for ``name`` when it is running or succeeded, else a new one from
        ``create()``. Returns its resource name."""
        return taken_over(self.earlier_job(list_jobs, name), "Vertex job", self.log, try_number) or create().name


class VertexTrainingOperator(CloudTrainingOperator, VertexBaseOperator):
    """A TrainingJobSpec as a Vertex AI CustomJob (``mlfactory_airflow.training``'s life cycle); returns the
    entrypoint's metrics.json (from AIP_MODEL_DIR)."""

    adapter_class = VertexJobs


class VertexBatchPredictionOperator(VertexBaseOperator):
    """A BatchJobSpec as a Vertex BatchPredictionJob over JSON Lines instances of the curated snapshots."""

    def execute(self, context, event: dict | None = None, waited_for: str | None = None) -> None:
        from mlfactory import storage
        from mlfactory.backends.gcp import vertex
        from mlfactory.backends.gcp.instances import write_instances
        from mlfactory.serving.batch import batch_uri
        from mlfactory.specs import BatchJobSpec

        from mlfactory_airflow.outcomes import task_outcome

        self.raise_for(event, waited_for)
        spec, cfg = BatchJobSpec.model_validate(self.spec), self.config
        operation = upload_model(self.client("model"), cfg, spec.model, self.log)
        if operation is not None:
            return self.wait_for_operation(operation, "model", f"upload of v{spec.model.version}")
        client = self.client("job")

        def create():
            with task_outcome():
                files, excluded = write_instances(cfg, spec, storage.join(batch_uri(cfg), "_instances", f"run={spec.name}"))
                job = vertex.batch_prediction_job(spec.name, model_name(self.settings, spec.model), files, spec, self.settings,
                                                  excluded)
            self.log.info("batch prediction of v%s over %d instance file(s) -> %s", spec.model.version, len(files),
                          spec.output_uri)
            return client.create_batch_prediction_job(parent=vertex.parent(self.settings), batch_prediction_job=job)

        name = self.start_or_take_over(create, client.list_batch_prediction_jobs, spec.name, context["ti"].try_number)
        self.show_job(context, links.batch_prediction_job(self.settings, name))
        self.defer(trigger=VertexJobs(self).trigger(name, spec.max_runtime_s), method_name="execute_complete",
                   kwargs={"job": name})

    def execute_complete(self, context, event: dict | None = None, job: str = "") -> dict:
        from airflow.sdk.exceptions import AirflowException
        from mlfactory.backends.gcp.vertex import job_status
        from mlfactory.serving.batch import complete
        from mlfactory.specs import BatchJobSpec

        spec = BatchJobSpec.model_validate(self.spec)
        described = self.client("job").get_batch_prediction_job(name=job)
        status = job_status(described)
        if status.state != "succeeded":
            raise AirflowException(f"Vertex batch prediction job {job} {status.state}: {status.detail}")
        complete(self.config, spec)
        stats = described.completion_stats
        return {"uri": spec.output_uri, "version": spec.model.version, "job": job, "snapshots": spec.snapshots,
                "inputs": spec.inputs, "output": described.output_info.gcs_output_directory,
                "rows": stats.successful_count, "failed_rows": stats.failed_count}

