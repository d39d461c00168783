"""The `gcp` backend's operators: Vertex AI training, the endpoint rollout and batch prediction.

Every Vertex call goes through an ``aiplatform_v1`` client on the google provider's credentials
(``clients.VertexConnection``). Long work never holds a worker slot: a job defers on a
``VertexJobTrigger``, a long-running operation (model upload, endpoint creation, deploy, undeploy) on a
``VertexOperationTrigger`` that resumes the operator's ``execute``, which looks at what exists and
starts the next step, so a retry (or a resumed try) takes over where the last one stopped.

ml_train: ``VertexTrainingOperator`` (``train``) runs a ``TrainingJobSpec`` as a CustomJob.

ml_deploy (an ``EndpointSpec``):

- ``deploy.stage``: the version uploaded to the Vertex Model Registry as the deployable artifact (its
  files stay where MLflow keeps them; the container is the project's model server) and the endpoint
  created if it does not exist. Nothing serves the version yet; the plan (what serves now) is kept in
  the endpoint state for a rollback.
- ``deploy.canary``: the version deployed beside the served one with ``serving.canary_percent`` of the
  traffic (Vertex's traffic split) and autoscaling between ``min_replicas`` and ``max_replicas``; after
  ``serving.canary_wait_s`` (deferred), ``canary_requests`` holdout rows through the endpoint: their error
  rate must stay under ``max_error_rate``, and every prediction must be sane.
- ``deploy.full_traffic``: all traffic to the version, the old deployed models undeployed.
- ``rollback`` (after a failed step): the old traffic split back, the new deployed model undeployed.

ml_batch_score: ``VertexBatchPredictionOperator`` (``score``) runs a ``BatchJobSpec`` as a BatchPredictionJob.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from mlfactory_airflow.backends import CloudSpecOperator


class VertexBaseOperator(CloudSpecOperator):
    """The `gcp` config section, Vertex clients, and deferring on Vertex's jobs and operations."""

    ui_color = "#d2e3fc"
    backend, platform = "gcp", "a Vertex AI operator"

    @cached_property
    def connection(self):
        from mlfactory_airflow.backends.gcp.clients import VertexConnection

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

    def wait_for_job(self, name: str, timeout_s: int, **resume) -> None:
        from mlfactory_airflow.backends.gcp.triggers import VertexJobTrigger

        self.defer(trigger=VertexJobTrigger(name, self.connection.to_dict(), poll_interval=self.poll_interval,
                                            timeout_s=timeout_s),
                   method_name="execute_complete", kwargs={"job": name, **resume})

    @staticmethod
    def raise_for(event: dict | None, what: str | None) -> None:
        """After a deferral: fail on an operation that failed or timed out, naming it and Vertex's error."""
        from airflow.sdk.exceptions import AirflowException

        if event and event.get("state") not in (None, "succeeded"):
            raise AirflowException(f"{what or 'a Vertex AI operation'} {event['state']} ({event['name']}): "
                                   f"{event.get('detail')}")

    def model_name(self, model) -> str:
        from mlfactory.backends.gcp.vertex import model_id, parent

        return f"{parent(self.settings)}/models/{model_id(model)}"

    def upload_model(self, model):
        """The operation uploading ``model`` (a ModelRef) to the Vertex Model Registry, or None when it is there."""
        from mlfactory.backends.gcp.vertex import upload_model_request
        from mlfactory_airflow.backends.gcp.clients import not_found

        client = self.client("model")
        if not_found(client.get_model, name=self.model_name(model)) is not None:
            return None
        environment = {"MLFACTORY_PREDICTION_LOG_URI": self.config.storage.prediction_log_uri}
        self.log.info("uploading v%s (%s) to the Vertex Model Registry", model.version, model.uri)
        return client.upload_model(request=upload_model_request(model, self.settings, environment))

    def start_or_take_over(self, create, list_jobs, name: str, try_number: int) -> str:
        """The job an earlier try started for ``name`` when it is running or succeeded (found by its label), else
        a new one from ``create()``. Returns its resource name."""
        from mlfactory.backends.gcp.vertex import job_filter, job_status, parent

        earlier = sorted(list_jobs(request={"parent": parent(self.settings), "filter": job_filter(name)}),
                         key=lambda j: j.create_time.timestamp() if j.create_time else 0)
        if earlier:
            latest, status = earlier[-1], job_status(earlier[-1])
            if status.state in ("running", "succeeded"):
                self.log.info("%s (started for %s by an earlier try) is %s: taking it over", latest.name, name,
                              status.detail)
                return latest.name
            self.log.info("the earlier job %s ended %s (%s): starting another (try %d)", latest.name, status.state,
                          status.detail, try_number)
        return create().name


class VertexTrainingOperator(VertexBaseOperator):
    """A TrainingJobSpec as a Vertex AI CustomJob; returns the entrypoint's metrics.json (from AIP_MODEL_DIR).

    - The cost guard refuses a job whose worst case is over ``gcp.budget_usd`` before anything is created.
    - The job's resource name is carried through the deferral; a retry whose earlier job runs or succeeded
      takes it over, one whose job failed or was cancelled starts another with the same
      ``base_output_directory`` (so it resumes from the same ``AIP_CHECKPOINT_DIR``).
    - Killing the task cancels the job (the trigger's ``on_kill`` while deferred, ``on_kill`` on a worker).
    - A failed job fails the task with Vertex's error message.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.job_name: str | None = None

    def execute(self, context, **_) -> None:
        from mlfactory.backends.gcp.vertex import check_training_budget, custom_job, parent, training_machine
        from mlfactory.specs import TrainingJobSpec
        from mlfactory_airflow.outcomes import task_outcome

        spec = TrainingJobSpec.model_validate(self.spec)
        with task_outcome():  # over budget, or a request the protos refuse: retrying cannot help
            estimate = check_training_budget(spec, self.settings)
            job = custom_job(spec, self.settings)
        self.log.info("training job %s: %s (%s)", spec.name, estimate, "spot" if job.job_spec.scheduling.strategy == 4
                      else job.job_spec.scheduling.strategy.name)
        client = self.client("job")
        self.job_name = self.start_or_take_over(
            lambda: client.create_custom_job(parent=parent(self.settings), custom_job=job), client.list_custom_jobs,
            spec.name, context["ti"].try_number)
        self.log.info("Vertex AI custom job %s: %d x %s", self.job_name, spec.nodes,
                      training_machine(spec, self.settings).machine_type)
        # spot or flex-start jobs may wait for capacity: poll for up to 3 x the max runtime
        self.wait_for_job(self.job_name, 3 * spec.max_runtime_s)

    def execute_complete(self, context, event: dict[str, Any] | None = None, job: str = "") -> dict:
        from airflow.sdk.exceptions import AirflowException

        from mlfactory import storage
        from mlfactory.backends.gcp.vertex import job_status, model_dir, training_result
        from mlfactory.specs import METRICS_FILE, TrainingJobSpec

        self.job_name = job
        status = job_status(self.client("job").get_custom_job(name=job))
        if status.state != "succeeded":
            raise AirflowException(f"Vertex AI custom job {job} {status.state}: {status.detail}")
        spec = TrainingJobSpec.model_validate(self.spec)
        metrics = storage.join(model_dir(spec.output_uri), METRICS_FILE)
        if not storage.exists(metrics):
            raise FileNotFoundError(f"Vertex AI custom job {job} succeeded but left no {metrics}: did it run the "
                                    "mlfactory.train entrypoint?")
        result = training_result(storage.read_bytes(metrics), spec.output_uri, job)
        self.log.info("job %s: %s %s; model bundle %s", job, result["metric"], result["value"], result["model_bundle_uri"])
        return result

    def on_kill(self) -> None:
        from mlfactory_airflow.backends.gcp.triggers import cancel_job

        if self.job_name:
            cancel_job(self.client("job"), self.job_name, self.log)


class VertexStageOperator(VertexBaseOperator):
    """The version in the Vertex Model Registry and the endpoint in place; returns the rollout plan."""

    def execute(self, context, event: dict | None = None, waited_for: str | None = None) -> dict | None:
        from mlfactory.backends.gcp import vertex
        from mlfactory.deployment import write_endpoint_state
        from mlfactory.specs import EndpointSpec
        from mlfactory_airflow.backends.gcp.clients import not_found

        self.raise_for(event, waited_for)
        spec = EndpointSpec.model_validate(self.spec)
        operation = self.upload_model(spec.model)
        if operation is not None:
            return self.wait_for_operation(operation, "model", f"upload of v{spec.model.version}")
        client = self.client("endpoint")
        name = vertex.endpoint_name(spec, self.settings)
        endpoint = not_found(client.get_endpoint, name=name)
        if endpoint is None:
            operation = client.create_endpoint(request=vertex.create_endpoint_request(spec, self.settings))
            return self.wait_for_operation(operation, "endpoint", f"creation of endpoint {name}")
        model = self.model_name(spec.model)
        ours = [d.id for d in endpoint.deployed_models if _same_model(d.model, model)]
        split = {k: int(v) for k, v in endpoint.traffic_split.items()}
        plan = {"endpoint": name, "model": model, "version": spec.model.version,
                "serving": {k: v for k, v in split.items() if k not in ours and v > 0},
                "new": ours[0] if ours else None,
                "already_served": bool(ours) and split.get(ours[0], 0) == 100}
        write_endpoint_state(self.config, rollout=plan)
        self.log.info("endpoint %s serves %s; v%s is %s", name, split or "nothing",
                      spec.model.version, "served already" if plan["already_served"] else "staged")
        return plan


def _same_model(deployed: str, model: str) -> bool:
    """Whether a deployed model's ``model`` is ``model`` (Vertex may name the project by number, and a version)."""
    return deployed.split("@")[0].rsplit("/models/", 1)[-1] == model.rsplit("/models/", 1)[-1]


class VertexCanaryOperator(VertexBaseOperator):
    """The version deployed beside the served one with ``canary_percent`` of the traffic, then checked."""

    template_fields = ("spec", "plan")

    def __init__(self, *, plan: dict[str, Any], **kwargs) -> None:
        super().__init__(**kwargs)
        self.plan = plan

    def execute(self, context, event: dict | None = None, waited_for: str | None = None, check: bool = False) -> dict | None:
        from mlfactory.backends.gcp import vertex
        from mlfactory.deployment import write_endpoint_state
        from mlfactory.specs import EndpointSpec

        self.raise_for(event, waited_for)
        spec, plan = EndpointSpec.model_validate(self.spec), self.plan
        if plan["already_served"]:
            return {"skipped": f"v{spec.model.version} serves all traffic already", "deployed_model_id": plan["new"]}
        client = self.client("endpoint")
        endpoint = client.get_endpoint(name=plan["endpoint"])
        new = next((d.id for d in endpoint.deployed_models if _same_model(d.model, plan["model"])), None)
        if new is None:
            request = vertex.deploy_model_request(spec, self.settings, plan["model"], plan["serving"])
            self.log.info("deploying v%s to %s: traffic split %s, %d-%d replicas", spec.model.version, plan["endpoint"],
                          dict(request.traffic_split), spec.min_replicas, spec.max_replicas)
            return self.wait_for_operation(client.deploy_model(request=request), "endpoint",
                                           f"deployment of v{spec.model.version}", timeout_s=2 * 3600)
        write_endpoint_state(self.config, rollout={**plan, "new": new})
        if not check and plan["serving"] and spec.canary_wait_s:
            from datetime import timedelta

            from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger

            self.log.info("v%s (deployed model %s) has %s%% of the traffic; checking it in %ss", spec.model.version, new,
                          dict(endpoint.traffic_split).get(new), spec.canary_wait_s)
            return self.defer(trigger=TimeDeltaTrigger(timedelta(seconds=spec.canary_wait_s)), method_name="execute",
                              kwargs={"check": True})
        return self._check(spec, plan, new)

    def _check(self, spec, plan: dict, new: str) -> dict:
        """``canary_requests`` (at least ``smoke_rows``) holdout rows through the endpoint, one per request."""
        from google.protobuf import json_format, struct_pb2

        from mlfactory.deployment import DeploymentFailed, holdout_requests, record_failure, sane_prediction

        rows = holdout_requests(self.config, spec.smoke_rows)
        client = self.client("prediction")
        answered: dict[str, int] = {}
        errors, samples, requests = 0, [], max(spec.canary_requests, len(rows))
        for i in range(requests):
            instance = json_format.ParseDict(rows[i % len(rows)], struct_pb2.Value())
            try:
                reply = client.predict(endpoint=plan["endpoint"], instances=[instance])
                (prediction,) = type(reply).to_dict(reply)["predictions"]
                answered[reply.deployed_model_id] = answered.get(reply.deployed_model_id, 0) + 1
                if not sane_prediction(prediction):
                    raise ValueError(f"not a usable prediction: {prediction}")
            except Exception as err:  # noqa: BLE001 - every failed request counts against the canary
                errors += 1
                samples.append(str(err)[:300])
        rate = errors / requests
        result = {"requests": requests, "errors": errors, "error_rate": rate, "deployed_model_id": new,
                  "answered_by": answered, "percent": spec.canary_percent if plan["serving"] else 100}
        self.log.info("canary of v%s: %s", spec.model.version, result)
        if rate > spec.max_error_rate:
            reason = (f"canary of v{spec.model.version} on {plan['endpoint']}: {errors} of {requests} requests failed "
                      f"({rate:.1%} > {spec.max_error_rate:.1%}), e.g. {samples[:2]}")
            record_failure(self.config, "canary", spec.model.version, reason)
            raise DeploymentFailed(reason)
        return result


class VertexFullTrafficOperator(VertexBaseOperator):
    """All traffic to the new deployed model; the others undeployed; the endpoint state written."""

    template_fields = ("spec", "plan", "canary")

    def __init__(self, *, plan: dict[str, Any], canary: dict[str, Any], **kwargs) -> None:
        super().__init__(**kwargs)
        self.plan, self.canary = plan, canary

    def execute(self, context, event: dict | None = None, waited_for: str | None = None) -> dict | None:
        from mlfactory.backends.gcp import vertex
        from mlfactory.deployment import served
        from mlfactory.specs import EndpointSpec

        self.raise_for(event, waited_for)
        spec, plan = EndpointSpec.model_validate(self.spec), self.plan
        new = self.canary["deployed_model_id"]
        client = self.client("endpoint")
        endpoint = client.get_endpoint(name=plan["endpoint"])
        if dict(endpoint.traffic_split) != {new: 100}:
            endpoint = client.update_endpoint(request=vertex.update_endpoint_request(endpoint, {new: 100}))
            self.log.info("v%s (deployed model %s) has all the traffic of %s", spec.model.version, new, plan["endpoint"])
        old = [d.id for d in endpoint.deployed_models if d.id != new]
        if old:
            operation = client.undeploy_model(endpoint=plan["endpoint"], deployed_model_id=old[0],
                                              traffic_split={new: 100})
            return self.wait_for_operation(operation, "endpoint", f"undeployment of deployed model {old[0]}")
        deployed = next(d for d in endpoint.deployed_models if d.id == new)
        resources = deployed.dedicated_resources
        return served(self.config, spec.model.version, endpoint=plan["endpoint"],
                      tags={"mlfactory.vertex_deployed_model": new}, backend="gcp", deployed_model_id=new,
                      model=plan["model"], model_uri=spec.model.uri,
                      autoscaling={"min_replicas": resources.min_replica_count,
                                   "max_replicas": resources.max_replica_count,
                                   "metrics": {m.metric_name: m.target for m in resources.autoscaling_metric_specs}})


class VertexBatchPredictionOperator(VertexBaseOperator):
    """A BatchJobSpec as a Vertex BatchPredictionJob over JSON Lines instances of the curated snapshots."""

    def execute(self, context, event: dict | None = None, waited_for: str | None = None) -> None:
        from mlfactory import storage
        from mlfactory.backends.gcp import vertex
        from mlfactory.backends.gcp.instances import write_instances
        from mlfactory.batch_scoring import batch_uri
        from mlfactory.specs import BatchJobSpec
        from mlfactory_airflow.outcomes import task_outcome

        self.raise_for(event, waited_for)
        spec, cfg = BatchJobSpec.model_validate(self.spec), self.config
        operation = self.upload_model(spec.model)
        if operation is not None:
            return self.wait_for_operation(operation, "model", f"upload of v{spec.model.version}")
        client = self.client("job")

        def create():
            with task_outcome():
                files, excluded = write_instances(cfg, spec, storage.join(batch_uri(cfg), "_instances", f"run={spec.name}"))
                job = vertex.batch_prediction_job(spec.name, self.model_name(spec.model), files, spec, self.settings,
                                                  excluded)
            self.log.info("batch prediction of v%s over %d instance file(s) -> %s", spec.model.version, len(files),
                          spec.output_uri)
            return client.create_batch_prediction_job(parent=vertex.parent(self.settings), batch_prediction_job=job)

        name = self.start_or_take_over(create, client.list_batch_prediction_jobs, spec.name, context["ti"].try_number)
        self.wait_for_job(name, spec.max_runtime_s)

    def execute_complete(self, context, event: dict | None = None, job: str = "") -> dict:
        from airflow.sdk.exceptions import AirflowException

        from mlfactory.backends.gcp.vertex import job_status
        from mlfactory.batch_scoring import complete
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
