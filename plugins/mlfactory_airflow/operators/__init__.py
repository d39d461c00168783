"""Operators of each backend. ``training_operators`` is the one place that knows which exist."""

from __future__ import annotations


def training_operators() -> dict[str, type]:
    """backend -> the operator that runs a TrainingJobSpec there (imported lazily, on parse)."""
    from mlfactory_airflow.operators.local_training import LocalTrainingOperator
    from mlfactory_airflow.operators.sagemaker_training import SageMakerTrainingOperator

    return {"local": LocalTrainingOperator, "aws": SageMakerTrainingOperator}
