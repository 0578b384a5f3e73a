"""The MLflow UI, for real: a tiny study recorded on a real ``mlflow server``, read in headless Chromium.

Checks what a user sees: the study's experiment page lists the trial runs (``trial-N-seed-S``,
nested under the study's parent run) with their params as columns, a trial's run page shows its
params, and its "Model metrics" tab draws the ``val_accuracy`` chart. Screenshots go to tmp_path;
the experiment page is copied to docs/img/mlflow_ui.png for the docs.

Needs Debian's chromium and chromium-driver (``scripts/install_browser.sh``; the fixture runs it
when they are missing and it can: root and apt-get) and selenium (the ``test`` extra). Selenium
drives the system browser through the system chromedriver: nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.record.store import ui_address

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT_DOC = ROOT / "docs" / "img" / "mlflow_ui.png"
STUDY = "ui_study"
WAIT_S = 60  # React renders after the API answers; on 2 busy CPUs that can take a while
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1600,1000",
]


# ---- fixtures: browser, server, study ----------------------------------------------------------


@pytest.fixture(scope="module")
def browser_paths() -> tuple[Path, Path]:
    """Chromium and chromedriver from Debian; installed here if missing and installable."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()) and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["bash", str(ROOT / "scripts" / "install_browser.sh")], check=False, timeout=1200)
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(
            f"{CHROMIUM} or {CHROMEDRIVER} missing and not installable here (needs root and apt-get); "
            "run scripts/install_browser.sh"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("selenium is missing: pip install -e '.[test]'")
    return CHROMIUM, CHROMEDRIVER


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(f"{url}/health", timeout=2).read().strip() == b"OK"
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a free loopback port, sqlite backend and served artifacts in a tmp dir."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job runner processes
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
        "--serve-artifacts",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    log = (root / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not _healthy(url):
            assert server.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server gave no /health answer in 180 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, 15)  # the server and its uvicorn workers: its own session, started here
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def study(local_ray, mlflow_server, tmp_path_factory):
    """A tiny study recorded on the server: 3 trials, 2 epochs, a 2-layer MLP 32 units wide."""
    from mlflow.tracking import MlflowClient

    from pipeline.cli import main

    out = tmp_path_factory.mktemp("ui_study")
    assert 0 == main(
        [
            "run",
            f"study.name={STUDY}",
            "study.n_trials=3",
            "study.sampler=random",
            "study.seed=0",
            f"study.output_dir={out}/studies",
            "study.progress=false",
            f"tracking.uri={mlflow_server}",
            "cluster.num_cpus=2",
            "model.depth=2",
            "model.width=32",
            "train.epochs=2",
            "train.probe_size=64",
            "tracking.log_weights=false",
        ]
    )  # the command builds the report once the study is over
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(STUDY)
    children = client.search_runs([experiment.experiment_id], "tags.`initstudy.role` = 'trial'")
    parent = client.search_runs([experiment.experiment_id], "tags.`initstudy.role` = 'study'")[0]
    return {
        "url": mlflow_server,
        "experiment_id": experiment.experiment_id,
        "parent": parent,
        "children": {r.info.run_name: r for r in children},
        "report": out / "studies" / STUDY / "report",
    }


def test_the_study_report_reads_and_writes_through_the_server(study):
    """The report read curves and layers.csv over HTTP (every figure drawn) and logged itself there."""
    from mlflow.tracking import MlflowClient

    page = (study["report"] / "report.html").read_text()
    assert "Figure skipped" not in page and "drawing this figure failed" not in page
    logged = {a.path for a in MlflowClient(study["url"]).list_artifacts(study["parent"].info.run_id, "report")}
    assert "report/report.html" in logged and "report/signal_at_init.png" in logged


@pytest.fixture(scope="module")
def driver(browser_paths, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_paths
    options = Options()
    options.binary_location = str(chromium)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(str(chromedriver)))
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


# ---- page helpers ------------------------------------------------------------------------------


def _wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.25).until(condition, message=f"waiting for {what}")


def _element(driver, xpath: str, what: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    return _wait(driver, EC.visibility_of_element_located((By.XPATH, xpath)), what)


def _close_assistant(driver) -> None:
    """MLflow 3.17 opens its "Assistant" side panel; close it so the page gets the full width."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(
        By.CSS_SELECTOR, "button[data-component-id='mlflow.assistant.chat_panel.close']"
    ):
        if button.is_displayed():
            button.click()


def _toggle_columns(driver, names: list[str]) -> None:
    """Tick (or untick) columns in the runs table's "Columns" selector, searching for each by name."""
    from selenium.webdriver.common.keys import Keys

    _element(driver, "//button[normalize-space(.)='Columns']", "the Columns button").click()
    search = _element(driver, "//input[@placeholder='Search columns']", "the column search box")
    for name in names:
        search.send_keys(Keys.CONTROL, "a")
        search.send_keys(Keys.BACKSPACE)
        search.send_keys(name)
        node = _element(
            driver,
            f"//span[contains(@class,'tree-title')][normalize-space(.)='{name}']"
            "/ancestor::div[contains(@class,'tree-treenode')][1]",
            f"column '{name}' in the selector",
        )
        node.find_element("xpath", ".//span[contains(@class,'tree-checkbox')]").click()
    search.send_keys(Keys.ESCAPE)


def _header(driver, name: str):
    return _element(
        driver, f"//div[@role='columnheader'][.//*[normalize-space(text())='{name}']]", f"column header {name}"
    )


def _column_texts(driver, name: str) -> list[str]:
    """The cell texts of the runs table's column titled ``name`` (ag-grid: cells share the header's col-id)."""
    col_id = _header(driver, name).get_attribute("col-id")
    cells = driver.find_elements("xpath", f"//div[@role='gridcell'][@col-id='{col_id}']")
    return [c.text.strip() for c in cells]


# ---- the checks --------------------------------------------------------------------------------


def test_experiment_page_lists_the_trial_runs_with_their_params(driver, study, shots):
    # The address a study prints: MLflow 3.17's UI opens an experiment in its GenAI view (traces)
    # whatever the experiment's kind tag says, unless the address asks for model training.
    driver.get(ui_address(study["url"], study["parent"].info.run_id, experiment_page=True))
    _element(driver, f"//a[normalize-space(.)='study-{STUDY}']", "the study's parent run")
    _close_assistant(driver)
    # Trial runs are nested under the study's run: expand it.
    _element(driver, "//button[contains(@data-component-id,'runnamecellrenderer')]", "the expand button").click()
    for name in study["children"]:
        assert name.startswith("trial-") and name.endswith("-seed-0")
        _element(driver, f"//a[normalize-space(.)='{name}']", f"run {name}")
    # Make room (Dataset, Source, Models are empty here), then show the axes and the objective.
    _toggle_columns(
        driver,
        [
            "Dataset",
            "Source",
            "Models",
            "initializer",
            "scale",
            "activation",
            "normalization",
            "batch_size",
            "val_accuracy",
        ],
    )
    shown = _column_texts(driver, "initializer")
    for run in study["children"].values():
        value = run.data.params["initializer"]
        assert any(text and value.startswith(text.rstrip("…").rstrip(".")) for text in shown), (value, shown)
    assert any(_is_number(t) for t in _column_texts(driver, "val_accuracy"))
    time.sleep(1)  # let the last column finish its transition before the picture
    driver.save_screenshot(str(shots / "experiment.png"))
    SCREENSHOT_DOC.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(shots / "experiment.png", SCREENSHOT_DOC)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_run_page_shows_the_params_and_the_val_accuracy_chart(driver, study, shots):
    run = study["children"]["trial-0-seed-0"]
    driver.get(ui_address(study["url"], run.info.run_id))  # the address a trial prints
    _element(
        driver,
        "//h2[normalize-space(.)='trial-0-seed-0'] | //*[normalize-space(text())='trial-0-seed-0']",
        "the run's title",
    )
    _close_assistant(driver)
    value = run.data.params["initializer"]
    row = _element(
        driver,
        "//tr[td[normalize-space(.)='initializer']] | //div[@role='row'][.//*[normalize-space(text())='initializer']]",
        "the initializer param row",
    )
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", row)
    assert value in row.text, row.text
    driver.save_screenshot(str(shots / "run_params.png"))

    _element(
        driver,
        "//*[@role='tab' or self::a or self::button][normalize-space(.)='Model metrics']",
        "the Model metrics tab",
    ).click()
    search = _element(driver, "//input[@placeholder='Search metric charts']", "the chart search box")
    search.send_keys("val_accuracy")
    # The chart card: the closest block around the title 'val_accuracy' that holds exactly one plot.
    card = _element(
        driver,
        "//*[normalize-space(text())='val_accuracy']/ancestor::div[count(.//div[contains("
        "@class,'js-plotly-plot')])=1][1]",
        "the val_accuracy chart",
    )
    _wait(driver, lambda d: card.find_elements("css selector", ".js-plotly-plot g.trace path"), "the chart's line")
    assert "trial-0-seed-0 (val_accuracy)" in card.text, card.text
    time.sleep(1)
    driver.save_screenshot(str(shots / "run_metrics.png"))
