"""Recompute a trace's fields from HF eager attention, independently of sinkscope's recorder.

    .venv/bin/python examples/recompute.py traces/demo-prompts [--samples 3]
    .venv/bin/python examples/recompute.py traces/demo-avsr      # an AV trace: needs its corpus (make demo's)

For each sample it rebuilds the LLM's input and runs the LLM with `attn_implementation="eager"` and
`output_attentions=True`, takes every decoder block's output with a forward hook, and recomputes with plain
numpy (not `sinkscope.metrics`):

- alpha[l, h, k] = sum_{i >= k} A[l, h, i, k] / (T - k)
- cos-to-BOS, max |h| per token, the median of |h| over the layer (numpy's median)
- the massive entries: |h| >= abs and |h| >= rel * median, with the trace's thresholds

then prints the largest difference per field and exits with status 1 when one exceeds its tolerance. A text
sample's input is its stored `token_ids`. An AV sample's is rebuilt as `sinkscope record --checkpoint` built it:
the trace's checkpoint, corpus and split (from its manifest), the utterance of the sample's id through the
encoders and projectors, and its stored `token_ids` must equal the rebuilt ones (-1 at the encoder frames).

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
from sinkscope.record.blocks import find_decoder_layers, find_hf_model
from sinkscope.trace import Trace

# float32 recordings (the recorder's own tests hold alpha within 1e-5 of eager)
TOLERANCE = {"attention_received": 1e-5, "bos_cosine": 1e-4, "max_abs (relative)": 1e-4,
             "median_abs (relative)": 1e-4}


def forward(model, inputs: dict, implementation: str):
    """Each decoder block's output (a forward hook; before the final norm) and, with eager, the attentions."""
    find_hf_model(model).set_attn_implementation(implementation)
    outputs = []
    hooks = [block.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for block in find_decoder_layers(model)[1]]
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=implementation == "eager")
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(outputs)[:, 0].double().numpy(), out.attentions


def recompute(model, inputs: dict, thresholds: dict) -> dict:
    # alpha from eager's probabilities; the residual-stream fields from an SDPA forward, the kernel the recording
    # ran (in bfloat16 the two forwards drift apart through the layers by more than either's error)
    _, attentions = forward(model, inputs, "eager")
    A = torch.stack(attentions)[:, 0].double().numpy()  # [L, H, T, T]
    h, _ = forward(model, inputs, "sdpa")  # [L, T, D]
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


def text_inputs(manifest: dict, dtype: str):
    """The trace's LLM and, per sample, its stored token ids as `input_ids`."""
    from sinkscope.models.llm import load_llm

    model, _ = load_llm(manifest["model"], dtype=dtype)

    def inputs(sample):
        ids = sample.token_ids
        if ids is None or (ids < 0).any():
            return f"skipped ({'no token_ids' if ids is None else 'encoder frames in a text trace'})"
        return {"input_ids": torch.from_numpy(ids)[None]}

    return model, inputs


def av_inputs(config: dict):
    """The trace's AVSR checkpoint and, per sample, `inputs_embeds` rebuilt from its utterance in the corpus."""
    from sinkscope.data.dataset import collate
    from sinkscope.eval import rate_index
    from sinkscope.models.avsr import dataset_for
    from sinkscope.models.pretrained import load_trained

    model, _ = load_trained(config["checkpoint"])
    if config.get("rate"):
        model.set_rate(rate_index(model.cfg, config["rate"]))
    model.eval()
    dataset = dataset_for(model.cfg, config["data"], config.get("split"))
    position = {item.id: i for i, item in enumerate(dataset.items)}

    def inputs(sample):
        if sample.sample_id not in position:
            return f"skipped (no utterance {sample.sample_id!r} in {config['data']})"
        with torch.no_grad():
            built = model.build(collate([dataset[position[sample.sample_id]]]))
        if sample.token_ids is not None and built["token_ids"][0] != sample.token_ids.tolist():
            raise SinkscopeError(f"sample {sample.sample_id}: the rebuilt input's token ids differ from the stored "
                                 "ones (another corpus or checkpoint than the recording's?)")
        return {"inputs_embeds": built["inputs_embeds"], "attention_mask": built["attention_mask"]}

    return model.llm, inputs


def _count(text: str) -> int:
    """--samples: a whole number >= 1 (0 reported "no sample to check" as if the trace were old, and a negative
    number checked every sample)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of samples (a whole number >= 1)")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--samples", type=_count, default=3, help="how many samples to check (default 3)")
    args = parser.parse_args(argv)
    trace = Trace.load(args.trace)
    manifest = trace.manifest
    config = manifest.get("config") or {}
    dtype = config.get("dtype") or "float32"
    model, inputs_of = av_inputs(config) if config.get("checkpoint") else text_inputs(manifest, dtype)
    worst = dict.fromkeys(TOLERANCE, 0.0)
    checked = massive_diff = 0
    for sample in trace:
        if checked == args.samples:
            break
        inputs = inputs_of(sample)
        if isinstance(inputs, str):
            print(f"{sample.sample_id}: {inputs}")
            continue
        ref = recompute(model, inputs, manifest["thresholds"])
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
        print("no sample to check (text traces recorded before session 23 have no token_ids)")
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
