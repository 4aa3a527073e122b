"""The `sinkscope` command line."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import typer
from rich.console import Console

from sinkscope import __version__
from sinkscope.errors import SinkscopeError

app = typer.Typer(
    name="sinkscope",
    help="Attention sinks and massive activations in LLM-based audio-visual speech recognition.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Build and inspect corpora.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.command()
def info() -> None:
    """Print versions, the compute device and where the default LLM is cached."""
    import torch
    import transformers

    from sinkscope.models.llm import KNOWN_MODELS, converted_cache_dir, is_cached, locate_packaged_gguf

    console.print(f"sinkscope     {__version__}")
    console.print(f"python        {platform.python_version()}")
    console.print(f"torch         {torch.__version__}")
    console.print(f"transformers  {transformers.__version__}")
    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    console.print(f"device        {device}, {torch.get_num_threads()} CPU threads")
    for name, spec in KNOWN_MODELS.items():
        try:
            gguf_path = locate_packaged_gguf(spec)
        except SinkscopeError as exc:
            console.print(f"{name}: [yellow]{exc}[/]")
            continue
        cached = converted_cache_dir(gguf_path)
        state = "ready" if is_cached(cached) else "not converted yet (first load converts it)"
        console.print(f"{name}  gguf  {gguf_path}")
        console.print(f"{name}  cache {cached}  [{state}]")


@app.command()
def prepare(model: str = typer.Option("smollm2-135m", help="Known name, .gguf file or HF directory.")) -> None:
    """Convert and cache an LLM so that later loads take seconds."""
    from sinkscope.models.llm import resolve_llm_dir

    try:
        where = resolve_llm_dir(model)
    except SinkscopeError as exc:
        _fail(str(exc))
    console.print(f"{model} ready at {where}")


@app.command()
def record(
    out: Path = typer.Option(..., "--out", help="Trace directory to create (or continue with --resume)."),
    model: str = typer.Option("smollm2-135m", help="Known name, .gguf file, HF directory or cached hub id."),
    checkpoint: Path = typer.Option(None, "--checkpoint",
                                    help="An AVSR training run (or `demo`): record AV samples."),
    data: Path = typer.Option(None, "--data", help="Corpus for --checkpoint."),
    split: str = typer.Option("test", help="Corpus split for --checkpoint."),
    n: int = typer.Option(None, "--n", min=1, help="Record the first N utterances (--checkpoint)."),
    text: list[str] = typer.Option(None, "--text", help="A prompt to record (repeatable)."),
    text_file: Path = typer.Option(None, "--text-file", help="UTF-8 file with one prompt per line."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Prompts per forward pass (padded)."),
    attention_maps: str = typer.Option(None, "--attention-maps", help="Full maps to keep, e.g. 5:0,12:3."),
    hidden_states: str = typer.Option(None, "--hidden-states", help="Layers whose residual stream is kept, e.g. 3,5."),
    max_length: int = typer.Option(None, "--max-length", min=2, help="Truncate prompts to this many tokens."),
    resume: bool = typer.Option(False, "--resume", help="Continue a trace, skipping samples already in it."),
) -> None:
    """Record a trace of attention sinks and massive activations: text prompts, or AV utterances (--checkpoint)."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sinkscope.models.llm import load_llm
    from sinkscope.record.run import parse_attention_maps, parse_layers, read_text_file, record_texts

    if checkpoint is not None:
        _record_checkpoint(checkpoint, data, split, n, out, batch_size, attention_maps, hidden_states, resume)
        return
    try:
        texts = list(text or []) + (read_text_file(text_file) if text_file else [])
        if not texts:
            _fail("give at least one --text or a --text-file")
        if device.startswith("cuda") and not torch.cuda.is_available():
            _fail(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        maps, layers = parse_attention_maps(attention_maps), parse_layers(hidden_states)
        llm, tokenizer = load_llm(model, device=device, dtype=dtype)
        config = {"model": model, "device": device, "dtype": dtype, "batch_size": batch_size,
                  "attention_maps": attention_maps, "hidden_states": hidden_states, "max_length": max_length}
        columns = [TextColumn("recording"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=err_console) as bar:
            task = bar.add_task("record", total=len(texts))
            recorded, skipped = record_texts(
                llm, tokenizer, texts, out, batch_size=batch_size, attention_maps=maps, hidden_states=layers,
                resume=resume, max_length=max_length, config=config,
                progress=lambda n: bar.advance(task, n),
            )
            bar.advance(task, skipped)
    except SinkscopeError as exc:
        _fail(str(exc))
    console.print(f"recorded {recorded} samples into {out}" + (f" ({skipped} already there)" if skipped else ""))


def _record_checkpoint(checkpoint, data, split, n, out, batch_size, attention_maps, hidden_states, resume):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sinkscope.data.dataset import AVSRDataset
    from sinkscope.record.run import parse_attention_maps, parse_layers, record_avsr
    from sinkscope.train.avsr import load_trained

    if data is None:
        _fail("--checkpoint needs --data (the corpus to record)")
    try:
        model, cfg = load_trained(checkpoint)
        dataset = AVSRDataset(data, split, video_multiple=cfg.model.k_video)
        total = len(dataset) if n is None else min(n, len(dataset))
        config = {"model": f"{cfg.model.llm} + AVSR ({checkpoint})", "checkpoint": str(checkpoint),
                  "data": str(data), "split": split, "mode": cfg.model.mode, "compression": cfg.model.compression,
                  "k_audio": cfg.model.k_audio, "k_video": cfg.model.k_video, "decorrelation": cfg.decorrelation}
        columns = [TextColumn("recording"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=err_console) as bar:
            task = bar.add_task("record", total=total)
            recorded, skipped = record_avsr(model, dataset, out, n=n, batch_size=batch_size,
                                            attention_maps=parse_attention_maps(attention_maps),
                                            hidden_states=parse_layers(hidden_states), resume=resume, config=config,
                                            progress=lambda k: bar.advance(task, k))
            bar.advance(task, skipped)
    except SinkscopeError as exc:
        _fail(str(exc))
    console.print(f"recorded {recorded} AV samples into {out}" + (f" ({skipped} already there)" if skipped else ""))


@app.command()
def summary(
    trace: Path = typer.Argument(..., help="A trace directory."),
    eps: float = typer.Option(0.3, help="Sink threshold on attention received."),
) -> None:
    """Print a per-layer table: top sink tokens, Sink^eps of position 0, massive features, cos-to-BOS."""
    from rich.table import Table

    from sinkscope.analysis import layer_summary
    from sinkscope.trace import Trace

    try:
        tr = Trace.load(trace)
        table_data = layer_summary(tr, eps=eps)
    except SinkscopeError as exc:
        _fail(str(exc))
    m = tr.manifest
    console.print(f"[bold]{trace}[/]: {len(tr)} samples of {m['model']} "
                  f"({m['n_layers']} layers x {m['n_heads']} heads)")
    console.print("top_sinks: the tokens with the largest head-mean attention received, as token@position "
                  "alpha (samples); massive_features: feature (samples)")
    table = Table(show_lines=False)
    for col in table_data.columns:
        header = f"Sink^{eps} pos0 %" if col == "sink_rate_pos0" else col
        left = col in ("top_sinks", "massive_features")
        table.add_column(header, overflow="fold", justify="left" if left else "right", no_wrap=not left)
    for _, row in table_data.iterrows():
        table.add_row(*[f"{v:.1f}" if k == "sink_rate_pos0" else f"{v:.3f}" if isinstance(v, float) else str(v)
                        for k, v in row.items()])
    wide = Console(width=max(console.width, 160), soft_wrap=False)
    wide.print(table)


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="Corpus directory (created, or resumed when it exists)."),
    n: int = typer.Option(1000, "--n", min=1, help="Number of utterances."),
    seed: int = typer.Option(0, help="Random seed: the same seed and arguments give identical files."),
    vocab: str = typer.Option("grid", help="grid (the 51-word GRID grammar) or open (4-12 words of ~3,000)."),
    workers: int = typer.Option(max(1, (os.cpu_count() or 1)), "--workers", min=1, help="Processes."),
) -> None:
    """Generate the synthetic audio-visual speech corpus (espeak-ng speech + rendered mouth video)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sinkscope.data.synth import SynthConfig, synthesize

    columns = [TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    try:
        with Progress(*columns, console=err_console) as bar:
            task = bar.add_task("synth", total=n)
            made, kept = synthesize(out, SynthConfig(n=n, seed=seed, vocab=vocab), workers=workers,
                                    progress=lambda k: bar.advance(task, k))
    except SinkscopeError as exc:
        _fail(str(exc))
    console.print(f"{out}: {made} utterances generated" + (f", {kept} already there" if kept else ""))


@app.command("pretrain-encoders")
def pretrain_encoders(
    data: Path = typer.Option(..., "--data", help="Corpus directory (sinkscope data synth, or LRS)."),
    out: Path = typer.Option(..., "--out", help="Run directory (resumed when it exists)."),
    modality: str = typer.Option("audio,video", help="audio, video or both."),
    epochs: int = typer.Option(20, min=1),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    lr: float = typer.Option(1e-3),
    max_train: int = typer.Option(None, "--max-train", help="Use only the first N training utterances."),
    seed: int = typer.Option(0),
) -> None:
    """CTC-pretrain the audio and video encoders on a corpus; prints greedy-CTC CER/WER on the test split."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sinkscope.train.ctc import PretrainConfig, pretrain

    mods = tuple(m.strip() for m in modality.split(",") if m.strip())
    if not mods or not set(mods) <= {"audio", "video"}:
        _fail(f"--modality must name audio and/or video, not {modality!r}")
    cfg = PretrainConfig(data=str(data), out=str(out), modalities=mods, epochs=epochs, batch_size=batch_size,
                         lr=lr, max_train=max_train, seed=seed)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    try:
        with Progress(*columns, console=err_console, transient=True) as bar:
            tasks: dict[str, int] = {}

            def progress(name: str, done: int, total: int) -> None:
                if name not in tasks:
                    tasks[name] = bar.add_task(f"{name} epoch", total=total)
                bar.update(tasks[name], completed=done % total if done < total else total)

            results = pretrain(cfg, log=lambda msg: bar.console.print(msg), progress=progress)
    except SinkscopeError as exc:
        _fail(str(exc))
    for name, r in results.items():
        console.print(f"{name}: greedy CTC on {r['n']} test utterances: CER {r['cer']:.3f}, WER {r['wer']:.3f}")


@app.command()
def train(
    config: Path = typer.Option(None, "--config", help="YAML config (see experiments/configs/)."),
    overrides: list[str] = typer.Option(None, "--set", help="key=value overrides, e.g. --set model.k_audio=8."),
    until_epoch: int = typer.Option(None, "--until-epoch", min=1,
                                    help="Stop after this epoch (the schedule still spans `epochs`); resume later."),
) -> None:
    """Train the AVSR LLM (projectors + LoRA), with or without the decorrelation loss; resumes a killed run."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sinkscope.train.avsr import load_config
    from sinkscope.train.avsr import train as run_training

    try:
        cfg = load_config(config, list(overrides or []))
        if not cfg.data or not cfg.out:
            _fail("the config needs `data` and `out` (set them in the YAML or with --set data=DIR --set out=DIR)")
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=err_console, transient=True) as bar:
            task = bar.add_task("train", total=None)

            def progress(done: int, total: int, loss: float, lr: float, tps: float) -> None:
                text = f"train loss {loss:.3f} lr {lr:.2e} {tps:.0f} tok/s"
                bar.update(task, completed=done, total=total, description=text)
                if not err_console.is_terminal and (done % 25 == 0 or done == total):  # a log file, not a terminal
                    bar.console.print(f"step {done}/{total}: {text}")

            state = run_training(cfg, log=lambda msg: bar.console.print(msg), progress=progress,
                                 until_epoch=until_epoch)
    except SinkscopeError as exc:
        _fail(str(exc))
    last = state["history"][-1] if state["history"] else {}
    console.print(f"{cfg.out}: {state['epoch']} epochs; last test WER {last.get('wer', float('nan')):.3f}")


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A training run directory, or `demo`."),
    data: Path = typer.Option(..., "--data", help="Corpus directory."),
    split: str = typer.Option("test"),
    snr: float = typer.Option(None, help="Mix babble noise at this SNR (dB); clean when not given."),
    beam: int = typer.Option(1, min=1, help="Beam size (1 = greedy)."),
    limit: int = typer.Option(None, help="Only the first N utterances."),
    out: Path = typer.Option(None, help="CSV of per-utterance hypotheses (default: CHECKPOINT/eval-...csv)."),
    as_json: bool = typer.Option(False, "--json", help="End with one JSON line: wer, cer, n, mode, snr."),
) -> None:
    """Decode a split with the trained model and compute WER/CER (jiwer, lower-cased)."""
    import json as _json

    import pandas as pd

    from sinkscope.data.dataset import AVSRDataset
    from sinkscope.train.avsr import evaluate as run_eval
    from sinkscope.train.avsr import load_trained

    try:
        model, cfg = load_trained(checkpoint)
        dataset = AVSRDataset(data, split, snr=snr, video_multiple=cfg.model.k_video)
        if limit:
            dataset.items = dataset.items[:limit]
        result = run_eval(model, dataset, cfg, beams=beam)
    except SinkscopeError as exc:
        _fail(str(exc))
    tag = f"{split}-{'clean' if snr is None else f'snr{snr:g}'}-beam{beam}"
    csv = out or (checkpoint if checkpoint.is_dir() else Path(".")) / f"eval-{tag}.csv"
    pd.DataFrame(result["hypotheses"], columns=["id", "reference", "hypothesis"]).to_csv(csv, index=False)
    console.print(f"{cfg.model.mode} {tag}: WER {result['wer']:.3f}, CER {result['cer']:.3f} on {result['n']} "
                  f"utterances (hypotheses in {csv})")
    if as_json:
        print(_json.dumps({"wer": result["wer"], "cer": result["cer"], "n": result["n"], "mode": cfg.model.mode,
                           "snr": snr, "beam": beam, "split": split, "checkpoint": str(checkpoint)}))


@app.command()
def export(
    run: Path = typer.Argument(..., help="A training run, or a `pretrain-encoders` run."),
    out: Path = typer.Argument(..., help="Directory to write (files there are replaced)."),
    encoders: str = typer.Option(None, help="Encoders path to write into the exported config."),
) -> None:
    """Export a run's trainable weights in fp16 with its config and history (how `demo` is made), or a
    `pretrain-encoders` run's encoders as OUT/audio.safetensors and OUT/video.safetensors (fp16)."""
    from sinkscope.train.avsr import export_checkpoint
    from sinkscope.train.ctc import export_encoders

    try:
        if (run / "pretrain_config.json").is_file():
            files = export_encoders(run, out)
        else:
            path = export_checkpoint(run, out, encoders)
            files = list(path.iterdir())
    except SinkscopeError as exc:
        _fail(str(exc))
    size = sum(f.stat().st_size for f in files) / 2**20
    console.print(f"exported {run} to {out}: {', '.join(f.name for f in files)} ({size:.1f} MiB)")


@app.command()
def sweep(
    config: Path = typer.Option(..., "--config", help="Sweep YAML (see experiments/configs/sweep_*.yaml)."),
    until_epoch: int = typer.Option(None, "--until-epoch", min=1, help="Train every point only this far."),
) -> None:
    """Run a resumable grid of training runs (downsampling rates x decorrelation) and tabulate test WER."""
    import pandas as pd
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sinkscope.train.sweep import load_sweep, run_sweep

    try:
        spec = load_sweep(config)
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=err_console, transient=True) as bar:
            task = bar.add_task("train", total=None)

            def progress(done: int, total: int, loss: float, lr: float, tps: float) -> None:
                bar.update(task, completed=done, total=total, description=f"train loss {loss:.3f} lr {lr:.2e}")

            rows = run_sweep(spec, log=lambda msg: bar.console.print(msg), progress=progress,
                             until_epoch=until_epoch)
    except SinkscopeError as exc:
        _fail(str(exc))
    if rows:
        from sinkscope.viz import sweep_figure

        frame = pd.DataFrame(rows)
        table = frame.pivot_table(index="point", columns="snr", values="wer", aggfunc="first")
        figure = Path(spec.results).with_suffix(".html")
        sweep_figure(frame).write_html(figure, include_plotlyjs="cdn")
        console.print(f"test WER by grid point and SNR ({spec.results}; figure: {figure}):")
        console.print(table.to_string())


@app.command("app")
def run_app(
    root: Path = typer.Option(None, help="Directory of traces (default: $SINKSCOPE_ROOT or traces/)."),
    port: int = typer.Option(8501, help="Port to serve on (localhost)."),
    headless: bool = typer.Option(True, "--headless/--open-browser", help="Open a browser tab or not."),
) -> None:
    """Open the Streamlit trace browser."""
    import os
    import subprocess

    env = dict(os.environ)
    if root is not None:
        if not root.is_dir():
            _fail(f"--root {root} is not a directory")
        env["SINKSCOPE_ROOT"] = str(root.resolve())
    script = Path(__file__).with_name("_app_entry.py")
    cmd = [sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(port),
           "--server.address", "localhost", "--browser.gatherUsageStats", "false",
           "--server.headless", "true" if headless else "false"]
    console.print(f"sinkscope app on http://localhost:{port} (traces under {env.get('SINKSCOPE_ROOT', 'traces/')})")
    raise typer.Exit(subprocess.call(cmd, env=env))


def main() -> None:  # pragma: no cover - console entry for `python -m sinkscope`
    try:
        app()
    except SinkscopeError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(1)

