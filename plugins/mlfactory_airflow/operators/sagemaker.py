"""The `aws` backend's serving operators, and what every SageMaker operator shares.

- ``SageMakerEndpointOperator`` (ml_deploy): a registered MLflow version -> SageMaker Model ->
  EndpointConfig -> Endpoint. A new endpoint is created; an existing one is updated blue/green with
  a canary (``serving.canary_percent`` of the capacity for ``aws.canary_wait_s``, then the rest) and
  the CloudWatch alarms in ``aws.rollback_alarms`` roll it back. The task defers while SageMaker
  works; an endpoint back in service on its old config means SageMaker rolled the update back, and
  the task fails saying so (ml_deploy's `rollback` then moves alias `champion` back). In service,
  the variant gets its Application Auto Scaling target and target-tracking policy.
- ``SageMakerTransformOperator`` (ml_batch_score): a batch transform job over the curated snapshots
  not scored yet (a manifest file lists them), each file sent whole to the model server as Parquet;
  the answers land under ``predictions/batch/run=<run>/``.

All are built on the amazon provider: SageMakerHook for SageMaker, the base AWS hook for
Application Auto Scaling, and the provider's SageMakerTrigger while a job or endpoint is busy.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from airflow.sdk import BaseOperator


class SageMakerBaseOperator(BaseOperator):
    """The pipeline config's `aws` section, the provider's SageMakerHook, and finding earlier work."""

    ui_color = "#ffe9c7"

    def __init__(self, *, waiter_delay: int = 30, **kwargs) -> None:
        super().__init__(**kwargs)
        self.waiter_delay = waiter_delay

    @cached_property
    def config(self):
        from mlfactory.config import load_config

        cfg = load_config()
        if cfg.aws is None:
            raise ValueError(f"the aws backend needs an 'aws' section in {cfg.source}")
        return cfg

    @property
    def settings(self):
        return self.config.aws

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
        from mlfactory.aws import job_name

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

    def ensure_model(self, version: str, model_uri: str) -> str:
        """The SageMaker Model of a registered version (created once, shared by endpoint and transform)."""
        from mlfactory.aws import create_model_request, endpoint_name, model_name_for

        name = model_name_for(endpoint_name(self.settings, self.config.model_name), version)
        if self.describe("describe_model", ModelName=name) is None:
            environment = {"MLFACTORY_MODEL_VERSION": str(version),  # the prediction log ml_monitor reads, as on local
                           "MLFACTORY_PREDICTION_LOG_URI": self.config.storage.prediction_log_uri}
            self.hook.conn.create_model(**create_model_request(name, model_uri, self.settings, environment))
            self.log.info("created SageMaker model %s on %s", name, model_uri)
        return name

    def trigger(self, name: str, job_type: str, max_wait_s: int, trigger_class=None):
        """The provider's SageMakerTrigger (or a subclass) polling ``name`` for up to ``max_wait_s``."""
        from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger

        return (trigger_class or SageMakerTrigger)(
            job_name=name, job_type=job_type, waiter_delay=self.waiter_delay,
            waiter_max_attempts=max(1, max_wait_s // self.waiter_delay),
            aws_conn_id=self.settings.conn_id, region_name=self.settings.region)


class SageMakerEndpointOperator(SageMakerBaseOperator):
    """Deploy ``target`` ({"version", "model_uri"}: a registered version and its files in S3)."""

    template_fields = ("target",)

    def __init__(self, *, target: dict[str, Any], **kwargs) -> None:
        super().__init__(**kwargs)
        self.target = target

    def execute(self, context) -> dict:
        from datetime import datetime, timezone

        from mlfactory import aws

        version, settings = str(self.target["version"]), self.settings
        endpoint = aws.endpoint_name(settings, self.config.model_name)
        model = self.ensure_model(version, self.target["model_uri"])
        existing = self.describe("describe_endpoint", EndpointName=endpoint)
        config = self._config_running(existing, model)
        if config:  # a retry, or the version is served already: wait for that deployment, start none
            self.log.info("endpoint %s is already on %s (v%s, %s): taking it over", endpoint, config, version,
                          existing["EndpointStatus"])
        else:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
            config = aws.job_name(f"{model[:48]}-{stamp}")
            variant = aws.Variant("primary", model, 1.0, settings.endpoint_instance_type, settings.endpoint_min_instances)
            self.hook.conn.create_endpoint_config(**aws.endpoint_config_request(config, [variant], settings))
            if existing is None:
                self.hook.conn.create_endpoint(**aws.create_endpoint_request(endpoint, config, settings))
                self.log.info("creating endpoint %s on %s (v%s)", endpoint, config, version)
            else:
                update = aws.update_endpoint_request(endpoint, config, settings, self.config.serving.canary_percent)
                self.hook.conn.update_endpoint(**update)
                self.log.info("blue/green update of %s from %s to %s (v%s): %s%% canary for %ss", endpoint,
                              existing["EndpointConfigName"], config, version, self.config.serving.canary_percent,
                              settings.canary_wait_s)
        previous = (existing or {}).get("EndpointConfigName")
        self.defer(trigger=self.trigger(endpoint, "endpoint", 2 * 3600 + settings.canary_wait_s),
                   method_name="execute_complete",
                   kwargs={"endpoint": endpoint, "config": config, "model": model,
                           "previous_config": previous if previous != config else None})

    def _config_running(self, endpoint: dict | None, model: str) -> str | None:
        """The endpoint's config (current, or pending in an update) that serves ``model`` alone, if any."""
        if endpoint is None:
            return None
        pending = (endpoint.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")
        for config in (pending, endpoint.get("EndpointConfigName")):
            if config:
                variants = self.hook.conn.describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"]
                if [v["ModelName"] for v in variants] == [model]:
                    return config
        return None

    def execute_complete(self, context, event: dict | None = None, endpoint: str = "", config: str = "", model: str = "",
                         previous_config: str | None = None) -> dict:
        from datetime import datetime, timezone

        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
        from airflow.sdk.exceptions import AirflowException

        from mlfactory import aws
        from mlfactory.deployment import tag_version, write_endpoint_state

        version = str(self.target["version"])
        status = aws.endpoint_state(self.hook.conn.describe_endpoint(EndpointName=endpoint), config)
        if status.state != "succeeded":
            reason = f"endpoint {endpoint} did not take v{version} ({config}): {status.detail}"
            write_endpoint_state(self.config, last_failure={"step": "deploy", "version": version, "reason": reason})
            raise AirflowException(reason)
        target, policy = aws.autoscaling_requests(endpoint, "primary", self.settings)
        scaling = AwsBaseHook(aws_conn_id=self.settings.conn_id, region_name=self.settings.region,
                              client_type="application-autoscaling").conn
        scaling.register_scalable_target(**target)
        scaling.put_scaling_policy(**policy)
        state = write_endpoint_state(self.config, backend="aws", endpoint=endpoint, endpoint_config=config, model=model,
                                     served_version=version, model_uri=self.target["model_uri"],
                                     previous_config=previous_config, autoscaling=target["ResourceId"],
                                     deployed_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                     last_failure=None)
        tag_version(self.config, version, {"mlfactory.deployment": "serving", "mlfactory.endpoint": endpoint,
                                           "mlfactory.endpoint_config": config})
        self.log.info("v%s serves all traffic on SageMaker endpoint %s (%s); autoscaling %d-%d instances at %d "
                      "invocations/instance", version, endpoint, config, target["MinCapacity"], target["MaxCapacity"],
                      self.settings.invocations_per_instance)
        return state


class SageMakerTransformOperator(SageMakerBaseOperator):
    """Score the curated snapshots not scored yet (or ``input_uri``) with ``target`` ({"version", "model_uri"})."""

    template_fields = ("target", "input_uri")

    def __init__(self, *, target: dict[str, Any], input_uri: str | None = None, max_runtime_s: int = 6 * 3600,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.target, self.input_uri, self.max_runtime_s = target, input_uri, max_runtime_s

    def execute(self, context) -> dict:
        import hashlib

        from airflow.sdk.exceptions import AirflowSkipException

        from mlfactory import aws, batch_scoring, storage

        cfg, version = self.config, str(self.target["version"])
        key = batch_scoring.run_key(context["run_id"])
        out = batch_scoring.output_uri(cfg, key)
        if self.input_uri:
            source, manifest, snapshots = self.input_uri, False, []
        else:
            sources = batch_scoring.unscored(cfg, key)
            if not sources:
                raise AirflowSkipException("every curated snapshot is scored already")
            files = [o.uri for uri in sources.values() for o in storage.list_objects(uri) if o.key.endswith(".parquet")]
            source, manifest, snapshots = storage.join(batch_scoring.batch_uri(cfg), "_manifests", f"run={key}.json"), True, sorted(sources)
            storage.write_bytes(source, aws.transform_manifest(cfg.storage.curated_uri, files))
        model = self.ensure_model(version, self.target["model_uri"])
        name = aws.job_name(f"{model[:40]}-batch-{hashlib.sha1(key.encode()).hexdigest()[:12]}")
        request = aws.transform_job_request(name, model, source, out, self.settings, manifest=manifest)
        name = self.start_or_take_over(request, "TransformJobName", "describe_transform_job", aws.transform_status,
                                       "create_transform_job", context["ti"].try_number)
        self.log.info("batch transform %s: v%s over %s -> %s", name, version, source, out)
        self.defer(trigger=self.trigger(name, "transform", self.max_runtime_s), method_name="execute_complete",
                   kwargs={"job": name, "uri": out, "key": key, "snapshots": snapshots})

    def execute_complete(self, context, event: dict | None = None, job: str = "", uri: str = "", key: str = "",
                         snapshots: list | None = None) -> dict:
        from airflow.sdk.exceptions import AirflowException

        from mlfactory import aws, batch_scoring

        status = aws.transform_status(self.hook.conn.describe_transform_job(TransformJobName=job))
        if status.state != "succeeded":
            raise AirflowException(f"SageMaker transform job {job} {status.state}: {status.detail}")
        if snapshots:
            batch_scoring.mark_scored(self.config, key, snapshots)
        return {"uri": uri, "version": str(self.target["version"]), "job": job, "snapshots": snapshots or [],
                "input_uri": self.input_uri}
