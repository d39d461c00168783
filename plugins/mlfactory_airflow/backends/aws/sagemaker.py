"""The `aws` backend's serving operators, and what every SageMaker operator shares.

ml_deploy's steps (an ``EndpointSpec``), each variant named ``v<version>``:

- ``SageMakerEndpointStageOperator`` (``deploy.stage``): the version's SageMaker Model; the endpoint
  created on it, or updated (blue/green, rolled back by the alarms in ``rollback_alarms``) to a new
  EndpointConfig where the served variant keeps all the traffic and the new one stands beside it
  at weight 0. The plan is kept in the endpoint state for ``rollback``.
- ``SageMakerSmokeTestOperator`` (``deploy.smoke_test``): holdout rows sent to the new variant alone
  (InvokeEndpoint's ``TargetVariant``) must get sane answers: a model that answers NaN, raises or
  hangs past SageMaker's 60 s fails here, before any client reaches it.
- ``SageMakerCanaryOperator`` (``deploy.canary``): ``canary_percent`` of the traffic to the new variant
  (UpdateEndpointWeightsAndCapacities) for ``canary_wait_s``, then ``canary_requests`` holdout rows
  through the endpoint (error rate under ``max_error_rate``) and no alarm of ``rollback_alarms`` in ALARM.
- ``SageMakerEndpointOperator`` (``deploy.full_traffic``): all the traffic to the new variant, then a
  config with it alone (the old instances go); in service, it gets its Application Auto Scaling
  target (``min_replicas``..``max_replicas``) and a target-tracking policy on invocations per instance.

A failed step records why; ml_deploy's ``rollback`` (``AwsBackend.restore_traffic``) puts the weights
back on the old variant and the endpoint back on the config it served before.

ml_batch_score's step (a ``BatchJobSpec``):

- ``SageMakerTransformOperator`` (``score``): a batch transform job over the curated snapshots not
  scored yet (a manifest file lists their files), each file sent whole to the model server as
  Parquet; the answers land under the spec's output prefix.

All are built on the amazon provider: SageMakerHook for SageMaker, the base AWS hook for
Application Auto Scaling and CloudWatch alarms, sagemaker-runtime for the smoke test and the canary, and the
provider's SageMakerTrigger while a job or endpoint is busy.
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


class SageMakerRolloutOperator(SageMakerBaseOperator):
    """A step of ml_deploy's rollout of ``spec`` (an EndpointSpec) along ``plan`` (what ``stage`` returned)."""

    template_fields = ("spec", "plan")

    def __init__(self, *, plan: dict[str, Any] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.plan = plan

    def client(self, service: str):
        """A boto3 client of ``service`` on the pipeline's AWS connection. sagemaker-runtime waits up to 90 s for an
        answer (SageMaker itself gives a model 60 s) and never retries: a failed request counts."""
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
        from botocore.config import Config

        config = Config(read_timeout=90, retries={"total_max_attempts": 1}) if service == "sagemaker-runtime" else None
        return AwsBaseHook(aws_conn_id=self.settings.conn_id, region_name=self.settings.region, client_type=service,
                           config=config).conn

    def variants(self, config: str | None) -> list:
        """The production variants of endpoint config ``config`` (none for None)."""
        from mlfactory.backends.aws.sagemaker import config_variants

        return config_variants(self.hook.conn.describe_endpoint_config(EndpointConfigName=config)) if config else []

    def set_weights(self, weights: dict[str, float]) -> None:
        from mlfactory.backends.aws.sagemaker import weights_request

        self.hook.conn.update_endpoint_weights_and_capacities(**weights_request(self.plan["endpoint"], weights))
        self.log.info("traffic of %s: %s", self.plan["endpoint"], weights)

    def invoke(self, rows: list[dict], variant: str | None = None) -> tuple[str, list]:
        """``rows`` through the endpoint (to ``variant`` alone, if given): (the variant that answered, its predictions)."""
        import json

        from mlfactory.backends.aws.sagemaker import invoke_request

        reply = self.runtime.invoke_endpoint(**invoke_request(self.plan["endpoint"], rows, variant))
        return reply.get("InvokedProductionVariant", ""), json.loads(reply["Body"].read()).get("predictions") or []

    @cached_property
    def runtime(self):
        return self.client("sagemaker-runtime")

    def holdout_rows(self, step: str, n: int) -> list[dict]:
        """``n`` rows of the frozen holdout, or ``step`` failed saying why there are none."""
        from mlfactory.deployment import DeploymentFailed, holdout_requests

        try:
            return holdout_requests(self.config, n)
        except DeploymentFailed as err:
            self.fail(step, str(err))

    def fail(self, step: str, reason: str):
        from mlfactory.deployment import DeploymentFailed, record_failure

        record_failure(self.config, step, self.plan["version"], reason)
        raise DeploymentFailed(reason)

    def wait_for_endpoint(self, config: str, method: str = "execute", **kwargs):
        """Defer until the endpoint is out of its update (then ``method`` runs with ``waited_for=config``)."""
        from mlfactory.specs import EndpointSpec

        spec = EndpointSpec.model_validate(self.spec)
        self.defer(trigger=self.trigger(self.plan["endpoint"], "endpoint", 2 * 3600 + spec.canary_wait_s),
                   method_name=method, kwargs={"waited_for": config, "plan": self.plan, **kwargs})

    def check_on(self, config: str, step: str) -> None:
        """Fail ``step`` unless the endpoint is in service on ``config`` (SageMaker rolls a failed update back)."""
        from mlfactory.backends.aws.sagemaker import endpoint_state

        status = endpoint_state(self.hook.conn.describe_endpoint(EndpointName=self.plan["endpoint"]), config)
        if status.state != "succeeded":
            self.fail(step, f"endpoint {self.plan['endpoint']} did not take {config} for v{self.plan['version']}: "
                            f"{status.detail}")


class SageMakerEndpointStageOperator(SageMakerRolloutOperator):
    """The version's SageMaker Model as variant ``v<version>``: the endpoint created on it, or updated (blue/green)
    to a config with the served variant unchanged and the new one beside it at weight 0, so that nothing reaches
    the new model before the smoke test. Returns the plan; the endpoint state keeps it for ``rollback``."""

    def execute(self, context, event: dict | None = None, waited_for: str | None = None, plan: dict | None = None) -> dict:
        from dataclasses import replace
        from datetime import datetime, timezone

        from mlfactory.backends.aws import sagemaker
        from mlfactory.deployment import read_endpoint_state, write_endpoint_state
        from mlfactory.specs import EndpointSpec

        if waited_for:  # the endpoint's creation or update is over
            self.plan = plan
            self.check_on(waited_for, "stage")
            return self.plan
        spec = EndpointSpec.model_validate(self.spec)
        endpoint, model = sagemaker.endpoint_name(spec), self.ensure_model(spec.model)
        new = sagemaker.endpoint_variant(spec, model, self.settings, weight=0.0)
        existing = self.describe("describe_endpoint", EndpointName=endpoint)
        current, pending = sagemaker.endpoint_configs(existing)
        plan = {"endpoint": endpoint, "model": model, "version": spec.model.version, "new": new.name, "old": None,
                "previous_config": current, "already_served": False}
        self.plan = plan
        taken = pending or current  # the config an update is moving to, else the one in service
        variants = self.variants(taken)
        mine = [v for v in variants if v.model_name == model]
        if mine:  # a retry, or the version is served already: no new config
            others = [v for v in variants if v.model_name != model]
            earlier = read_endpoint_state(self.config).get("rollout") or {}
            plan.update(config=taken, new=mine[0].name, old=others[0].name if others else None,
                        already_served=not others and taken == current,
                        previous_config=earlier.get("previous_config") if others else current)
            self.log.info("endpoint %s already has %s for v%s: taking it over", endpoint, taken, spec.model.version)
            if plan["already_served"]:
                return plan
            write_endpoint_state(self.config, rollout=plan)
            return self.wait_for_endpoint(taken)
        if pending:
            raise RuntimeError(f"endpoint {endpoint} is updating to {pending} (not v{spec.model.version}): "
                               "deploy again once that update is over")
        stamp = f"{datetime.now(timezone.utc):%Y%m%d%H%M%S}"
        config = sagemaker.job_name(f"{model[:48]}-{stamp}")
        if existing is None:
            variants = [replace(new, weight=1.0)]
        else:
            old = max(self.variants(current), key=lambda v: v.weight)  # the served one
            variants = [replace(old, weight=1.0), new]
            plan["old"] = old.name
        plan["config"] = config
        self.hook.conn.create_endpoint_config(**sagemaker.endpoint_config_request(config, variants, self.settings))
        write_endpoint_state(self.config, rollout=plan)
        if existing is None:
            self.hook.conn.create_endpoint(**sagemaker.create_endpoint_request(endpoint, config, self.settings))
            self.log.info("creating endpoint %s on %s: v%s on %d x %s", endpoint, config, spec.model.version,
                          new.instances, new.instance_type)
        else:
            self.hook.conn.update_endpoint(**sagemaker.update_endpoint_request(endpoint, config, spec.rollback_alarms))
            self.log.info("updating endpoint %s from %s to %s: %s keeps the traffic, v%s (%s) beside it at weight 0",
                          endpoint, current, config, plan["old"], spec.model.version, new.name)
        return self.wait_for_endpoint(config)


class SageMakerSmokeTestOperator(SageMakerRolloutOperator):
    """Holdout rows sent to the new variant alone (InvokeEndpoint's TargetVariant) must get sane predictions."""

    def execute(self, context) -> dict:
        from botocore.exceptions import BotoCoreError, ClientError

        from mlfactory.deployment import sane_prediction
        from mlfactory.specs import EndpointSpec

        spec, plan = EndpointSpec.model_validate(self.spec), self.plan
        if plan["already_served"]:
            return {"skipped": f"v{plan['version']} serves all traffic already"}
        rows = self.holdout_rows("smoke_test", spec.smoke_rows)
        try:
            _, predictions = self.invoke(rows, variant=plan["new"])
        except (ClientError, BotoCoreError) as err:  # ModelError: the model raised, hung past 60 s or died
            self.fail("smoke_test", f"smoke test of v{plan['version']} ({plan['new']}) failed: {err}")
        if not (len(predictions) == len(rows) and all(sane_prediction(p) for p in predictions)):
            self.fail("smoke_test", f"smoke test of v{plan['version']} ({plan['new']}): {len(predictions)} answers to "
                                    f"{len(rows)} rows, e.g. {predictions[:3]}")
        self.log.info("smoke test of v%s (%s): %d sane predictions", plan["version"], plan["new"], len(rows))
        return {"rows": len(rows)}


class SageMakerCanaryOperator(SageMakerRolloutOperator):
    """``canary_percent`` of the traffic on the new variant for ``canary_wait_s``; then ``canary_requests`` holdout
    rows through the endpoint (error rate under ``max_error_rate``) and no alarm of ``rollback_alarms`` firing."""

    def execute(self, context, event: dict | None = None, check: bool = False) -> dict:
        from mlfactory.specs import EndpointSpec

        spec, plan = EndpointSpec.model_validate(self.spec), self.plan
        if not plan["old"]:
            return {"skipped": "nothing served before: no traffic to share" if not plan["already_served"]
                    else f"v{plan['version']} serves all traffic already"}
        if not check:
            self.set_weights({plan["old"]: 100 - spec.canary_percent, plan["new"]: spec.canary_percent})
            if spec.canary_wait_s:
                from datetime import timedelta

                from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger

                self.log.info("v%s has %s%% of the traffic; checking it in %ss", plan["version"], spec.canary_percent,
                              spec.canary_wait_s)
                return self.defer(trigger=TimeDeltaTrigger(timedelta(seconds=spec.canary_wait_s)),
                                  method_name="execute", kwargs={"check": True})
        return self._check(spec, plan)

    def _check(self, spec, plan: dict) -> dict:
        from mlfactory.deployment import sane_prediction

        rows = self.holdout_rows("canary", spec.smoke_rows)
        answered: dict[str, int] = {}
        errors, samples, requests = 0, [], max(spec.canary_requests, len(rows))
        for i in range(requests):
            try:
                variant, predictions = self.invoke([rows[i % len(rows)]])
                answered[variant] = answered.get(variant, 0) + 1
                if not (len(predictions) == 1 and sane_prediction(predictions[0])):
                    raise ValueError(f"not a usable prediction: {predictions[:1]}")
            except Exception as err:  # noqa: BLE001 - every failed request counts against the canary
                errors += 1
                samples.append(str(err)[:300])
        rate = errors / requests
        firing = self.firing_alarms(spec.rollback_alarms)
        result = {"requests": requests, "errors": errors, "error_rate": rate, "answered_by": answered,
                  "percent": spec.canary_percent, "alarms": firing}
        self.log.info("canary of v%s: %s", plan["version"], result)
        if firing:
            self.fail("canary", f"canary of v{plan['version']} on {plan['endpoint']}: alarm {', '.join(firing)} fired")
        if rate > spec.max_error_rate:
            self.fail("canary", f"canary of v{plan['version']} on {plan['endpoint']}: {errors} of {requests} requests "
                                f"failed ({rate:.1%} > {spec.max_error_rate:.1%}), e.g. {samples[:2]}")
        return result

    def firing_alarms(self, names: list[str]) -> list[str]:
        if not names:
            return []
        alarms = self.client("cloudwatch").describe_alarms(AlarmNames=names)["MetricAlarms"]
        return sorted(a["AlarmName"] for a in alarms if a["StateValue"] == "ALARM")


class SageMakerEndpointOperator(SageMakerRolloutOperator):
    """All traffic to the new variant, then (blue/green) a config with it alone, so the old instances go; then
    autoscaling on it and the endpoint state written."""

    def execute(self, context, event: dict | None = None, waited_for: str | None = None, plan: dict | None = None) -> dict:
        from dataclasses import replace
        from datetime import datetime, timezone

        from mlfactory.backends.aws import sagemaker
        from mlfactory.specs import EndpointSpec

        spec, plan = EndpointSpec.model_validate(self.spec), self.plan
        if waited_for or not plan["old"]:
            return self._complete(spec, waited_for or plan["config"])
        current, pending = sagemaker.endpoint_configs(self.hook.conn.describe_endpoint(EndpointName=plan["endpoint"]))
        final = next((c for c in (pending, current) if c and c != plan["config"]
                      and [v.model_name for v in self.variants(c)] == [plan["model"]]), None)
        if final is None:  # not a retry
            self.set_weights({plan["new"]: 100, plan["old"]: 0})
            final = sagemaker.job_name(f"{plan['model'][:48]}-{datetime.now(timezone.utc):%Y%m%d%H%M%S}")
            variant = sagemaker.endpoint_variant(spec, plan["model"], self.settings)
            self.hook.conn.create_endpoint_config(**sagemaker.endpoint_config_request(
                final, [replace(variant, name=plan["new"])], self.settings))
            self.hook.conn.update_endpoint(**sagemaker.update_endpoint_request(plan["endpoint"], final,
                                                                               spec.rollback_alarms))
            self.log.info("v%s has all the traffic of %s; %s drops %s's instances", plan["version"], plan["endpoint"],
                          final, plan["old"])
        return self.wait_for_endpoint(final)

    def _complete(self, spec, config: str) -> dict:
        from mlfactory.backends.aws import sagemaker
        from mlfactory.deployment import served

        plan = self.plan
        self.check_on(config, "full_traffic")
        target, policy = sagemaker.autoscaling_requests(spec, plan["new"])
        scaling = self.client("application-autoscaling")
        scaling.register_scalable_target(**target)
        scaling.put_scaling_policy(**policy)
        if plan["old"]:  # the old variant is gone: so is its scalable target
            old = sagemaker.scalable_target(plan["endpoint"], plan["old"])
            if scaling.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[old["ResourceId"]])[
                    "ScalableTargets"]:
                scaling.deregister_scalable_target(**old)
        state = served(self.config, plan["version"], endpoint=plan["endpoint"], tags={"mlfactory.endpoint_config": config},
                       backend="aws", endpoint_config=config, variant=plan["new"], model=plan["model"],
                       model_uri=spec.model.uri, previous_config=plan["previous_config"], autoscaling=target["ResourceId"])
        self.log.info("v%s serves all traffic on SageMaker endpoint %s (%s); autoscaling %d-%d instances at %d "
                      "invocations/instance/minute", plan["version"], plan["endpoint"], config, target["MinCapacity"],
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
