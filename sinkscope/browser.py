"""Serve the app on a free localhost port and walk its views in a browser page (tests and screenshots)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sinkscope.appserver import command
from sinkscope.webapp import VIEWS

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_app(root: str | os.PathLike, timeout: float = 60.0, script: str | None = None) -> Iterator[str]:
    """`streamlit run` the app (or `script`) over the traces under `root`; yields its URL and stops it on exit."""
    port = free_port()
    env = dict(os.environ, SINKSCOPE_ROOT=str(Path(root).resolve()))
    proc = subprocess.Popen(
        command(port, "127.0.0.1", script=script),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    output = proc.stdout.read().decode(errors="replace") if proc.poll() is not None else ""
                    raise RuntimeError(f"streamlit did not start on {url}: {output[-2000:]}") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def walk_views(page, url: str, views: list[str] = VIEWS, settle_ms: int = 500) -> Iterator[str]:
    """Open `url` in a playwright page and click each view in the sidebar; yields the view once it rendered.

    A view that shows no chart within 60 s is tried once more on a reloaded page (said on stdout): in session 11
    two of six runs of the browser tests on this 2-core machine timed out waiting for a chart, once inside a full
    `make test`, and the same tests passed alone four times. A second failure raises with the page's text."""

    def open_page() -> None:
        page.goto(url, wait_until="networkidle")
        page.wait_for_selector('[data-testid="stSidebar"]', timeout=60_000)
        # the first page's script run ends before the first click, so that a cold start cannot swallow it
        page.wait_for_selector('[data-testid="stPlotlyChart"]', timeout=120_000)
        page.wait_for_function("!document.querySelector('[data-testid=stStatusWidget]')", timeout=60_000)

    def show(view: str) -> None:
        page.locator('[data-testid="stSidebar"]').get_by_text(view, exact=True).click()
        page.wait_for_selector('[data-testid="stPlotlyChart"]', timeout=60_000)
        page.wait_for_function("!document.querySelector('[data-testid=stStatusWidget]')", timeout=60_000)

    open_page()
    for view in views:
        try:
            show(view)
        except Exception as first:  # noqa: BLE001 - a stalled page: reload once, then fail with what it shows
            print(f"walk_views: the {view!r} view showed no chart within 60 s ({type(first).__name__}); "
                  "reloading the page once", flush=True)
            try:
                open_page()
                show(view)
            except Exception as exc:
                text = page.locator("body").inner_text(timeout=5_000)[:1500]
                raise AssertionError(f"view {view!r} did not render a chart, twice ({type(exc).__name__}); "
                                     f"the page reads:\n{text}") from exc
        page.wait_for_timeout(settle_ms)
        yield view
