"""ml_batch_score: the champion scores curated data not yet scored → a predictions table in the bucket.

Daily (``batch_scoring.schedule``) and whenever Asset `champion` moves. Scores in chunks of
``batch_scoring.chunk_rows`` and writes ``<bucket>/predictions/batch/run=<run id>/`` (key columns,
outputs, model version, snapshot, time); a retried run replaces its own output, never duplicates it.
The form can score any Parquet URI instead, or use another model version.

On `aws`, a SageMaker batch transform job does the scoring (the same model server, each curated
file sent whole as Parquet) over a manifest of the snapshots not scored yet; its answers land under
the same ``run=<run id>/`` prefix as ``<file>.out`` (JSON, in the file's row order).
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable, Param, task

from mlfactory.config import load_config
from mlfactory_airflow.assets import pipeline_assets

cfg = load_config()
assets = pipeline_assets(cfg)

with DAG(
    dag_id="ml_batch_score",
    description="Score new curated data with the champion into a predictions table",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(cfg.batch_scoring.schedule, timezone="UTC"), assets=assets.champion
    ),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["mlfactory", "batch"],
    doc_md=__doc__,
    params={
        "input_uri": Param(None, type=["null", "string"], title="Data to score",
                           description="Leave empty for the curated snapshots not scored yet. Example: file:///data/batch/"),
        "version": Param(None, type=["null", "string"], title="Model version",
                         description="Leave empty for the current champion"),
    },
):

    def champion_version(params: dict) -> str:
        from airflow.sdk.exceptions import AirflowSkipException

        from mlfactory.registry import CHAMPION, Registry

        version = params.get("version") or Registry(cfg).alias_version(CHAMPION)
        if not version:
            raise AirflowSkipException(f"{cfg.model_name} has no champion yet: nothing to score with")
        return str(version)

    if cfg.backend == "aws":
        from mlfactory_airflow.operators.sagemaker import SageMakerTransformOperator

        @task
        def resolve(params: dict) -> dict:
            """The version to score with and where its files are in S3 (what the SageMaker Model loads)."""
            from mlfactory.deployment import cloud_target

            return cloud_target(cfg, champion_version(params))

        SageMakerTransformOperator(task_id="transform", target=resolve(), input_uri="{{ params.input_uri or '' }}",
                                   outlets=[assets.predictions])
    else:

        @task(outlets=[assets.predictions])
        def score(params: dict, run_id=None) -> dict:
            from mlfactory.batch_scoring import score

            return score(cfg, run_id, champion_version(params), params.get("input_uri"))

        score()
