"""Recompute a text trace's fields from HF eager attention, independently of sinkscope's recorder.

    .venv/bin/python examples/recompute.py traces/demo-prompts [--samples 3]

For each sample it feeds the stored `token_ids` to the trace's model with `attn_implementation="eager"` and
`output_attentions=True`, takes every decoder block's output with a forward hook, and recomputes with plain
numpy (not `sinkscope.metrics`):

- alpha[l, h, k] = sum_{i >= k} A[l, h, i, k] / (T - k)
- cos-to-BOS, max |h| per token, the median of |h| over the layer (numpy's median)
- the massive entries: |h| >= abs and |h| >= rel * median, with the trace's thresholds

then prints the largest difference per field and exits with status 1 when one exceeds its tolerance. Samples
whose positions are not all vocabulary tokens (AV samples: encoder frames have id -1) are skipped.

The tolerances hold for float32 recordings. In bfloat16 two forwards of the same model through different
attention kernels drift apart through the layers (SmolLM2, one prompt: eager against SDPA up to 23 % of a
token's max |h| at layer 10, cos-to-BOS by 0.1), and the recorder's own forward is a third such kernel on the
CPU, so there the differences are printed for information and not checked.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from sinkscope.errors import SinkscopeError
from sinkscope.models.llm import load_llm
from sinkscope.trace import Trace

# float32 recordings (the recorder's own tests hold alpha within 1e-5 of eager)
TOLERANCE = {"attention_received": 1e-5, "bos_cosine": 1e-4, "max_abs (relative)": 1e-4,
             "median_abs (relative)": 1e-4}


def forward(model, ids: np.ndarray, implementation: str):
    """Each decoder block's output (a forward hook; before the final norm) and, with eager, the attentions."""
    model.set_attn_implementation(implementation)
    outputs = []
    hooks = [block.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for block in model.model.layers]
    try:
        with torch.no_grad():
            out = model(input_ids=torch.as_tensor(ids)[None], output_attentions=implementation == "eager")
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(outputs)[:, 0].double().numpy(), out.attentions


def recompute(model, ids: np.ndarray, thresholds: dict) -> dict:
    # alpha from eager's probabilities; the residual-stream fields from an SDPA forward, the kernel the recording
    # ran (in bfloat16 the two forwards drift apart through the layers by more than either's error)
    _, attentions = forward(model, ids, "eager")
    A = torch.stack(attentions)[:, 0].double().numpy()  # [L, H, T, T]
    h, _ = forward(model, ids, "sdpa")  # [L, T, D]
    T = A.shape[-1]
    alpha = A.sum(axis=2) / np.arange(T, 0, -1)
    norms = np.linalg.norm(h, axis=-1)
    cos = (h * h[:, :1]).sum(-1) / (norms * norms[:, :1])
    magnitude = np.abs(h)
    median = np.median(magnitude.reshape(len(h), -1), axis=1)
    limit = np.maximum(thresholds["massive_abs"], thresholds["massive_rel"] * median)[:, None, None]
    massive = {tuple(e) for e in np.argwhere(magnitude >= limit).tolist()}
    return {"attention_received": alpha, "bos_cosine": cos, "max_abs": magnitude.max(-1), "median_abs": median,
            "massive": massive}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--samples", type=int, default=3, help="how many samples to check (default 3)")
    args = parser.parse_args(argv)
    trace = Trace.load(args.trace)
    manifest = trace.manifest
    config = manifest.get("config") or {}
    if config.get("checkpoint"):
        print(f"{args.trace} was recorded through an AVSR checkpoint ({config['checkpoint']}): its encoder frames "
              "have no token ids to feed again; this example checks text traces")
        return 1
    dtype = config.get("dtype") or "float32"
    model, _ = load_llm(manifest["model"], dtype=dtype)
    worst = dict.fromkeys(TOLERANCE, 0.0)
    checked = massive_diff = 0
    for sample in trace:
        if checked == args.samples:
            break
        ids = sample.token_ids
        if ids is None or (ids < 0).any():
            print(f"{sample.sample_id}: skipped ({'no token_ids' if ids is None else 'encoder frames'})")
            continue
        ref = recompute(model, ids, manifest["thresholds"])
        errors = {
            "attention_received": np.abs(sample.attention_received - ref["attention_received"]).max(),
            "bos_cosine": np.abs(sample.bos_cosine - ref["bos_cosine"]).max(),
            "max_abs (relative)": (np.abs(sample.max_abs - ref["max_abs"]) / ref["max_abs"]).max(),
            "median_abs (relative)": (np.abs(sample.median_abs - ref["median_abs"]) / ref["median_abs"]).max(),
        }
        stored = set(zip(sample.massive.layer.tolist(), sample.massive.token.tolist(),
                         sample.massive.feature.tolist(), strict=True))
        massive_diff += len(stored ^ ref["massive"])
        print(f"{sample.sample_id}: T={len(sample)}, " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
              + f", massive entries {len(stored)} stored / {len(ref['massive'])} recomputed")
        worst = {k: max(worst[k], float(v)) for k, v in errors.items()}
        checked += 1
    if not checked:
        print("no sample with token ids to check (traces recorded before token_ids was stored, or AV samples)")
        return 1
    failed = [f"{k} {v:.2e} > {TOLERANCE[k]:.0e}" for k, v in worst.items() if v > TOLERANCE[k]]
    if massive_diff:
        failed.append(f"{massive_diff} massive entries differ")
    if dtype != "float32":
        print(f"{checked} samples, {dtype}: not checked (see this script's docstring); record in float32 to check")
        return 0
    print(f"{checked} samples, {dtype}: " + ("all within tolerance" if not failed else "; ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SinkscopeError as exc:  # a trace or model that cannot be read: the message names it
        sys.exit(f"recompute.py: {exc}")
