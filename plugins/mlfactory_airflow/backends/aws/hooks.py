"""The `aws` backend's clients and the adapters built on them (the amazon provider's SageMakerHook, and
the base AWS hook for Application Auto Scaling, CloudWatch and sagemaker-runtime).

``SageMakerJobs``: ml_train's training job life cycle (``mlfactory_airflow.training``) on SageMaker.

ml_deploy's rollout, the batch transform
operator, and what every SageMaker operator shares.

ml_deploy's rollout (``mlfactory.serving.rollout``: the same five steps and verdict as on every backend) on a
SageMaker endpoint, through ``SageMakerEndpointAdapter``, each variant named ``v<version>``:

- ``stage``: the version's SageMaker Model; the endpoint created on it, or updated (blue/green, rolled back
  by the alarms in ``rollback_alarms``) to a new EndpointConfig where the served variant keeps all the traffic
  and the new one stands beside it at weight 0 (the update deferred on a ``SageMakerJobTrigger``).
- ``health_check``: the endpoint in service with the new variant on it.
- ``smoke_test``: holdout rows to the new variant alone (InvokeEndpoint's ``TargetVariant``): a model that
  answers NaN, raises or hangs past SageMaker's 60 s fails here, before any client reaches it.
- ``canary``: ``canary_percent`` of the traffic to the new variant (UpdateEndpointWeightsAndCapacities) for
  ``canary_wait_s``, then ``canary_requests`` holdout rows through the endpoint, and no CloudWatch alarm of
  ``rollback_alarms`` in ALARM.
- ``full_traffic``: all the traffic to the new variant, then a config with it alone (the old instances go);
  in service, it gets its Application Auto Scaling target (``min_replicas``..``max_replicas``) and a
  target-tracking policy on invocations per instance.
- ``restore`` (ml_deploy's ``rollback``): the weights back on the old variant and the endpoint back on the
  config it served before.
"""

from __future__ import annotations

from functools import cached_property

from mlfactory.serving.rollout import EndpointAdapter, Wait

from mlfactory_airflow.backends.aws import links
from mlfactory_airflow.training import JobAdapter


def sagemaker_hook(settings):
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    return SageMakerHook(aws_conn_id=settings.conn_id, region_name=settings.region)


def describe(hook, operation: str, **name) -> dict | None:
    """``hook.conn.<operation>(**name)``, or None if SageMaker has no such resource."""
    from botocore.exceptions import ClientError

    try:
        return getattr(hook.conn, operation)(**name)
    except ClientError as err:
        message = str(err.response.get("Error", {}).get("Message", "")).lower()
        if "not found" in message or "could not find" in message or "does not exist" in message:
            return None
        raise


def ensure_model(hook, cfg, model, log) -> str:
    """The SageMaker Model of a registered version (a ``ModelRef``; created once, shared by endpoint and
    transform): the project's model server on the version's files in S3."""
    from mlfactory.backends.aws.sagemaker import create_model_request, model_name_for

    name = model_name_for(model)
    if describe(hook, "describe_model", ModelName=name) is None:
        environment = {"MLFACTORY_MODEL_VERSION": model.version,  # the prediction log ml_monitor reads, as on local
                       "MLFACTORY_PREDICTION_LOG_URI": cfg.storage.prediction_log_uri}
        hook.conn.create_model(**create_model_request(name, model.uri, cfg.backend, environment))
        log.info("created SageMaker model %s on %s", name, model.uri)
    return name


def retry_name(base: str, try_number: int) -> str:
    """The job try ``try_number`` starts after an earlier try's job ``base`` failed or stopped."""
    from mlfactory.backends.aws.sagemaker import job_name

    return job_name(f"{base[:56]}-a{try_number}")


def stop_training_job(hook, job_name: str, log) -> None:
    """Best effort: a job already finished (or a call that fails) is logged, never raised."""
    try:
        hook.conn.stop_training_job(TrainingJobName=job_name)
        log.info("stopped SageMaker training job %s", job_name)
    except Exception as err:  # noqa: BLE001 - killing must not fail on an already finished job
        log.warning("could not stop SageMaker training job %s: %s", job_name, err)


class SageMakerJobs(JobAdapter):
    platform = "SageMaker training job"

    def prepare(self, spec, try_number: int) -> str:
        from mlfactory.backends.aws.sagemaker import check_training_budget, create_training_job_request

        estimate = check_training_budget(spec, self.settings)
        self.log.info("training job %s: %s", spec.name, estimate)
        self.request = create_training_job_request(spec, self.settings)
        return f"{spec.nodes} x {self.request['ResourceConfig']['InstanceType']}"

    def find_earlier(self, spec, try_number: int):
        from mlfactory.backends.aws.sagemaker import training_status

        earlier = self.operator.earlier_job(self.request["TrainingJobName"], "TrainingJobName", "describe_training_job",
                                            try_number)
        return earlier and (earlier[0], training_status(earlier[1]))

    def submit(self, spec, try_number: int, earlier: str | None) -> str:
        hook = self.operator.hook
        hook.check_training_config(self.request)  # the provider's own check: the input channels exist in S3
        base = self.request["TrainingJobName"]
        name = retry_name(base, try_number) if earlier else base
        hook.conn.create_training_job(**{**self.request, "TrainingJobName": name})
        return name

    def trigger(self, job: str, timeout_s: int):
        from mlfactory_airflow.backends.aws.sagemaker_triggers import SageMakerTrainingJobTrigger

        return self.operator.trigger(job, "Training", timeout_s, SageMakerTrainingJobTrigger)

    def status(self, job: str):
        from mlfactory.backends.aws.sagemaker import training_status

        self.described = self.operator.hook.describe_training_job(job)
        return training_status(self.described)

    def result(self, job: str, spec, event: dict | None) -> dict:
        """The job's model.tar.gz unpacked next to it: model.pt and metrics.json under ``output_uri``."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook
        from mlfactory.backends.aws.sagemaker import training_result, training_status

        artifact = training_status(self.described).artifact
        if not artifact:
            raise ValueError(f"SageMaker training job {job} completed without a model artifact")
        s3 = S3Hook(aws_conn_id=self.settings.conn_id, region_name=self.settings.region)
        bucket, key = S3Hook.parse_s3_url(artifact)
        if not s3.check_for_key(key, bucket):
            raise FileNotFoundError(f"SageMaker training job {job} completed, but its model artifact {artifact} is "
                                    "not in S3; a retry takes the job over and looks again")
        result, files = training_result(s3.get_key(key, bucket).get()["Body"].read(), spec.output_uri, job, artifact)
        out_bucket, out_key = S3Hook.parse_s3_url(spec.output_uri)
        for filename, data in files.items():
            s3.load_bytes(data, key=f"{out_key.rstrip('/')}/{filename}", bucket_name=out_bucket, replace=True)
        return result

    def console_url(self, job: str) -> str:
        return links.training_job(self.settings, job)

    def cancel(self, job: str) -> None:
        stop_training_job(self.operator.hook, job, self.log)


class SageMakerEndpointAdapter(EndpointAdapter):
    """ml_deploy's rollout on the pipeline's SageMaker endpoint (see the module's docstring)."""

    def __init__(self, cfg, spec, poll_interval: int | None = None) -> None:
        super().__init__(cfg, spec, poll_interval)
        self.waiter_delay = self.poll_interval

    def console_url(self, plan: dict) -> str:
        return links.endpoint(self.settings, plan["endpoint"])

    @cached_property
    def hook(self):
        return sagemaker_hook(self.settings)

    def client(self, service: str):
        """A boto3 client of ``service`` on the pipeline's AWS connection. sagemaker-runtime waits up to 90 s for an
        answer (SageMaker itself gives a model 60 s) and never retries: a failed request counts."""
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
        from botocore.config import Config

        config = Config(read_timeout=90, retries={"total_max_attempts": 1}) if service == "sagemaker-runtime" else None
        return AwsBaseHook(aws_conn_id=self.settings.conn_id, region_name=self.settings.region, client_type=service,
                           config=config).conn

    @cached_property
    def runtime(self):
        return self.client("sagemaker-runtime")

    def variants(self, config: str | None) -> list:
        """The production variants of endpoint config ``config`` (none for None)."""
        from mlfactory.backends.aws.sagemaker import config_variants

        return config_variants(self.hook.conn.describe_endpoint_config(EndpointConfigName=config)) if config else []

    def wait(self, endpoint: str, config: str, **resume) -> Wait:
        """Until ``endpoint`` is out of its update to ``config``."""
        from mlfactory_airflow.backends.aws.sagemaker_triggers import job_trigger

        trigger = job_trigger(self.settings, endpoint, "endpoint", 2 * 3600 + self.spec.canary_wait_s, self.waiter_delay)
        return Wait(f"endpoint {endpoint} moving to {config}", operation=trigger, resume={"config": config, **resume})

    def check_on(self, plan: dict, config: str) -> None:
        """The endpoint, out of its update, serves ``config``: else SageMaker rolled it back (or it failed)."""
        from mlfactory.backends.aws.sagemaker import endpoint_state
        from mlfactory.serving.deployment import DeploymentFailed

        status = endpoint_state(self.hook.conn.describe_endpoint(EndpointName=plan["endpoint"]), config)
        if status.state != "succeeded":
            raise DeploymentFailed(f"endpoint {plan['endpoint']} did not take {config} for v{plan['version']}: "
                                   f"{status.detail}")

    def stage(self, keep, plan: dict | None = None, config: str | None = None) -> dict | Wait:
        """The version's Model as variant ``v<version>``: the endpoint created on it, or updated (blue/green) to a
        config with the served variant unchanged and the new one beside it at weight 0."""
        from dataclasses import replace
        from datetime import datetime, timezone

        from mlfactory.backends.aws import sagemaker
        from mlfactory.serving.deployment import read_endpoint_state

        if plan:  # the endpoint's creation or update is over
            self.check_on(plan, config)
            return plan
        spec = self.spec
        endpoint, model = sagemaker.endpoint_name(spec), ensure_model(self.hook, self.cfg, spec.model, self.log)
        new = sagemaker.endpoint_variant(spec, model, self.settings, weight=0.0)
        existing = describe(self.hook, "describe_endpoint", EndpointName=endpoint)
        current, pending = sagemaker.endpoint_configs(existing)
        plan = {"endpoint": endpoint, "model": model, "version": spec.model.version, "new": new.name, "old": None,
                "previous_config": current, "already_served": False}
        taken = pending or current  # the config an update is moving to, else the one in service
        variants = self.variants(taken)
        mine = [v for v in variants if v.model_name == model]
        if mine:  # a retry, or the version is served already: no new config
            others = [v for v in variants if v.model_name != model]
            earlier = read_endpoint_state(self.cfg).get("rollout") or {}
            plan.update(config=taken, new=mine[0].name, old=others[0].name if others else None,
                        already_served=not others and taken == current,
                        previous_config=earlier.get("previous_config") if others else current)
            self.log.info("endpoint %s already has %s for v%s: taking it over", endpoint, taken, spec.model.version)
            if plan["already_served"]:
                return plan
            keep(plan)
            return self.wait(endpoint, taken, plan=plan)
        if pending:
            raise RuntimeError(f"endpoint {endpoint} is updating to {pending} (not v{spec.model.version}): "
                               "deploy again once that update is over")
        config = sagemaker.job_name(f"{model[:48]}-{datetime.now(timezone.utc):%Y%m%d%H%M%S}")
        if existing is None:
            variants = [replace(new, weight=1.0)]
        else:
            old = max(self.variants(current), key=lambda v: v.weight)  # the served one
            variants = [replace(old, weight=1.0), new]
            plan["old"] = old.name
        plan["config"] = config
        self.hook.conn.create_endpoint_config(**sagemaker.endpoint_config_request(config, variants, self.settings))
        keep(plan)
        if existing is None:
            self.hook.conn.create_endpoint(**sagemaker.create_endpoint_request(endpoint, config, self.settings))
            self.log.info("creating endpoint %s on %s: v%s on %d x %s", endpoint, config, spec.model.version,
                          new.instances, new.instance_type)
        else:
            self.hook.conn.update_endpoint(**sagemaker.update_endpoint_request(endpoint, config, spec.rollback_alarms))
            self.log.info("updating endpoint %s from %s to %s: %s keeps the traffic, v%s (%s) beside it at weight 0",
                          endpoint, current, config, plan["old"], spec.model.version, new.name)
        return self.wait(endpoint, config, plan=plan)

    def ready(self, plan: dict) -> str | None:
        described = self.hook.conn.describe_endpoint(EndpointName=plan["endpoint"])
        names = [v["VariantName"] for v in described.get("ProductionVariants", [])]
        if described["EndpointStatus"] != "InService":
            return f"endpoint {plan['endpoint']} is {described['EndpointStatus']}"
        return None if plan["new"] in names else f"endpoint {plan['endpoint']} has no variant {plan['new']} ({names})"

    def predict(self, plan: dict, rows: list[dict], variant: str | None) -> tuple[str, list]:
        import json

        from mlfactory.backends.aws.sagemaker import invoke_request

        reply = self.runtime.invoke_endpoint(**invoke_request(plan["endpoint"], rows, variant))
        return reply.get("InvokedProductionVariant", ""), json.loads(reply["Body"].read()).get("predictions") or []

    def set_weights(self, plan: dict, weights: dict[str, float]) -> None:
        from mlfactory.backends.aws.sagemaker import weights_request

        if not plan["old"]:  # a first deployment: the new variant is alone on the endpoint, with all its traffic
            return
        self.hook.conn.update_endpoint_weights_and_capacities(**weights_request(plan["endpoint"], weights))
        self.log.info("traffic of %s: %s", plan["endpoint"], weights)

    def firing_alarms(self, plan: dict, names: list[str]) -> list[str]:
        alarms = self.client("cloudwatch").describe_alarms(AlarmNames=names)["MetricAlarms"]
        return sorted(a["AlarmName"] for a in alarms if a["StateValue"] == "ALARM")

    def finalise(self, plan: dict, config: str | None = None) -> dict | Wait:
        """All traffic to the new variant, then (blue/green) a config with it alone, so the old instances go; then
        autoscaling on it."""
        from dataclasses import replace
        from datetime import datetime, timezone

        from mlfactory.backends.aws import sagemaker

        if config or not plan["old"]:
            return self._complete(plan, config or plan["config"])
        current, pending = sagemaker.endpoint_configs(self.hook.conn.describe_endpoint(EndpointName=plan["endpoint"]))
        final = next((c for c in (pending, current) if c and c != plan["config"]
                      and [v.model_name for v in self.variants(c)] == [plan["model"]]), None)
        if final is None:  # not a retry
            self.set_weights(plan, {plan["new"]: 100, plan["old"]: 0})
            final = sagemaker.job_name(f"{plan['model'][:48]}-{datetime.now(timezone.utc):%Y%m%d%H%M%S}")
            variant = sagemaker.endpoint_variant(self.spec, plan["model"], self.settings)
            self.hook.conn.create_endpoint_config(**sagemaker.endpoint_config_request(
                final, [replace(variant, name=plan["new"])], self.settings))
            self.hook.conn.update_endpoint(**sagemaker.update_endpoint_request(plan["endpoint"], final,
                                                                               self.spec.rollback_alarms))
            self.log.info("v%s has all the traffic of %s; %s drops %s's instances", plan["version"], plan["endpoint"],
                          final, plan["old"])
        return self.wait(plan["endpoint"], final)

    def _complete(self, plan: dict, config: str) -> dict:
        from mlfactory.backends.aws import sagemaker

        spec = self.spec
        self.check_on(plan, config)
        target, policy = sagemaker.autoscaling_requests(spec, plan["new"])
        scaling = self.client("application-autoscaling")
        scaling.register_scalable_target(**target)
        scaling.put_scaling_policy(**policy)
        if plan["old"]:  # the old variant is gone: so is its scalable target
            old = sagemaker.scalable_target(plan["endpoint"], plan["old"])
            if scaling.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[old["ResourceId"]])[
                    "ScalableTargets"]:
                scaling.deregister_scalable_target(**old)
        self.log.info("autoscaling %d-%d instances at %d invocations/instance/minute", target["MinCapacity"],
                      target["MaxCapacity"], spec.target_requests_per_replica)
        return {"endpoint": plan["endpoint"], "tags": {"mlfactory.endpoint_config": config}, "backend": "aws",
                "endpoint_config": config, "variant": plan["new"], "model": plan["model"], "model_uri": spec.model.uri,
                "previous_config": plan["previous_config"], "autoscaling": target["ResourceId"]}

    def restore(self, plan: dict) -> None:
        """The weights back on the old variant, and the endpoint back (blue/green, not waited for) on the config
        that served it alone. After a failed first deployment there is nothing to go back to: the endpoint stays."""
        from mlfactory.backends.aws.sagemaker import update_endpoint_request, weights_request

        if plan.get("already_served") or not plan.get("endpoint"):
            return
        if not plan.get("old"):
            self.log.warning("v%s was the first version on %s: no earlier one to return to; the endpoint stays until a "
                             "version passes its rollout", plan.get("version"), plan["endpoint"])
            return
        sagemaker = self.hook.conn
        described = sagemaker.describe_endpoint(EndpointName=plan["endpoint"])
        if described["EndpointStatus"] != "InService":
            self.log.warning("endpoint %s is %s: SageMaker finishes (or rolls back) that update first; the traffic is "
                             "left to it", plan["endpoint"], described["EndpointStatus"])
            return
        names = {v["VariantName"] for v in described.get("ProductionVariants", [])}
        if {plan["old"], plan["new"]} <= names:
            sagemaker.update_endpoint_weights_and_capacities(**weights_request(plan["endpoint"], {plan["old"]: 100,
                                                                                                  plan["new"]: 0}))
            self.log.info("traffic of %s back on %s", plan["endpoint"], plan["old"])
        if plan.get("previous_config") and described["EndpointConfigName"] != plan["previous_config"]:
            sagemaker.update_endpoint(**update_endpoint_request(plan["endpoint"], plan["previous_config"],
                                                                self.spec.rollback_alarms))
            self.log.info("endpoint %s going back to %s (blue/green)", plan["endpoint"], plan["previous_config"])

