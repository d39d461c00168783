"""The `aws` backend's serving operators, and what every SageMaker operator shares.

ml_deploy's steps (an ``EndpointSpec``):

- ``SageMakerEndpointStageOperator`` (``deploy.stage``): the version's SageMaker Model and a new
  EndpointConfig with one variant on ``min_replicas`` instances; nothing serves it yet. A retry, or
  a version the endpoint serves already, reuses the config that serves it.
- ``SageMakerEndpointOperator`` (``deploy.full_traffic``): creates the endpoint, or updates it
  blue/green: SageMaker runs the canary (``canary_percent`` of the capacity for ``canary_wait_s``,
  then the rest) and the CloudWatch alarms in ``rollback_alarms`` roll it back. The task defers
  while SageMaker works; an endpoint back in service on its old config means SageMaker rolled the
  update back, and the task fails saying so (ml_deploy's `rollback` then moves alias `champion`
  back; the traffic is already back). In service, the variant gets its Application Auto Scaling
  target (``min_replicas``..``max_replicas``) and a target-tracking policy on invocations per instance.

ml_batch_score's step (a ``BatchJobSpec``):

- ``SageMakerTransformOperator`` (``score``): a batch transform job over the curated snapshots not
  scored yet (a manifest file lists their files), each file sent whole to the model server as
  Parquet; the answers land under the spec's output prefix.

All are built on the amazon provider: SageMakerHook for SageMaker, the base AWS hook for
Application Auto Scaling, and the provider's SageMakerTrigger while a job or endpoint is busy.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from mlfactory_airflow.backends import CloudSpecOperator


class SageMakerBaseOperator(CloudSpecOperator):
    """The pipeline config's `aws` section, the provider's SageMakerHook, and finding earlier work."""

    ui_color = "#ffe9c7"
    backend, platform = "aws", "a SageMaker operator"

    def __init__(self, *, waiter_delay: int | None = None, **kwargs) -> None:
        super().__init__(poll_interval=waiter_delay, **kwargs)

    @property
    def waiter_delay(self) -> int:
        """Seconds between two checks of a deferred job or endpoint (``aws.poll_interval_s``), as the amazon
        provider's triggers call it."""
        return self.poll_interval

    @cached_property
    def hook(self):
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        return SageMakerHook(aws_conn_id=self.settings.conn_id, region_name=self.settings.region)

    def describe(self, operation: str, **name) -> dict | None:
        """``hook.conn.<operation>(**name)``, or None if SageMaker has no such resource."""
        from botocore.exceptions import ClientError

        try:
            return getattr(self.hook.conn, operation)(**name)
        except ClientError as err:
            message = str(err.response.get("Error", {}).get("Message", "")).lower()
            if "not found" in message or "could not find" in message or "does not exist" in message:
                return None
            raise

    def start_or_take_over(self, request: dict, name_field: str, describe: str, status, create: str, try_number: int) -> str:
        """Create the job in ``request`` unless an earlier try's job (``<name>``, or ``<name>-a<n>`` that a
        later try started) is running or done: then take the latest of them over. After a failed or
        stopped one, start ``<name>-a<try>``. Returns the job's name."""
        from mlfactory.backends.aws.sagemaker import job_name

        base = request[name_field]
        names = [job_name(f"{base[:56]}-a{n}") for n in range(try_number, 1, -1)] + [base]  # the latest try first
        earlier = next(((n, d) for n in names if (d := self.describe(describe, **{name_field: n})) is not None), None)
        name = base
        if earlier is not None:
            found, described = earlier
            job = status(described)
            if job.state in ("running", "succeeded"):
                self.log.info("%s from an earlier try is %s: taking it over", found, job.state)
                return found
            name = job_name(f"{base[:56]}-a{try_number}")
            self.log.info("the earlier job %s %s (%s): starting %s", found, job.state, job.detail, name)
        getattr(self.hook.conn, create)(**{**request, name_field: name})
        return name

    def ensure_model(self, model) -> str:
        """The SageMaker Model of a registered version (a ``ModelRef``; created once, shared by endpoint and
        transform): the project's model server on the version's files in S3."""
        from mlfactory.backends.aws.sagemaker import create_model_request, model_name_for

        name = model_name_for(model)
        if self.describe("describe_model", ModelName=name) is None:
            environment = {"MLFACTORY_MODEL_VERSION": model.version,  # the prediction log ml_monitor reads, as on local
                           "MLFACTORY_PREDICTION_LOG_URI": self.config.storage.prediction_log_uri}
            self.hook.conn.create_model(**create_model_request(name, model.uri, self.settings, environment))
            self.log.info("created SageMaker model %s on %s", name, model.uri)
        return name

    def trigger(self, name: str, job_type: str, max_wait_s: int, trigger_class=None):
        """A SageMakerJobTrigger (or a subclass) polling ``name`` for up to ``max_wait_s``."""
        from mlfactory_airflow.backends.aws.sagemaker_trigger import SageMakerJobTrigger

        return (trigger_class or SageMakerJobTrigger)(
            job_name=name, job_type=job_type, waiter_delay=self.waiter_delay,
            waiter_max_attempts=max(1, max_wait_s // self.waiter_delay),
            aws_conn_id=self.settings.conn_id, region_name=self.settings.region)


class SageMakerEndpointStageOperator(SageMakerBaseOperator):
    """``spec`` (an EndpointSpec) -> its SageMaker Model and an EndpointConfig that serves it alone."""

    def execute(self, context) -> dict:
        from datetime import datetime, timezone

        from mlfactory.backends.aws import sagemaker
        from mlfactory.specs import EndpointSpec

        spec = EndpointSpec.model_validate(self.spec)
        endpoint = sagemaker.endpoint_name(spec)
        model = self.ensure_model(spec.model)
        existing = self.describe("describe_endpoint", EndpointName=endpoint)
        current, pending = sagemaker.endpoint_configs(existing)
        config = next((c for c in (pending, current) if c and self._serves(c, model)), None)  # the newest first
        if config:  # a retry, or the version is served already: no new config
            self.log.info("endpoint %s already has %s for v%s: reusing it", endpoint, config, spec.model.version)
        else:
            config = sagemaker.job_name(f"{model[:48]}-{datetime.now(timezone.utc):%Y%m%d%H%M%S}")
            variant = sagemaker.endpoint_variant(spec, model, self.settings)
            self.hook.conn.create_endpoint_config(**sagemaker.endpoint_config_request(config, [variant], self.settings))
            self.log.info("endpoint config %s: v%s on %d x %s", config, spec.model.version, variant.instances,
                          variant.instance_type)
        return {"endpoint": endpoint, "model": model, "config": config, "version": spec.model.version}

    def _serves(self, config: str, model: str) -> bool:
        """Whether endpoint config ``config`` serves ``model`` alone."""
        variants = self.hook.conn.describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"]
        return [v["ModelName"] for v in variants] == [model]


class SageMakerEndpointOperator(SageMakerBaseOperator):
    """All traffic on the ``staged`` config (SageMaker's blue/green canary on the way), then autoscaling."""

    template_fields = ("spec", "staged")

    def __init__(self, *, staged: dict[str, Any], **kwargs) -> None:
        super().__init__(**kwargs)
        self.staged = staged

    def execute(self, context) -> None:
        from mlfactory.backends.aws import sagemaker
        from mlfactory.specs import EndpointSpec

        spec = EndpointSpec.model_validate(self.spec)
        endpoint, config = self.staged["endpoint"], self.staged["config"]
        existing = self.describe("describe_endpoint", EndpointName=endpoint)
        current, pending = sagemaker.endpoint_configs(existing)
        if config in (current, pending):  # a retry, or served already: wait for that deployment, start none
            self.log.info("endpoint %s is already on %s (%s): taking it over", endpoint, config, existing["EndpointStatus"])
        elif existing is None:
            self.hook.conn.create_endpoint(**sagemaker.create_endpoint_request(endpoint, config, self.settings))
            self.log.info("creating endpoint %s on %s (v%s)", endpoint, config, spec.model.version)
        else:
            self.hook.conn.update_endpoint(**sagemaker.update_endpoint_request(endpoint, config, spec))
            self.log.info("blue/green update of %s from %s to %s (v%s): %s%% canary for %ss", endpoint, current, config,
                          spec.model.version, spec.canary_percent, spec.canary_wait_s)
        self.defer(trigger=self.trigger(endpoint, "endpoint", 2 * 3600 + spec.canary_wait_s),
                   method_name="execute_complete",
                   kwargs={"previous_config": current if current != config else None})

    def execute_complete(self, context, event: dict | None = None, previous_config: str | None = None) -> dict:
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
        from airflow.sdk.exceptions import AirflowException

        from mlfactory.backends.aws import sagemaker
        from mlfactory.deployment import record_failure, served
        from mlfactory.specs import EndpointSpec

        spec = EndpointSpec.model_validate(self.spec)
        endpoint, config, version = self.staged["endpoint"], self.staged["config"], spec.model.version
        status = sagemaker.endpoint_state(self.hook.conn.describe_endpoint(EndpointName=endpoint), config)
        if status.state != "succeeded":
            reason = f"endpoint {endpoint} did not take v{version} ({config}): {status.detail}"
            record_failure(self.config, "full_traffic", version, reason)
            raise AirflowException(reason)
        target, policy = sagemaker.autoscaling_requests(spec, "primary")
        scaling = AwsBaseHook(aws_conn_id=self.settings.conn_id, region_name=self.settings.region,
                              client_type="application-autoscaling").conn
        scaling.register_scalable_target(**target)
        scaling.put_scaling_policy(**policy)
        state = served(self.config, version, endpoint=endpoint, tags={"mlfactory.endpoint_config": config},
                       backend="aws", endpoint_config=config, model=self.staged["model"], model_uri=spec.model.uri,
                       previous_config=previous_config, autoscaling=target["ResourceId"])
        self.log.info("v%s serves all traffic on SageMaker endpoint %s (%s); autoscaling %d-%d instances at %d "
                      "invocations/instance/minute", version, endpoint, config, target["MinCapacity"],
                      target["MaxCapacity"], spec.target_requests_per_replica)
        return state


class SageMakerTransformOperator(SageMakerBaseOperator):
    """Score ``spec`` (a BatchJobSpec) with a batch transform job on the version's SageMaker Model."""

    def execute(self, context) -> None:
        import hashlib

        from mlfactory import storage
        from mlfactory.backends.aws import sagemaker
        from mlfactory.batch_scoring import batch_uri
        from mlfactory.specs import BatchJobSpec

        spec, cfg = BatchJobSpec.model_validate(self.spec), self.config
        if spec.snapshots:  # exactly the files of the snapshots not scored yet
            files = [o.uri for uri in spec.inputs.values() for o in storage.list_objects(uri) if o.key.endswith(".parquet")]
            source = storage.join(batch_uri(cfg), "_manifests", f"run={spec.name}.json")
            storage.write_bytes(source, sagemaker.transform_manifest(cfg.storage.curated_uri, files))
        else:
            (source,) = spec.inputs.values()
        model = self.ensure_model(spec.model)
        name = sagemaker.job_name(f"{model[:40]}-batch-{hashlib.sha1(spec.name.encode()).hexdigest()[:12]}")
        request = sagemaker.transform_job_request(name, model, source, spec, self.settings, manifest=bool(spec.snapshots))
        name = self.start_or_take_over(request, "TransformJobName", "describe_transform_job", sagemaker.transform_status,
                                       "create_transform_job", context["ti"].try_number)
        self.log.info("batch transform %s: v%s over %s -> %s", name, spec.model.version, source, spec.output_uri)
        self.defer(trigger=self.trigger(name, "transform", spec.max_runtime_s), method_name="execute_complete",
                   kwargs={"job": name})

    def execute_complete(self, context, event: dict | None = None, job: str = "") -> dict:
        from airflow.sdk.exceptions import AirflowException

        from mlfactory.backends.aws import sagemaker
        from mlfactory.batch_scoring import complete
        from mlfactory.specs import BatchJobSpec

        spec = BatchJobSpec.model_validate(self.spec)
        status = sagemaker.transform_status(self.hook.conn.describe_transform_job(TransformJobName=job))
        if status.state != "succeeded":
            raise AirflowException(f"SageMaker transform job {job} {status.state}: {status.detail}")
        complete(self.config, spec)
        return {"uri": spec.output_uri, "version": spec.model.version, "job": job, "snapshots": spec.snapshots,
                "inputs": spec.inputs}
