"""The dashboard in a real browser: `streamlit run app.py` on a free localhost port, driven by Debian's chromium
through Playwright's Python package (the system browser via `executable_path`; nothing is downloaded).

Visits every page on the test archives of test_app.py, checks that the app finished each run without an exception
element, an error card (other than the Overview's cards about the runs that are broken on purpose) or a JavaScript
error, that figures were drawn and that the URL carries the widget state; saves one screenshot per page (under
$COS_SCREENSHOTS when set, else pytest's tmp dir). Skipped when /usr/bin/chromium or playwright is missing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from test_app import APP, BROKEN, PAGES, session_runs

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUN_FOR = {"probes": "organism-maze", "working_memory": "organism-memory", "interventions": "plot-fixtures",
           "ensemble": "plot-fixtures", "self_correction": "plot-fixtures"}  # a run whose tables the page plots

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runs = session_runs(tmp_path_factory)
    port = _free_port()
    env = {**os.environ, "COS_RUNS_DIR": str(runs), "COS_ORGANISM_DIR": str(runs.parent / "organism")}
    log = open(tmp_path_factory.mktemp("streamlit") / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"],
                            cwd=APP.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"streamlit did not start: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def _settle(page, timeout: float = 60) -> None:
    """Wait until the script run is over: a title is drawn and Streamlit's 'running' status has gone."""
    page.wait_for_selector("h1", timeout=timeout * 1000)
    deadline = time.time() + timeout
    while page.locator('[data-testid="stStatusWidget"]').count() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # let plotly finish drawing


def test_every_page_in_chromium(server, browser, tmp_path):
    shots = Path(os.environ.get("COS_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 2400})  # tall: Streamlit scrolls inside its own div
    js_errors: list[str] = []
    page.on("pageerror", lambda err: js_errors.append(str(err)))
    for name in PAGES:
        path = "" if name == "overview" else name
        page.goto(f"{server}/{path}?run={RUN_FOR.get(name, 'organism-maze')}")
        _settle(page)
        if name not in ("overview", "live"):  # the status widget can lag the first elements: wait for a figure
            page.wait_for_selector(".js-plotly-plot", timeout=60_000)
            _settle(page)
        exceptions = page.locator('[data-testid="stException"]').all_inner_texts()
        assert not exceptions, (name, exceptions)
        cards = page.locator('[data-testid="stAlertContentError"]').all_inner_texts()
        assert all(any(b in c for b in BROKEN) for c in cards), (name, cards)
        page.screenshot(path=str(shots / f"{name}.png"))
        assert f"run={RUN_FOR.get(name, 'organism-maze')}" in page.url, (name, page.url)
    assert not js_errors, js_errors


def test_sidebar_navigation_keeps_the_run_and_the_url_reopens_the_view(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{server}/steps?run=tiny-wan22&step=2")
    _settle(page)
    assert "step=2" in page.url and "run=tiny-wan22" in page.url
    shared_url = page.url
    page.locator('[data-testid="stSidebarNav"] a', has_text="Layers").click()
    page.wait_for_url("**/layers**")
    _settle(page)
    assert "run=tiny-wan22" in page.url and not page.locator('[data-testid="stException"]').count()
    fresh = browser.new_page(viewport={"width": 1400, "height": 1000})
    fresh.goto(shared_url)
    _settle(fresh)
    assert "step=2" in fresh.url
    assert fresh.get_by_role("combobox", name="run").input_value() == "tiny-wan22"
