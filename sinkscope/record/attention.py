"""A streamed attention function: SDPA output plus the column sums that `attention_received` needs.

Registered with `transformers.AttentionInterface` as "sinkscope", so any model that uses the interface (Llama,
Qwen2, Mistral, ...) can record without materialising L*H*T^2 attention. The output comes from SDPA; where the
kernel exposes its log-sum-exp (CPU flash, CUDA flash / memory-efficient) it is reused, so the column sums need
one extra QK^T pass over the causal half only, in query chunks of O(chunk * T) memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sinkscope.errors import RecorderError
from sinkscope.record import kernels

ATTN_IMPLEMENTATION = "sinkscope"
CHUNK_BYTES = 16 * 2**20
"""Budget for one chunk of attention probabilities (per forward, all heads)."""
CHUNK_ROWS = 64
"""Query rows per chunk at most: 64 was the fastest of 32-256 on the CPU at T = 512, 2048 and 8192 (SmolLM2 shapes;
the chunk's scores then stay in cache between the matmul, the exp and the sum)."""

# The active recorder's callback, or None. Set by Recorder.__enter__.
_HANDLER: Callable | None = None


def set_handler(handler: Callable | None) -> Callable | None:
    """Install the callback that receives column sums; returns the previous one."""
    global _HANDLER
    previous, _HANDLER = _HANDLER, handler
    return previous


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


def sdpa_with_lse(query, key, value, mask, scale) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDPA output `[B, Hq, T, d]` and, when the kernel gives it, the row log-sum-exp `[B, Hq, T]` (float32)."""
    groups = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, groups), repeat_kv(value, groups)
    causal = mask is None
    bias = None if causal else _additive(mask, query.dtype).expand(query.shape[0], -1, -1, -1)
    try:
        if query.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, k, v, 0.0, causal, attn_mask=bias, scale=scale
            )
            return out, lse.float()
        if query.device.type == "cuda":
            if causal and query.dtype in (torch.float16, torch.bfloat16) and os.environ.get("SINKSCOPE_CUDNN") != "0":
                try:  # cuDNN's attention: what plain SDPA picks on Hopper (about 1.5x faster than flash there)
                    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                        query, k, v, None, True, 0.0, True, False, scale=scale)[:2]
                    return out, lse.reshape(query.shape[:3]).float()
                except (RuntimeError, NotImplementedError):
                    pass
            if causal and query.dtype in (torch.float16, torch.bfloat16):
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, k, v, 0.0, True, scale=scale)[:2]
                return out, lse.float()
            if bias is not None:  # the memory-efficient kernel wants the bias's rows 16-element aligned
                t_k = bias.shape[-1]
                aligned = torch.empty(*query.shape[:3], -(-t_k // 16) * 16, dtype=bias.dtype, device=bias.device)
                aligned[..., :t_k] = bias
                bias = aligned[..., :t_k]
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                query, k, v, bias, True, 0.0, causal, scale=scale
            )[:2]
            return out, lse[..., : query.shape[2]].float()
    except (RuntimeError, NotImplementedError):
        pass  # a kernel that refuses these shapes or dtypes: fall back to the public SDPA below
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=bias, is_causal=causal, scale=scale)
    return out, None


def _causal_chunk_colsum(qc: torch.Tensor, kt: torch.Tensor, i0: int, c: int, hq: int) -> torch.Tensor:
    """Column sums of one query chunk: `qc` = [q*scale, -lse] rows, `kt` = [k; 1] up to the chunk's last key."""
    s = torch.matmul(qc, kt).view(qc.shape[0], hq, c, kt.shape[-1])  # [B, Hq, c, i1] = scores - lse
    keys = torch.arange(kt.shape[-1], device=s.device)
    queries = torch.arange(i0, i0 + c, device=s.device)
    return torch.where(keys[None, :] <= queries[:, None], torch.exp(s), 0.0).sum(dim=2)  # [B, Hq, i1]


_COMPILED: dict[str, object] = {}


def _compiled_chunk_colsum():
    """`_causal_chunk_colsum` fused by torch.compile (one kernel for exp, mask and sum); eager on failure."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_causal_chunk_colsum, dynamic=True)
    return _COMPILED["fn"]


def column_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    lse: torch.Tensor | None,
    mask: torch.Tensor | None,
    query_valid: torch.Tensor | None,
    scale: float,
    map_heads: tuple[int, ...] = (),
    chunk_bytes: int = CHUNK_BYTES,
    compile: bool = False,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """`sum_i A[b, h, i, k]` over valid queries i, for every key k: `[B, Hq, T]` float32.

    `mask` is None (plain causal) or the model's 4D mask (bool: True attends, or additive float). Queries with
    `query_valid == False` (padding) contribute nothing. `map_heads` also returns those heads' full maps
    `[B, T, T]`. Grouped-query heads are handled by reshaping the queries, never by repeating the keys.
    `compile=True` fuses the elementwise work of unpadded causal chunks with torch.compile.
    """
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    # Fold the scale and (when known) the row log-sum-exp into one matmul: [q*scale, -lse] @ [k; 1]^T gives
    # s - lse directly, so exp(.) of the product is the attention probability.
    q = (query.float() * scale).reshape(b, hkv, g, t, d)
    kt = key.float().transpose(-1, -2)  # [B, Hkv, d, T]
    if lse is not None:
        q = torch.cat([q, -lse.float().reshape(b, hkv, g, t, 1)], dim=-1)
        kt = torch.cat([kt, torch.ones(b, hkv, 1, t, dtype=kt.dtype, device=kt.device)], dim=-2)
    colsum = torch.zeros(b, hq, t, dtype=torch.float32, device=query.device)
    maps = {h: torch.zeros(b, t, t, dtype=torch.float32, device=query.device) for h in map_heads}
    chunk = int(max(16, min(CHUNK_ROWS, chunk_bytes // max(1, 4 * b * hq * t))))
    fused = compile and lse is not None and mask is None and query_valid is None and not map_heads
    # one buffer for every chunk's scores, written by the matmul and exponentiated in place: no allocation per
    # chunk (CPU, SmolLM2 shapes, one layer: 110 -> 73 ms at T = 2048, 10.4 -> 5.2 ms at T = 512)
    buffer = None if fused else torch.empty(b * hq * chunk * t, dtype=torch.float32, device=query.device)
    causal_block = torch.ones(chunk, chunk, dtype=torch.bool, device=query.device).triu_(1)
    for i0 in range(0, t, chunk):
        i1 = min(t, i0 + chunk)
        c = i1 - i0
        qc = q[:, :, :, i0:i1].reshape(b, hkv, g * c, q.shape[-1])
        if fused:
            colsum[..., :i1] += _compiled_chunk_colsum()(qc, kt[..., :i1], i0, c, hq)
            continue
        s = buffer[: b * hq * c * i1].view(b, hkv, g * c, i1)
        torch.matmul(qc, kt[..., :i1], out=s)
        s = s.view(b, hq, c, i1)  # [B, Hq, c, i1]; keys after i1 are masked
        if mask is None:
            s[..., i0:i1].masked_fill_(causal_block[:c, :c], float("-inf"))
        elif mask.dtype == torch.bool:
            s.masked_fill_(~mask[:, :, i0:i1, :i1], float("-inf"))
        else:
            s.add_(mask[:, :, i0:i1, :i1].float())
        if lse is None:
            s.sub_(torch.logsumexp(s, dim=-1, keepdim=True))
        p = s.exp_()
        if query_valid is not None:
            p.masked_fill_(~query_valid[:, None, i0:i1, None], 0.0)  # also clears NaN rows of padded queries
        colsum[..., :i1] += p.sum(dim=2)
        for h, m in maps.items():
            m[:, i0:i1, :i1] = p[:, h]
    return colsum, maps


def sinkscope_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                        **kwargs):
    """AttentionInterface entry: SDPA for the output; column sums handed to the active recorder."""
    handler = _HANDLER
    request = handler(module) if handler is not None else None
    if request is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("sinkscope records softmax attention without softcap or learned sinks")
    if query.shape[2] != key.shape[2]:
        raise RecorderError(
            "The sinkscope recorder needs full forward passes (query length == key length); "
            "do not call generate() or pass a KV cache inside `with Recorder(...)`."
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out, lse = sdpa_with_lse(query, key, value, attention_mask, scale)
    window = getattr(getattr(module, "config", None), "sliding_window", None)
    if lse is not None and not request.map_heads and (window is None or window >= query.shape[2]) \
            and request.device_path:
        # the device path: one Triton pass over the causal triangle (the mask is causal + padding, which the
        # recorder's 2D mask gives as request.query_valid)
        with torch.no_grad():
            colsum = kernels.colsum_triton(query.detach(), key.detach(), lse.detach(), scale, request.query_valid,
                                           block_n=128 if query.shape[-1] >= 128 else 64)  # measured on an H200
        request.deliver(colsum, {})
        return out.transpose(1, 2).contiguous(), None
    with torch.no_grad():
        colsum, maps = column_sums(query.detach(), key.detach(), None if lse is None else lse.detach(),
                                   attention_mask, request.query_valid, scale, request.map_heads,
                                   compile=request.compile)
    request.deliver(colsum, maps)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the "sinkscope" attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, sinkscope_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
