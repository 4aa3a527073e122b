"""The CPU recorder's C reductions (sinkscope.record.fused_cpu) against the torch reductions they replace."""

from __future__ import annotations

import platform
import warnings

import numpy as np
import pytest
import torch

from sinkscope.record import Recorder, fused_cpu
from sinkscope.record.recorder import _host_blocks
from sinkscope.record.reduce import _two_ranks, reduce_layer
from tests.tiny_models import tiny_llama

needs_cc = pytest.mark.skipif(not fused_cpu.available(), reason="no C compiler (or SINKSCOPE_CPU_KERNELS=0)")

FIELDS = [f for f in fused_cpu.FIELDS if f != "bos_cosine"]


def _layer(seed: int, b: int, t: int, d: int, pad: bool):
    g = torch.Generator().manual_seed(seed)
    h, a, m = (torch.randn(b, t, d, generator=g) for _ in range(3))
    h[:, 0] *= 4  # a BOS-like first token
    h[0, 3, 5] = 250.0  # massive entries (one negative), and a token just under the absolute threshold
    h[-1, t - 2, d - 1] = -400.0
    h[-1, 7, 2] = 99.0
    m[0, 1, d - 3] = 60.0
    valid = torch.ones(b, t, dtype=torch.bool)
    if pad:
        valid[0, t - 5:] = False  # right padding
        valid[-1, :9] = False  # left padding
        h[-1, 9] *= 4
    return h, a, m, valid


def _both(h, a, m, valid, top_k=5, abs_threshold=100.0, rel_threshold=50.0):
    """(torch path's fields, massive) and (fused fields, massive), fields as [B, ...] numpy arrays."""
    b, t, d = h.shape
    padded = not bool(valid.all())
    ref, ref_massive = reduce_layer(h, a, m, valid, padded, top_k, abs_threshold, rel_threshold, workspace={})
    out = _host_blocks(b, t, 2, 1, d, top_k)
    block = fused_cpu.MassiveBlock(2)  # grown as the entries come
    assert fused_cpu.reduce_layer_cpu(h, a, m, valid.numpy(), top_k, abs_threshold, rel_threshold, out, 1, block)
    got = {key: out[key][:, 1] for key in fused_cpu.FIELDS}
    layer, *got_massive = block.arrays()
    assert (layer == 1).all()
    return ({k: v.numpy() for k, v in ref.items()}, _massive_arrays(ref_massive)), (got, got_massive)


def _massive_arrays(massive):
    if not massive:
        return [np.zeros(0)] * 6
    return [torch.cat([x[i].reshape(-1) for x in massive]).double().numpy() for i in range(6)]


@pytest.fixture(params=["native", "no-avx512"])
def isa(request, monkeypatch, tmp_path):
    """The library as built for this CPU, and built without AVX-512 (the passes' portable code) on x86-64."""
    if request.param == "no-avx512":
        if platform.machine().lower() not in ("x86_64", "amd64"):
            pytest.skip("AVX-512 is an x86-64 extension")
        _fresh(monkeypatch, tmp_path)
        monkeypatch.setattr(fused_cpu, "CFLAGS", (*fused_cpu.CFLAGS, "-mno-avx512f"))
    return request.param


def _stable_top(x: np.ndarray, k: int) -> np.ndarray:
    """The k largest |x| of each row, ties to the lower index."""
    return np.argsort(-np.abs(x), axis=-1, kind="stable")[..., :k]


@needs_cc
@pytest.mark.parametrize("shape,pad", [((2, 300, 250), False), ((2, 300, 250), True), ((3, 40, 72), True),
                                       ((1, 130, 576), False)], ids=["bracket", "bracket-padded", "small-padded",
                                                                      "smollm2-width"])
def test_fields_equal_the_torch_reductions(isa, shape, pad):
    (ref, ref_massive), (got, got_massive) = _both(*_layer(0, *shape, pad))
    for key in FIELDS:
        np.testing.assert_array_equal(got[key], ref[key].astype(got[key].dtype), err_msg=key)
    np.testing.assert_allclose(got["bos_cosine"], ref["bos_cosine"], atol=1e-6)
    for x, y in zip(got_massive, ref_massive, strict=True):
        np.testing.assert_array_equal(x, y)
    assert len(got_massive[0]) == 2


@needs_cc
def test_ties_go_to_the_lower_feature_index(isa):
    first = torch.tensor([3.0, -5.0, 5.0, 1.0, -3.0, 5.0, 0.0, 2.0] * 5)  # D = 40: a run of 32 and a tail
    first[33] = -5.0
    second = torch.full((96,), 0.1)  # three runs: the tie at 32 is found in the scan, after 33 entered the list
    second[0], second[32], second[33] = 7.0, 5.0, -5.0
    for row, k in ((first, 6), (second, 2)):
        h = row[None, None]
        (_, _), (got, _) = _both(h, h, h, torch.ones(1, 1, dtype=torch.bool), top_k=k)
        order = np.argsort(-np.abs(row.numpy()), kind="stable")[:k]
        np.testing.assert_array_equal(got["top_features"][0, 0], order)
        np.testing.assert_array_equal(got["top_values"][0, 0], row.numpy()[order])


@needs_cc
@pytest.mark.parametrize("case", ["bracket-miss", "band-overflow"])
def test_median_stays_exact_when_the_bracket_fails(isa, monkeypatch, case):
    h, a, m, valid = _layer(1, 1, 300, 250, False)
    if case == "bracket-miss":  # a subsample of the smallest entries: the bracket lies below the median
        smallest = np.argsort(np.abs(h.numpy()).reshape(-1))[:20000]
        monkeypatch.setattr(fused_cpu, "_subsample_index", lambda n: smallest[np.arange(8192) % len(smallest)])
    else:
        monkeypatch.setattr(fused_cpu, "BAND_SLACK", 0)  # room for two rows only
    (ref, _), (got, _) = _both(h, a, m, valid)
    assert got["median_abs"][0] == np.median(np.abs(h.numpy()))
    np.testing.assert_array_equal(got["median_abs"], ref["median_abs"])


@needs_cc
@pytest.mark.parametrize("case", ["tied-rows", "top-20", "narrow"])
def test_rows_outside_the_threshold_route_take_the_scan(isa, case):
    """The top-k's threshold route (AVX-512) hands a row to the scan when more than 64 entries reach its threshold
    (ties), when k > 16, or when D < 32; the fields stay those of the torch reductions, ties to the lower index."""
    d, top_k = {"tied-rows": (576, 5), "top-20": (576, 20), "narrow": (24, 5)}[case]
    h, a, m, valid = _layer(6, 2, 50, d, False)
    if case == "tied-rows":
        h[:, 10:20] = 3.0  # every entry of these rows ties
        m[0, 5:9] = -2.0
        m[1, 7, :100] = 9.0  # 100 tied maxima
    (ref, ref_massive), (got, got_massive) = _both(h, a, m, valid, top_k=top_k)
    for key in ("top_features", "mlp_top_features"):  # torch.topk's order among ties is unspecified
        x = (h if key == "top_features" else m).numpy()
        np.testing.assert_array_equal(got[key], _stable_top(x, top_k), err_msg=key)
    for key in set(FIELDS) - {"top_features", "mlp_top_features"}:
        np.testing.assert_array_equal(got[key], ref[key].astype(got[key].dtype), err_msg=key)
    np.testing.assert_allclose(got["bos_cosine"], ref["bos_cosine"], atol=1e-6)
    for x, y in zip(got_massive, ref_massive, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("seed", range(6))
def test_histogram_selection_returns_the_ranks_of_a_sort(seed):
    """`reduce._two_ranks`, the selections of both paths' medians."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 20000))
    kind = seed % 3
    if kind == 0:
        x = np.abs(rng.standard_normal(n)).astype(np.float32)
    elif kind == 1:  # heavy ties and zeros
        x = rng.integers(0, 4, n).astype(np.float32)
    else:  # magnitudes across the float32 range, subnormals included
        x = (10.0 ** rng.uniform(-44, 38, n)).astype(np.float32)
    ref = np.sort(x)
    for r_lo, r_hi in [((n + 1) // 2, n // 2 + 1), (1, n), (max(1, n // 3), max(1, n // 3) + min(n - 1, 377)),
                       (n, n)]:
        lo, hi = _two_ranks(x, r_lo, r_hi)
        assert (lo, hi) == (ref[r_lo - 1], ref[r_hi - 1]), (n, r_lo, r_hi)


@needs_cc
@pytest.mark.parametrize("where", ["h", "mlp"])
def test_a_non_finite_row_hands_the_layer_to_torch(where):
    h, a, m, valid = _layer(2, 2, 40, 72, False)
    (h if where == "h" else m)[1, 17, 3] = float("nan" if where == "h" else "inf")
    out, block = _host_blocks(2, 40, 1, 1, 72, 5), fused_cpu.MassiveBlock(8)
    h[0, 2, 4] = 300.0  # sample 0 has a massive entry: it must not be added when sample 1 refuses the layer
    assert not fused_cpu.reduce_layer_cpu(h, a, m, valid.numpy(), 5, 100.0, 50.0, out, 0, block)
    assert block.n == 0


def _record(model, ids, mask):
    with Recorder(model, abs_threshold=0.01, rel_threshold=3.0) as rec:
        model(input_ids=ids, attention_mask=mask)
    return rec.samples


def _assert_same_samples(xs, ys):
    for x, y in zip(xs, ys, strict=True):
        for key in ("attention_received", "max_abs", "median_abs", "feature_max_abs", "mlp_feature_max_abs",
                    "top_features", "top_values", "mlp_top_features", "mlp_top_values"):
            np.testing.assert_array_equal(getattr(x, key), getattr(y, key), err_msg=key)
        np.testing.assert_allclose(x.bos_cosine, y.bos_cosine, atol=1e-6)
        assert len(x.massive) > 0
        np.testing.assert_array_equal(x.massive.to_numpy(), y.massive.to_numpy())


@needs_cc
@pytest.mark.parametrize("padded", [False, True])
def test_recorder_records_the_same_with_and_without_the_c_passes(monkeypatch, padded):
    model = tiny_llama()
    torch.manual_seed(3)
    ids = torch.randint(3, 128, (2, 30))
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 22:] = 0
    calls = []
    original = fused_cpu.reduce_layer_cpu
    monkeypatch.setattr(fused_cpu, "reduce_layer_cpu", lambda *a, **k: calls.append(1) or original(*a, **k))
    fused = _record(model, ids, mask)
    assert len(calls) == model.config.num_hidden_layers
    monkeypatch.setenv("SINKSCOPE_CPU_KERNELS", "0")
    _assert_same_samples(fused, _record(model, ids, mask))
    assert len(calls) == model.config.num_hidden_layers


@needs_cc
def test_a_layer_refused_by_the_kernels_is_recorded_by_torch(monkeypatch):
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 25), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    original = fused_cpu.reduce_layer_cpu
    monkeypatch.setattr(fused_cpu, "reduce_layer_cpu", lambda *a, **k: a[-2] != 1 and original(*a, **k))
    mixed = _record(model, ids, mask)
    monkeypatch.setenv("SINKSCOPE_CPU_KERNELS", "0")
    _assert_same_samples(mixed, _record(model, ids, mask))


def _fresh(monkeypatch, tmp_path, cc=None):
    """fused_cpu as in a new process, its cache in tmp_path (and $CC set when given)."""
    monkeypatch.setattr(fused_cpu, "_STATE", {})
    monkeypatch.setenv("SINKSCOPE_CACHE_DIR", str(tmp_path))
    if cc is not None:
        monkeypatch.setenv("CC", cc)


def _reduce_small():
    h, a, m, valid = _layer(5, 1, 20, 40, False)
    out = _host_blocks(1, 20, 1, 1, 40, 5)
    return fused_cpu.reduce_layer_cpu(h, a, m, valid.numpy(), 5, 100.0, 50.0, out, 0, fused_cpu.MassiveBlock(8))


def _recorder_still_records():
    model = tiny_llama()
    with Recorder(model) as rec:
        model(input_ids=torch.randint(3, 128, (1, 12)))
    assert len(rec.samples) == 1


@needs_cc
def test_the_library_is_built_once_and_taken_from_the_cache(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    assert _reduce_small()
    built = list(tmp_path.glob("fused_cpu-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    _fresh(monkeypatch, tmp_path)
    assert _reduce_small()
    assert [p.stat().st_mtime_ns for p in tmp_path.glob("fused_cpu-*.so")] == [stamp]
    assert not list(tmp_path.glob("*.so.tmp*")) and len(list(tmp_path.iterdir())) == 1  # no temporaries left


@needs_cc
def test_a_corrupt_cached_library_is_rebuilt(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    target = fused_cpu._target(fused_cpu.compiler(), tmp_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"not a shared library")  # e.g. a disk that filled up while another process built it
    assert _reduce_small()
    assert target.read_bytes()[:4] == b"\x7fELF"


@needs_cc
def test_an_unwritable_cache_directory_falls_back_to_a_private_temporary_one(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    _fresh(monkeypatch, blocker / "kernels")
    monkeypatch.setattr(fused_cpu.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert _reduce_small()
    (private,) = (tmp_path / "tmp").iterdir()
    assert private.name.startswith("sinkscope-kernels-") and private.stat().st_mode & 0o077 == 0
    assert len(list(private.glob("fused_cpu-*.so"))) == 1
    private.chmod(0o777)  # another user could have planted a library there: refused, with the first error
    _fresh(monkeypatch, blocker / "kernels")
    with pytest.warns(UserWarning, match="C reductions are unavailable"):
        assert not _reduce_small()


@pytest.mark.parametrize("how", ["no-compiler", "compiler-fails", "wrong-results"])
def test_a_build_failure_warns_once_and_leaves_torch_in_charge(monkeypatch, tmp_path, how):
    if how == "no-compiler":
        _fresh(monkeypatch, tmp_path, cc="no-such-compiler")
        monkeypatch.setattr(fused_cpu.shutil, "which", lambda name: None)
        assert not fused_cpu.available()
        match = "no C compiler found"
    elif how == "compiler-fails":
        script = tmp_path / "cc"
        script.write_text("#!/bin/sh\necho 'cc: error: out of licences' >&2\nexit 1\n")
        script.chmod(0o755)
        _fresh(monkeypatch, tmp_path, cc=str(script))
        match = "could not build fused_cpu.c.*out of licences"
    else:
        if not fused_cpu.available():
            pytest.skip("no C compiler")
        _fresh(monkeypatch, tmp_path)

        class Wrong:  # a library that loads but leaves its outputs unwritten
            def __init__(self, path):
                self.m_pass = self.h_pass = lambda *args: 1

        monkeypatch.setattr(fused_cpu.ctypes, "CDLL", Wrong)
        match = "m_pass computed wrong top features"
    with pytest.warns(UserWarning, match=f"C reductions are unavailable.*{match}"):
        assert not _reduce_small()
    assert not fused_cpu.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the second layer and the recorder stay quiet
        assert not _reduce_small()
        _recorder_still_records()
