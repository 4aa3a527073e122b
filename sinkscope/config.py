"""Job configs and run provenance.

Every job verb (`pretrain-encoders`, `train`, `eval`, `sweep`, `record`) takes one dataclass config, read from
YAML and `--set key=value` overrides (dotted keys reach nested fields: `--set model.k_audio=8`). Each job writes
into its output directory:

    config.yaml     the resolved config (every field, defaults included)
    run.json        the verb, the exact command, the sinkscope version, the git commit (when there is one), times
    results.json    what the job measured

so that a run directory says how to make it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sinkscope import __version__
from sinkscope.errors import SinkscopeError

C = TypeVar("C")
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
RESULTS_FILE = "results.json"
MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 32


class _Loader(yaml.SafeLoader):
    """A safe loader that refuses aliases (a config never needs them, and nested aliases can expand
    exponentially: a "billion laughs" file hangs the reader) and nesting deeper than MAX_YAML_DEPTH."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in configs",
                                              event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise SinkscopeError(f"{where}: not valid YAML ({exc})") from exc


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict:
    """A YAML file that must hold a mapping (an empty file gives {}), with errors that name the file."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise SinkscopeError(f"{path}: {path.stat().st_size} bytes is too large for a {what} "
                                 f"(at most {MAX_YAML_BYTES})")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SinkscopeError(f"{path}: not a readable {what} ({exc})") from exc
    data = parse_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise SinkscopeError(f"{path}: the {what} must be a mapping of fields, not a {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """`key=value` overrides (values parsed as YAML) applied to a nested mapping, in order."""
    data = json.loads(json.dumps(data, default=str))
    for item in overrides or ():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SinkscopeError(f"--set {item!r}: expected key=value (for example --set model.k_audio=8)")
        target = data
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise SinkscopeError(f"--set {item!r}: {part} is not a mapping")
        target[parts[-1]] = parse_yaml(raw, f"--set {key}")
    return data


def _check_scalar(value: Any, kind: Any, where: str) -> Any:
    """`value` as the annotated scalar type, or a SinkscopeError naming the field and the value."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_scalar(value, option, where)
            except SinkscopeError as exc:
                errors.append(exc)
        raise errors[0] if errors else SinkscopeError(f"{where}: unexpected value {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise SinkscopeError(f"{where}: expected a list, got {value!r}")
        inner = (typing.get_args(kind) or (Any,))[0]
        return tuple(_check_scalar(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (list, dict) or kind is Any:
        expected = origin or object
        if not isinstance(value, expected):
            raise SinkscopeError(f"{where}: expected a {expected.__name__}, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise SinkscopeError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SinkscopeError(f"{where}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SinkscopeError(f"{where}: expected a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise SinkscopeError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise SinkscopeError(f"{where}: expected a string, got {value!r}")
        return value
    if value is None:
        raise SinkscopeError(f"{where}: a value is required")
    return value


def build(cls: type[C], data: dict, where: str = "config") -> C:
    """A dataclass from a mapping: nested dataclass fields from nested mappings, scalar types checked, and
    errors that name `where`, the field and the bad value."""
    if not isinstance(data, dict):
        raise SinkscopeError(f"{where}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SinkscopeError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        kind = hints[key]
        optional = [k for k in typing.get_args(kind) if dataclasses.is_dataclass(k)] \
            if typing.get_origin(kind) in (typing.Union, types.UnionType) else []
        if dataclasses.is_dataclass(kind):
            kwargs[key] = build(kind, value or {}, f"{where}: {key}")
        elif optional and value is not None:  # an optional section, e.g. `mome:`
            kwargs[key] = build(optional[0], value or {}, f"{where}: {key}")
        else:
            kwargs[key] = _check_scalar(value, kind, f"{where}: {key}")
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SinkscopeError(f"{where}: missing field(s) {missing}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise SinkscopeError(f"{where}: {exc}") from exc


def load_config(cls: type[C], path: str | Path | None = None, overrides: typing.Iterable[str] = (),
                defaults: dict | None = None) -> C:
    """`cls` from `defaults`, then the YAML file at `path`, then `key=value` overrides."""
    data = dict(defaults or {})
    if path is not None:
        data.update(read_yaml_mapping(path, "config"))
    return build(cls, apply_overrides(data, overrides), str(path or "config"))


def to_dict(cfg: Any) -> dict:
    """A config as plain JSON/YAML data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(cfg: Any, ignore: typing.Iterable[str] = ()) -> str:
    """A short content hash of a config (fields in `ignore` left out)."""
    data = {k: v for k, v in to_dict(cfg).items() if k not in set(ignore)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def changed_fields(previous: dict, current: dict, ignore: typing.Iterable[str] = ()) -> list[str]:
    """Top-level fields whose values differ between two configs."""
    skip = set(ignore)
    keys = (set(previous) | set(current)) - skip
    return sorted(k for k in keys if json.dumps(previous.get(k), sort_keys=True)
                  != json.dumps(current.get(k), sort_keys=True))


def git_commit() -> str | None:
    """The commit of the sinkscope checkout (with `+dirty` when it has uncommitted changes), or None."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


_COMMAND: list[str] = []


def set_command(argv: list[str]) -> None:
    """Remember the command line of this job (the CLI calls this with its own arguments)."""
    _COMMAND[:] = [str(a) for a in argv]


def command_line() -> str:
    """The command that started this job, as a shell line (`sinkscope ...` for the CLI)."""
    if _COMMAND:
        return shlex.join(_COMMAND)
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if argv and Path(argv[0]).name.startswith("python"):
        argv[0] = "python"
    if argv[:3] == ["python", "-m", "sinkscope"]:
        argv = ["sinkscope", *argv[3:]]
    elif argv and argv[0].endswith("/sinkscope"):
        argv[0] = "sinkscope"
    return shlex.join(argv)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def provenance(verb: str) -> dict:
    return {"verb": verb, "command": command_line(), "cwd": os.getcwd(), "sinkscope_version": __version__,
            "git_commit": git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def claim_output(out: str | Path, verbs: str | tuple[str, ...], markers: tuple[str, ...] = (),
                 lock: bool = True) -> Path:
    """Check, before any work starts, that a job may write into `out`, and create it.

    Accepted: a missing or empty directory, or one this kind of job wrote before (its `run.json` names one of
    `verbs`, or it holds one of `markers`, e.g. a checkpoint's `state.json`). Refused with a message: a file, a
    directory of other files (they are never overwritten), a directory that cannot be written, and (`lock`) a
    directory that another sinkscope process is writing now (`lock_output`)."""
    out = Path(out)
    verbs = (verbs,) if isinstance(verbs, str) else tuple(verbs)
    if out.exists() and not out.is_dir():
        raise SinkscopeError(f"output {out}: exists and is not a directory; `sinkscope {verbs[0]}` writes a "
                             "directory there; choose another path")
    if out.is_dir() and any(out.iterdir()):
        try:
            verb = json.loads((out / RUN_FILE).read_text(encoding="utf-8")).get("verb")
        except (OSError, ValueError, AttributeError):
            verb = None
        if verb not in verbs and not any((out / m).exists() for m in markers):
            raise SinkscopeError(f"output {out}: holds files that `sinkscope {verbs[0]}` did not write (its "
                                 f"{RUN_FILE} is missing or names another command); they are left untouched; "
                                 "choose a new or empty directory")
    out = make_writable_dir(out, f"output {out}")
    if lock:
        lock_output(out, verbs[0])
    return out


HELD_LOCKS: dict[str, int] = {}
"""Output directories this process holds the lock of (`lock_output`): resolved path -> the open descriptor."""


def lock_output(out: Path, verb: str) -> None:
    """Hold an exclusive lock on the directory `out` (flock on the directory itself: no file is added to it) until
    `release_locks` or the process ends, so that a second job writing into the same directory (a resumed run
    started twice, two terminals) is refused at once instead of interleaving checkpoints, samples or rows with the
    first. The kernel drops the lock of a killed process, so a stale lock never blocks a resume."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        return
    key = str(out.resolve())
    if key in HELD_LOCKS:  # this process holds it already (a sweep point's run, scored after training)
        return
    fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SinkscopeError(f"output {out}: another process is writing there now (it holds the directory's "
                             f"lock); wait until it finishes, or give `sinkscope {verb}` another directory; nothing "
                             "was changed") from None
    HELD_LOCKS[key] = fd


def releases_locks(job):
    """Decorate a job function (`run_record`, `run_eval`, `train`, ...): the output locks it takes are dropped when
    it returns or fails, so that a notebook or a sweep that goes on in the same process leaves the directory free
    for other processes."""

    @functools.wraps(job)
    def wrapper(*args, **kwargs):
        before = set(HELD_LOCKS)
        try:
            return job(*args, **kwargs)
        finally:
            release_locks(set(HELD_LOCKS) - before)

    return wrapper


def _forget_inherited_locks() -> None:
    """In a forked child (a worker of `data synth`'s pool): close the inherited lock descriptors. An flock belongs
    to the open file, which fork shares, so a worker that outlived a killed parent kept the directory locked and
    refused the user's resume; closing the child's copy leaves the parent's lock as it was."""
    for fd in HELD_LOCKS.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited_locks)


def release_locks(keys=None) -> None:
    """Drop the output locks of `keys` (resolved paths), or every one this process holds (at the end of a
    command)."""
    for key in list(HELD_LOCKS) if keys is None else keys:
        with contextlib.suppress(OSError):
            os.close(HELD_LOCKS.pop(key))


CLAIMED: list[Path] = []
"""Output directories that `make_writable_dir` (`claim_output`, `export`, `data synth`) created in this process: a
command that then fails before writing anything removes them again (`release_claims`), so that a refused job
leaves no empty directory behind."""


def release_claims() -> None:
    """Remove the directories `make_writable_dir` created that are still empty (a failed job's); nothing else."""
    while CLAIMED:
        out = CLAIMED.pop()
        with contextlib.suppress(OSError):
            out.rmdir()  # only an empty directory goes


def make_writable_dir(out: Path, label: str) -> Path:
    """Create `out` (with parents) and check that a file can be written there; a SinkscopeError naming `label`
    otherwise (a read-only location, a file in the way), before any work starts."""
    try:
        try:
            out.mkdir(parents=True)
            CLAIMED.append(out)
        except FileExistsError:  # there already (a directory, or a file, which the probe below refuses)
            pass
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SinkscopeError(f"{label}: cannot be written ({exc.strerror or exc})") from exc
    return out


def write_run_files(out: str | Path, verb: str, cfg: Any, config_name: str = CONFIG_FILE) -> dict:
    """Write the resolved config and `run.json` (verb, command, version, commit) into `out`; return the latter.
    The commands of earlier invocations on the same directory (a resumed run) are kept under `earlier`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / config_name, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    run = provenance(verb)
    try:
        previous = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
        earlier = [*previous.pop("earlier", []), previous] if isinstance(previous, dict) else []
    except (OSError, ValueError):
        earlier = []
    if earlier:
        run["earlier"] = earlier[-20:]
    atomic_write_text(out / RUN_FILE, json.dumps(run, indent=2) + "\n")
    return run


def write_results(out: str | Path, results: dict, cfg: Any = None) -> Path:
    """Write `results.json` into `out` atomically, with what made it: the command, the sinkscope version and
    commit, the resolved config (when given) and its hash, so that the file still names its origin when it is
    copied elsewhere (experiments/results/)."""
    path = Path(out) / RESULTS_FILE
    data = {**results, "command": command_line(), "sinkscope_version": __version__, "git_commit": git_commit(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if cfg is not None:
        data.update(config_hash=config_hash(cfg), config=to_dict(cfg))
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
    return path
