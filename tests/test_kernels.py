"""The recorder's device path (issue 16): Triton column sums and radix-select median, and the recorder with no host
synchronisation inside the forward. Without a GPU they run under TRITON_INTERPRET=1 (set by conftest), on the CPU;
on a GPU machine the same tests run the compiled kernels."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[dev]')")

from sinkscope.errors import RecorderError  # noqa: E402
from sinkscope.record import Recorder, kernels  # noqa: E402
from sinkscope.record.attention import column_sums, sdpa_with_lse  # noqa: E402
from sinkscope.record.kernels import colsum_triton, median_abs_triton  # noqa: E402
from tests.test_recorder import padded_batch  # noqa: E402
from tests.tiny_models import tiny_llama, tiny_qwen2  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference_colsum(q, k, valid, scale) -> np.ndarray:
    """sum over valid queries q >= key of softmax(q.k * scale) over valid keys <= q, in float64."""
    q, k = q.double().cpu(), k.double().cpu()
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    t = q.shape[2]
    ok = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    if valid is not None:
        v = valid.cpu()
        ok = ok & v[:, None, None, :] & v[:, None, :, None]
    p = torch.softmax(s.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0)
    return (p * ok).sum(dim=2).numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("variant", ["cols", "rows", "rows-poly", "cols-pipe-heavy-first", "default", "pre-ampere"])
def test_column_sums_match_a_float64_reference(dtype, padded, variant, monkeypatch):
    """Every variant of the column-sum kernel (kernels.COLSUM_CONFIG) against float64. T = 150 with 16 x 32 tiles:
    key blocks whose run of whole tiles below the diagonal is long, one tile (PIPE's prologue and epilogue only)
    or empty, and a partial last tile; "default": the tiles the recorder uses (COLSUM_CONFIG's, COLSUM_FP32's for
    float32); "pre-ampere": those it uses on a GPU without tensor cores for Triton's dot (COLSUM_FP32's)."""
    if variant == "pre-ampere":
        monkeypatch.setattr(kernels, "_tensor_core_dot", lambda device: False)
        variant = "default"
    torch.manual_seed(0)
    b, hq, hkv, t, d = 3, 4, 2, 150, 24  # grouped heads, T and d off the block sizes
    q = torch.randn(b, hq, t, d, device=DEVICE).to(dtype)
    k = torch.randn(b, hkv, t, d, device=DEVICE).to(dtype)
    v = torch.randn(b, hkv, t, d, device=DEVICE).to(dtype)
    valid = None
    mask = None
    if padded:
        valid = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
        valid[1, 60:] = False  # right padding
        valid[2, :9] = False  # left padding
        mask = (valid[:, None, None, :] & torch.ones(t, t, dtype=torch.bool, device=DEVICE).tril())
    scale = d**-0.5
    _, lse = sdpa_with_lse(q, k, v, mask, scale)
    assert lse is not None
    if variant == "default":
        got = colsum_triton(q, k, lse, scale, valid).cpu().numpy()
    else:
        got = colsum_triton(q, k, lse, scale, valid, block_m=16, block_n=32, rows=variant.startswith("rows"),
                            poly=variant == "rows-poly", pipe="pipe" in variant,
                            heavy_first="heavy-first" in variant).cpu().numpy()
    want = reference_colsum(q, k, valid, scale)
    count = np.arange(t, 0, -1, dtype=np.float64)  # queries that see each key (unpadded)
    # alpha (the column sum over the queries that see the key): within 1e-5 in fp32 and 1e-3 in bf16 (issue 16)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    np.testing.assert_allclose(got / count, want / count, atol=tol)
    if valid is not None:
        assert np.all(got[1, :, 60:] == 0) and np.all(got[2, :, :9] == 0), "padding receives nothing"
    # and the torch path of the recorder agrees
    torch_path, _ = column_sums(q, k, lse, mask, valid, scale)
    np.testing.assert_allclose(got, torch_path.cpu().numpy(), rtol=1e-4, atol=1e-5 if dtype == torch.float32 else 1e-3)


def test_column_sums_take_the_fma_tiles_where_the_dot_has_no_tensor_cores(monkeypatch):
    """bf16/fp16 column sums take COLSUM_FP32's tiles below compute capability 8.0 (Triton emits no tensor-core
    instruction for tl.dot on sm_75, and the default tiles spilled there), the default ones from Ampere on;
    float32 always COLSUM_FP32's."""
    capability = {0: (7, 5), 1: (8, 0), 2: (9, 0)}
    monkeypatch.setattr(kernels, "_capability", capability.__getitem__)
    assert [kernels._tensor_core_dot(torch.device("cuda", i)) for i in range(3)] == [False, True, True]
    launched = []
    monkeypatch.setattr(kernels, "launch", lambda fn, grid, tensors, scalars, consts, **options: launched.append(
        (consts["BLOCK_M"], consts["BLOCK_N"], options["num_warps"])))
    q, k, lse = torch.zeros(1, 2, 64, 64), torch.zeros(1, 1, 64, 64), torch.zeros(1, 2, 64)
    for dtype, tensor_cores in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False),
                                (torch.float32, True)):
        monkeypatch.setattr(kernels, "_tensor_core_dot", lambda device, ok=tensor_cores: ok)
        colsum_triton(q.to(dtype), k.to(dtype), lse, 0.125)
    fma = (kernels.COLSUM_FP32["block_m"], kernels.COLSUM_FP32["block_n"], kernels.COLSUM_FP32["num_warps"])
    assert launched == [fma, (kernels.COLSUM_CONFIG["block_m"], 64, kernels.COLSUM_CONFIG["num_warps"]), fma, fma]


def test_gpu_bench_chooses_the_fastest_exact_column_sum_config(monkeypatch):
    """`bench.gpu --colsum` sets kernels.COLSUM_CONFIG (every key, the session-16 flags included) to the config
    with the smallest mean time over the shapes, skipping one that is faster but off in alpha or failed on a shape."""
    from sinkscope.bench import gpu
    from sinkscope.record import kernels

    monkeypatch.setattr(kernels, "COLSUM_CONFIG", dict(kernels.COLSUM_CONFIG))
    labels = [gpu._colsum_label(c) for c in gpu.COLSUM_CONFIGS]
    assert len(set(labels)) == len(labels)
    fast_but_off, fastest, failed = gpu.COLSUM_CONFIGS[8], gpu.COLSUM_CONFIGS[10], gpu.COLSUM_CONFIGS[3]
    rows = []
    for shape in ("a", "b"):
        for config in gpu.COLSUM_CONFIGS:
            label = gpu._colsum_label(config)
            if config == failed and shape == "b":
                rows.append(dict(shape=shape, config=label, error="OutOfResources"))
                continue
            time = {fast_but_off: 0.5, fastest: 0.6, failed: 0.4}.get(config, 0.9)
            rows.append(dict(shape=shape, config=label, colsum_over_with_lse=time,
                             alpha_diff_vs_first=2e-3 if config == fast_but_off else 1e-6))
    rows += gpu._rows({"error": "OutOfMemoryError: ...", "args": ["llama-3.2-1b", "32768"]})  # a failed stage
    assert gpu.choose_colsum(rows) == gpu._colsum_label(fastest)
    keys = ("rows", "poly", "block_m", "block_n", "num_warps", "num_stages", "heavy_first", "pipe")
    assert tuple(kernels.COLSUM_CONFIG[k] for k in keys) == fastest and set(kernels.COLSUM_CONFIG) == set(keys)


def test_gpu_bench_chooses_the_fastest_exact_radix_config(monkeypatch):
    """`bench.gpu --radix` / `--kernels` set kernels.RADIX_CONFIG for bf16 and fp16 (float32 untouched) to the
    config with the smallest total time over the shapes, skipping one that is faster but gave another median or
    failed on a shape, and never the pre-session-22 baseline row; and the configs it times are the 5-field ones
    `median_abs_triton` takes."""
    from sinkscope.bench import gpu
    from sinkscope.record import kernels

    monkeypatch.setattr(kernels, "RADIX_CONFIG", dict(kernels.RADIX_CONFIG))
    labels = [gpu.radix_label(c) for c in gpu.RADIX_CONFIGS]
    assert len(set(labels)) == len(labels) and all(len(c) == 5 for c in gpu.RADIX_CONFIGS)
    assert kernels.RADIX_CONFIG[1] in gpu.RADIX_CONFIGS  # the shipped config is among those timed
    wrong, fastest, failed = gpu.RADIX_CONFIGS[2], gpu.RADIX_CONFIGS[3], gpu.RADIX_CONFIGS[4]
    rows = []
    for d in (2048, 576):
        for config in gpu.RADIX_CONFIGS:
            if config == failed and d == 576:
                rows.append(dict(kernel="median", t=8192, d=d, config=gpu.radix_label(config), error="Refused"))
                continue
            us = {wrong: 50.0, fastest: 100.0, failed: 40.0}.get(config, 200.0)
            rows.append(dict(kernel="median", t=8192, d=d, config=gpu.radix_label(config), us=us,
                             same=config != wrong))
        rows.append(dict(kernel="median_before", t=8192, d=d, config=labels[0] + " before s22", us=1.0, same=True))
    rows += gpu._rows({"error": "AssertionError: ...", "args": ["8192", "4096"]})  # a failed stage's record
    float32 = kernels.RADIX_CONFIG[0]
    assert gpu.choose_radix(rows) == fastest
    assert kernels.RADIX_CONFIG[1] == kernels.RADIX_CONFIG[2] == fastest and kernels.RADIX_CONFIG[0] == float32


def test_exp2_on_fma_units_is_within_its_bound():
    """`exp2_fma`, the polynomial 2**x that takes half of the bf16 column sums' exponentials off the special-function
    units: relative error at most 7.5e-5 over the range the column sums use (x <= 0, down to -100), and no
    overflow or NaN far below (clamped to 2**-125)."""
    from sinkscope.record.kernels import exp2_fma

    x = torch.cat([torch.linspace(-30, 0, 200_001), torch.tensor([-0.5, -0.49999, -1e-7, -100.0, -1e4])])
    got = exp2_fma(x.to(DEVICE)).cpu().double()
    want = torch.exp2(x.double())
    rel = ((got - want) / want)[:-1].abs().max().item()
    assert rel <= 7.6e-5, rel
    assert torch.all(torch.isfinite(got)) and got[-1].item() <= 2.0**-124


@pytest.mark.parametrize("dtype,bits,onehot,spread,lean", [
    (torch.float32, 8, False, 0, True), (torch.bfloat16, 8, False, 0, True), (torch.float16, 8, False, 0, True),
    (torch.float32, 6, True, 0, True),  # float32 in six passes: a digit width that does not divide 31
    (torch.bfloat16, 5, False, 0, True), (torch.float16, 5, False, 0, True), (torch.bfloat16, 4, True, 0, True),
    (torch.float16, 4, True, 0, True),
    (torch.bfloat16, 8, False, 3, True), (torch.float32, 5, False, 2, True),  # digits counted in copies of bins
    (torch.bfloat16, 8, False, 0, False), (torch.float32, 8, False, 0, False),  # the passes before session 22
], ids=lambda v: str(v).removeprefix("torch."))
def test_radix_median_is_exact(dtype, bits, onehot, spread, lean):
    """Every digit width and counting the recorder may be configured with (kernels.RADIX_CONFIG) gives numpy's
    median bit for bit: ties, zeros, negative zeros, a massive entry, padding, and two middle values whose bit
    patterns part in the first digit (row 4: half the entries 1, half 1000), so the ranks' prefixes differ (the
    passes' second loop). The first pass counts fewer bins than the others where the digits do not divide the
    pattern's width (8-bit digits: 7 bits of bf16's 15, of float32's 31)."""
    torch.manual_seed(0)
    h = torch.randn(5, 33, 40, device=DEVICE) * torch.rand(5, 33, 40, device=DEVICE) ** 3
    h[0, 0, 7] = 3e4  # a massive activation
    h[1, :, :5] = 0.0  # zeros and ties
    h[3] = torch.round(h[3] * 4) / 4  # many ties
    h[2, 5, :4] = -0.0  # negative zeros (the sign bit is cleared)
    h[4] = torch.where(torch.arange(33 * 40, device=DEVICE).view(33, 40) % 2 == 0, 1.0, -1000.0)
    h = h.to(dtype)
    valid = torch.ones(5, 33, dtype=torch.bool, device=DEVICE)
    valid[1, 20:] = False
    valid[2, :3] = False
    for v in (None, valid):
        med, thr = median_abs_triton(h, v, block=256, thresholds=(0.5, 3.0), bits=bits, onehot=onehot,
                                     spread=spread, lean=lean)
        got = med.cpu().numpy()
        assert torch.equal(thr, torch.clamp(med * 3.0, min=0.5)), "the massive threshold, as the torch path has it"
        for i in range(5):
            rows = h[i].float().cpu().numpy() if v is None else h[i][v[i]].float().cpu().numpy()
            assert got[i] == np.float32(np.median(np.abs(rows))), (i, v is None)
    assert got[4] == 500.5
    odd = h[:1, :3, :5]  # 15 entries: the middle one
    assert median_abs_triton(odd, bits=bits, onehot=onehot, spread=spread, lean=lean)[0].item() == np.median(
        np.abs(odd.float().cpu().numpy()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda v: str(v)[6:])
def test_token_pass_takes_the_radix_final_step_exactly(dtype):
    """FOLD_RADIX_FINAL: the token pass that derives the median and the threshold from the radix passes' histograms
    itself writes the same median and threshold as the final launch, bit for bit, and the same per-token fields as
    the pass given that threshold: with and without padding, on the rows whose middle ranks part in the first digit
    (row 4) or whose median is a tie, with thresholds that put some entries over them (massive entries appended)."""
    from sinkscope.record import kernels

    torch.manual_seed(0)
    h = torch.randn(5, 9, 40, device=DEVICE) * torch.rand(5, 9, 40, device=DEVICE) ** 3
    h[0, 0, 7] = 3e4
    h[3] = torch.round(h[3] * 4) / 4
    h[4] = torch.where(torch.arange(9 * 40, device=DEVICE).view(9, 40) % 2 == 0, 1.0, -1000.0)
    h = h.to(dtype)
    a, m = (torch.randn(5, 9, 40, device=DEVICE).to(dtype) for _ in range(2))
    valid = torch.ones(5, 9, dtype=torch.bool, device=DEVICE)
    valid[1, 6:] = False
    valid[2, :3] = False
    first = valid.int().argmax(dim=1)
    for v in (None, valid):
        count = None if v is None else v.sum(dim=1, dtype=torch.int32)
        med, thr = median_abs_triton(h, v, block=256, thresholds=(0.5, 3.0), count=count)
        # one row a program, as on a GPU: the derived median written by every program of a sample
        want = kernels.token_stats_triton(h, m, a, first, thr, v, 4, 2, kernels.massive_buffers(5, 9, h.device),
                                          rows=1)
        radix = median_abs_triton(h, v, block=256, thresholds=(0.5, 3.0), count=count, final=False)
        buffers = kernels.massive_buffers(5, 9, h.device)
        got = kernels.token_stats_triton(h, m, a, first, torch.full_like(thr, float("nan")), v, 4, 2, buffers,
                                         radix=radix, rows=1)
        assert torch.equal(radix.out[0], med) and torch.equal(radix.out[1], thr)
        assert torch.equal(got, want)
        assert int(buffers[0].item()) > 0  # some entries were over the threshold the pass derived


def test_token_pass_falls_back_to_its_own_final_launch_when_the_fold_does_not_compile(monkeypatch):
    """If the token pass with the radix median's final step fails to compile, the recorder warns once and launches
    the final step on its own (the record equal to the torch path's), without giving up the int32 keys."""
    from sinkscope.record import kernels

    real = kernels._kernels().token_stats

    class Refuses:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                if kw["FROM_HIST"]:
                    raise RuntimeError("simulated compiler refusal")
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(kernels._kernels(), "token_stats", Refuses())
    monkeypatch.setattr(kernels, "_FOLD_FAILED", [])
    monkeypatch.setattr(kernels, "_NARROW_KEYS_FAILED", [])
    model = tiny_llama().to(DEVICE)
    thresholds = {"abs_threshold": 0.0, "rel_threshold": 3.0}
    with pytest.warns(RuntimeWarning, match="final step"):
        fast = _record(model, True, monkeypatch, **thresholds)
    assert kernels._FOLD_FAILED and not kernels._NARROW_KEYS_FAILED
    slow = _record(model, False, monkeypatch, **thresholds)
    for x, y in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(x.median_abs, y.median_abs)
        np.testing.assert_array_equal(x.top_features, y.top_features)
        assert len(x.massive) == len(y.massive) > 0


def _record(model, device_path: bool, monkeypatch, **kwargs):
    monkeypatch.setenv("SINKSCOPE_TRITON", "1" if device_path else "0")
    ids, mask = padded_batch()
    with Recorder(model, **kwargs) as rec:
        model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE))
    return rec.samples


@pytest.mark.parametrize("factory,rows", [(tiny_llama, 1), (tiny_qwen2, 2)], ids=["llama", "qwen2-2-rows"])
def test_recorder_device_path_matches_the_torch_path(factory, rows, monkeypatch):
    from sinkscope.record import kernels

    monkeypatch.setattr(kernels, "token_config", lambda block_d: (rows, 2))  # rows per token-stats program
    model = factory().to(DEVICE)
    thresholds = {"abs_threshold": 0.0, "rel_threshold": 3.0}  # low, so that the tiny model has massive entries
    fast = _record(model, True, monkeypatch, **thresholds)
    slow = _record(model, False, monkeypatch, **thresholds)
    assert sum(len(s.massive) for s in slow) > 10
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a.attention_received, b.attention_received, atol=1e-5)
        np.testing.assert_array_equal(a.median_abs, b.median_abs)
        np.testing.assert_allclose(a.bos_cosine, b.bos_cosine, atol=1e-6)
        np.testing.assert_array_equal(a.top_features, b.top_features)
        ma = a.massive.sort_values(["layer", "token", "feature"], ignore_index=True)
        mb = b.massive.sort_values(["layer", "token", "feature"], ignore_index=True)
        assert len(ma) == len(mb)
        np.testing.assert_array_equal(ma[["layer", "token", "feature"]].to_numpy(),
                                      mb[["layer", "token", "feature"]].to_numpy())
        np.testing.assert_allclose(ma[["value", "attn_share", "mlp_share"]].to_numpy(dtype=float),
                                   mb[["value", "attn_share", "mlp_share"]].to_numpy(dtype=float), rtol=1e-5)


def test_device_path_falls_back_to_torch_median_when_radix_does_not_compile(monkeypatch):
    """Should the radix passes fail to compile on some GPU, the device path warns and takes torch's exact median
    for the rest of the process: the record equals the torch path's (median, threshold, massive entries)."""
    from sinkscope.record import kernels

    class Refuses:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                raise RuntimeError("simulated compiler refusal")
            return launch

    monkeypatch.setattr(kernels._kernels(), "radix_pass", Refuses())
    monkeypatch.setattr(kernels, "_RADIX_FAILED", [])
    model = tiny_llama().to(DEVICE)
    thresholds = {"abs_threshold": 0.0, "rel_threshold": 3.0}
    with pytest.warns(RuntimeWarning, match="radix median"):
        fast = _record(model, True, monkeypatch, **thresholds)
    slow = _record(model, False, monkeypatch, **thresholds)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(a.median_abs, b.median_abs)
        assert len(a.massive) == len(b.massive) > 0


def test_device_path_refuses_an_overflowing_massive_buffer(monkeypatch):
    from sinkscope.record import reduce

    model = tiny_llama().to(DEVICE)
    monkeypatch.setenv("SINKSCOPE_TRITON", "1")
    monkeypatch.setattr(reduce, "MASSIVE_MIN_CAP", 1024)
    ids = torch.randint(3, 128, (1, 20), device=DEVICE)  # 3 layers x 20 tokens x 64 features, over the 1,024 kept
    with pytest.raises(RecorderError, match="3840 massive entries, more than the 1024"), \
            Recorder(model, abs_threshold=0.0, rel_threshold=0.0):  # every entry is "massive"
        model(input_ids=ids)


def test_token_chunks_give_the_same_record(monkeypatch):
    """The torch path's reductions run over token chunks (bounded float32 temporaries at long context); tiny
    chunks (5 tokens of the 3 x 24 x 64 batch, so that chunk edges cut samples and padding) must record exactly
    what one chunk does. (The device path reads h in its own dtype in one Triton pass and has no chunks.)"""
    device_path = False
    from sinkscope.record import reduce

    model = tiny_llama().to(DEVICE)
    thresholds = {"abs_threshold": 0.0, "rel_threshold": 3.0}
    whole = _record(model, device_path, monkeypatch, **thresholds)
    monkeypatch.setattr(reduce, "CHUNK_ELEMENTS", 3 * 5 * 64)
    chunked = _record(model, device_path, monkeypatch, **thresholds)
    assert sum(len(s.massive) for s in whole) > 10
    for a, b in zip(whole, chunked, strict=True):
        for field in ("attention_received", "bos_cosine", "max_abs", "median_abs", "feature_max_abs",
                      "mlp_feature_max_abs", "top_features", "top_values", "mlp_top_features", "mlp_top_values"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
        assert a.massive.equals(b.massive)


@pytest.mark.parametrize("dtype,rows", [(torch.float32, 1), (torch.bfloat16, 1), (torch.bfloat16, 4),
                                        (torch.float16, 1)])
def test_token_stats_kernel_against_numpy(dtype, rows):
    """The one-pass per-token kernel of the device path on its own: ties (values rounded to quarters) resolved
    to the smaller feature index, signed values, cos to BOS, and the massive entries of real tokens only, against
    a numpy reference; D off the power-of-two block."""
    from sinkscope.record.kernels import massive_buffers, token_stats_triton, unpack_token_stats

    torch.manual_seed(0)
    b, t, d, k = 2, 7, 40, 8
    h, a, m = (torch.round(torch.randn(b, t, d, device=DEVICE) * 8) / 4 for _ in range(3))
    h[1, 3, 11] = -50.0  # a massive entry (negative)
    h[0, 2, 5] = 40.0
    h[1, 0, 2] = 45.0  # on a padded token: not kept
    h, a, m = h.to(dtype), a.to(dtype), m.to(dtype)
    valid = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
    valid[1, :2] = False
    first = valid.int().argmax(dim=1)  # the kernel reads each sample's BOS row of h itself
    h0 = h[torch.arange(b), first].float()
    thr = torch.tensor([30.0, 30.0], device=DEVICE)
    buffers = massive_buffers(b, t, h.device)
    packed = token_stats_triton(h, m, a, first, thr, valid, k, 3, buffers, rows=rows)  # 7 tokens: a partial block
    got = {key: x.cpu().numpy() for key, x in unpack_token_stats(packed, b, t, k).items()}
    hn, mn = h.float().cpu().numpy(), m.float().cpu().numpy()
    for name, x in (("top", hn), ("mlp_top", mn)):
        order = np.lexsort((np.broadcast_to(np.arange(d), x.shape), -np.abs(x)), axis=-1)[..., :k]
        np.testing.assert_array_equal(got[f"{name}_features"], order)
        np.testing.assert_array_equal(got[f"{name}_values"], np.take_along_axis(x, order, axis=-1))
    np.testing.assert_array_equal(got["max_abs"], np.abs(hn).max(axis=-1))
    h0n = h0.cpu().numpy()[:, None, :]
    cos = (hn * h0n).sum(-1) / np.sqrt((hn * hn).sum(-1) * (h0n * h0n).sum(-1))
    np.testing.assert_allclose(got["bos_cosine"], cos, atol=1e-6)
    count, ent_i, ent_v = (x.cpu().numpy() for x in buffers)
    entries = sorted(map(tuple, ent_i[: count[0]].tolist()))
    assert entries == [(3, 0, 2, 5), (3, 1, 3, 11)]
    values = {tuple(i): v for i, v in zip(ent_i[: count[0]].tolist(), ent_v[: count[0]].tolist(), strict=True)}
    np.testing.assert_array_equal(values[(3, 1, 3, 11)], [-50.0, a[1, 3, 11].item(), m[1, 3, 11].item()])
    if dtype != torch.float32:  # the int32 keys of 16-bit formats rank exactly as int64 keys over float32 bits
        wide = token_stats_triton(h, m, a, first, thr, valid, k, 3, massive_buffers(b, t, h.device), rows=rows,
                                  narrow_keys=False)
        assert torch.equal(wide, packed)


def test_token_pass_falls_back_to_int64_keys_when_int32_keys_do_not_compile(monkeypatch):
    """The int32-key token pass is newer than the GPUs it was measured on: if it fails to compile, the recorder
    warns once and uses int64 keys (the same result) instead of failing the recording."""
    from sinkscope.record import kernels

    real = kernels._kernels().token_stats

    class Refuses:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                if kw["FMT"] or kw["MLP_FMT"]:
                    raise RuntimeError("simulated compiler refusal")
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(kernels._kernels(), "token_stats", Refuses())
    monkeypatch.setattr(kernels, "_NARROW_KEYS_FAILED", [])
    torch.manual_seed(0)
    h, a, m = (torch.randn(1, 5, 24, device=DEVICE).to(torch.bfloat16) for _ in range(3))
    first, thr = torch.zeros(1, dtype=torch.long, device=DEVICE), torch.full((1,), 1e4, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="int64 keys"):
        got = kernels.token_stats_triton(h, m, a, first, thr, None, 4, 0, kernels.massive_buffers(1, 5, h.device))
    assert kernels._NARROW_KEYS_FAILED
    monkeypatch.setattr(kernels._kernels(), "token_stats", real)
    want = kernels.token_stats_triton(h, m, a, first, thr, None, 4, 0, kernels.massive_buffers(1, 5, h.device),
                                      narrow_keys=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("padded", [False, True])
def test_feature_max_kernel_is_exact(padded):
    """The per-feature max over real tokens of |h| and |mlp_out| (one launch, atomic max on the bit patterns of
    |x|) against torch, bit for bit, with token runs that cut the sequence (block_t 4, T 37), negative values,
    padding that holds the largest entries, and a NaN that must propagate as in torch's max."""
    from sinkscope.record.kernels import colmax_triton

    torch.manual_seed(0)
    b, t, d = 3, 37, 50
    h, m = (torch.randn(b, t, d, device=DEVICE).to(torch.bfloat16) for _ in range(2))
    h[0, 5, 7] = -900.0
    valid = None
    if padded:
        valid = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
        valid[1, :6] = False
        valid[2, 30:] = False
        h[1, 2, 3] = 5000.0  # on padding: not counted
        m[2, 33, 9] = -7000.0
    h[2, 10, 11] = float("nan")
    got = colmax_triton(h, m, valid, block_t=4, block_d=16).cpu()
    for i, x in enumerate((h, m)):
        x = x.float()
        if valid is not None:
            x = x.masked_fill(~valid[..., None], 0)
        want = torch.linalg.vector_norm(x, ord=float("inf"), dim=1).cpu()
        assert torch.equal(got[i].isnan(), want.isnan())
        assert torch.equal(got[i].nan_to_num(-1), want.nan_to_num(-1)), i
    assert got[0, 0, 7] == 900.0 and got[0, 2, 11].isnan()


def test_host_blocks_are_separate_views_of_one_aligned_block():
    """The device path's per-forward host fields (`recorder._host_blocks`): one 2 MiB-aligned block (huge pages),
    carved into C-contiguous fields of the right shapes and dtypes that do not overlap."""
    from sinkscope.record.recorder import _HOST_ALIGN, _host_blocks

    blocks = _host_blocks(3, 17, 4, 5, 33, 8)
    assert blocks["alpha"].shape == (3, 4, 5, 17) and blocks["top_features"].dtype == np.int32
    assert blocks["alpha"].ctypes.data % _HOST_ALIGN == 0
    assert len({id(a.base) for a in blocks.values()}) == 1
    for i, a in enumerate(blocks.values()):
        assert a.flags.c_contiguous
        a[...] = i + 1
    for i, (name, a) in enumerate(blocks.items()):
        assert (a == i + 1).all(), name


def test_layer_buffer_round_trip():
    """The recorder's one buffer per layer: the five device reductions write their parts of it, and the host
    copy unpacks into the same fields as the separate kernels give (median, feature maxima, per-token fields,
    column sums)."""
    from sinkscope.record import kernels

    torch.manual_seed(0)
    b, t, d, hq, k = 2, 19, 40, 4, 8
    h, a, m = (torch.randn(b, t, d, device=DEVICE) for _ in range(3))
    h[1, 4, 6] = 80.0
    layout = kernels.layer_layout(b, t, d, hq, k)
    buf = kernels.layer_buffer(layout, torch.device(DEVICE))
    colsum = torch.rand(b, hq, t, device=DEVICE)
    kernels.colsum_view(buf, layout).copy_(colsum)
    first = torch.zeros(b, dtype=torch.long, device=DEVICE)
    massive = kernels.massive_buffers(b, t, h.device)
    host = kernels.reduce_layer_device(h, a, m, buf, layout, first, None, None, 2, (0.0, 20.0), massive).cpu()
    fields, got_colsum = kernels.unpack_layer(host, layout)
    assert torch.equal(got_colsum, colsum.cpu())
    med, _ = median_abs_triton(h)
    assert torch.equal(fields["median_abs"], med.cpu())
    assert torch.equal(fields["feature_max_abs"], h.abs().amax(dim=1).cpu())
    assert torch.equal(fields["mlp_feature_max_abs"], m.abs().amax(dim=1).cpu())
    separate = kernels.unpack_token_stats(kernels.token_stats_triton(
        h, m, a, first, torch.full((b,), 20.0, device=DEVICE) * med, None, k, 2,
        kernels.massive_buffers(b, t, h.device)), b, t, k)
    for key, x in separate.items():
        assert torch.equal(fields[key], x.cpu()), key
    count = int(massive[0].item())
    assert count >= 1 and (1, 4, 6) in {tuple(r[1:]) for r in massive[1][:count].tolist()}
    with pytest.raises(RecorderError, match=r"block 2 output has shape \(2, 19, 41\)"):
        kernels.reduce_layer_device(torch.zeros(b, t, d + 1, device=DEVICE), a, m, buf, layout, first, None, None, 2,
                                    (0.0, 20.0), massive)


def test_device_path_with_a_full_map_layer(monkeypatch):
    """A layer whose full attention map is asked for takes the torch column sums inside the device path; its
    alpha (delivered apart from the layer buffer) must still land in the right place."""
    model = tiny_llama().to(DEVICE)
    fast = _record(model, True, monkeypatch, attention_maps=[(1, 0)])
    slow = _record(model, False, monkeypatch, attention_maps=[(1, 0)])
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a.attention_received, b.attention_received, atol=1e-5)
        np.testing.assert_allclose(a.attention_maps[(1, 0)], b.attention_maps[(1, 0)], atol=1e-6)
        n = len(a.tokens)  # alpha recomputed from the map: the mean over the n - k queries that see key k
        np.testing.assert_allclose(a.attention_maps[(1, 0)].sum(axis=0) / np.arange(n, 0, -1),
                                   a.attention_received[1, 0], atol=1e-5)


def test_gpu_bench_launch_stage_runs(monkeypatch):
    """`bench.gpu --launch` (the host cost of each per-layer call, for the next GPU session) runs every call without
    an error, here under the interpreter at a tiny length."""
    from sinkscope.bench import gpu

    rows = gpu.launch_bench(t=16, n=1, device=DEVICE)
    assert len(rows) == (16 if DEVICE == "cuda" else 8), rows  # both launch modes on CUDA
    assert all("error" not in r and r["host_us"] > 0 for r in rows), rows


def test_gpu_bench_unpack_stage_runs():
    """`bench.gpu --unpack` (the end-of-forward unpacking, no GPU needed) times both fills at the issue's shapes."""
    from sinkscope.bench import gpu

    rows = gpu.unpack_bench(reps=1)
    assert len(rows) == 4 and all(r["fresh_ms"] > 0 and r["touched_ms"] > 0 and r["touch_ms"] > 0
                                  and r["touched_numpy_ms"] > 0 for r in rows)


@pytest.mark.parametrize("mixed", [True, False], ids=["some-layers-on-the-torch-path", "all-in-buffer"])
def test_unpacking_with_torch_equals_numpy(monkeypatch, mixed):
    """recorder.UNPACK_TORCH: the end-of-forward unpacking through torch's (multi-threaded) copies and division
    fills every sample-major field exactly as numpy's did, in runs of layers, padded counts, B > 1, and with layers
    whose column sums took the torch path (left alone)."""
    from sinkscope.record import kernels, recorder

    b, t, n_layers, heads, hidden = 3, 37, 5, 4, 48
    layout = kernels.layer_layout(b, t, hidden, heads, 8)
    torch.manual_seed(0)
    landing = torch.randn(n_layers, layout.total - layout.feat)
    valid = np.ones((b, t), dtype=bool)
    valid[1, :5] = valid[2, 30:] = False
    count = recorder._query_count(valid)
    in_buffer = [True, False, True, True, False] if mixed else [True] * n_layers
    filled = []
    for flag in (False, True):
        monkeypatch.setattr(recorder, "UNPACK_TORCH", flag)
        out = recorder._host_blocks(b, t, n_layers, heads, hidden, 8)
        for x in out.values():
            x[...] = -7  # what the unpacking must overwrite, or (the torch path's alpha) leave
        events = [None] * n_layers
        recorder._touch_pages(out)
        recorder._unpack_layers(landing, events, layout, out, count, in_buffer, touched=True)
        filled.append(out)
    for key in filled[0]:
        assert np.array_equal(filled[0][key], filled[1][key]), key
    assert np.all(filled[1]["alpha"][:, 1] == -7) == mixed  # a torch-path layer's alpha is not written here
    assert not np.all(filled[1]["top_values"] == -7)


class _FakeParam:
    def __init__(self, name, default=None, has_default=False):
        self.name, self.default, self.has_default = name, default, has_default


class _FakeJit:
    """A stand-in for a `triton.jit` function (its `params`, `fn[grid](...)` returning a compiled kernel) that
    records what each launch received: through "Triton" (its dispatch) or straight to the compiled kernel."""

    def __init__(self, compiles: bool = True, tensors_only: bool = False):
        self.params = [_FakeParam(n) for n in ("x_ptr", "n", "scale", "BLOCK")] + [_FakeParam("FLAG", 7, True)]
        self.calls: list[tuple] = []
        self.compiles = compiles
        self.tensors_only = tensors_only  # a launcher that refuses addresses given as integers

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("triton", grid, args, kwargs))
            return self._compiled() if self.compiles else None

        return run

    def _compiled(self):
        jit = self

        class Compiled:
            function = object()

            def __getitem__(self, grid):
                def run(*args, stream=None):
                    if jit.tensors_only and not isinstance(args[0], torch.Tensor):
                        raise TypeError("Pointer argument must have a data_ptr method")
                    jit.calls.append(("direct", grid, args, stream))

                return run

        return Compiled()


def test_launch_reuses_the_compiled_kernel_only_for_the_same_specialisation(monkeypatch):
    """`kernels.launch`: the first call with a key goes through Triton's dispatch; a repeat with the same dtypes,
    alignment and scalar values goes to the compiled kernel with every parameter in the kernel's order (the
    constexpr left out taking its default) and a 3-D grid; another alignment, scalar or constexpr goes through
    Triton again. Off under the interpreter and with FAST_LAUNCH False."""
    from sinkscope.record import kernels

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(kernels, "_stream", lambda device: 123)
    monkeypatch.setattr(kernels, "_LAUNCHES", {})
    fn = _FakeJit()
    x = torch.zeros(64)
    kernels.launch(fn, (4,), (x,), (32, 0.5), {"BLOCK": 16}, num_warps=4)
    kernels.launch(fn, (4,), (x,), (32, 0.5), {"BLOCK": 16}, num_warps=4)
    assert [c[0] for c in fn.calls] == ["triton", "direct"]
    assert fn.calls[0][2:] == ((x, 32, 0.5), {"BLOCK": 16, "num_warps": 4})
    _, grid, args, stream = fn.calls[1]
    assert grid == (4, 1, 1) and args == (x.data_ptr(), 32, 0.5, 16, 7) and stream == 123  # the address, as an int
    kernels.launch(fn, (4, 2), (torch.zeros(64),), (32, 0.5), {"BLOCK": 16}, num_warps=4)  # another tensor, same spec
    assert fn.calls[-1][0] == "direct" and fn.calls[-1][1] == (4, 2, 1)
    for tensors, scalars, consts, options, cached in (
            ((x[1:],), (32, 0.5), {"BLOCK": 16}, {"num_warps": 4}, True),  # 4-byte aligned only
            ((x[2:],), (32, 0.5), {"BLOCK": 16}, {"num_warps": 4}, True),  # 8-byte aligned
            ((x.double(),), (32, 0.5), {"BLOCK": 16}, {"num_warps": 4}, True),  # another dtype
            ((x,), (33, 0.5), {"BLOCK": 16}, {"num_warps": 4}, True),  # another integer
            ((x,), (32.0, 0.5), {"BLOCK": 16}, {"num_warps": 4}, True),  # a float where an int was
            ((x,), (32, 0.5), {"BLOCK": 32}, {"num_warps": 4}, True),  # another constexpr
            ((x,), (32, 0.5), {"BLOCK": 16}, {"num_warps": 8}, True)):  # another option
        n = len(fn.calls)
        kernels.launch(fn, (4,), tensors, scalars, consts, **options)
        kernels.launch(fn, (4,), tensors, scalars, consts, **options)
        assert [c[0] for c in fn.calls[n:]] == ["triton", "direct" if cached else "triton"], (scalars, consts)
    n = len(fn.calls)
    kernels.launch(fn, (4,), (x,), (32, 0.5), {"BLOCK": 16, "NOT_A_PARAM": 1})  # never cached: Triton each time
    kernels.launch(fn, (4,), (x,), (32, 0.5), {"BLOCK": 16, "NOT_A_PARAM": 1})
    assert [c[0] for c in fn.calls[n:]] == ["triton", "triton"]
    none = _FakeJit(compiles=False)  # Triton returned no compiled kernel (as the interpreter does)
    kernels.launch(none, (4,), (x,), (32, 0.5), {"BLOCK": 16})
    kernels.launch(none, (4,), (x,), (32, 0.5), {"BLOCK": 16})
    assert [c[0] for c in none.calls] == ["triton", "triton"]
    for setting in ({"env": "1"}, {"flag": False}):
        fresh = _FakeJit()
        with monkeypatch.context() as m:
            if "env" in setting:
                m.setenv("TRITON_INTERPRET", setting["env"])
            else:
                m.setattr(kernels, "FAST_LAUNCH", setting["flag"])
            kernels.launch(fresh, (4,), (x,), (32, 0.5), {"BLOCK": 16})
            kernels.launch(fresh, (4,), (x,), (32, 0.5), {"BLOCK": 16})
        assert [c[0] for c in fresh.calls] == ["triton", "triton"], setting


def test_launch_hands_tensors_to_a_launcher_that_refuses_integer_addresses(monkeypatch):
    """A compiled kernel whose launcher refuses an address given as an integer gets the same call with the tensors
    at once (nothing lost, one launch each), and every later direct launch gets tensors."""
    from sinkscope.record import kernels

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(kernels, "_stream", lambda device: 0)
    monkeypatch.setattr(kernels, "_LAUNCHES", {})
    monkeypatch.setattr(kernels, "_INT_POINTERS_FAILED", [])
    fn, x = _FakeJit(tensors_only=True), torch.zeros(64)
    for _ in range(3):
        kernels.launch(fn, (4,), (x,), (32, 0.5), {"BLOCK": 16})
    assert [c[0] for c in fn.calls] == ["triton", "direct", "direct"]
    assert all(c[2][0] is x for c in fn.calls[1:]) and len(kernels._INT_POINTERS_FAILED) == 1


def test_launch_cache_is_bounded(monkeypatch):
    from sinkscope.record import kernels

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(kernels, "_stream", lambda device: 0)
    monkeypatch.setattr(kernels, "_LAUNCHES", {})
    monkeypatch.setattr(kernels, "_LAUNCH_CAP", 3)
    fn, x = _FakeJit(), torch.zeros(4)
    for n in range(7):
        kernels.launch(fn, (1,), (x,), (n, 0.5), {"BLOCK": 16})
        assert 1 <= len(kernels._LAUNCHES) <= 3


def test_prefault_touches_every_page_of_the_host_block():
    """`_touch_pages` (the CUDA path's worker thread) writes one byte of every 4 KiB page of the whole block that
    `_host_blocks` carves the fields from, and nothing else."""
    from sinkscope.record.recorder import _PAGE, _host_blocks, _touch_pages

    blocks = _host_blocks(2, 300, 3, 4, 96, 8)
    raw = blocks["alpha"]
    while raw.base is not None:
        raw = raw.base
    raw = raw.reshape(-1).view(np.uint8)
    raw[:] = 0xFF
    _touch_pages(blocks)
    assert (raw[::_PAGE] == 0).all() and raw.size > 20 * _PAGE
    rest = np.ones(raw.size, dtype=bool)
    rest[::_PAGE] = False
    assert (raw[rest] == 0xFF).all()


def test_prefault_pool_is_per_process():
    """A forked child must not queue work on its parent's worker thread, which does not exist there."""
    import os

    from sinkscope.record import recorder

    pool = recorder._prefault_pool()
    assert recorder._prefault_pool() is pool and pool.submit(lambda: 7).result(timeout=10) == 7
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own pool, which runs work
        try:
            child = recorder._prefault_pool()
            ok = child is not pool and child.submit(lambda: 7).result(timeout=10) == 7
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    import signal
    import time

    deadline = time.monotonic() + 60  # a child that hangs is killed and fails the test, never stalls the suite
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's prefault pool did not run its work within 60 s")
        time.sleep(0.05)
    os.close(write)
    assert os.read(read, 1) == b"1"


@pytest.mark.parametrize("dtype,shapes,replayed,rel", [
    (torch.float32, ((3, 24, True), (3, 10, True)), 2 + 2, 3.0),
    (torch.bfloat16, ((2, 16, True), (2, 16, True), (2, 16, False)), 2 + 3 + 2, 1000.0)],
    ids=["fp32-padded-two-shapes", "bf16-repeated-then-unpadded"])
def test_layer_plan_repeats_the_first_layer_exactly(dtype, shapes, replayed, rel, monkeypatch):
    """`kernels.LayerPlan`: every layer after the one that recorded it repeats its launches with its own tensors
    (counted), and the record is the one the wrappers give at every layer, bit for bit. In fp32 with padding, many
    massive entries and two forwards of different shapes in one recorder (a new plan for the second); in bf16
    three forwards: the second of the same shape and padding replays all its layers (the recorder kept the plan
    and its buffers), the third, of the same shape without padding, gets its own."""
    from sinkscope.record import kernels

    monkeypatch.setenv("SINKSCOPE_TRITON", "1")
    model = tiny_llama().to(DEVICE, dtype)
    ids, mask = padded_batch()
    replays = {"reductions": 0, "colsum": 0}
    for name in ("reductions", "colsum"):
        original = getattr(kernels.LayerPlan, f"replay_{name}")

        def counted(self, *args, _original=original, _name=name):
            done = _original(self, *args)
            replays[_name] += done
            return done

        monkeypatch.setattr(kernels.LayerPlan, f"replay_{name}", counted)

    def record(plan: bool, forwards):
        monkeypatch.setattr(kernels, "LAYER_PLAN", plan)
        # the repeated forward's layers also go through LaunchGraphs (on the CPU a stand-in capture, though the
        # heap hands out other addresses each forward, so they launch: the replay is tested below; on a GPU real
        # CUDA graphs)
        graphs = plan and len(forwards) > 2
        monkeypatch.setattr(kernels, "GRAPH_CAPTURE", _Graph if graphs and DEVICE == "cpu" else None)
        monkeypatch.setattr(kernels, "CUDA_GRAPHS", graphs and DEVICE == "cuda")
        with Recorder(model, abs_threshold=0.0, rel_threshold=rel) as rec:
            for b, n, padded in forwards:
                m = mask[:b, :n] if padded else torch.ones(b, n, dtype=mask.dtype)
                model(input_ids=ids[:b, :n].to(DEVICE), attention_mask=m.to(DEVICE))
        return rec.samples

    planned = record(True, shapes)
    assert replays == {"reductions": replayed, "colsum": replayed}
    unique = list(dict.fromkeys(shapes))  # the wrappers' record of a repeated forward is the first one's
    done = record(False, unique)
    assert replays == {"reductions": replayed, "colsum": replayed}
    assert sum(len(s.massive) for s in done) > (10 if rel < 10 else -1)
    starts = np.cumsum([0] + [b for b, _, _ in unique])
    plain = [s for shape in shapes for s in done[starts[unique.index(shape)]: starts[unique.index(shape)] + shape[0]]]
    for a, b in zip(planned, plain, strict=True):
        for field in ("attention_received", "bos_cosine", "max_abs", "median_abs", "top_features", "top_values",
                      "mlp_top_features", "mlp_top_values", "feature_max_abs", "mlp_feature_max_abs"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
        assert a.massive.equals(b.massive)


def test_layer_plan_takes_the_wrappers_for_a_layer_unlike_the_first(monkeypatch):
    """A layer whose block output differs in layout from the first layer's (here: strided) is not replayed: the
    recorded scalars hold the first layer's strides."""
    from sinkscope.record import kernels

    plan = kernels.LayerPlan()
    h, a, m = (torch.randn(1, 8, 32) for _ in range(3))
    plan.reductions, plan._inputs = [], (kernels._layout_of(h), kernels._layout_of(a), kernels._layout_of(m), "buf")
    assert plan.replay_reductions(h.clone(), a, m, 1, "buf")
    strided = torch.randn(1, 8, 64)[..., ::2]
    assert not plan.replay_reductions(strided, a, m, 1, "buf")
    assert not plan.replay_reductions(h.double(), a, m, 1, "buf")
    assert not plan.replay_reductions(h.clone(), a, m, 1, "another buffer")


def test_layer_plan_keeps_no_tensor_of_the_first_layer():
    """What the plan keeps for the rest of a forward holds the buffers, not the first layer's h, attn_out, mlp_out,
    Q, K or log-sum-exp (at the 135M shape and T=32768 those would be 6 x 38 MB against the 10 % memory target)."""
    import gc
    import weakref

    from sinkscope.record import kernels

    kern = kernels._kernels()
    plan = kernels.LayerPlan()
    h, a, m = (torch.randn(1, 8, 32) for _ in range(3))
    q, k, lse = torch.randn(1, 2, 8, 16), torch.randn(1, 1, 8, 16), torch.randn(1, 2, 8)
    buf, extra = torch.zeros(64), torch.zeros(4)
    plan.keep_reductions([(kern.radix_pass, (1, 1), (h.reshape(1, -1), extra, extra, buf), (256, 1), {}, {}),
                          (kern.token_stats, (8, 1), (h, a, m, extra, buf), (0.0, 1.0, 8, 5, 1000), {}, {}),
                          (kern.colmax, (1, 1, 1), (h, m, extra, buf), (8, 32), {}, {})], h, a, m, 5, buf)
    plan.keep_colsum([(kern.colsum, (1, 2), (q, k, lse, extra, buf), (1, 2), {}, {})],
                     tuple(kernels._layout_of(x) for x in (q, k, lse)), 0.25, None, buf)
    assert plan.reductions is not None and plan.colsum is not None
    refs = [weakref.ref(x) for x in (h, a, m, q, k, lse)]
    del h, a, m, q, k, lse
    gc.collect()
    assert all(r() is None for r in refs)


class _Graph:
    """A stand-in for a captured CUDA graph on the CPU: it keeps each call's tensors as their addresses and
    layouts, as a graph does, and replays the calls on whatever memory sits at those addresses then."""

    def __init__(self, calls):
        self.calls = [(fn, grid, tuple((t.data_ptr(), t.dtype, t.shape, t.stride()) for t in tensors), scalars,
                       consts, options) for fn, grid, tensors, scalars, consts, options in calls]

    @staticmethod
    def _at(ptr, dtype, shape, stride):
        import ctypes

        n = 1 + sum((s - 1) * st for s, st in zip(shape, stride, strict=True)) if all(shape) else 0
        size = torch.empty(0, dtype=dtype).element_size()
        raw = (ctypes.c_char * max(1, n * size)).from_address(ptr)
        return torch.frombuffer(raw, dtype=dtype, count=n).as_strided(shape, stride)

    def replay(self):
        from sinkscope.record import kernels

        kernels._execute([(fn, grid, tuple(self._at(*t) for t in tensors), scalars, consts, options)
                          for fn, grid, tensors, scalars, consts, options in self.calls])


def test_launch_graphs_replay_only_the_inputs_they_were_captured_with(monkeypatch):
    """`kernels.LaunchGraphs.run`: a layer's calls are launched the first time its inputs are seen, captured and
    replayed when the same layer sees the same inputs again, replayed from then on; other inputs launch (and are
    captured at their second time). A capture that is "not now" (None) is tried again; one that raises warns once,
    launches the calls and turns graphs off."""
    from sinkscope.record import kernels

    monkeypatch.setattr(kernels, "_GRAPHS_FAILED", [])
    x = torch.ones(8)
    calls = [(None, None, (x,), (), {}, {})]  # zero x
    captured = []

    def capture(c):
        captured.append(c)
        return SimpleGraph()

    class SimpleGraph:
        replays = 0

        def replay(self):
            SimpleGraph.replays += 1

    graphs = kernels.LaunchGraphs(torch.device("cpu"), capture)

    def step(inputs, key=(0, "reductions")):
        x.fill_(1.0)
        graphs.run(key, inputs, lambda: calls)
        return "launched" if x.sum() == 0 else "replayed"

    assert [step((1, 100)), step((1, 100)), step((1, 100)), step((1, 200)), step((1, 200)), step((1, 100))] == [
        "launched", "replayed", "replayed", "launched", "replayed", "launched"]
    assert step((1, 100), key=(1, "reductions")) == "launched"  # another layer: its own entry
    assert len(captured) == 2 and SimpleGraph.replays == 3 and graphs.captures == 2 and graphs.replays == 3
    later = kernels.LaunchGraphs(torch.device("cpu"), lambda c: None)  # not now: launched, asked again next time
    asked = []
    later._capture = lambda c: asked.append(c)
    x.fill_(1.0)
    for _ in range(3):
        later.run((0, "colsum"), (5,), lambda: calls)
    assert len(asked) == 2 and later.captures == 0

    def broken(c):
        raise RuntimeError("operation not permitted when stream is capturing")

    failing = kernels.LaunchGraphs(torch.device("cpu"), broken)
    with pytest.warns(RuntimeWarning, match="CUDA graph"):
        assert [step2 for step2 in (failing.run((0, "x"), (1,), lambda: calls), failing.run((0, "x"), (1,),
                                                                                         lambda: calls))]
    assert kernels._GRAPHS_FAILED and failing.captures == 0
    x.fill_(1.0)
    graphs.run((0, "y"), (9,), lambda: calls)
    graphs.run((0, "y"), (9,), lambda: calls)  # graphs are off after a failure: launched, never captured
    assert x.sum() == 0 and graphs.captures == 2
    monkeypatch.setattr(kernels, "_GRAPHS_FAILED", [])

    class Refused:
        def replay(self):
            raise RuntimeError("CUDA error: invalid argument")

    refusing = kernels.LaunchGraphs(torch.device("cpu"), lambda c: Refused())
    refusing.run((0, "z"), (1,), lambda: calls)
    x.fill_(1.0)
    with pytest.warns(RuntimeWarning, match="CUDA graph"):
        refusing.run((0, "z"), (1,), lambda: calls)  # captured, its replay refused: launched instead
    assert x.sum() == 0 and refusing.replays == 0 and kernels._GRAPHS_FAILED


@pytest.mark.skipif(DEVICE == "cuda", reason="the stand-in graph reads host memory at the captured addresses; on a "
                    "GPU, test_recorder's test_cuda_graphs_replay_the_same_record replays real graphs")
def test_graphs_replay_a_layers_reductions_exactly(monkeypatch):
    """The recorder's reductions through a plan with graphs: launched, then captured and replayed (a stand-in graph
    that, like a CUDA graph, holds addresses) while the layer's h, attn_out and mlp_out stay where they were; the
    layer buffer is the wrappers' bit for bit every time; new tensors are launched again."""
    from sinkscope.record import kernels

    monkeypatch.setattr(kernels, "_GRAPHS_FAILED", [])
    torch.manual_seed(3)
    b, t, d, heads, k = 2, 8, 32, 2, 4
    h, a, m = (torch.randn(b, t, d, device=DEVICE) for _ in range(3))
    h[:, 3, 5] = 300.0  # a massive activation
    valid = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
    valid[1, :2] = False
    layout = kernels.layer_layout(b, t, d, heads, k)
    first = valid.int().argmax(dim=1)
    count = valid.sum(dim=1, dtype=torch.int32)

    def reduce(plan, buf, massive, x=h):
        massive[0].zero_()
        kernels.reduce_layer_device(x, a, m, buf, layout, first, valid, count, 1, (100.0, 50.0), massive, plan=plan)
        n = int(massive[0])
        return buf[layout.feat:].clone(), massive[0].clone(), massive[1][:n].clone(), massive[2][:n].clone()

    want = reduce(None, kernels.layer_buffer(layout, h.device).zero_(), kernels.massive_buffers(b, t, h.device))
    graphs = kernels.LaunchGraphs(h.device, _Graph)
    plan = kernels.LayerPlan(graphs)
    buf, massive = kernels.layer_buffer(layout, h.device).zero_(), kernels.massive_buffers(b, t, h.device)
    for i in range(5):  # wrappers (recorded), launched, captured + replayed, replayed, replayed
        got = reduce(plan, buf, massive)
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True, msg=lambda e, i=i: f"forward {i}: {e}")
    assert graphs.captures == 1 and graphs.replays == 3 and int(want[1]) > 0
    other = h.clone()  # the same values elsewhere: launched, not replayed
    got = reduce(plan, buf, massive, other)
    assert graphs.replays == 3
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_gpu_bench_case_times_every_recorder_variant_and_restores_the_switches(monkeypatch):
    """`bench.gpu.run_case` with --host-ab, --graphs and --fresh (here on the CPU path, which runs in a second):
    every variant timed against SDPA, the graph counts reported, and the module switches as they were after."""
    from sinkscope.bench import gpu
    from sinkscope.record import kernels
    from sinkscope.record import recorder as recorder_module

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    before = (kernels.CUDA_GRAPHS, kernels.FAST_LAUNCH, kernels.LAYER_PLAN, recorder_module.PREFAULT)
    row = gpu.run_case(tiny_llama(), 2, 16, 2, False, host_ab=True, graphs=True, fresh=True)
    for name in ("recorder", "recorder_host_before", "recorder_graphs", "recorder_fresh"):
        assert row[f"{name}_ratio"] > 0, name
    assert {"graphs_captured", "graphs_replayed", "graphs_failed"} <= set(row)
    assert (kernels.CUDA_GRAPHS, kernels.FAST_LAUNCH, kernels.LAYER_PLAN, recorder_module.PREFAULT) == before


def test_cuda_graph_capture_waits_for_compiled_kernels(monkeypatch):
    """`kernels._cuda_graph` captures only calls whose kernels `launch` has kept (no compilation under capture),
    and none with FAST_LAUNCH off: until then it answers "not now" (None) without touching the GPU."""
    from sinkscope.record import kernels

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(kernels, "_stream", lambda device: 0)
    monkeypatch.setattr(kernels, "_LAUNCHES", {})
    fn, x = _FakeJit(), torch.zeros(64)
    call = (fn, (4,), (x,), (32, 0.5), {"BLOCK": 16}, {})
    assert kernels._cuda_graph([call], torch.device("cpu")) is None  # never launched: not compiled
    kernels.launch(*call[:5], **call[5])
    monkeypatch.setattr(kernels, "FAST_LAUNCH", False)
    assert kernels._cuda_graph([call], torch.device("cpu")) is None
    monkeypatch.setattr(kernels, "FAST_LAUNCH", True)
    key = kernels._launch_key(fn, (x,), (x.data_ptr(),), (32, 0.5), {"BLOCK": 16}, {})
    assert key in kernels._LAUNCHES  # kept: the capture would go ahead (on a GPU)


def test_gpu_bench_host_python_stage_runs(tmp_path):
    """`bench.gpu --host-python` (the recorder's own Python a layer, launches stubbed; in a process of its own, as
    it stubs the kernels module): the plain, recorded and graphs timings are written."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    subprocess.run([sys.executable, "-m", "sinkscope.bench.gpu", "--host-python", "--device", "cpu", "--shapes", "",
                    "--out", str(tmp_path)], check=True, env=env, timeout=300, capture_output=True)
    result = json.loads((tmp_path / "bench_host_python.json").read_text())
    assert result["layers"] == 30 and result["plain_ms"] > 0
    assert result["extra_us_per_layer"] > 0 and result["graphs_extra_us_per_layer"] > 0
    for name in ("recorded", "graphs"):  # the split into a part a forward and a part a layer (2 and 30 layers)
        assert result[f"{name}_us_per_layer"] > 0
        fixed = result[f"{name}_fixed_us"]
        assert fixed == pytest.approx(1e3 * result[f"{name}_ms"] - 1e3 * result["plain_ms"]
                                      - 30 * result[f"{name}_us_per_layer"], rel=1e-9, abs=1e-6)


def test_sass_tool_compiles_the_shipped_layer_for_ampere_and_hopper_without_a_gpu(tmp_path, monkeypatch):
    """`python -m sinkscope.bench.sass` compiles each kernel of a recorded layer for sm_80 and sm_90 in one process
    with the installed Triton (no GPU, no launch) and reads its SASS: the five launches of a layer, each with
    instructions, registers
    and no spilled registers, the column sums on the tensor cores with their exponentials, and the radix passes
    counting by ballots (Triton 3.6) or shared-memory atomics (3.9). In a process of its own: this one interprets
    the kernels (TRITON_INTERPRET=1), which the tool refuses."""
    import subprocess
    import sys

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton ships no cuobjdump")
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "sinkscope.bench.sass", "--arch", "75,80,90", "--shapes", "smollm2-135m:256",
           "--shipped", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "static SASS counts, not timings" in done.stdout
    turing, ampere, hopper = (json.loads(out.read_text())["rows"][i:i + 5] for i in (0, 5, 10))
    for arch, rows in ((75, turing), (80, ampere), (90, hopper)):
        assert [(r["arch"], r["kernel"]) for r in rows] == [(arch, k) for k in (
            "colsum_kernel", "radix_pass_kernel", "radix_pass_kernel", "token_stats_kernel", "colmax_kernel")]
        for r in rows:
            assert r["instructions"] > 100 and r["registers"] > 0 and r["stack"] == 0 and r["ldl"] + r["stl"] == 0, r
        assert rows[0]["mufu"] > 0
        assert all(r["vote"] + r["atoms"] > 0 for r in rows[1:3])
    # each architecture compiled for itself (session 22's tool handed the second one the first one's kernels):
    # Ampere's column sums on mma.sync (HMMA), Hopper's on warpgroup MMA (HGMMA)
    assert ampere[0]["hmma"] > 0 and ampere[0]["hgmma"] == 0
    assert hopper[0]["hgmma"] > 0 and hopper[0]["hmma"] == 0
    # before Ampere Triton's dot runs on the FMA units: the column sums take COLSUM_FP32's tiles there (the default
    # 64 x 64 tile spilled 300 instructions' worth of registers on sm_75, 20,533 at head dim 128)
    tiles = {arch: (rows[0]["consts"]["BLOCK_M"], rows[0]["consts"]["BLOCK_N"], rows[0]["num_warps"])
             for arch, rows in ((75, turing), (80, ampere), (90, hopper))}
    assert tiles == {75: (32, 32, 8), 80: (64, 64, 4), 90: (64, 64, 4)}
    assert turing[0]["hmma"] + turing[0]["hgmma"] == 0
    from sinkscope.bench import sass

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # interpreted kernels cannot be compiled: refused with a message
    with pytest.raises(SystemExit) as refused:
        sass.main(["--shapes", "smollm2-135m:256", "--shipped"])
    assert refused.value.code == 2


def test_host_cost_splits_into_a_part_a_forward_and_a_part_a_layer():
    """`bench.gpu.split_per_layer` (behind `--host-python` and `bench.hostcount`) recovers each recorder's fixed and
    per-layer extra from costs at 30 and 2 layers that follow extra(L) = fixed + L * per_layer exactly."""
    from sinkscope.bench.gpu import split_per_layer

    def plain(n_layers):
        return 1000 + 150 * n_layers

    truth = {"recorded": (2500, 340), "graphs": (2400, 180)}
    cost = {"plain": plain(30), "short_plain": plain(2)}
    for name, (fixed, per_layer) in truth.items():
        cost[name] = plain(30) + fixed + 30 * per_layer
        cost[f"short_{name}"] = plain(2) + fixed + 2 * per_layer
    split = split_per_layer(cost, 30)
    for name, (fixed, per_layer) in truth.items():
        assert split[f"{name}_fixed"] == pytest.approx(fixed) and split[f"{name}_per_layer"] == pytest.approx(per_layer)


def test_hostcount_says_what_it_needs_when_valgrind_is_missing(monkeypatch):
    """`python -m sinkscope.bench.hostcount` on a machine without valgrind: one line naming what to install, exit
    status 1, no traceback."""
    import shutil

    from sinkscope.bench import hostcount

    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "valgrind" else real_which(name))
    with pytest.raises(SystemExit) as exc:
        hostcount.main([])
    assert "needs valgrind" in str(exc.value.code) and "apt-get install valgrind" in str(exc.value.code)
