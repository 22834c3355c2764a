"""The MLflow UI in a real headless browser: a sweep's runs, trained by the real trainer and
logged to a real server, are nested under their parent run, and the compare view draws their
dev/wer curves.

Debian's chromium and chromedriver (scripts/setup.sh) driven by selenium; selenium-manager, which
would download a browser, is never run. Screenshots go to the test's tmp_path and, when
$LMU_ASR_SCREENSHOTS is set, are copied there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mlflow_server import MlflowServer, mlflow_server  # noqa: F401
from tests.test_train import SMALL, corpus_env  # noqa: F401

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# Without the background-networking flags Chromium keeps trying to reach Google's hosts.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
CHROMIUM_ARGS += ["--disable-background-networking", "--disable-component-update"]
CHROMIUM_ARGS += ["--disable-sync", "--no-first-run", "--window-size=1920,1080"]
WAIT_S = 60  # per page element; the machine may be busy


@pytest.fixture
def browser(monkeypatch) -> Iterator:
    """A headless Debian chromium through /usr/bin/chromedriver. selenium-manager is made to fail
    the test if anything calls it (it would try to download a browser and a driver)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    assert not missing, f"{missing} missing: run scripts/setup.sh (Debian chromium chromium-driver)"
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    def no_selenium_manager(*args, **kwargs):
        raise AssertionError("selenium-manager was invoked")

    monkeypatch.setattr(SeleniumManager, "binary_paths", no_selenium_manager)
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def train_sweep(server: MlflowServer, env: dict, tmp_path: Path, experiment: str) -> tuple:
    """Two real training runs (seeds 0 and 1) side by side, as the jobs of a sweep, logging under
    a parent run created first. Returns (experiment id, parent run id, {run name: run id})."""
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    exp_id = client.create_experiment(experiment)
    parent = client.create_run(exp_id, run_name="sweep").info.run_id
    procs = {}
    for seed in (0, 1):
        cmd = [sys.executable, "-m", "lmu_asr.launch", *SMALL, f"hydra.run.dir={tmp_path}/{seed}"]
        cmd += [f"trainer.seed={seed}", "trainer.max_steps=4", "trainer.eval_every=2"]
        cmd += ["trainer.final_lm=false", f"tracking.uri={server.uri}"]
        cmd += [f"tracking.experiment={experiment}", f"tracking.parent_run_id={parent}"]
        cmd += [f"tracking.run_name=seed{seed}"]
        kw = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        procs[f"seed{seed}"] = subprocess.Popen(cmd, env=env, **kw)
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} failed:\n{out}"
    client.set_terminated(parent)

    children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent}'")
    runs = {r.info.run_name: r.info.run_id for r in children}
    assert sorted(runs) == ["seed0", "seed1"]
    for run_id in runs.values():
        steps = sorted(m.step for m in client.get_metric_history(run_id, "dev/wer"))
        assert steps == [2, 4], steps
    return exp_id, parent, runs


def test_sweep_runs_nest_under_the_parent_and_compare_dev_wer(
    mlflow_server,  # noqa: F811 (the imported fixture)
    corpus_env,  # noqa: F811
    browser,
    tmp_path,
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    exp_id, parent, runs = train_sweep(mlflow_server, corpus_env, tmp_path, "ui-sweep")
    wait = WebDriverWait(browser, WAIT_S)
    shots = []

    def shot(name: str) -> None:
        path = tmp_path / f"{len(shots) + 1}-{name}.png"
        assert browser.save_screenshot(str(path)), path
        shots.append(path)
        if out := os.environ.get("LMU_ASR_SCREENSHOTS"):
            Path(out).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, out)

    def visible(css: str):
        return wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, css)))

    def row(run_id: str) -> str:  # ag-grid keys the runs table's rows by run id
        return f"div[role='row'][row-id='{run_id}']"

    try:
        # The runs table ("Model training" view): the children are folded under the parent.
        browser.get(
            f"{mlflow_server.uri}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
        )
        parent_row = visible(row(parent))
        assert parent_row.find_element(By.CSS_SELECTOR, "a").text == "sweep"
        shown = browser.find_elements(By.CSS_SELECTOR, ", ".join(map(row, runs.values())))
        assert not shown, "child runs listed at the top level, not folded under the parent"
        expander = (By.CSS_SELECTOR, row(parent) + " div[col-id='attributes.`Run Name`'] button")
        wait.until(EC.element_to_be_clickable(expander)).click()
        for name, run_id in runs.items():
            child = visible(row(run_id))
            assert child.find_element(By.CSS_SELECTOR, "a").text == name
            parent_index = browser.find_element(By.CSS_SELECTOR, row(parent)).get_attribute(
                "row-index"
            )
            assert int(child.get_attribute("row-index")) > int(parent_index)
        wait.until(EC.text_to_be_present_in_element((By.TAG_NAME, "body"), "3 matching runs"))
        shot("runs-nested-under-parent")

        # Select the two children and compare them.
        for run_id in runs.values():
            checkbox = row(run_id) + " .ag-selection-checkbox .ag-checkbox-input-wrapper"
            browser.find_element(By.CSS_SELECTOR, checkbox).click()
        compare = (By.XPATH, "//button[normalize-space()='Compare']")
        wait.until(EC.element_to_be_clickable(compare)).click()
        if len(browser.window_handles) > 1:  # in case the view opens in a new tab
            browser.switch_to.window(browser.window_handles[-1])
        heading = (By.XPATH, "//*[normalize-space()='Comparing 2 Runs from 1 Experiment']")
        wait.until(EC.visibility_of_element_located(heading))
        assert sorted(json.loads(_query(browser.current_url)["runs"])) == sorted(runs.values())
        names = (By.XPATH, "//tr[th[normalize-space()='Run Name:']]/td")  # the run details
        wait.until(EC.visibility_of_all_elements_located(names))
        assert sorted(td.text for td in browser.find_elements(*names)) == sorted(runs)
        shot("compare-two-runs")
        metric_link = (By.XPATH, "//a[normalize-space()='dev/wer']")
        link = wait.until(EC.presence_of_element_located(metric_link))
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", link)
        wait.until(EC.visibility_of(link))
        shot("compare-metrics")

        # The dev/wer chart of the two runs: one line per run over steps 2..4.
        link.click()
        plot = visible(".js-plotly-plot")
        for name in runs:
            legend = (By.XPATH, f"//*[normalize-space()='{name} (dev/wer)']")
            wait.until(EC.visibility_of_element_located(legend))
        paths = plot.find_elements(By.CSS_SELECTOR, ".scatterlayer path.js-line")
        lines = [  # per run its line (2+ points), and the raw one faintly (stroke-opacity < 1)
            p
            for p in paths
            if "L" in (p.get_attribute("d") or "")
            and p.value_of_css_property("stroke-opacity") == "1"
        ]
        # Not their colours: MLflow picks a run's colour by a hash of its id from 29, so two runs
        # share one about once in 29 sweeps (CI saw it).
        assert len(lines) == 2, [p.get_attribute("outerHTML") for p in lines]
        xticks = {t.text for t in plot.find_elements(By.CSS_SELECTOR, ".xtick text")}
        assert {"2", "4"} <= xticks, xticks
        assert plot.size["width"] > 300 and plot.size["height"] > 150, plot.size
        for run_id in runs.values():  # the table under the chart: latest value at step 4
            cells = browser.find_elements(By.CSS_SELECTOR, f"tr[data-row-key='{run_id}'] td")
            assert "(step=4)" in cells[1].text, [c.text for c in cells]
        shot("dev-wer-chart")
    except Exception:
        shot("failure")
        raise
    assert all(p.stat().st_size > 10_000 for p in shots)


def _query(url: str) -> dict[str, str]:
    """The query parameters of a hash-routed URL (`.../#/path?a=1&b=2`)."""
    from urllib.parse import parse_qsl, urlsplit

    return dict(parse_qsl(urlsplit(url.split("#", 1)[1]).query))


def test_the_server_fixture_restarts_on_the_same_port_and_store(mlflow_server):  # noqa: F811
    """What an outage test does: stop (every process of the server gone, the port free), start
    again, and the runs are still there."""
    from mlflow import MlflowClient

    from tests.mlflow_server import group_members, port_in_use

    client = MlflowClient(mlflow_server.uri)
    exp_id = client.create_experiment("restart")
    run_id = client.create_run(exp_id).info.run_id
    client.log_metric(run_id, "loss", 2.0, step=1)
    uri, pgid = mlflow_server.uri, mlflow_server.proc.pid
    mlflow_server.stop()
    assert not group_members(pgid) and not port_in_use(mlflow_server.port)
    assert not mlflow_server.healthy()
    mlflow_server.start()
    assert mlflow_server.uri == uri
    client.log_metric(run_id, "loss", 1.0, step=2)
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == [(1, 2.0), (2, 1.0)]
