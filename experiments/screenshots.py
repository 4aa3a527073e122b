"""Screenshots of every app view on the traces under a root: `python experiments/screenshots.py --root traces`.

Serves the app on a free localhost port and drives headless Chromium (Debian `chromium`) with playwright.
Used for the README images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

from sinkscope.browser import CHROMIUM_ARGS, serve_app, walk_views


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="traces")
    ap.add_argument("--trace", default=None, help="Trace to open (relative to the root).")
    ap.add_argument("--out", default="docs/screenshots")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with serve_app(args.root) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        for view in walk_views(page, url + (f"/?trace={args.trace}" if args.trace else ""), settle_ms=3000):
            page.screenshot(path=str(out / f"{view.lower().replace(' ', '_')}.png"))
            if view == "Compare":  # its second part: one sample paired across the two traces
                page.get_by_text("One sample in both", exact=True).click()
                page.wait_for_function("document.body.innerText.includes('Paired sample') || "
                                       "document.body.innerText.includes('No sample of A')", timeout=60_000)
                page.wait_for_function("!document.querySelector('[data-testid=stStatusWidget]')", timeout=60_000)
                page.wait_for_timeout(3000)
                page.screenshot(path=str(out / "compare_sample.png"))
        browser.close()


if __name__ == "__main__":
    main()
