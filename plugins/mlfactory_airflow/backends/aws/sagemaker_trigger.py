"""The `aws` backend's triggers: the provider's SageMakerTrigger, first looking one ``waiter_delay``
after the deferral; the training job's also stops the job when a user kills the deferred task (mark
failed, clear, mark success)."""

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
        await asyncio.to_thread(stop_training_job, self.hook(), self.job_name, self.log)


def stop_training_job(hook, job_name: str, log) -> None:
    """Best effort: a job already finished (or a call that fails) is logged, never raised."""
    try:
        hook.conn.stop_training_job(TrainingJobName=job_name)
        log.info("stopped SageMaker training job %s", job_name)
    except Exception as err:  # noqa: BLE001 - killing must not fail on an already finished job
        log.warning("could not stop SageMaker training job %s: %s", job_name, err)
