"""The app in a real browser: `streamlit run` on a free localhost port, driven by headless Chromium."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sinkscope.browser import CHROMIUM_ARGS, serve_app, walk_views
from sinkscope.webapp import VIEWS
from tests.av_trace import write_av_trace

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (make test installs Debian's chromium; apt-get was unavailable)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    root = tmp_path_factory.mktemp("browser-traces")
    write_av_trace(root / "av-a", seed=0)
    write_av_trace(root / "av-b", seed=1)
    with serve_app(root) as url:
        yield url


def test_every_view_renders_without_exceptions(server, tmp_path):
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("SINKSCOPE_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    seen = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        for view in walk_views(page, server):
            assert page.locator('[data-testid="stException"]').count() == 0, f"exception on the {view} view"
            assert "Traceback" not in page.inner_text("body"), view
            assert page.get_by_role("heading", name=f"{view}: av-a").count() == 1, view
            path = shots / f"{view.lower().replace(' ', '_')}.png"
            page.screenshot(path=str(path), full_page=True)
            assert path.stat().st_size > 10_000
            seen.append(view)
        browser.close()
    assert seen == VIEWS
