"""The batch-size explorer where learners use it: in JupyterLab, in a real browser (issue 7).

A JupyterLab server on 127.0.0.1 (test-only configuration: no token, no news, a temporary copy of
``00_start_here.ipynb``), and Debian's Chromium driven by Playwright for Python. The test runs every
cell, moves the batch-size slider with the keyboard as a person does, and checks that the memory
readout and figure follow, up to the out-of-memory state of a batch that does not fit a 4 GiB GPU.
A screenshot goes to ``test-results/e2e/`` (ignored by git).

Needs /usr/bin/chromium (``apt-get install -y chromium``; ``.ci/run`` installs it): skipped without it.
Playwright's own browser download is never used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
RESULTS = ROOT / "test-results" / "e2e"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's Chromium is not installed at /usr/bin/chromium "
    "(apt-get update && apt-get install -y chromium; .ci/run does this in CI)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(home: Path) -> dict:
    """A Jupyter configuration of this test's own: no token, nothing fetched from the internet."""
    config = home / "config"
    (config / "labconfig").mkdir(parents=True)
    (config / "jupyter_server_config.json").write_text(
        json.dumps(
            {
                "IdentityProvider": {"token": ""},
                "ServerApp": {
                    "ip": "127.0.0.1",
                    "open_browser": False,
                    "port_retries": 0,
                    "password": "",
                    "allow_root": os.geteuid() == 0,
                },
                "LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate"},
            }
        )
    )
    # The announcements plugin would ask about news; no language packs or extension manager lookups.
    (config / "labconfig" / "page_config.json").write_text(
        json.dumps(
            {
                "disabledExtensions": {
                    "@jupyterlab/apputils-extension:announcements": True,
                    "@jupyterlab/extensionmanager-extension": True,
                }
            }
        )
    )
    return {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "JUPYTER_PLATFORM_DIRS": "1",
    }


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server serving a copy of notebooks/00_start_here.ipynb; yields its URL."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    shutil.copy(ROOT / "notebooks" / "00_start_here.ipynb", notebooks)
    port = free_port()
    env = write_config(tmp_path / "jupyter")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            f"--ServerApp.port={port}",
            f"--ServerApp.root_dir={notebooks}",
            f"--LabApp.workspaces_dir={tmp_path / 'jupyter' / 'workspaces'}",
        ],
        cwd=notebooks,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(server, url)
        yield url
    finally:
        stop(server)


def wait_for_server(server, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/api/status", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    server.kill()
    log = server.communicate(timeout=30)[0].decode(errors="replace")
    raise AssertionError(f"JupyterLab did not answer at {url}; it printed:\n{log[-3000:]}")


def stop(server) -> None:
    """Stop the server (it shuts its kernels down), then anything it left behind."""
    family = (
        [server.pid] + [p.pid for p in psutil.Process(server.pid).children(recursive=True)]
        if server.poll() is None
        else [server.pid]
    )
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.communicate()
    for pid in family[1:]:  # kernels live in their own process group
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1000})
        finally:
            browser.close()


def memory_readout(page):
    return page.locator(".widget-html").filter(has_text="at its peak")


def memory_figure_src(page) -> str:
    """The memory figure's image: the first ``Image`` widget above the memory readout."""
    return page.locator(".widget-vbox", has=memory_readout(page)).last.locator("img").first.get_attribute("src")


def largest_cnn_batch_on_4_gib() -> int:
    """max_batch_size's answer for chapter 0's explorer (the cnn on the simulated 4 GiB GPU), in this process."""
    from batchlab import explorer as ex

    profile = ex.device_profiles()["GPU 4 GiB (simulated)"]
    shape = ex.memory_input_shape("cnn")
    return ex.largest_batch(ex.meta_model("cnn", shape), shape, profile)


def test_moving_the_batch_size_slider_updates_memory_up_to_out_of_memory(lab, page):
    page.goto(f"{lab}/lab/tree/00_start_here.ipynb")
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=120_000)
    page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for(timeout=120_000)  # kernel ready
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    # The cell after the explorer prints what set() saw: every cell has run once it is there.
    page.get_by_text("batch 256 fits the 4 GiB GPU: False").wait_for(timeout=180_000)
    readout = memory_readout(page)
    readout.wait_for(timeout=60_000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.widget-html')].some(e => e.textContent.includes('at batch 64 needs'))",
        timeout=60_000,
    )
    before = (readout.inner_text(), memory_figure_src(page))
    assert "Fits." in before[0]

    slider = page.locator(".widget-slider", has=page.locator("label", has_text="batch size"))
    handle = slider.locator(".noUi-handle")
    handle.focus()
    handle.press("Home")  # the smallest batch, as a person at the keyboard
    page.wait_for_function(
        "() => [...document.querySelectorAll('.widget-html')].some(e => e.textContent.includes('at batch 1 needs'))",
        timeout=60_000,
    )
    at_one = (readout.inner_text(), memory_figure_src(page))
    assert "Fits." in at_one[0] and at_one[0] != before[0] and at_one[1] != before[1]
    assert slider.locator(".widget-readout").inner_text().strip() == "1"

    handle.press("End")  # the whole data set in one batch: far more than a 4 GiB GPU holds
    page.wait_for_function(
        "() => [...document.querySelectorAll('.widget-html')].some(e => e.textContent.includes('Out of memory.'))",
        timeout=60_000,
    )
    page.wait_for_function(
        "() => [...document.querySelectorAll('.widget-html')].some("
        "e => e.textContent.includes('The largest batch that fits'))",
        timeout=60_000,
    )
    full = (readout.inner_text(), memory_figure_src(page))
    largest = largest_cnn_batch_on_4_gib()  # what the explorer's search must have found, computed here too
    assert "at batch 1438 needs" in full[0] and f"The largest batch that fits in one step: {largest}" in full[0]
    assert full[1] != at_one[1]
    assert slider.locator(".widget-readout").inner_text().strip() == "1438"

    for _ in range(3):  # back down, one stop at a time: 1024, 512, 256, still too large
        handle.press("ArrowLeft")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.widget-html')].some(e => e.textContent.includes('at batch 256 needs'))",
        timeout=60_000,
    )
    assert "Out of memory." in readout.inner_text()
    # The convergence panel shows this setting's run too (trained by the notebook's own cells: cached).
    page.wait_for_function(
        "() => [...document.querySelectorAll('.widget-html')].some("
        "e => e.textContent.startsWith('cnn, batch 256, lr 0.05: 10 steps'))",
        timeout=60_000,
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    page.locator(".jp-OutputArea-output", has=readout).screenshot(path=str(RESULTS / "explorer_out_of_memory.png"))
    page.screenshot(path=str(RESULTS / "jupyterlab.png"), full_page=True)
