"""The `sinkscope` command line."""

from __future__ import annotations

import platform
import sys

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


def _not_yet(verb: str) -> None:
    _fail(f"`sinkscope {verb}` is not yet available in sinkscope {__version__}.", code=2)


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
def record() -> None:
    """Record a trace of attention sinks and massive activations."""
    _not_yet("record")


@app.command()
def summary() -> None:
    """Print a per-layer summary of a trace."""
    _not_yet("summary")


@data_app.command("synth")
def data_synth() -> None:
    """Generate the synthetic audio-visual speech corpus."""
    _not_yet("data synth")


@app.command("pretrain-encoders")
def pretrain_encoders() -> None:
    """CTC-pretrain the audio and video encoders on a corpus."""
    _not_yet("pretrain-encoders")


@app.command()
def train() -> None:
    """Train the AVSR LLM (LoRA), with or without the decorrelation loss."""
    _not_yet("train")


@app.command("eval")
def evaluate() -> None:
    """Decode a test split and compute WER."""
    _not_yet("eval")


@app.command()
def sweep() -> None:
    """Run a resumable grid of training runs (downsampling rates x decorrelation)."""
    _not_yet("sweep")


@app.command("app")
def run_app() -> None:
    """Open the Streamlit trace browser."""
    _not_yet("app")


def main() -> None:  # pragma: no cover - console entry for `python -m sinkscope`
    try:
        app()
    except SinkscopeError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(1)

