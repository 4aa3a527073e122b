"""The `sinkscope` command line: one module per verb family (`train`, `trace`), the rest here."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import typer
from typer.core import TyperGroup

from sinkscope import __version__
from sinkscope.cli import trace as trace_verbs
from sinkscope.cli import train as train_verbs
from sinkscope.cli.common import DEBUG, clean_errors, console, err_console, fail, progress_bar
from sinkscope.config import set_command
from sinkscope.errors import SinkscopeError


class _Group(TyperGroup):
    """Records the exact command line, which every job writes into its output directory (run.json)."""

    def parse_args(self, ctx, args):
        set_command(["sinkscope", *args])
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_Group,
    name="sinkscope",
    help="Attention sinks and massive activations in LLM-based audio-visual speech recognition.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show the full traceback when a command fails.")):
    DEBUG["on"] = debug


data_app = typer.Typer(help="Build and inspect corpora.", no_args_is_help=True)
app.add_typer(data_app, name="data")
trace_verbs.register(app)
train_verbs.register(app)


def recorder_paths() -> list[str]:
    """Which path the recorder takes here, per device, and why (what a user checks before a long recording)."""
    import os

    import torch

    from sinkscope.record import fused_cpu, kernels

    if fused_cpu.available():
        reductions = f"C passes (built by {fused_cpu.compiler()} at the first recording, cached under " \
                     f"{fused_cpu.cache_dir()})"
    elif os.environ.get("SINKSCOPE_CPU_KERNELS") == "0":
        reductions = "torch's (SINKSCOPE_CPU_KERNELS=0)"
    else:
        reductions = "torch's (no C compiler found: cc, gcc or clang; slower, the same fields)"
    lines = [f"recorder cpu  one-pass attention with column sums (unpadded inputs; padded batches: SDPA and a second "
             f"pass); per-layer reductions: {reductions}"]
    if torch.cuda.is_available():
        if kernels.available(torch.device("cuda")):
            import triton

            how = f"device path (Triton {triton.__version__} kernels, no host sync inside the forward)"
        elif os.environ.get("SINKSCOPE_TRITON") == "0":
            how = "torch path (SINKSCOPE_TRITON=0)"
        else:
            how = "torch path (Triton is not installed: pip install triton for the device path)"
        lines.append(f"recorder cuda {how}")
    else:
        lines.append("recorder cuda no CUDA device here")
    return lines


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
    for line in recorder_paths():
        console.print(line, highlight=False)
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
    from sinkscope.models.llm import checked_llm_source

    with clean_errors():
        where = checked_llm_source(model)  # a known name or .gguf converted and cached; anything else checked
    console.print(f"{model} ready at {where}")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="Corpus directory (created, or resumed when it exists)."),
    n: int = typer.Option(1000, "--n", min=1, help="Number of utterances."),
    seed: int = typer.Option(0, help="Random seed: the same seed and arguments give identical files."),
    vocab: str = typer.Option("grid", help="grid (the 51-word GRID grammar) or open (4-12 words of ~3,000)."),
    workers: int = typer.Option(max(1, (os.cpu_count() or 1)), "--workers", min=1, help="Processes."),
) -> None:
    """Generate the synthetic audio-visual speech corpus (espeak-ng speech + rendered mouth video)."""
    from sinkscope.data.synth import SynthConfig, synthesize

    with clean_errors(), progress_bar("synth", total=n) as bar:
        made, kept = synthesize(out, SynthConfig(n=n, seed=seed, vocab=vocab), workers=workers,
                                progress=bar.advance)
    console.print(f"{out}: {made} utterances generated" + (f", {kept} already there" if kept else ""))


@app.command("app")
def run_app(
    root: Path = typer.Option(None, help="Directory of traces (default: $SINKSCOPE_ROOT or traces/)."),
    port: int = typer.Option(8501, min=1, max=65535, help="Port to serve on (localhost)."),
    headless: bool = typer.Option(True, "--headless/--open-browser", help="Open a browser tab or not."),
    trace: str = typer.Option(None, help="The trace the app opens on (a name under the root; default: the first). "
                              "A link with ?trace=NAME still opens that one."),
) -> None:
    """Open the Streamlit trace browser."""
    import os
    import subprocess

    env = dict(os.environ)
    if root is not None:
        if not root.is_dir():
            fail(f"--root {root} is not a directory")
        env["SINKSCOPE_ROOT"] = str(root.resolve())
    if trace is not None:
        from sinkscope.trace import find_traces

        where = Path(env.get("SINKSCOPE_ROOT", "traces"))
        names = find_traces(where)
        if trace not in names:
            fail(f"--trace {trace}: no such trace under {where}" + (f"; the traces there: {', '.join(names)}"
                                                                    if names else " (it holds no trace)"))
        env["SINKSCOPE_TRACE"] = trace
    from sinkscope.appserver import command

    cmd = command(port, "localhost", headless)
    console.print(f"sinkscope app on http://localhost:{port} (traces under {env.get('SINKSCOPE_ROOT', 'traces/')})")
    raise typer.Exit(subprocess.call(cmd, env=env))


def main() -> None:  # pragma: no cover - console entry for `python -m sinkscope`
    """Every failure ends in one message; a traceback only under `--debug`. An exception that is not a
    SinkscopeError is a bug in sinkscope (its input checks missed a case), and says so."""
    try:
        app()
    except SinkscopeError as exc:
        if DEBUG["on"]:
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted; finished work is kept (rerun the command to resume where it can)")
        sys.exit(130)
    except Exception as exc:
        if DEBUG["on"]:
            raise
        err_console.print(f"[bold red]error:[/] unexpected {type(exc).__name__}: {exc}\n"
                          "This is a sinkscope bug: its input checks missed this case. Rerun with `sinkscope "
                          "--debug ...` for the traceback and report it.", highlight=False)
        sys.exit(2)
