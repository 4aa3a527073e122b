"""Shared fixtures. Every test runs offline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import pytest  # noqa: E402
import torch  # noqa: E402

# Triton kernels (the recorder's device path) run on the CPU through Triton's interpreter when there is no GPU
# (torch.cuda.is_available() does not import Triton, which reads this variable when it is first imported)
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")


INTERPRETED_TOKEN_ROWS = 8
"""Token rows per program of the recorder's token pass when Triton's interpreter runs it (no GPU). The interpreter
pays per program, not per row: a tiny Llama's recorded forward (3 samples of 24 tokens) took about 20 s at the one
row a program that GPUs run, 4 s at 8 rows and 1.5 s at 32 (development CPU, session 23). 8, not 32, so that the
tests' sequences (10-24 tokens) still span several programs and forwards of different lengths different grids
(what the layer plan's test needs to catch a stale launch). One row a program is still what the token pass's own
tests and `test_recorder_device_path_matches_the_torch_path[llama]` run, and what the CUDA tests run on a GPU."""


@pytest.fixture(autouse=True)
def _token_rows_for_the_interpreter(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") == "1":
        from sinkscope.record import kernels

        monkeypatch.setattr(kernels, "token_config", lambda block_d: (INTERPRETED_TOKEN_ROWS, 2))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32, CPU, SDPA), loaded once per test session."""
    from sinkscope.models.llm import load_llm

    return load_llm("smollm2-135m")


@pytest.fixture(scope="module")
def make_corpus(tmp_path_factory):
    """A factory for small synthetic corpora: `make_corpus(n, seed)`, generated with 2 workers."""
    from sinkscope.data.synth import SynthConfig, synthesize

    def make(n: int, seed: int):
        out = tmp_path_factory.mktemp(f"corpus-{n}-{seed}")
        synthesize(out, SynthConfig(n=n, seed=seed), workers=2)
        return out

    return make


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
