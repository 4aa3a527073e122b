"""Resumable checkpoints: weights (safetensors), optimiser + RNG state (torch.save, read back with
`weights_only=True`), and `state.json`, which names them and is replaced last (the commit point)."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sinkscope.errors import SinkscopeError
from sinkscope.validation import read_json_file


def save_checkpoint(out: Path, name: str, weights: dict[str, torch.Tensor], optimiser, state: dict) -> None:
    """Write `name.safetensors` and `name.pt`, then `state.json` naming them; drop the previous checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(out / f".{name}.safetensors"))
    torch.save({"optimiser": optimiser.state_dict(), "rng": torch.get_rng_state()}, out / f".{name}.pt")
    os.replace(out / f".{name}.safetensors", out / f"{name}.safetensors")
    os.replace(out / f".{name}.pt", out / f"{name}.pt")
    previous = read_state(out).get("checkpoint") if (out / "state.json").exists() else None
    state["checkpoint"] = name
    (out / ".state.tmp").write_text(json.dumps(state, indent=2))
    os.replace(out / ".state.tmp", out / "state.json")
    if previous and previous != name:
        for ext in (".safetensors", ".pt"):
            (out / f"{previous}{ext}").unlink(missing_ok=True)


def save_half(weights: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write the weights in fp16 (floating tensors only) to `path`, through a temporary file renamed into place."""
    half = {k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in weights.items()}
    tmp = path.with_name(f".{path.name}")
    save_file(half, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_state(out: Path) -> dict:
    state = read_json_file(out / "state.json", "a checkpoint's state")
    name = state.get("checkpoint")
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name) or name.startswith("."):
        raise SinkscopeError(f"{out / 'state.json'}: field 'checkpoint' is {name!r}; expected the name of a weights "
                             "file in the same directory")
    return state


def load_weights(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The state and the weights of the checkpoint that `out/state.json` names."""
    state = read_state(out)
    path = out / f"{state.get('checkpoint')}.safetensors"
    try:
        weights = load_file(path)
    except Exception as exc:
        raise SinkscopeError(f"{path} is missing or not a safetensors file ({type(exc).__name__}: {exc})") from exc
    check_finite(weights, path)
    return state, weights


def refusal(exc: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in our words: torch's own text suggests unsafe loading,
    which sinkscope never does."""
    if isinstance(exc, __import__("pickle").UnpicklingError) or "weights_only" in str(exc).lower():
        return ("it holds pickled Python objects, not only tensors; sinkscope never unpickles code "
                "(it reads safetensors, or torch files with weights_only=True)")
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}"


def check_finite(weights: dict[str, torch.Tensor], where: Path) -> None:
    """Refuse NaN or Inf in floating-point weights (a diverged run or a corrupt file), naming the tensor."""
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise SinkscopeError(f"{where}: tensor '{name}' holds {bad} NaN or Inf values; the checkpoint is "
                                 "corrupt or its training diverged; it is not used")


def load_checkpoint(out: Path, optimiser) -> tuple[dict, dict[str, torch.Tensor]]:
    """Weights and state, and restore the optimiser and the torch RNG."""
    state, weights = load_weights(out)
    path = out / f"{state['checkpoint']}.pt"
    try:  # weights_only: a foreign or tampered file can hold tensors and plain containers, never code
        with warnings.catch_warnings():  # torch's pickle-protocol notice says nothing to a user
            warnings.simplefilter("ignore", UserWarning)
            extra = torch.load(path, weights_only=True)
        optimiser.load_state_dict(extra["optimiser"])
        torch.set_rng_state(extra["rng"])
    except Exception as exc:
        raise SinkscopeError(f"{path}: not an optimiser checkpoint of this run ({refusal(exc)}); delete the run "
                             "directory to start over") from exc
    return state, weights
