"""Screenshots of every app view on the traces under a root: `python experiments/screenshots.py --root traces`.

Starts `streamlit run app.py` on a free localhost port and drives headless Chromium (Debian `chromium`) with
playwright. Used for the README images.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

from sinkscope.webapp import VIEWS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="traces")
    ap.add_argument("--trace", default=None, help="Trace to open (relative to the root).")
    ap.add_argument("--out", default="docs/screenshots")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, SINKSCOPE_ROOT=str(Path(args.root).resolve()))
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true",
                             "--browser.gatherUsageStats", "false"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}" + (f"/?trace={args.trace}" if args.trace else "")
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                        args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(url, wait_until="networkidle")
            page.wait_for_selector('[data-testid="stSidebar"]', timeout=60_000)
            for view in VIEWS:
                page.locator('[data-testid="stSidebar"]').get_by_text(view, exact=True).click()
                page.wait_for_selector('[data-testid="stPlotlyChart"]', timeout=60_000)
                page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')",
                                       timeout=60_000)
                page.wait_for_timeout(1500)
                page.screenshot(path=str(out / f"{view.lower().replace(' ', '_')}.png"), full_page=False)
            browser.close()
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
