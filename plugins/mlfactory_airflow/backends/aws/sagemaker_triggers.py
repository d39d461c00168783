"""The `aws` backend's deferral triggers: the provider's SageMakerTrigger, first looking one ``waiter_delay``
after the deferral; the training job's also stops the job when a user kills the deferred task (mark
failed, clear, mark success).
"""

from __future__ import annotations

import asyncio

from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger


class SageMakerJobTrigger(SageMakerTrigger):
    """Waits one ``waiter_delay`` before its first check. A job that is done already (a retry taking a
    finished job over; an emulator's instant job) would otherwise fire within a second of the deferral,
    while the deferring try's worker may still be reporting it: Airflow 3's scheduler then sees that try
    finish while its resumed run is going, fails it, and was seen to exit on the clash."""

    async def run(self):
        await asyncio.sleep(self.waiter_delay)
        async for event in super().run():
            yield event


class SageMakerTrainingJobTrigger(SageMakerJobTrigger):
    def __init__(self, job_name: str, **kwargs) -> None:
        kwargs.pop("job_type", None)  # serialize() writes it back: it is always a training job here
        super().__init__(job_name=job_name, job_type="Training", **kwargs)

    async def on_kill(self) -> None:
        from mlfactory_airflow.backends.aws.hooks import stop_training_job

        await asyncio.to_thread(stop_training_job, self.hook(), self.job_name, self.log)


def job_trigger(settings, name: str, job_type: str, max_wait_s: int, waiter_delay: int, trigger_class=None):
    """A SageMakerJobTrigger (or a subclass) polling ``name`` every ``waiter_delay`` s for up to ``max_wait_s``."""
    return (trigger_class or SageMakerJobTrigger)(
        job_name=name, job_type=job_type, waiter_delay=waiter_delay, waiter_max_attempts=max(1, max_wait_s // waiter_delay),
        aws_conn_id=settings.conn_id, region_name=settings.region)

