"""Trace verbs: `record` (text prompts or AV utterances into a trace) and `summary` (a per-layer table)."""

from __future__ import annotations

from pathlib import Path

import typer

from sinkscope.cli.common import (
    CONFIG_OPTION,
    SET_OPTION,
    clean_errors,
    console,
    err_console,
    fail,
    job_config,
    progress_bar,
)
from sinkscope.metrics import MIN_QUERIES, SINK_EPS


def record(
    config: Path = CONFIG_OPTION,
    sets: list[str] = SET_OPTION,
    out: Path = typer.Option(None, "--out", help="Trace directory to create (or continue with --resume)."),
    model: str = typer.Option(None, help="Text recording: a known name (default smollm2-135m), .gguf, HF directory."),
    checkpoint: str = typer.Option(None, "--checkpoint", help="An AVSR training run (or `demo`): record AV samples."),
    data: Path = typer.Option(None, "--data", help="The corpus to record, with --checkpoint."),
    split: str = typer.Option(None, help="Corpus split, with --checkpoint (default test)."),
    n: int = typer.Option(None, "--n", min=1, help="Record the first N prompts or utterances."),
    text: list[str] = typer.Option(None, "--text", help="A prompt to record (repeatable)."),
    text_file: Path = typer.Option(None, "--text-file", help="UTF-8 file with one prompt per line."),
    device: str = typer.Option(None, help="cpu (default), cuda or cuda:N."),
    dtype: str = typer.Option(None, help="float32 (default), bfloat16 or float16 (text recording)."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Samples per forward pass (padded)."),
    attention_maps: str = typer.Option(None, "--attention-maps", help="Full maps to keep, e.g. 5:0,12:3."),
    hidden_states: str = typer.Option(None, "--hidden-states", help="Layers whose residual stream is kept, e.g. 3,5."),
    max_length: int = typer.Option(None, "--max-length", min=2, help="Truncate prompts to this many tokens."),
    resume: bool = typer.Option(False, "--resume", help="Continue a trace, skipping samples already in it."),
    rate: str = typer.Option(None, "--rate", help="With a Matryoshka (MoME) checkpoint: the rate to record at, "
                             "K_a,K_v (AVSR), K_a (ASR) or K_v (VSR); default its first."),
) -> None:
    """Record a trace of attention sinks and massive activations: text prompts, or AV utterances (--checkpoint)."""
    from sinkscope.record.run import RecordConfig, run_record

    with clean_errors():
        cfg = job_config(RecordConfig, config, sets, out=out, model=model, checkpoint=checkpoint, data=data,
                         split=split, n=n, text=text or None, text_file=text_file, device=device, dtype=dtype,
                         batch_size=batch_size, attention_maps=attention_maps, hidden_states=hidden_states,
                         max_length=max_length, resume=resume or None, rate=rate)
        with progress_bar("recording") as bar:
            result = run_record(cfg, progress=bar.advance, total=lambda k: bar.update(0, k))
    kind = "AV samples" if cfg.checkpoint else "samples"
    skipped = result["skipped_existing"]
    console.print(f"recorded {result['recorded']} {kind} into {cfg.out}"
                  + (f" ({skipped} already there)" if skipped else ""))


def summary(
    trace: Path = typer.Argument(..., help="A trace directory."),
    eps: float = typer.Option(SINK_EPS, min=0.0, max=1.0, help="Sink threshold on attention received, in [0, 1]."),
    min_queries: int = typer.Option(MIN_QUERIES, min=1, help="Top sink tokens only among the keys seen by at least "
                                    "this many queries (the sink rule's; the last keys' alpha averages a few)."),
) -> None:
    """Print a per-layer table: top sink tokens, Sink^eps of position 0, massive features, cos-to-BOS."""
    from rich.console import Console
    from rich.table import Table

    from sinkscope.analysis import layer_summary
    from sinkscope.trace import Trace

    if not 0.0 <= eps <= 1.0:  # also refuses nan
        fail(f"--eps {eps}: the sink threshold is an attention weight, in [0, 1]")
    with clean_errors():
        tr = Trace.load(trace)
        table_data = layer_summary(tr, eps=eps, min_queries=min_queries)
    m = tr.manifest
    for name, why in tr.skipped:
        err_console.print(f"[yellow]warning:[/] {trace}/samples/{name} is not read: {why}", highlight=False)
    if tr.index_note:
        err_console.print(f"[yellow]warning:[/] {tr.index_note}", highlight=False)
    if not len(tr):  # a recording stopped before its first sample: a table of zeros would read as findings
        fail(f"{trace}: the trace holds no samples yet (a recording stopped before its first sample?); nothing to "
             "summarise")
    console.print(f"[bold]{trace}[/]: {len(tr)} samples of {m['model']} "
                  f"({m['n_layers']} layers x {m['n_heads']} heads)")
    console.print(f"top_sinks: the tokens with the largest head-mean attention received among the keys seen by at "
                  f"least {min_queries} queries, as token@position alpha (samples); massive_features: feature "
                  "(samples)")
    # two tables, so that neither is squeezed: sinks and massive features, then cos-to-BOS per segment (an AV
    # trace has ten segments; in one table rich would fold the text columns to nothing)
    cos = [c for c in table_data.columns if c.startswith("cos:")]
    out = Console(width=max(console.width, 160), soft_wrap=False)
    for columns in ([c for c in table_data.columns if c not in cos], ["layer", *cos] if cos else []):
        if not columns:
            continue
        table = Table(show_lines=False)
        for col in columns:
            header = f"Sink^{eps} pos0 %" if col == "sink_rate_pos0" else col.removeprefix("cos:") if cos and \
                col in cos else col
            left = col in ("top_sinks", "massive_features")
            table.add_column(header, overflow="fold", justify="left" if left else "right", no_wrap=not left)
        if columns[1:] == cos:
            out.print("mean cos-to-BOS per segment (BOS itself left out), by layer:")
        for _, row in table_data[columns].iterrows():
            table.add_row(*[str(int(v)) if k == "layer" else f"{v:.1f}" if k == "sink_rate_pos0" else
                            f"{v:.3f}" if isinstance(v, float) else str(v) for k, v in row.items()])
        out.print(table)


def index(trace: Path = typer.Argument(..., help="A trace directory.")) -> None:
    """(Re)write a trace's index.safetensors: its samples' per-token arrays in one file, so that the app and
    `summary` open a trace of thousands of samples without reading each one. Recording writes it already; run this
    after copying samples in, or on traces recorded before the index existed."""
    from sinkscope.trace.columns import write_index

    with clean_errors():
        path = write_index(trace)
    console.print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def register(app: typer.Typer) -> None:
    app.command()(record)
    app.command()(summary)
    app.command()(index)
