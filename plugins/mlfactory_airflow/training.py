"""ml_train's ``train`` on a cloud, one life cycle for every cloud backend.

``CloudTrainingOperator`` runs one ``TrainingJobSpec`` as a cloud training job; a backend gives it a small
``JobAdapter`` (its clients, its request builders, its trigger):

- ``prepare``: the cost guard refuses a job whose worst case is over the backend's ``budget_usd``, and the request
  is built (and checked against the cloud's own model) before anything is created: neither can succeed on a retry.
- ``find_earlier``: an earlier try's job for the same spec. Running or succeeded: this try takes it over (waits for
  it, or takes its result); failed or cancelled: ``submit`` starts another on the same checkpoints (it resumes).
- the task defers on the backend's ``trigger`` while the job runs: no worker slot is held; the job's name travels
  in the deferral's kwargs and is never recomputed.
- ``execute_complete``: the job's state; a failed job fails the task with the cloud's own error; else ``result``,
  the entrypoint's metrics.json with the model bundle's URI.
- killing the task cancels the job: the trigger's ``on_kill`` while deferred, ``on_kill`` (``cancel``) on a worker.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from mlfactory_airflow.backends import CloudSpecOperator


def taken_over(earlier: tuple | None, platform: str, log, try_number: int) -> str | None:
    """The job an earlier try started (``earlier``: its name and ``JobStatus``, or None) when this try takes it over:
    it runs or succeeded. None when a new job must start (none, or it failed or was cancelled: logged)."""
    if earlier is None:
        return None
    name, status = earlier
    if status.state in ("running", "succeeded"):
        log.info("%s %s (an earlier try's) is %s (%s): taking it over", platform, name, status.state, status.detail)
        return name
    log.info("the earlier %s %s ended %s (%s): starting another (try %d)", platform, name, status.state, status.detail,
             try_number)
    return None


class JobAdapter(ABC):
    """One cloud's training jobs, seen from ``operator`` (its settings, config, clients and log). The backend's batch
    operator defers on the same ``trigger``."""

    platform: str  # what a message calls the job, e.g. "Vertex AI custom job"

    def __init__(self, operator: CloudTrainingOperator) -> None:
        self.operator, self.settings, self.log = operator, operator.settings, operator.log

    @abstractmethod
    def prepare(self, spec, try_number: int) -> str:
        """The cost guard and the request, checked (raise on either); what the log says about the job."""

    @abstractmethod
    def find_earlier(self, spec, try_number: int):
        """The latest job an earlier try started for ``spec``: (its name, its ``JobStatus``), or None."""

    @abstractmethod
    def submit(self, spec, try_number: int, earlier: str | None) -> str:
        """Start the prepared job (``earlier``: the failed or cancelled job of an earlier try); its name."""

    @abstractmethod
    def trigger(self, job: str, timeout_s: int):
        """The trigger that fires when ``job`` is done (or after ``timeout_s``) and cancels it when killed."""

    @abstractmethod
    def status(self, job: str):
        """``job``'s ``JobStatus`` now."""

    @abstractmethod
    def result(self, job: str, spec, event: dict | None) -> dict:
        """The succeeded job's metrics (``mlfactory.specs`` training result)."""

    @abstractmethod
    def cancel(self, job: str) -> None:
        """Cancel ``job``, best effort (a finished job, a failed call: logged, never raised)."""

    @abstractmethod
    def console_url(self, job: str) -> str:
        """``job``'s page in the cloud's console (the backend's ``links``)."""


class CloudTrainingOperator(CloudSpecOperator):
    """A TrainingJobSpec as a cloud training job (see the module's docstring); returns the entrypoint's metrics."""

    adapter_class: type[JobAdapter]
    job_kwarg = "job"  # the deferral's kwarg carrying the job's name

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.job_name: str | None = None

    @property
    def jobs(self) -> JobAdapter:
        return self.adapter_class(self)

    def execute(self, context, **_) -> None:
        from mlfactory.specs import TrainingJobSpec
        from mlfactory_airflow.outcomes import task_outcome

        spec, jobs, try_number = TrainingJobSpec.model_validate(self.spec), self.jobs, context["ti"].try_number
        with task_outcome():  # over budget, or a request the cloud's model refuses: retrying cannot help
            about = jobs.prepare(spec, try_number)
        earlier = jobs.find_earlier(spec, try_number)
        self.job_name = taken_over(earlier, jobs.platform, self.log, try_number)
        if self.job_name is None:
            self.job_name = jobs.submit(spec, try_number, earlier[0] if earlier else None)
            self.log.info("%s %s: %s", jobs.platform, self.job_name, about)
        self.show_job(context, jobs.console_url(self.job_name))
        # spot or flex-start jobs may wait for capacity (and be requeued): poll for up to 3 x the max runtime
        self.defer(trigger=jobs.trigger(self.job_name, 3 * spec.max_runtime_s), method_name="execute_complete",
                   kwargs={self.job_kwarg: self.job_name})

    def execute_complete(self, context, event: dict[str, Any] | None = None, **kwargs) -> dict:
        from airflow.sdk.exceptions import AirflowException

        from mlfactory.specs import TrainingJobSpec

        jobs, job = self.jobs, kwargs[self.job_kwarg]
        self.job_name = job
        status = jobs.status(job)
        if status.state != "succeeded":
            raise AirflowException(f"{jobs.platform} {job} {status.state}: "
                                   f"{status.detail or (event or {}).get('message', '')}")
        result = jobs.result(job, TrainingJobSpec.model_validate(self.spec), event)
        self.log.info("job %s: %s %s; model bundle %s", job, result["metric"], result["value"], result["model_bundle_uri"])
        return result

    def on_kill(self) -> None:
        if self.job_name:
            self.jobs.cancel(self.job_name)
