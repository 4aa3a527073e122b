"""The interventions of `sinkscope.intervene` as TransformerLens 4 hooks, for work on a `TransformerBridge`.

    from sinkscope.intervene import lens
    bridge = lens.boot("smollm2-135m")                          # offline, from sinkscope's safetensors cache
    logits = bridge.run_with_hooks(ids, return_type="logits", fwd_hooks=[
        *lens.ablate_features(layer=11, features=[507], tokens=[0]),
        *lens.block_attention(keys=[0], layers=range(2, 30)),
        *lens.rotate_states(layer=11, tokens=[5], reference=0, cosine=0.0),
    ])

Each function returns `(hook_name, hook_fn)` pairs for `run_with_hooks` / `hooks()`. They apply the same tensor
edits (`edits.py`) as the HF-hook context managers in `sinkscope.intervene` (to the residual stream after a block,
and to the pre-softmax attention scores), and `tests/test_lens.py` checks that both give the same logits. Use
them to combine sinkscope's interventions with TransformerLens tooling (caches, patching, every `hook_*` point)
on a plain LLM; the AVSR notebooks use `sinkscope.intervene`, because the AVSR LLM is a peft model fed with
`inputs_embeds`.
Positions are one list for the batch, or one list per sample, and count within each forward call: use these
hooks on whole sequences, not under `bridge.generate()`, whose cached steps pass one position at a time (position
0 there is each new token). The HF context managers of `sinkscope.intervene` follow the KV cache instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from sinkscope.intervene.edits import (
    apply_block,
    blocked,
    checked_features,
    checked_positions,
    checked_reference,
    rotate,
    set_features,
)

Hook = tuple[str, Callable]


def boot(model: str = "smollm2-135m", device: str | torch.device | None = None):
    """A TransformerBridge over a model that sinkscope can load (a known name, a .gguf file or an HF directory)."""
    from transformer_lens.model_bridge import TransformerBridge

    from sinkscope.models.llm import load_llm, resolve_llm_dir

    _, tokenizer = load_llm(model)
    device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return TransformerBridge.boot_transformers(str(resolve_llm_dir(model)), tokenizer=tokenizer, device=device)


def resid_post(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def attn_scores(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_attn_scores"


def ablate_features(layer: int, features: Iterable[int], tokens: Sequence | None = None,
                    value: float = 0.0) -> list[Hook]:
    """Set the residual stream after block `layer` to `value` at `features` (for `tokens`, or everywhere)."""
    features = checked_features(features)  # and below the model's width, at the hook (set_features)
    tokens = None if tokens is None else checked_positions(tokens, "tokens")
    return [(resid_post(layer), lambda resid, hook=None: set_features(resid.clone(), features, tokens, value))]


def block_attention(keys: Sequence, layers: Iterable[int], keep_self: bool = True) -> list[Hook]:
    """No query attends to the key positions `keys` in `layers`: their pre-softmax scores are set to -inf, as
    `sinkscope.intervene.block_attention` does to the attention mask (a blocked token keeps attending to itself
    when `keep_self`)."""
    keys = checked_positions(keys, "keys")

    def hook(scores: torch.Tensor, hook=None) -> torch.Tensor:  # [B, H, Tq, Tk]
        b, _, tq, tk = scores.shape
        return apply_block(scores, blocked(keys, b, tq, tk, tk - tq, keep_self, scores.device))

    return [(attn_scores(layer), hook) for layer in layers]


def rotate_states(layer: int, tokens: Sequence, reference: int | Sequence[int] = 0, cosine: float = 0.0) -> list[Hook]:
    """Turn the residual state of `tokens` after block `layer` to `cosine` with the `reference` token's state,
    keeping its norm (see `sinkscope.intervene.rotate_states`)."""
    if not -1.0 <= cosine <= 1.0:
        raise ValueError(f"cosine must lie in [-1, 1], not {cosine}")
    tokens = checked_positions(tokens, "tokens")
    reference = checked_reference(reference)
    return [(resid_post(layer), lambda resid, hook=None: rotate(resid.clone(), tokens, reference, cosine))]
