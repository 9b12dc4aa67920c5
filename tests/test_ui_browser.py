"""The MLflow UI in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``,
driven by Selenium) against a real ``mlflow server`` that this module starts and stops by its PID,
serving the tiny sweep's SQLite store.

Each step starts from a URL that prunetune prints and counts the clicks it takes to reach the view:
the interactive front (every trial, the front, the dense model) is 0 clicks from the printed URL;
the front's trials in the runs table, cheapest first, are 0 clicks from the other printed URL; a
trial's Register button is 1 click from the trial (its logged model). Screenshots (1280x800) go to
``tmp_path``, and to ``$PRUNETUNE_SCREENSHOTS`` when set (the README's are made that way).
"""
from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlflow_server import running_server

pytestmark = pytest.mark.browser

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
WAIT_S = 90
WIDTH, HEIGHT = 1280, 800


def _require_browser():
    if CHROMIUM and CHROMEDRIVER:
        return
    message = "headless Chromium is missing: apt-get install chromium chromium-driver (.ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def ui_server(tiny_sweep, tmp_path_factory):
    """`mlflow server` on the tiny sweep's own SQLite store (its artifacts are beside the database)."""
    cfg, _ = tiny_sweep
    with running_server(tmp_path_factory.mktemp("ui-server"), cfg.tracking_uri) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WIDTH},{HEIGHT}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        _set_viewport(driver)
        yield driver
    finally:
        driver.quit()


def _set_viewport(driver) -> None:
    """The page itself WIDTH x HEIGHT (--window-size counts the browser's own frame too)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False})


class Steps:
    """Opens printed URLs, counts clicks, saves screenshots."""

    def __init__(self, driver, out: Path):
        self.driver, self.out, self.clicks = driver, out, 0

    def open(self, url: str) -> None:
        self.clicks = 0
        for handle in self.driver.window_handles[1:]:  # tabs a previous step opened
            self.driver.switch_to.window(handle)
            self.driver.close()
        self.driver.switch_to.window(self.driver.window_handles[0])
        self.driver.get("about:blank")  # a hash-only change would not load the page again
        self.driver.get(url)
        self.hide_assistant()

    def click(self, element) -> None:
        """Click; a link that opens a new tab is followed there."""
        self.clicks += 1
        before = set(self.driver.window_handles)
        element.click()
        new = set(self.driver.window_handles) - before
        if new:
            self.driver.switch_to.window(new.pop())
            _set_viewport(self.driver)

    def click_when(self, find, what: str) -> None:
        """Click what ``find`` returns once it is there (found again if the page re-rendered it)."""
        from selenium.common.exceptions import StaleElementReferenceException

        def clicked(d):
            element = find(d)
            if element is None:
                return False
            try:
                self.click(element)
            except StaleElementReferenceException:
                self.clicks -= 1
                return False
            return True

        self.wait(clicked, what)

    def wait(self, condition, what: str):
        from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:  # an element the UI re-rendered while we looked: look again
            return WebDriverWait(self.driver, WAIT_S, poll_frequency=0.5,
                                 ignored_exceptions=(StaleElementReferenceException,)).until(lambda d: condition(d))
        except TimeoutException:
            self.shot(f"timeout-{re.sub(r'[^a-z0-9]+', '-', what.lower())}")
            raise AssertionError(f"the UI never showed {what} within {WAIT_S}s (screenshot in {self.out})") from None

    def hide_assistant(self) -> None:
        """MLflow 3.17 opens its chat panel on the first visit; it covers a third of the page."""
        from selenium.webdriver.common.by import By

        # UI preferences, not steps: the chat panel closed, and "Model training" for pages opened
        # in a new tab (the printed links say so themselves: workflowType=machine_learning).
        self.driver.execute_script("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                                   "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                                   "localStorage.setItem('mlflow.workflowType_v1', '\"machine_learning\"');")
        for button in self.driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
            if button.is_displayed():
                button.click()  # not a step towards the view: counted apart from self.clicks

    def shot(self, name: str) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"{name}.png"
        self.driver.switch_to.default_content()
        self.driver.save_screenshot(str(path))
        target = os.environ.get("PRUNETUNE_SCREENSHOTS")
        if target:
            _save_small(path, Path(target) / path.name)
        return path


def _save_small(src: Path, dst: Path) -> None:
    """A palette PNG (256 colours): a UI screenshot at a fraction of the size."""
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)


@pytest.fixture
def steps(browser, tmp_path):
    return Steps(browser, tmp_path / "screenshots")


PLOT_JS = """
const gd = document.getElementById('prunetune-front');
if (!gd || !gd.data || !document.querySelector('.scatterlayer .trace .points path')) return null;
return {traces: gd.data.map(t => ({name: t.name, meta: t.meta, ids: t.customdata || [], x: t.x || [], y: t.y || [],
                                   mode: t.mode, hover: t.hovertext || []})),
        rendered: document.querySelectorAll('.scatterlayer .trace .points path.point').length};
"""


def _plot_in_artifact_view(steps: Steps, what: str) -> dict:
    """Wait for the HTML artifact's iframe in the run's Artifacts tab, and read its plot."""
    from selenium.webdriver.common.by import By

    def ready(d):
        d.switch_to.default_content()
        for frame in d.find_elements(By.TAG_NAME, "iframe"):
            d.switch_to.frame(frame)
            plot = d.execute_script(PLOT_JS)
            if plot:
                return plot
            d.switch_to.default_content()
        return None

    plot = steps.wait(ready, what)
    steps.driver.switch_to.default_content()
    return plot


def _finished(client: MlflowClient, parent_run_id: str) -> dict[str, object]:
    """The sweep's finished trials with both objectives, straight from MLflow: run id -> run."""
    from search.tracking import PARENT_TAG

    exp_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    return {r.info.run_id: r for r in runs if r.info.status == "FINISHED" and "accuracy" in r.data.metrics
            and math.isfinite(r.data.metrics.get("macs", math.nan)) and not r.data.metrics.get("removed_nothing")}


def _printed_urls(text: str) -> dict[str, str]:
    return {m.group(1).strip(): m.group(2) for m in re.finditer(r"^\s*(.+?): (http\S+)$", text, re.M)}


def test_front_is_zero_clicks_from_the_printed_url(tiny_sweep, ui_server, steps):
    from search.front_html import HTML_NAME
    from search.ui_links import look_at_it

    cfg, result = tiny_sweep
    client = MlflowClient(ui_server.uri)
    printed = _printed_urls(look_at_it(ui_server.uri, result.parent_run_id, cfg.objective))
    url = printed["front (interactive)"]
    assert url.startswith(ui_server.uri) and url.split("?")[0].endswith(f"/{result.parent_run_id}/artifacts/{HTML_NAME}")

    steps.open(url)
    plot = _plot_in_artifact_view(steps, "the interactive front")
    assert steps.clicks == 0
    steps.shot("front")

    finished = _finished(client, result.parent_run_id)
    traces = plot["traces"]
    trials = [t for t in traces if t["meta"]["role"] == "trials" and not t["meta"]["faded"]]
    # One point per finished trial, one trace per method, each point its own run.
    shown = [rid for t in trials for rid in t["ids"]]
    assert sorted(shown) == sorted(finished)
    for t in trials:
        assert {finished[rid].data.tags["method"] for rid in t["ids"]} == {t["meta"]["method"]} == {t["name"]}
        for rid, x, y, hover in zip(t["ids"], t["x"], t["y"], t["hover"]):
            run = finished[rid]
            assert y == pytest.approx(run.data.metrics["accuracy"]) and x == pytest.approx(run.data.metrics["macs"] / 1e6)
            assert run.info.run_name in hover and "prune_ratio=" in hover and "test accuracy" in hover
    # The front: the runs tagged pareto=true, cheapest first, as a step line through its points.
    (front,) = [t for t in traces if t["meta"]["role"] == "front"]
    tagged = sorted((r for r in finished.values() if r.data.tags.get("pareto") == "true"),
                    key=lambda r: (r.data.metrics["macs"], -r.data.metrics["accuracy"]))
    assert front["ids"] == [r.info.run_id for r in tagged] and front["ids"]
    assert front["mode"] == "lines+markers"
    # The dense model, marked apart.
    (dense,) = [t for t in traces if t["meta"]["role"] == "dense"]
    assert dense["y"] == [pytest.approx(client.get_run(result.parent_run_id).data.metrics["base_accuracy"])]
    # What the browser drew: every marker of every trace with markers.
    assert plot["rendered"] == sum(len(t["x"]) for t in traces if "markers" in (t["mode"] or ""))


def test_front_trials_in_the_runs_table_cheapest_first(tiny_sweep, ui_server, steps):
    from selenium.webdriver.common.by import By

    from search.ui_links import look_at_it

    cfg, result = tiny_sweep
    client = MlflowClient(ui_server.uri)
    printed = _printed_urls(look_at_it(ui_server.uri, result.parent_run_id, cfg.objective))
    tagged = sorted((r for r in _finished(client, result.parent_run_id).values() if r.data.tags.get("pareto") == "true"),
                    key=lambda r: r.data.metrics["macs"])
    names = [r.info.run_name for r in tagged]
    assert all(re.fullmatch(rf"{r.data.tags['method']}-[0-9a-f]{{8}}", r.info.run_name) for r in tagged), names
    assert {r.data.tags["sweep"] for r in tagged} == {client.get_run(result.parent_run_id).info.run_name}

    steps.open(printed["front's trials, cheapest first"])

    def run_links(d):  # the Run Name column (the Models column links each trial's model, named alike)
        return [a for a in d.find_elements(By.CSS_SELECTOR, "a[href*='/runs/']") if a.is_displayed()
                and a.text.strip()]

    links = steps.wait(lambda d: (lambda ls: ls if len(ls) >= len(names) else None)(run_links(d)),
                       "the front's trials in the runs table")
    assert steps.clicks == 0
    shown = [a.text.strip() for a in sorted(links, key=lambda a: a.location["y"])]
    assert sorted(shown) == sorted(names), "the table must list exactly the front's trials"
    macs = {r.info.run_name: r.data.metrics["macs"] for r in tagged}
    assert [macs[n] for n in shown] == sorted(macs.values()), "cheapest first"
    # Each row links its trial's model too (the Models column, filled in after the rows): the logged
    # model, or the registered version once a trial was promoted.
    model_link = re.compile(r"/models/(m-[0-9a-f]+|[^/?#]+/versions/\d+)")

    def model_links(d):
        return [a for a in d.find_elements(By.CSS_SELECTOR, "a[href*='/models/']")
                if model_link.search(a.get_attribute("href") or "")]

    steps.wait(lambda d: len(model_links(d)) >= len(names), "each front trial's model in the runs table")
    steps.shot("runs")


def test_trial_model_has_a_register_button(tiny_sweep, ui_server, steps):
    from selenium.webdriver.common.by import By

    from search.ui_links import run_url

    cfg, result = tiny_sweep
    client = MlflowClient(ui_server.uri)
    finished = _finished(client, result.parent_run_id)
    # A trial nobody promoted (the promotion tests may have registered the best one).
    trial = sorted(finished.values(), key=lambda r: ("promoted_to" in r.data.tags, r.info.run_name))[0]
    model = client.search_logged_models([trial.info.experiment_id],
                                        filter_string=f"source_run_id = '{trial.info.run_id}'")[0]
    assert model.name == trial.info.run_name
    for key in ("accuracy", "test_accuracy", "macs", "latency_ratio"):  # the LoggedModel carries them
        assert float(model.params[key]) == pytest.approx(trial.data.metrics[key], rel=1e-5), key

    steps.open(run_url(ui_server.uri, trial.info.experiment_id, trial.info.run_id))
    steps.wait(lambda d: any(a.is_displayed() for a in d.find_elements(By.CSS_SELECTOR, f"a[href*='{model.model_id}']")),
               "the trial's logged model")
    steps.shot("trial")
    steps.click_when(lambda d: next((a for a in d.find_elements(By.CSS_SELECTOR, f"a[href*='{model.model_id}']")
                                     if a.is_displayed()), None), "the link to the trial's logged model")
    steps.wait(lambda d: next((b for b in d.find_elements(By.TAG_NAME, "button")
                               if b.text.strip() == "Register model" and b.is_displayed()), None),
               "the Register model button")
    assert steps.clicks == 1
    steps.shot("register")


def test_fronts_overlay_run_opens_in_the_ui(tiny_sweep, ui_server, steps, tmp_path, capsys):
    from search.cli import main

    cfg, result = tiny_sweep
    rc = main(["fronts", cfg.name, "--tracking-uri", ui_server.uri, "--out", str(tmp_path / "fronts.png")])
    assert rc == 0
    printed = _printed_urls(capsys.readouterr().out)
    steps.open(printed["overlay (interactive)"])
    plot = _plot_in_artifact_view(steps, "the fronts overlay")
    assert steps.clicks == 0
    steps.shot("fronts")
    finished = _finished(MlflowClient(ui_server.uri), result.parent_run_id)
    methods = sorted({r.data.tags["method"] for r in finished.values()})
    trials = [t for t in plot["traces"] if t["meta"]["role"] == "trials"]
    assert [t["meta"]["series"] for t in trials] == methods  # one sweep: one series per method
    assert sorted(rid for t in trials for rid in t["ids"]) == sorted(finished)
