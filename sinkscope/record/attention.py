"""A streamed attention function: SDPA output plus the column sums that `attention_received` needs.

Registered with `transformers.AttentionInterface` as "sinkscope", so any model that uses the interface (Llama,
Qwen2, Mistral, ...) can record without materialising L*H*T^2 attention. On the CPU, for unpadded causal inputs,
one pass over the causal triangle in query chunks gives both the output and the column sums
(`attention_with_column_sums`). Otherwise the output comes from SDPA; where the kernel exposes its log-sum-exp
(CPU flash, CUDA flash / memory-efficient) it is reused, so the column sums need one extra QK^T pass over the
causal half only, in query chunks of O(chunk * T) memory.
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
    causal = mask is None
    if (query.device.type == "cuda" and causal and query.dtype in (torch.float16, torch.bfloat16)
            and os.environ.get("SINKSCOPE_CUDNN") != "0"):
        # cuDNN's attention: what plain SDPA picks on Hopper (about 1.5x faster than flash there). It takes
        # grouped-query K and V as they are (as plain SDPA with enable_gqa gives them to it), so they are not
        # repeated first (two copies of K and V per layer saved); repeated when this cuDNN refuses them.
        for repeat in (False, True) if groups > 1 else (True,):
            k, v = (repeat_kv(key, groups), repeat_kv(value, groups)) if repeat else (key, value)
            try:
                out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    query, k, v, None, True, 0.0, True, False, scale=scale)[:2]
                return out, lse.reshape(query.shape[:3]).float()
            except (RuntimeError, NotImplementedError):
                pass
    k, v = repeat_kv(key, groups), repeat_kv(value, groups)
    bias = None if causal else _additive(mask, query.dtype).expand(query.shape[0], -1, -1, -1)
    if query.device.type == "cuda" and causal and query.dtype in (torch.float16, torch.bfloat16):
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, k, v, 0.0, True, scale=scale)[:2]
            return out, lse.float()
        except (RuntimeError, NotImplementedError):
            pass  # flash needs Ampere or newer: before that (T4, V100) the memory-efficient kernel below
    try:
        if query.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, k, v, 0.0, causal, attn_mask=bias, scale=scale
            )
            return out, lse.float()
        if query.device.type == "cuda":
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
    fused = compile and lse is not None and mask is None and query_valid is None and not map_heads
    # one buffer for every chunk's scores, written by the matmul and exponentiated in place: no allocation per
    # chunk (CPU, SmolLM2 shapes, one layer: 110 -> 73 ms at T = 2048, 10.4 -> 5.2 ms at T = 512)
    chunk, buffer, causal_block = _chunking(query, hq, chunk_bytes, scores=not fused)
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


def attention_with_column_sums(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention output `[B, T, Hq, d]` (the AttentionInterface's layout, in the query's dtype) and the
    column sums `[B, Hq, T]` (float32) from one pass over the causal triangle, for unpadded inputs.

    Each chunk of query rows holds every key those rows see, so its softmax is exact without a log-sum-exp; the
    probabilities give both the output (`P @ V`) and the column sums (`P` summed over the chunk's rows). This
    replaces SDPA plus a second QK^T pass: on the CPU (SmolLM2 shapes, one layer) 0.73-0.79x of their time at T =
    512 and 2048; the output within 1e-5 of a float64 reference in float32 (tests/test_recorder.py). The softmax is
    torch's (one pass a row; until session 17 a max, an exp, a sum and a rescale went over the chunk's scores one
    after the other, 15% slower at T = 512 and 8% at T = 2048 in one layer). The scores buffer is kept between calls
    (`release_scratch` frees it), so a forward allocates it once, not once per layer.
    """
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    kt = (key.float() * scale).transpose(-1, -2)  # [B, Hkv, d, T]; the scale on K, a third of Q's size at GQA 3
    v = value.float()
    out = torch.empty(b, t, hkv, g, v.shape[-1], dtype=torch.float32, device=query.device)
    colsum = torch.zeros(b, hq, t, dtype=torch.float32, device=query.device)
    chunk, buffer, causal_block = _chunking(query, hq, CHUNK_BYTES)
    for i0 in range(0, t, chunk):
        i1 = min(t, i0 + chunk)
        c = i1 - i0
        s = buffer[: b * hq * c * i1].view(b, hkv, g * c, i1)
        qc = query[:, :, i0:i1].float().reshape(b, hkv, g * c, d)
        torch.matmul(qc, kt[..., :i1], out=s)
        s = s.view(b, hq, c, i1)
        s[..., i0:i1].masked_fill_(causal_block[:c, :c], float("-inf"))
        p = torch.softmax(s, dim=-1)  # one fused pass a row (max, exp and sum, scale) while the row is in cache
        colsum[..., :i1] += p.sum(dim=2)
        o = torch.matmul(p.view(b, hkv, g * c, i1), v[:, :, :i1])
        out[:, i0:i1] = o.view(b, hkv, g, c, -1).permute(0, 3, 1, 2, 4)
    return out.view(b, t, hq, -1).to(query.dtype), colsum


_SCRATCH: dict[torch.device, torch.Tensor] = {}


def _chunking(query: torch.Tensor, hq: int, chunk_bytes: int, scores: bool = True
              ) -> tuple[int, torch.Tensor | None, torch.Tensor]:
    """Query rows per chunk (at most CHUNK_ROWS, within `chunk_bytes` of float32 scores), the scores buffer for one
    chunk of every head (the reused scratch buffer; None without `scores`), and the chunk's causal block (True
    above the diagonal: masked)."""
    b, t = query.shape[0], query.shape[2]
    chunk = int(max(16, min(CHUNK_ROWS, chunk_bytes // max(1, 4 * b * hq * t))))
    buffer = _scratch(b * hq * chunk * t, query.device) if scores else None
    return chunk, buffer, torch.ones(chunk, chunk, dtype=torch.bool, device=query.device).triu_(1)


def _scratch(numel: int, device: torch.device) -> torch.Tensor:
    """A float32 buffer of at least `numel` entries on `device`, reused between calls (grown when too small)."""
    device = torch.device(device)
    buffer = _SCRATCH.get(device)
    if buffer is None or buffer.numel() < numel:
        _SCRATCH.pop(device, None)
        buffer = _SCRATCH[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return buffer


def release_scratch() -> None:
    """Free the buffers kept by `attention_with_column_sums` (the recorder calls this when it exits)."""
    _SCRATCH.clear()


def _one_pass(query, attention_mask, request, window) -> bool:
    """Whether `attention_with_column_sums` replaces SDPA + column sums: the CPU, plain causal attention (no padding,
    no sliding window shorter than the input), no full maps, no torch.compile, and nothing that needs a gradient."""
    return (query.device.type == "cpu" and attention_mask is None and request.query_valid is None
            and not request.map_heads and not request.compile and not request.device_path
            and (window is None or window >= query.shape[2]) and not query.requires_grad
            and os.environ.get("SINKSCOPE_ONE_PASS") != "0")


def detached(x: torch.Tensor) -> torch.Tensor:
    """`x.detach()` where `x` requires a gradient, else `x` itself: the same values without a dispatcher call
    (about 1 us each, several a layer, in a forward that usually runs under `torch.no_grad()` already)."""
    return x.detach() if x.requires_grad else x


def without_grad(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` with autograd off: under `torch.no_grad()` only when it is on (the recorded forward
    usually runs without it already, and entering the context costs a few microseconds a call, twice a layer)."""
    if torch.is_grad_enabled():
        with torch.no_grad():
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


def sinkscope_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                        **kwargs):
    """AttentionInterface entry: SDPA for the output; column sums handed to the active recorder."""
    handler = _HANDLER
    request = handler(module) if handler is not None else None
    if request is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        what = (f"logit softcapping (softcap={kwargs['softcap']})" if kwargs.get("softcap") is not None
                else "learned sink logits (s_aux)")
        raise RecorderError(f"{type(module).__name__} uses attention with {what}; the sinkscope recorder records "
                            "plain softmax attention only (Llama, Qwen2, Mistral, SmolLM2 and the like)")
    if query.shape[2] != key.shape[2]:
        raise RecorderError(
            "The sinkscope recorder needs full forward passes (query length == key length); "
            "do not call generate() or pass a KV cache inside `with Recorder(...)`."
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = request.window
    if _one_pass(query, attention_mask, request, window):
        out, colsum = without_grad(attention_with_column_sums, query, key, value, scale)
        request.deliver(colsum, {})
        return out, None
    out, lse = sdpa_with_lse(query, key, value, attention_mask, scale)
    if lse is not None and not request.map_heads and (window is None or window >= query.shape[2]) \
            and request.device_path:
        # the device path: one Triton pass over the causal triangle (the mask is causal + padding, which the
        # recorder's 2D mask gives as request.query_valid)
        colsum = without_grad(kernels.colsum_triton, detached(query), detached(key), detached(lse), scale,
                              request.query_valid, out=request.colsum_out, plan=request.plan,
                              layer=request.layer)
        request.deliver(None if request.colsum_out is not None else colsum, {})
        return out.transpose(1, 2).contiguous(), None
    colsum, maps = without_grad(column_sums, query.detach(), key.detach(), None if lse is None else lse.detach(),
                                attention_mask, request.query_valid, scale, request.map_heads,
                                compile=request.compile)
    request.deliver(colsum, maps)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the "sinkscope" attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, sinkscope_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
