"""The `gcp` backend's clients and the adapters built on them.

Vertex AI clients on the google provider's credentials (``VertexConnection``), one place that makes them for
operators, adapters and triggers alike. The provider's Vertex hooks build gRPC clients for the regional endpoint; these are the same
``aiplatform_v1`` clients over REST (``transport="rest"``), with the connection's credentials
(``GoogleBaseHook``: key file, workload identity, impersonation, or anonymous for an emulator) and the
API host from ``gcp.api_endpoint`` (default ``REGION-aiplatform.googleapis.com``). One transport
everywhere means the requests a test sends to a local fake are the requests Google receives.

``VertexJobs``: ml_train's training job life cycle (``mlfactory_airflow.training``) as a Vertex CustomJob.

ml_deploy's rollout (``mlfactory.serving.rollout``: the same five steps and verdict as on every backend) on the Vertex
endpoint, through ``VertexEndpointAdapter``. Vertex's v1 ``predict`` (and ``rawPredict``) go by the endpoint's
traffic split: no request field or header picks a deployed model (``X-Vertex-AI-Deployed-Model-Id`` is a
response header; ``explain``'s ``deployed_model_id`` needs an explanation spec; ``deployedModels/*/invoke`` is
a preview for dedicated endpoints that disables ``predict``). So:

- ``stage``: the version uploaded to the Vertex Model Registry (its files stay where MLflow keeps them; the
  container is the project's model server), the endpoint created if needed, the plan kept for a rollback,
  then the version deployed alone on the endpoint's staging endpoint ``<id>-staging`` (which no client
  calls), or on the endpoint itself when nothing serves there yet.
- ``health_check``: that deployed model has all the traffic of where it was deployed; ``smoke_test``:
  holdout rows sent there, answered by the new model alone.
- ``canary``: the staging copy undeployed, the version deployed beside the served one with
  ``serving.canary_percent`` of the traffic (Vertex's traffic split) and autoscaling; after
  ``serving.canary_wait_s`` (deferred), ``canary_requests`` holdout rows through the endpoint.
- ``full_traffic``: all traffic to the version, the old deployed models undeployed.
- ``restore`` (ml_deploy's ``rollback``): the old traffic split back, the new deployed model undeployed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mlfactory.serving.deployment import DeploymentFailed, read_endpoint_state
from mlfactory.serving.rollout import EndpointAdapter, Wait

from mlfactory_airflow.backends.gcp import links
from mlfactory_airflow.training import JobAdapter

SERVICES = {"job": "JobServiceClient", "endpoint": "EndpointServiceClient", "model": "ModelServiceClient",
            "prediction": "PredictionServiceClient"}


@dataclass(frozen=True)
class VertexConnection:
    """What a client needs, small enough to travel in a trigger's serialized kwargs."""

    conn_id: str
    region: str
    api_endpoint: str = ""

    @classmethod
    def of(cls, settings) -> VertexConnection:
        return cls(settings.conn_id, settings.region, settings.api_endpoint)

    def to_dict(self) -> dict:
        return asdict(self)

    def client(self, service: str):
        """An aiplatform_v1 client of ``service`` (job, endpoint, model, prediction)."""
        from airflow.providers.google.common.hooks.base_google import GoogleBaseHook
        from google.cloud import aiplatform_v1

        credentials = GoogleBaseHook(gcp_conn_id=self.conn_id).get_credentials()
        host = self.api_endpoint or f"{self.region}-aiplatform.googleapis.com"
        return getattr(aiplatform_v1, SERVICES[service])(credentials=credentials, transport="rest",
                                                         client_options={"api_endpoint": host})


def not_found(call, *args, **kwargs):
    """``call(*args, **kwargs)``, or None when Vertex answers 404."""
    from google.api_core.exceptions import NotFound

    try:
        return call(*args, **kwargs)
    except NotFound:
        return None


def model_name(settings, model) -> str:
    """The Vertex model resource of ``model`` (a ModelRef)."""
    from mlfactory.backends.gcp.vertex import model_id, parent

    return f"{parent(settings)}/models/{model_id(model)}"


def upload_model(client, cfg, model, log):
    """The operation uploading ``model`` (a ModelRef) to the Vertex Model Registry, or None when it is there."""
    from mlfactory.backends.gcp.vertex import upload_model_request

    from mlfactory_airflow.backends.gcp.hooks import not_found

    if not_found(client.get_model, name=model_name(cfg.backend, model)) is not None:
        return None
    environment = {"MLFACTORY_PREDICTION_LOG_URI": cfg.storage.prediction_log_uri}
    log.info("uploading v%s (%s) to the Vertex Model Registry", model.version, model.uri)
    return client.upload_model(request=upload_model_request(model, cfg.backend, environment))


class VertexJobs(JobAdapter):
    """Vertex AI custom jobs: an earlier try's job is found by its ``mlfactory_job`` label; a retry after a failed
    one starts another with the same ``base_output_directory`` (so it resumes from the same ``AIP_CHECKPOINT_DIR``)."""

    platform = "Vertex AI custom job"

    def prepare(self, spec, try_number: int) -> str:
        from mlfactory.backends.gcp.vertex import check_training_budget, custom_job, training_machine

        estimate = check_training_budget(spec, self.settings)
        self.job = custom_job(spec, self.settings)
        strategy = self.job.job_spec.scheduling.strategy
        self.log.info("training job %s: %s (%s)", spec.name, estimate, "spot" if strategy == 4 else strategy.name)
        return f"{spec.nodes} x {training_machine(spec, self.settings).machine_type}"

    def find_earlier(self, spec, try_number: int):
        return self.operator.earlier_job(self.operator.client("job").list_custom_jobs, spec.name)

    def submit(self, spec, try_number: int, earlier: str | None) -> str:
        from mlfactory.backends.gcp.vertex import parent

        return self.operator.client("job").create_custom_job(parent=parent(self.settings), custom_job=self.job).name

    def trigger(self, job: str, timeout_s: int):
        from mlfactory_airflow.backends.gcp.triggers import VertexJobTrigger

        return VertexJobTrigger(job, self.operator.connection.to_dict(), poll_interval=self.operator.poll_interval,
                                timeout_s=timeout_s)

    def status(self, job: str):
        from mlfactory.backends.gcp.vertex import job_status

        return job_status(self.operator.client("job").get_custom_job(name=job))

    def result(self, job: str, spec, event: dict | None) -> dict:
        from mlfactory import storage
        from mlfactory.backends.gcp.vertex import model_dir, training_result
        from mlfactory.specs import METRICS_FILE

        metrics = storage.join(model_dir(spec.output_uri), METRICS_FILE)
        if not storage.exists(metrics):
            raise FileNotFoundError(f"Vertex AI custom job {job} succeeded but left no {metrics}: did it run the "
                                    "mlfactory.training.train entrypoint?")
        return training_result(storage.read_bytes(metrics), spec.output_uri, job)

    def console_url(self, job: str) -> str:
        return links.custom_job(self.settings, job)

    def cancel(self, job: str) -> None:
        from mlfactory_airflow.backends.gcp.triggers import cancel_job

        cancel_job(self.operator.client("job"), job, self.log)


def _same_model(deployed: str, model: str) -> bool:
    """Whether a deployed model's ``model`` is ``model`` (Vertex may name the project by number, and a version)."""
    return deployed.split("@")[0].rsplit("/models/", 1)[-1] == model.rsplit("/models/", 1)[-1]


class VertexEndpointAdapter(EndpointAdapter):
    """ml_deploy's rollout on the pipeline's Vertex endpoint (see the module's docstring). Vertex's v1 predict goes
    by the endpoint's traffic split and cannot be addressed to one deployed model, so a new version is smoke-tested
    alone on the endpoint's staging endpoint (``<id>-staging``, which no client calls) before it is deployed beside
    the served one. The plan's ``new`` is the version's Vertex model id; ``old`` and ``serving`` name deployed
    models of the endpoint."""

    def console_url(self, plan: dict) -> str:
        return links.endpoint(self.settings, plan["endpoint"])

    def __init__(self, cfg, spec, poll_interval: int | None = None) -> None:
        from mlfactory_airflow.backends.gcp.hooks import VertexConnection

        super().__init__(cfg, spec, poll_interval)
        self.connection = VertexConnection.of(self.settings)

    def client(self, service: str):
        return self.connection.client(service)

    def wait(self, operation, what: str, service: str = "endpoint", timeout_s: int = 3600) -> Wait:
        from mlfactory_airflow.backends.gcp.triggers import VertexOperationTrigger

        return Wait(what, operation=VertexOperationTrigger(operation.operation.name, self.connection.to_dict(),
                                                           service=service, poll_interval=self.poll_interval,
                                                           timeout_s=timeout_s))

    def deployed(self, endpoint, model: str) -> str | None:
        """The id of ``model``'s deployed model on ``endpoint``, if any."""
        return next((d.id for d in endpoint.deployed_models if _same_model(d.model, model)), None)

    def _endpoint(self, staging: bool = False):
        """The (staging) endpoint, or the Wait for its creation."""
        from mlfactory.backends.gcp import vertex

        from mlfactory_airflow.backends.gcp.hooks import not_found

        client, name = self.client("endpoint"), vertex.endpoint_name(self.spec, self.settings, staging)
        endpoint = not_found(client.get_endpoint, name=name)
        if endpoint is None:
            operation = client.create_endpoint(request=vertex.create_endpoint_request(self.spec, self.settings, staging))
            return self.wait(operation, f"creation of endpoint {name}")
        return endpoint

    def _deploy(self, plan: dict, staging: bool, serving: dict[str, int]) -> Wait:
        from mlfactory.backends.gcp import vertex

        request = vertex.deploy_model_request(self.spec, self.settings, plan["model"], serving, staging)
        self.log.info("deploying v%s to %s: traffic split %s, %d-%d replicas", plan["version"], request.endpoint,
                      dict(request.traffic_split), self.spec.min_replicas, self.spec.max_replicas)
        return self.wait(self.client("endpoint").deploy_model(request=request), f"deployment of v{plan['version']} "
                         f"to {request.endpoint}", timeout_s=2 * 3600)

    def stage(self, keep) -> dict | Wait:
        """The version in the Model Registry, the endpoint in place, and the version deployed alone: on the
        endpoint when nothing serves there, else on the staging endpoint (no traffic of the endpoint's)."""
        from mlfactory.backends.gcp import vertex

        spec = self.spec
        operation = upload_model(self.client("model"), self.cfg, spec.model, self.log)
        if operation is not None:
            return self.wait(operation, f"upload of v{spec.model.version}", service="model")
        endpoint = self._endpoint()
        if isinstance(endpoint, Wait):
            return endpoint
        model = model_name(self.settings, spec.model)
        ours = self.deployed(endpoint, model)
        split = {k: int(v) for k, v in endpoint.traffic_split.items()}
        serving = {k: v for k, v in split.items() if k != ours and v > 0}
        plan = {"endpoint": endpoint.name, "model": model, "version": spec.model.version, "new": vertex.model_id(spec.model),
                "serving": serving, "old": max(serving, key=serving.get) if serving else None,
                "staging": vertex.endpoint_name(spec, self.settings, staging=True) if serving else None,
                "already_served": bool(ours) and split.get(ours, 0) == 100}
        kept = read_endpoint_state(self.cfg).get("rollout") or {}
        if kept.get("version") == plan["version"] and kept.get("endpoint") == plan["endpoint"]:
            plan = kept  # this rollout's plan, from before its deployment (a first one takes all the traffic at once)
        else:
            keep(plan)
        self.log.info("endpoint %s serves %s; v%s is %s", endpoint.name, split or "nothing", spec.model.version,
                      "served already" if plan["already_served"] else "staged")
        if plan["already_served"]:
            return plan
        where = self._endpoint(staging=True) if plan["staging"] else endpoint
        if isinstance(where, Wait):
            return where
        if self.deployed(where, model) is None:
            return self._deploy(plan, bool(plan["staging"]), {})
        return plan

    def _new(self, plan: dict):
        """The endpoint (staging, or the endpoint itself on a first deployment) serving the new version alone."""
        return self.client("endpoint").get_endpoint(name=plan["staging"] or plan["endpoint"])

    def ready(self, plan: dict) -> str | None:
        endpoint = self._new(plan)
        new = self.deployed(endpoint, plan["model"])
        if new is None:
            return f"v{plan['version']} is not deployed on {endpoint.name}"
        return None if dict(endpoint.traffic_split).get(new) == 100 else \
            f"v{plan['version']} ({new}) has {dict(endpoint.traffic_split)} of {endpoint.name}"

    def predict(self, plan: dict, rows: list[dict], variant: str | None) -> tuple[str, list]:
        """``rows`` in one PredictRequest: to the new version alone (``variant``) through the endpoint that serves it
        alone, or to the endpoint as clients call it. Vertex answers which deployed model served it."""
        from google.protobuf import json_format, struct_pb2

        name = plan["endpoint"] if variant is None else (plan["staging"] or plan["endpoint"])
        if not hasattr(self, "_prediction"):
            self._prediction = self.client("prediction")
        reply = self._prediction.predict(endpoint=name, instances=[json_format.ParseDict(row, struct_pb2.Value())
                                                                   for row in rows])
        if variant is not None and not _same_model(reply.model, plan["model"]):
            raise ValueError(f"{reply.model} answered, not v{plan['version']}")
        return reply.deployed_model_id, type(reply).to_dict(reply)["predictions"]

    def set_weights(self, plan: dict, weights: dict[str, float]) -> Wait | None:
        """The new version deployed on the endpoint with its share (its staging copy undeployed first)."""
        from mlfactory.backends.gcp import vertex

        client = self.client("endpoint")
        if plan["staging"]:
            pending = self._undeploy_staging(plan)
            if pending is not None:
                return pending
        endpoint = client.get_endpoint(name=plan["endpoint"])
        new = self.deployed(endpoint, plan["model"])
        if new is None:
            return self._deploy(plan, False, plan["serving"])
        wanted = vertex.canary_split(plan["serving"], weights[plan["new"]])
        wanted[new] = wanted.pop("0")
        if {k: int(v) for k, v in endpoint.traffic_split.items() if v} != wanted:
            client.update_endpoint(request=vertex.update_endpoint_request(endpoint, wanted))
        return None

    def _undeploy_staging(self, plan: dict, wait: bool = True) -> Wait | None:
        from mlfactory_airflow.backends.gcp.hooks import not_found

        client = self.client("endpoint")
        staging = not_found(client.get_endpoint, name=plan["staging"]) if plan.get("staging") else None
        copy = self.deployed(staging, plan["model"]) if staging is not None else None
        if copy is None:
            return None
        operation = client.undeploy_model(endpoint=plan["staging"], deployed_model_id=copy, traffic_split={})
        self.log.info("undeploying v%s's staging copy %s from %s", plan["version"], copy, plan["staging"])
        return self.wait(operation, f"undeployment of the staging copy of v{plan['version']}") if wait else None

    def finalise(self, plan: dict) -> dict | Wait:
        """All traffic to the new deployed model, the others (and the staging copy) undeployed."""
        from mlfactory.backends.gcp import vertex

        pending = self._undeploy_staging(plan)
        if pending is not None:
            return pending
        client = self.client("endpoint")
        endpoint = client.get_endpoint(name=plan["endpoint"])
        new = self.deployed(endpoint, plan["model"])
        if new is None:
            raise DeploymentFailed(f"v{plan['version']} is not deployed on {plan['endpoint']}")
        if dict(endpoint.traffic_split) != {new: 100}:
            endpoint = client.update_endpoint(request=vertex.update_endpoint_request(endpoint, {new: 100}))
            self.log.info("v%s (deployed model %s) has all the traffic of %s", plan["version"], new, plan["endpoint"])
        old = [d.id for d in endpoint.deployed_models if d.id != new]
        if old:
            operation = client.undeploy_model(endpoint=plan["endpoint"], deployed_model_id=old[0],
                                              traffic_split={new: 100})
            return self.wait(operation, f"undeployment of deployed model {old[0]}")
        resources = next(d for d in endpoint.deployed_models if d.id == new).dedicated_resources
        return {"endpoint": plan["endpoint"], "tags": {"mlfactory.vertex_deployed_model": new}, "backend": "gcp",
                "deployed_model_id": new, "model": plan["model"], "model_uri": self.spec.model.uri,
                "autoscaling": {"min_replicas": resources.min_replica_count, "max_replicas": resources.max_replica_count,
                                "metrics": {m.metric_name: m.target for m in resources.autoscaling_metric_specs}}}

    def restore(self, plan: dict) -> None:
        """The traffic split of before the rollout, the new deployed model (and its staging copy) undeployed (not
        waited for)."""
        from mlfactory.backends.gcp.vertex import update_endpoint_request

        if not plan.get("endpoint") or plan.get("already_served"):
            return
        self._undeploy_staging(plan, wait=False)
        client = self.client("endpoint")
        endpoint = client.get_endpoint(name=plan["endpoint"])
        deployed = {d.id for d in endpoint.deployed_models}
        before = {k: v for k, v in plan["serving"].items() if k in deployed}
        if before and dict(endpoint.traffic_split) != before:
            client.update_endpoint(request=update_endpoint_request(endpoint, before))
            self.log.info("traffic of %s back to %s", plan["endpoint"], before)
        new = self.deployed(endpoint, plan["model"])
        if new is not None:
            operation = client.undeploy_model(endpoint=plan["endpoint"], deployed_model_id=new, traffic_split=before)
            self.log.info("undeploying the new deployed model %s (operation %s)", new, operation.operation.name)

