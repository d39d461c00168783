"""The `aws` backend's operators: what every SageMaker operator shares, ml_train's training job and
ml_batch_score's batch transform.

The life cycle (cost guard, take-over, deferral, result, kill) is ``mlfactory_airflow.training``'s; this is
SageMaker's part, on the amazon provider: SageMakerHook for the calls, a SageMakerTrigger subclass while the job
runs, S3Hook for the model artifact.

- Before anything is created, the cost guard (``mlfactory.backends.aws.sagemaker.check_training_budget``)
  refuses a job whose worst case is over ``aws.budget_usd``, and the provider checks the input channels.
- A retried task whose earlier job (``<name>``, or ``<name>-a<n>`` a later try started) is running or completed
  takes it over; one whose earlier job failed or stopped starts ``<name>-a<try>``, resuming from the same
  checkpoints.
- Killing the task (mark failed, clear) stops the job; a failed job fails the task with SageMaker's
  FailureReason.

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

from mlfactory_airflow.backends import CloudSpecOperator
from mlfactory_airflow.backends.aws import links
from mlfactory_airflow.backends.aws.hooks import SageMakerJobs, describe, ensure_model, retry_name, sagemaker_hook
from mlfactory_airflow.training import CloudTrainingOperator


class SageMakerBaseOperator(CloudSpecOperator):
    """The pipeline config's `aws` section, the provider's SageMakerHook, and finding earlier work."""

    ui_color = "#ffe9c7"
    backend, platform = "aws", "a SageMaker operator"

    def __init__(self, *, waiter_delay: int | None = None, **kwargs) -> None:
        super().__init__(poll_interval=waiter_delay, **kwargs)

    @property
    def waiter_delay(self) -> int:
        """Seconds between two checks of a deferred job (``aws.poll_interval_s``), as the amazon provider's
        triggers call it."""
        return self.poll_interval

    @cached_property
    def hook(self):
        return sagemaker_hook(self.settings)

    def describe(self, operation: str, **name) -> dict | None:
        return describe(self.hook, operation, **name)

    def earlier_job(self, base: str, name_field: str, describe: str, try_number: int) -> tuple[str, dict] | None:
        """The latest job an earlier try started: ``<base>``, or ``<base>-a<n>`` that a later try started after a
        failed one; (its name, its description) or None."""
        names = [retry_name(base, n) for n in range(try_number, 1, -1)] + [base]  # the latest try first
        return next(((n, d) for n in names if (d := self.describe(describe, **{name_field: n})) is not None), None)

    def start_or_take_over(self, request: dict, name_field: str, describe: str, status, create: str, try_number: int) -> str:
        """Create the job in ``request`` unless an earlier try's job is running or done: then take the latest of
        them over. After a failed or stopped one, start ``<name>-a<try>``. Returns the job's name."""
        from mlfactory_airflow.training import taken_over

        base = request[name_field]
        earlier = self.earlier_job(base, name_field, describe, try_number)
        earlier = earlier and (earlier[0], status(earlier[1]))
        found = taken_over(earlier, "SageMaker job", self.log, try_number)
        if found:
            return found
        name = retry_name(base, try_number) if earlier else base
        getattr(self.hook.conn, create)(**{**request, name_field: name})
        return name

    def trigger(self, name: str, job_type: str, max_wait_s: int, trigger_class=None):
        from mlfactory_airflow.backends.aws.sagemaker_triggers import job_trigger

        return job_trigger(self.settings, name, job_type, max_wait_s, self.waiter_delay, trigger_class)


class SageMakerTrainingOperator(CloudTrainingOperator, SageMakerBaseOperator):
    adapter_class = SageMakerJobs
    job_kwarg = "job_name"


class SageMakerTransformOperator(SageMakerBaseOperator):
    """Score ``spec`` (a BatchJobSpec) with a batch transform job on the version's SageMaker Model."""

    def execute(self, context) -> None:
        import hashlib

        from mlfactory import storage
        from mlfactory.backends.aws import sagemaker
        from mlfactory.serving.batch import batch_uri
        from mlfactory.specs import BatchJobSpec

        spec, cfg = BatchJobSpec.model_validate(self.spec), self.config
        if spec.snapshots:  # exactly the files of the snapshots not scored yet
            files = [o.uri for uri in spec.inputs.values() for o in storage.list_objects(uri) if o.key.endswith(".parquet")]
            source = storage.join(batch_uri(cfg), "_manifests", f"run={spec.name}.json")
            storage.write_bytes(source, sagemaker.transform_manifest(cfg.storage.curated_uri, files))
        else:
            (source,) = spec.inputs.values()
        model = ensure_model(self.hook, self.config, spec.model, self.log)
        name = sagemaker.job_name(f"{model[:40]}-batch-{hashlib.sha1(spec.name.encode()).hexdigest()[:12]}")
        request = sagemaker.transform_job_request(name, model, source, spec, self.settings, manifest=bool(spec.snapshots))
        name = self.start_or_take_over(request, "TransformJobName", "describe_transform_job", sagemaker.transform_status,
                                       "create_transform_job", context["ti"].try_number)
        self.log.info("batch transform %s: v%s over %s -> %s", name, spec.model.version, source, spec.output_uri)
        self.show_job(context, links.transform_job(self.settings, name))
        self.defer(trigger=self.trigger(name, "transform", spec.max_runtime_s), method_name="execute_complete",
                   kwargs={"job": name})

    def execute_complete(self, context, event: dict | None = None, job: str = "") -> dict:
        from airflow.sdk.exceptions import AirflowException
        from mlfactory.backends.aws import sagemaker
        from mlfactory.serving.batch import complete
        from mlfactory.specs import BatchJobSpec

        spec = BatchJobSpec.model_validate(self.spec)
        status = sagemaker.transform_status(self.hook.conn.describe_transform_job(TransformJobName=job))
        if status.state != "succeeded":
            raise AirflowException(f"SageMaker transform job {job} {status.state}: {status.detail}")
        complete(self.config, spec)
        return {"uri": spec.output_uri, "version": spec.model.version, "job": job, "snapshots": spec.snapshots,
                "inputs": spec.inputs}

