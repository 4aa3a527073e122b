"""Serving the app: `python -m sinkscope.appserver run SCRIPT [streamlit options]` is `streamlit run`, with the
modules the first render needs (sinkscope's trace reader, analysis and figures: pandas, pyarrow, safetensors,
pydantic, plotly) imported before the server starts rather than during the first visitor's first render (3.55 ->
2.52 s in `python -m sinkscope.bench browser`), and the first page's figures built once (`warm_up`: plotly's own
lazy imports; 3.91 -> 3.78 s). The Streamlit pages (`sinkscope.webapp`) are not imported here: their caches belong
to the running server. `command()` is the one command line that `sinkscope app` and the
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


def warm_up() -> None:
    """Build the first page's figures once on a tiny made-up sample and serialise them as `st.plotly_chart` does,
    so that plotly's lazily imported validators and its JSON path are loaded before the first visitor's first
    render rather than during it (the first chart then reaches the browser sooner, and Plotly's bundle, requested
    when it does, downloads while the server is less busy)."""
    import numpy as np
    import pandas as pd
    import plotly.io as pio

    from sinkscope import viz
    from sinkscope.metrics import MASSIVE_COLUMNS
    from sinkscope.trace.schema import SampleRecord

    layers, heads, n, d, k = 2, 2, 5, 8, 2
    rng = np.random.default_rng(0)
    massive = pd.DataFrame([[1, 0, 3, 500.0, 0.1, 0.9, 50.0, 450.0, 0]], columns=MASSIVE_COLUMNS)
    sample = SampleRecord(
        sample_id="warm-up", tokens=["<s>", "a", "b", "c", "."], segments=[("bos", 0, 1), ("text", 1, n)],
        attention_received=rng.uniform(0, 1, (layers, heads, n)).astype(np.float32),
        bos_cosine=rng.uniform(-1, 1, (layers, n)).astype(np.float32),
        max_abs=rng.uniform(0, 500, (layers, n)).astype(np.float32), median_abs=np.ones(layers, np.float32),
        massive=massive, feature_max_abs=rng.uniform(0, 500, (layers, d)).astype(np.float32),
        mlp_feature_max_abs=rng.uniform(0, 500, (layers, d)).astype(np.float32),
        top_features=rng.integers(0, d, (layers, n, k)).astype(np.int32),
        top_values=rng.uniform(-500, 500, (layers, n, k)).astype(np.float32))
    for fig in (viz.segment_profile_figure(sample), viz.top_activations_figure(sample)):
        pio.to_json(fig, validate=False)


if __name__ == "__main__":
    from streamlit.web.cli import main

    import sinkscope.analysis  # noqa: F401
    import sinkscope.trace  # noqa: F401
    import sinkscope.viz  # noqa: F401

    try:
        warm_up()
    except Exception as exc:  # noqa: BLE001 - an optimisation: the app must be served without it
        print(f"sinkscope: figure warm-up skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
    main(prog_name="streamlit")
