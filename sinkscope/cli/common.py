"""What every verb shares: consoles, clean failure, job configs from YAML + flags + `--set`, and progress that
shows as a bar on a terminal and as periodic lines in a log file."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console

from sinkscope.config import load_config
from sinkscope.errors import SinkscopeError

C = TypeVar("C")
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

CONFIG_OPTION = typer.Option(None, "--config", help="YAML config of this job (fields: see the docs of the verb).")
SET_OPTION = typer.Option(None, "--set", help="key=value override of a config field, e.g. --set model.k_audio=8.")


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def job_config(cls: type[C], config: Path | None, sets: list[str] | None, **flags) -> C:
    """The job's config: the YAML file, then the flags given on the command line, then `--set` overrides."""
    given = [f"{k}={_yaml(v)}" for k, v in flags.items() if v is not None]
    return load_config(cls, config, [*given, *(sets or [])])


def _yaml(value) -> str:
    import json

    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, tuple | list):
        value = list(value)
    return json.dumps(value)


class Bar:
    """A progress bar (rich) on a terminal; on a pipe or a log file, a line every `every` seconds and at the end."""

    def __init__(self, progress, task, every: float = 30.0):
        self.progress, self.task, self.every = progress, task, every
        self.last = 0.0
        self.start = time.time()

    def update(self, done: int, total: int | None = None, text: str | None = None) -> None:
        kwargs = {"completed": done}
        if total is not None:
            kwargs["total"] = total
        if text is not None:
            kwargs["description"] = text
        self.progress.update(self.task, **kwargs)
        if not err_console.is_terminal:
            now = time.time()
            total = self.progress.tasks[self.task].total
            if now - self.last >= self.every or (total and done >= total):
                self.last = now
                share = f" ({100 * done / total:.0f}%)" if total else ""
                label = self.progress.tasks[self.task].description
                err_console.print(f"{label}: {done}/{total or '?'}{share}, {now - self.start:.0f} s", highlight=False)

    def advance(self, k: int = 1) -> None:
        self.update(int(self.progress.tasks[self.task].completed) + k)

    def log(self, message: str) -> None:
        self.progress.console.print(message, highlight=False)


@contextmanager
def progress_bar(label: str, total: int | None = None) -> Iterator[Bar]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err_console, transient=err_console.is_terminal,
                  disable=not err_console.is_terminal) as progress:
        yield Bar(progress, progress.add_task(label, total=total))


DEBUG = {"on": False}
"""Set by `sinkscope --debug`: errors show their traceback."""


@contextmanager
def clean_errors() -> Iterator[None]:
    """User errors end the command with a message that names the input, not a traceback (`--debug` shows it). An
    output directory the command created and left empty is removed again (`config.release_claims`), and the
    command's output locks are dropped (`config.release_locks`)."""
    from sinkscope.config import CLAIMED, release_claims, release_locks

    CLAIMED.clear()
    try:
        yield
    except SinkscopeError as exc:
        release_claims()
        if DEBUG["on"]:
            raise
        fail(str(exc))
    except BaseException:
        release_claims()
        raise
    finally:
        release_locks()  # the command's output locks (config.lock_output); the process may go on (tests, notebooks)
