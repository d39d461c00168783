"""ml_monitor: drift of new curated data and of served traffic → Asset `drift_detected` → ml_train.

Hourly (``monitoring.schedule``) and whenever new data is curated. Compares the new rows with the
champion's training data, feature by feature (normalised Wasserstein distance for numeric features,
Jensen–Shannon distance for categorical ones, a BH-corrected test against noise, PSI alongside), and
writes an HTML report per source under ``<bucket>/reports/drift/``. New curated rows carry their
labels, and labels of served rows arrive later under ``predictions/labels/`` (keyed by request id and
row, ``mlfactory.monitoring.feedback``): on both the champion's metric is measured against its holdout metric, with
the drift of the labels and of its predictions (``reports/drift/performance.html``, the metric over time). When the
drifted share of features reaches ``monitoring.drift_share``, or the metric drops by more than
``monitoring.max_metric_drop``, `announce` emits Asset `drift_detected` with the reasons (features,
performance), the drifted features and their scores, which schedules ml_train: drift → retrain → gate
→ deploy, with no person.
"""

from __future__ import annotations


from airflow.sdk import DAG, Param, task

from mlfactory.config import load_config
from mlfactory_airflow.assets import cron_or, pipeline_assets

cfg = load_config()
assets = pipeline_assets(cfg)

with DAG(
    dag_id="ml_monitor",
    description="Check new data and served traffic for drift against the champion's training data",
    schedule=cron_or(cfg.monitoring.schedule, assets.curated),
    catchup=False,
    max_active_runs=1,
    tags=["mlfactory", "monitor"],
    doc_md=__doc__,
    params={
        "min_rows": Param(cfg.monitoring.min_rows, type="integer", minimum=1, title="Minimum new rows",
                          description="A source with fewer new rows is not judged yet (it waits for more)"),
    },
):

    @task
    def check_drift(params: dict, run_id=None) -> dict:
        """Compare each source with enough new rows; log where its report is."""
        from mlfactory.serving.batch import run_key
        from mlfactory.monitoring.monitor import check

        result = check(cfg, run_key(run_id), min_rows=params["min_rows"])
        for source, verdict in result.get("sources", {}).items():
            if verdict.get("checked"):
                print(f"{source}: {'DRIFT' if verdict['dataset_drift'] else 'no drift'} "
                      f"({verdict['share_drifted']:.0%} of features: {verdict['drifted_features']}); report: {verdict['report']}")
            else:
                print(f"{source}: not checked ({verdict['why']})")
        for key in ("performance", "served_performance"):
            judged = result.get(key) or {}
            if judged.get("checked"):
                print(f"{key}: {judged['metric']} {judged['value']:.4f} on {judged['rows']} new labelled {judged['source']} "
                      f"rows (holdout {judged['baseline']}, drop {judged['drop']}): "
                      f"{'DEGRADED' if judged['degraded'] else 'ok'}; report: {judged['report']}")
            for name, file in (judged.get("label_files") or {}).items():
                print(f"label file {name}: {file['status']} {file.get('why', '')} ({file.get('matched', 0)} of "
                      f"{file.get('labels', 0)} labels matched, {file.get('invalid', 0)} invalid)")
        return result

    @task.short_circuit
    def drifted(result: dict) -> bool:
        return result["drift"]

    @task(outlets=[assets.drift_detected])
    def announce(result: dict, outlet_events=None) -> dict:
        """Emit `drift_detected` (ml_train reads the drifted features from its extra)."""
        extra = {key: result[key] for key in ("reasons", "drifted_features", "scores", "drifted_sources",
                                              "champion_version")}
        extra["reports"] = [result["sources"][s]["report"] for s in result["drifted_sources"]]
        for key in ("performance", "served_performance"):
            if (result.get(key) or {}).get("degraded"):
                extra[key] = {k: result[key][k] for k in ("source", "metric", "value", "baseline", "drop", "rows")}
                extra["reports"].append(result[key]["report"])
        outlet_events[assets.drift_detected].extra = extra
        return extra

    result = check_drift()
    drifted(result) >> announce(result)
