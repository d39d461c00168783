"""ml_batch_score: the champion scores curated data not yet scored → a predictions table in the bucket.

Daily (``batch_scoring.schedule``) and whenever Asset `champion` moves. `plan` makes the run's
``BatchJobSpec``: the version (the champion, or the form's), the curated snapshots no run has scored
yet (or the URI from the form), the output ``<bucket>/predictions/batch/run=<run id>/``, and the
sizing of ``batch_scoring``; with nothing new to score, the run skips. `score` runs it on the
backend (see below), and marks the snapshots scored when it succeeds; a retried run replaces its own
output, never duplicates it.
"""

from __future__ import annotations


from airflow.sdk import DAG, Param, task

from mlfactory.config import load_config
from mlfactory.storage import prefix_pattern
from mlfactory_airflow.assets import cron_or, pipeline_assets
from mlfactory_airflow.backends import backend_for

cfg = load_config()
assets = pipeline_assets(cfg)
backend = backend_for(cfg)

with DAG(
    dag_id="ml_batch_score",
    description="Score new curated data with the champion into a predictions table",
    schedule=cron_or(cfg.batch_scoring.schedule, assets.champion),
    catchup=False,
    max_active_runs=1,
    tags=["mlfactory", "batch"],
    doc_md=f"{__doc__}\n**This pipeline's backend, `{cfg.backend.name}`:** {backend.batch_doc}",
    params={
        "input_uri": Param(None, type=["null", "string"], title="Data to score",
                           description="Leave empty for the curated snapshots not scored yet. Or Parquet under the "
                                       f"pipeline's bucket. Example: {cfg.storage.bucket}/batch/2026-12/",
                           pattern=prefix_pattern(cfg.storage.bucket)),
        "version": Param(None, type=["null", "string"], title="Model version",
                         description="Leave empty for the current champion"),
    },
):

    @task
    def plan(params: dict, run_id=None) -> dict:
        """The BatchJobSpec of this run (skipped when there is no champion or nothing new to score)."""
        from mlfactory.serving.batch import plan
        from mlfactory_airflow.outcomes import task_outcome

        with task_outcome():
            return plan(cfg, run_id, params.get("version"), params.get("input_uri")).model_dump()

    backend.batch_operator(task_id="score", spec=plan(), outlets=[assets.predictions])
