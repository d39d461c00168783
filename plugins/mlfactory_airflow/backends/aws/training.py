"""The `aws` backend's training operator: a TrainingJobSpec as a SageMaker training job.

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
"""

from __future__ import annotations

from mlfactory_airflow.backends.aws.sagemaker import SageMakerBaseOperator, retry_name
from mlfactory_airflow.training import CloudTrainingOperator, JobAdapter


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
        from mlfactory_airflow.backends.aws.sagemaker_trigger import SageMakerTrainingJobTrigger

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

    def cancel(self, job: str) -> None:
        from mlfactory_airflow.backends.aws.sagemaker_trigger import stop_training_job

        stop_training_job(self.operator.hook, job, self.log)


class SageMakerTrainingOperator(CloudTrainingOperator, SageMakerBaseOperator):
    adapter_class = SageMakerJobs
    job_kwarg = "job_name"
