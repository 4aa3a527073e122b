"""The interventions of `sinkscope.intervene` as TransformerLens 4 hooks, for work on a `TransformerBridge`.

    from sinkscope import lens
    bridge = lens.boot("smollm2-135m")                          # offline, from sinkscope's safetensors cache
    logits = bridge.run_with_hooks(ids, return_type="logits", fwd_hooks=[
        *lens.ablate_features(layer=11, features=[507], tokens=[0]),
        *lens.block_attention(keys=[0], layers=range(2, 30)),
        *lens.rotate_states(layer=11, tokens=[5], reference=0, cosine=0.0),
    ])

Each function returns `(hook_name, hook_fn)` pairs for `run_with_hooks` / `hooks()`. They act on the same
quantities as the HF-hook context managers in `sinkscope.intervene` (the residual stream after a block, and the
post-softmax attention pattern, whose rows are renormalised over the keys left, which equals masking the keys
before the softmax), and `tests/test_lens.py` checks that both give the same logits. The AVSR notebooks use
`sinkscope.intervene` because the AVSR LLM is a peft model fed with `inputs_embeds`.
Positions are one list for the batch, or one list per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from sinkscope.intervene import _per_sample, rotate_toward

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


def pattern(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def ablate_features(layer: int, features: Iterable[int], tokens: Sequence | None = None,
                    value: float = 0.0) -> list[Hook]:
    """Set the residual stream after block `layer` to `value` at `features` (for `tokens`, or everywhere)."""
    feats = list(map(int, features))

    def hook(resid: torch.Tensor, hook=None) -> torch.Tensor:
        resid = resid.clone()
        f = torch.as_tensor(feats, device=resid.device)
        if tokens is None:
            resid[..., f] = value
            return resid
        for i, toks in enumerate(_per_sample(tokens, resid.shape[0])):
            t = torch.as_tensor([p for p in toks if p < resid.shape[1]], dtype=torch.long, device=resid.device)
            rows = resid[i, t]
            rows[:, f] = value
            resid[i, t] = rows
        return resid

    return [(resid_post(layer), hook)]


def block_attention(keys: Sequence, layers: Iterable[int], keep_self: bool = True) -> list[Hook]:
    """No query attends to the key positions `keys` in `layers`: their pattern columns are zeroed and every row is
    renormalised (a blocked token keeps attending to itself when `keep_self`)."""

    def hook(pat: torch.Tensor, hook=None) -> torch.Tensor:  # [B, H, Tq, Tk]
        pat = pat.clone()
        tq = pat.shape[2]
        q = torch.arange(tq, device=pat.device)
        for i, cols in enumerate(_per_sample(keys, pat.shape[0])):
            for c in cols:
                if c < pat.shape[-1]:
                    rows = q != c if keep_self else torch.ones_like(q, dtype=torch.bool)
                    pat[i, :, rows, c] = 0
        return pat / pat.sum(-1, keepdim=True).clamp_min(torch.finfo(pat.dtype).tiny)

    return [(pattern(layer), hook) for layer in layers]


def rotate_states(layer: int, tokens: Sequence, reference: int | Sequence[int] = 0, cosine: float = 0.0) -> list[Hook]:
    """Turn the residual state of `tokens` after block `layer` to `cosine` with the `reference` token's state,
    keeping its norm (see `sinkscope.intervene.rotate_states`)."""

    def hook(resid: torch.Tensor, hook=None) -> torch.Tensor:
        resid = resid.clone()
        refs = [int(reference)] * resid.shape[0] if isinstance(reference, int) else [int(r) for r in reference]
        for i, toks in enumerate(_per_sample(tokens, resid.shape[0])):
            t = torch.as_tensor(toks, dtype=torch.long, device=resid.device)
            resid[i, t] = rotate_toward(resid[i, t].float(), resid[i, refs[i]].float()[None], cosine).to(resid.dtype)
        return resid

    return [(resid_post(layer), hook)]
