"""Serving the app: `python -m sinkscope.appserver run SCRIPT [streamlit options]` is `streamlit run`, with the
modules the first render needs (sinkscope's trace reader, analysis and figures: pandas, pyarrow, safetensors,
pydantic, plotly) imported before the server starts rather than during the first visitor's first render (3.55 ->
2.52 s in `python -m sinkscope.bench browser`). The Streamlit pages (`sinkscope.webapp`) are not imported here:
their caches belong to the running server. `command()` is the one command line that `sinkscope app` and the
browser tests use."""

from __future__ import annotations

import sys
from pathlib import Path

ENTRY = Path(__file__).resolve().with_name("_app_entry.py")

STREAMLIT_OPTIONS = ["--runner.postScriptGC", "false", "--browser.gatherUsageStats", "false"]
"""Streamlit's full garbage collection after every script run cost 1-3 s per click with 1,000-sample traces
cached (it runs before the run is reported finished); Python's own generational GC still runs."""


def command(port: int, address: str = "localhost", headless: bool = True, script: str | None = None) -> list[str]:
    """The command line that serves the app (or another Streamlit `script`, with the same options) on
    `address:port`."""
    return [sys.executable, "-m", "sinkscope.appserver", "run", str(script or ENTRY), "--server.port", str(port),
            "--server.address", address, "--server.headless", "true" if headless else "false", *STREAMLIT_OPTIONS]


if __name__ == "__main__":
    from streamlit.web.cli import main

    import sinkscope.analysis  # noqa: F401
    import sinkscope.trace  # noqa: F401
    import sinkscope.viz  # noqa: F401

    main(prog_name="streamlit")
