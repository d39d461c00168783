"""The `aws` backend's console links: the SageMaker console's page of a training job, a batch transform job
and an endpoint."""

from __future__ import annotations


def _console(settings) -> str:
    return f"https://{settings.region}.console.aws.amazon.com/sagemaker/home?region={settings.region}#"


def training_job(settings, name: str) -> str:
    return f"{_console(settings)}/jobs/{name}"


def transform_job(settings, name: str) -> str:
    return f"{_console(settings)}/transform-jobs/{name}"


def endpoint(settings, name: str) -> str:
    return f"{_console(settings)}/endpoints/{name}"
