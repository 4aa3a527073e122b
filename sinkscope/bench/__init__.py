"""Benchmarks, one module per subject: `record` (the recorder against SDPA, eager and TransformerLens 4),
`speed` (app speed and cold start, AppTest), `browser` (every interaction of the app in headless Chromium),
`synth` (corpus generation), `padding` (batch dependence of recorded numbers), `loss` (the decorrelation loss's
share of a training step), `mome`. Run `python -m sinkscope.bench --help`."""

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="sinkscope benchmarks (results: README).")


def main() -> None:
    from sinkscope.bench import browser, loss, mome, padding, record, speed, synth  # noqa: F401 - registers the commands

    app()
