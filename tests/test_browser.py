"""The app in a real browser: `streamlit run` on a free localhost port, driven by headless Chromium."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
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
    write_av_trace(root / "av-renamed", seed=1, prefix="other")  # other ids, the same transcripts
    with serve_app(root) as url:
        yield url


@contextmanager
def opened_app(url: str):
    """A `sinkscope.bench.browser.Page` (every `timed` step waits for its script run and checks for exceptions) on
    the app at `url`, after its first render."""
    from playwright.sync_api import sync_playwright

    from sinkscope.bench.browser import Page

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = Page(browser, url)
        page.timed(lambda: page.page.goto(url))
        try:
            yield page
        finally:
            browser.close()


def test_every_view_renders_without_exceptions(server, tmp_path):
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("SINKSCOPE_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    seen, downloads = [], 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        for view in walk_views(page, server):
            assert page.locator('[data-testid="stException"]').count() == 0, f"exception on the {view} view"
            assert "Traceback" not in page.inner_text("body"), view
            assert page.get_by_role("heading", name=f"{view}: av-a").count() == 1, view
            # every chart keeps its download button (the sidebar's format) in the trimmed mode bar
            charts = page.locator('[data-testid="stPlotlyChart"]')
            buttons = page.locator('.modebar-btn[data-title^="Download plot"]').count()
            assert buttons == charts.count(), view
            downloads += buttons
            path = shots / f"{view.lower().replace(' ', '_')}.png"
            page.screenshot(path=str(path), full_page=True)
            assert path.stat().st_size > 10_000
            if view == "Compare":  # its second part: one sample paired across the two traces
                page.get_by_text("One sample in both", exact=True).click()
                page.wait_for_function("document.body.innerText.includes('Paired sample')", timeout=60_000)
                page.wait_for_function("!document.querySelector('[data-testid=stStatusWidget]')", timeout=60_000)
                page.wait_for_timeout(500)
                assert page.locator('[data-testid="stException"]').count() == 0, "exception on Compare's sample part"
                assert "Traceback" not in page.inner_text("body")
                page.screenshot(path=str(shots / "compare_sample.png"), full_page=True)
            seen.append(view)
        browser.close()
    assert seen == VIEWS
    assert downloads > len(VIEWS)


def test_clicking_a_feature_bar_selects_the_feature(server, tmp_path):
    """A real click on the top-k view's bar of the second-ranked feature selects it: the trajectory follows."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        for _ in walk_views(page, server, ["Massive activations"]):
            pass
        chart = page.locator('[data-testid="stPlotlyChart"]').first
        labels = [t for t in chart.locator(".xaxislayer-above text").all_text_contents() if t.startswith("f")]
        second = labels[1]
        assert second.startswith("f"), labels
        bar = chart.locator(".barlayer .point path").nth(1)
        box = bar.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + 4  # near its top: a log-scale bar runs below the plot
        page.mouse.move(x, y - 3)
        page.mouse.move(x, y, steps=3)  # plotly clicks the point under its last hover
        page.wait_for_timeout(200)
        page.mouse.click(x, y)
        page.wait_for_function(f"document.body.innerText.includes('|h| of feature {second[1:]} across layers')",
                               timeout=30_000)
        page.wait_for_function("!document.querySelector('[data-testid=stStatusWidget]')", timeout=60_000)
        assert page.locator('[data-testid="stException"]').count() == 0
        browser.close()


def test_massive_view_survives_the_mlp_toggle_then_another_control(server):
    """The MLP toggle re-ranks the features and used to relabel the feature picker's options; the browser sent
    the old label back on the next run, which reached the app as a string (ValueError in a real browser only)."""
    with opened_app(server) as page:  # each step waits for its script run and checks for exceptions
        page.timed(lambda: page.view("Massive activations"))
        # every feature of the tiny model ranked (64), so the picked one stays an option when the toggle re-ranks
        page.timed(lambda: page.slider_step("Top features", "End"))
        page.timed(lambda: page.toggle("MLP output"))
        page.timed(lambda: page.slider_step("Layer for tokens"))
        page.timed(lambda: page.toggle("MLP output"))
        page.timed(lambda: page.slider_step("Top features", "ArrowLeft"))


def test_compare_of_traces_with_disjoint_ids_in_every_part(server):
    """Compare against a trace that shares no sample id (pairs by transcript): each part of the whole-trace
    comparison, then each figure of the one-sample part, without an exception in a real browser."""
    from sinkscope.webapp.views import SAMPLE_PARTS, TRACE_PARTS

    with opened_app(server) as page:  # each step waits for its script run and checks for exceptions
        page.timed(lambda: page.view("Compare"))
        page.timed(lambda: page.select("Trace B", "av-renamed"))
        assert "B: av-renamed" in page.page.inner_text("body")
        for part, charts in zip(TRACE_PARTS[1:], (2, 1), strict=True):
            page.timed(lambda part=part: page.radio("Whole-trace part", part))
            assert page.page.locator('[data-testid="stPlotlyChart"]').count() == charts, part
        page.timed(lambda: page.page.get_by_text("One sample in both", exact=True).click())
        assert "Paired sample (3 pairs" in page.page.inner_text("body"), "paired by transcript"
        for part in SAMPLE_PARTS[1:]:
            page.timed(lambda part=part: page.page.get_by_text(part, exact=True).click())
            assert page.page.locator('[data-testid="stPlotlyChart"]').count() == 1, part
        assert "Traceback" not in page.page.inner_text("body")
