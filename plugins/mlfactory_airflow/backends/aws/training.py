"""The `aws` backend's training operator: a TrainingJobSpec as a SageMaker training job.

Takes the same ``TrainingJobSpec`` as every backend's training operator and returns the same
result (the entrypoint's metrics.json, with the model bundle's S3 URI). Built on the amazon
provider: SageMakerHook for the calls, a SageMakerTrigger subclass while the job runs (the task
defers, holding no worker slot), S3Hook for the model artifact.

- Before anything is created, the cost guard (``mlfactory.backends.aws.sagemaker.check_training_budget``) refuses a job whose
  worst case is over ``aws.budget_usd``.
- The job name is chosen once and carried through the deferral in the resume kwargs; it is never
  recomputed. A retried task whose earlier job is running or completed takes it over (waits for
  it, or takes its result); one whose earlier job failed or stopped starts ``<name>-a<try>``,
  resuming from the same checkpoints.
- Killing the task (mark failed, clear) stops the job: the trigger's ``on_kill`` while deferred,
  the operator's ``on_kill`` while it runs on a worker.
- A failed job fails the task with SageMaker's FailureReason.
"""

from __future__ import annotations

from typing import Any

from mlfactory_airflow.backends.aws.sagemaker import SageMakerBaseOperator


class SageMakerTrainingOperator(SageMakerBaseOperator):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.job_name: str | None = None

    def execute(self, context) -> None:
        from mlfactory.backends.aws.sagemaker import check_training_budget, create_training_job_request, training_status
        from mlfactory.specs import TrainingJobSpec
        from mlfactory_airflow.outcomes import task_outcome

        spec = TrainingJobSpec.model_validate(self.spec)
        with task_outcome():  # a request over budget or that SageMaker's model refuses: retrying cannot help
            estimate = check_training_budget(spec, self.settings)
            self.log.info("training job %s: %s", spec.name, estimate)
            request = create_training_job_request(spec, self.settings)
        self.hook.check_training_config(request)  # the provider's own check: the input channels exist in S3
        self.job_name = self.start_or_take_over(request, "TrainingJobName", "describe_training_job", training_status,
                                                "create_training_job", context["ti"].try_number)
        self.log.info("SageMaker training job %s: %d x %s", self.job_name, spec.nodes,
                      request["ResourceConfig"]["InstanceType"])
        self._wait(self.job_name, spec)

    def _wait(self, name: str, spec) -> None:
        from mlfactory_airflow.backends.aws.sagemaker_trigger import SageMakerTrainingJobTrigger

        # spot jobs may wait for capacity: poll for up to 3 x the max runtime
        self.defer(trigger=self.trigger(name, "Training", spec.max_runtime_s * 3, SageMakerTrainingJobTrigger),
                   method_name="execute_complete", kwargs={"job_name": name})

    def execute_complete(self, context, event: dict[str, Any] | None = None, job_name: str | None = None) -> dict:
        from airflow.sdk.exceptions import AirflowException

        from mlfactory.backends.aws.sagemaker import training_status
        from mlfactory.specs import TrainingJobSpec

        self.job_name = job_name
        described = self.hook.describe_training_job(job_name)
        status = training_status(described)
        if status.state != "succeeded":
            reason = status.detail or (event or {}).get("message", "")
            raise AirflowException(f"SageMaker training job {job_name} {status.state}: {reason}")
        return self._result(job_name, TrainingJobSpec.model_validate(self.spec), described)

    def _result(self, name: str, spec, described: dict) -> dict:
        """The job's model.tar.gz unpacked next to it: model.pt and metrics.json under ``output_uri``."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        from mlfactory.backends.aws.sagemaker import training_result, training_status

        artifact = training_status(described).artifact
        if not artifact:
            raise ValueError(f"SageMaker training job {name} completed without a model artifact")
        s3 = S3Hook(aws_conn_id=self.settings.conn_id, region_name=self.settings.region)
        bucket, key = S3Hook.parse_s3_url(artifact)
        if not s3.check_for_key(key, bucket):
            raise FileNotFoundError(f"SageMaker training job {name} completed, but its model artifact {artifact} is "
                                    "not in S3; a retry takes the job over and looks again")
        result, files = training_result(s3.get_key(key, bucket).get()["Body"].read(), spec.output_uri, name, artifact)
        out_bucket, out_key = S3Hook.parse_s3_url(spec.output_uri)
        for filename, data in files.items():
            s3.load_bytes(data, key=f"{out_key.rstrip('/')}/{filename}", bucket_name=out_bucket, replace=True)
        self.log.info("job %s: %s %s; model bundle %s", name, result["metric"], result["value"], result["model_bundle_uri"])
        return result

    def on_kill(self) -> None:
        from mlfactory_airflow.backends.aws.sagemaker_trigger import stop_training_job

        if self.job_name:
            stop_training_job(self.hook, self.job_name, self.log)

