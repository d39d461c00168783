"""The Airflow UI in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright logs into the
test's real Airflow (a login is required: the Simple Auth Manager's `admin` with a generated password), opens
ml_train's trigger form, finds every Param's label and description, refuses bad values in the form, then
triggers a run with the epochs and trials typed in and sees it succeed.

Screenshots are kept in .test-artifacts/browser/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

from mlfactory.data import sample_data
from mlfactory.config import DEFAULT_CONFIG, PROJECT, load_config
from mlfactory.backends.local.local_airflow import LocalAirflow
from mlfactory.backends.local.processes import free_port

pytestmark = pytest.mark.scheduler

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = PROJECT / ".test-artifacts" / "browser"


def test_the_trigger_form_shows_every_param_refuses_bad_values_and_runs_ml_train(tmp_path, bucket, monkeypatch,
                                                                               mlflow_server, airflow_db_template):
    from playwright.sync_api import expect, sync_playwright

    assert shutil.which("chromium"), "chromium is not installed: `make test` installs Debian's chromium (docs/getting-started.md)"
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["training"].update(processes=1, search_space={"learning_rate": [0.003, 0.001]})
    raw["mlflow"].update(tracking_uri=mlflow_server.url, experiment="browser-test", model_name="churn_browser")
    raw["ingest"].update(sweep_schedule=None)
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MLFACTORY_CONFIG", str(tmp_path / "pipeline.yaml"))
    cfg = load_config()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    airflow = LocalAirflow(tmp_path / "airflow", api_port=free_port(), login=True, db_template=airflow_db_template,
                           env_overrides={"MLFACTORY_CONFIG": cfg.source})
    airflow.start()
    try:
        airflow.wait_for_dags(["ml_train"])
        # curated data for the run the form starts (no scheduled run comes first: the cron waits for its next tick)
        sample_data.land_and_curate(cfg, 3000, seed=31)
        params = airflow.api("/api/v2/dags/ml_train/details")["params"]
        assert len(params) == 12  # 4 of the search, 8 hyperparameters in a section per model family

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(120_000)  # two busy cores: Airflow, MLflow and the browser on them
            expect.set_options(timeout=60_000)
            try:
                # a login is required: the DAG's page redirects to it, and back after signing in
                page.goto(f"{airflow.url}/dags/ml_train")
                page.get_by_label("Username").fill("admin")
                page.get_by_label("Password").fill("not the password")
                page.get_by_role("button", name="Sign in").click()
                expect(page.get_by_text(re.compile("invalid|incorrect", re.I)).first).to_be_visible()
                page.get_by_label("Password").fill(airflow.admin_password)
                page.get_by_role("button", name="Sign in").click()
                page.wait_for_url(re.compile(r"/dags/ml_train"))

                page.get_by_role("button", name="Trigger").first.click()
                dialog = page.get_by_role("dialog")
                dialog.get_by_text("Run Parameters").wait_for()

                def open_section(name: str) -> None:  # the form's sections open one at a time
                    trigger = dialog.get_by_role("button", name=name, exact=True)
                    if trigger.get_attribute("aria-expanded") != "true":
                        trigger.click()

                sections = {param["schema"].get("section", "Run Parameters") for param in params.values()}
                for section in sorted(sections):
                    open_section(section)
                    for param in params.values():  # every Param: its title as the label, its description
                        if param["schema"].get("section", "Run Parameters") == section:
                            label = re.compile(rf"^{re.escape(param['schema']['title'])}\s*\*?$")  # "*": required
                            expect(dialog.locator("label").filter(has_text=label)).to_be_visible()
                            expect(dialog.get_by_text(param["description"], exact=True)).to_be_visible()
                    page.screenshot(path=ARTIFACTS / f"trigger-form-{section.split()[0].lower()}.png", full_page=True)

                # refused in the form: a number under its minimum is put back to it, a search space that is not
                # JSON is flagged under that field and the form cannot be sent
                epochs, trials = dialog.get_by_label("Epochs"), dialog.get_by_label("Search trials")
                open_section("Network (model: mlp)")
                epochs.fill("0")
                epochs.blur()
                expect(epochs).to_have_value("1")
                open_section("Run Parameters")
                space = dialog.locator("#element_search_space")
                space.locator(".view-lines").click()
                page.keyboard.press("End")
                page.keyboard.insert_text(" trailing")
                field = space.locator("xpath=..")  # the Search space field: its editor, description and errors
                expect(field.get_by_text(re.compile("SyntaxError"))).to_be_visible()
                submit = dialog.get_by_role("button", name="Trigger")
                expect(submit).to_be_disabled()
                page.screenshot(path=ARTIFACTS / "trigger-form-refused.png", full_page=True)
                page.keyboard.press("Control+Z")  # back to the valid default
                expect(field.get_by_text(re.compile("SyntaxError"))).to_have_count(0)

                # epochs and trials typed in, triggered from the form: the run gets them and succeeds
                open_section("Network (model: mlp)")
                epochs.fill("2")
                open_section("Run Parameters")
                trials.fill("1")
                trials.blur()
                expect(submit).to_be_enabled()
                submit.click()
                run = airflow.wait_for_run("ml_train", 1, timeout=600, run_type="manual")
                page.goto(f"{airflow.url}/dags/ml_train/runs/{run['dag_run_id']}")
                page.get_by_text("success").first.wait_for()
                page.screenshot(path=ARTIFACTS / "ml-train-run.png", full_page=True)
            finally:
                browser.close()

        assert run["state"] == "success", airflow.failure_report("ml_train", run)
        assert run["conf"]["epochs"] == 2 and run["conf"]["trials"] == 1
        trains = [t for t in airflow.task_instances("ml_train", run["dag_run_id"]) if t["task_id"] == "train"]
        assert [t["state"] for t in trains] == ["success"]  # one trial, as typed
        assert "epoch 2/2" in airflow.task_log("ml_train", run["dag_run_id"], "train", 0)
    finally:
        airflow.stop()
