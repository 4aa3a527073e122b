"""The app in a real browser: `streamlit run app.py` on a free localhost port, driven by headless Chromium."""

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

from sinkscope.webapp import VIEWS
from tests.av_trace import write_av_trace

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (make test installs Debian's chromium; apt-get was unavailable)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    root = tmp_path_factory.mktemp("browser-traces")
    write_av_trace(root / "av-a", seed=0)
    write_av_trace(root / "av-b", seed=1)
    port = _free_port()
    env = dict(os.environ, SINKSCOPE_ROOT=str(root))
    app = Path(__file__).resolve().parents[1] / "app.py"
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(port), "--server.address",
         "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not start: " + proc.stdout.read().decode(errors="replace")[-2000:])
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def test_every_view_renders_without_exceptions(server, tmp_path):
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("SINKSCOPE_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.goto(server, wait_until="networkidle")
        page.wait_for_selector('[data-testid="stSidebar"]', timeout=60_000)
        for view in VIEWS:
            page.locator('[data-testid="stSidebar"]').get_by_text(view, exact=True).click()
            page.wait_for_selector('[data-testid="stPlotlyChart"]', timeout=60_000)
            page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=60_000)
            page.wait_for_timeout(500)
            assert page.locator('[data-testid="stException"]').count() == 0, f"exception on the {view} view"
            text = page.inner_text("body")
            assert "Traceback" not in text and "Error" not in text.split("\n")[0], view
            assert page.get_by_role("heading", name=f"{view}: av-a").count() == 1, view
            path = shots / f"{view.lower().replace(' ', '_')}.png"
            page.screenshot(path=str(path), full_page=True)
            assert path.stat().st_size > 10_000
        browser.close()
