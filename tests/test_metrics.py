"""Metric formulas on hand-made numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sinkscope import metrics
from sinkscope.record import reduce
from sinkscope.train.losses import decorrelation_loss


def test_attention_received_is_mean_over_queries_that_see_the_key():
    A = np.array([[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.5, 0.2, 0.3]], dtype=np.float32)
    alpha = metrics.attention_received(A)
    np.testing.assert_allclose(alpha, [(1.0 + 0.6 + 0.5) / 3, (0.4 + 0.2) / 2, 0.3 / 1], rtol=1e-6)


def test_sink_rate_and_sink_layers():
    alpha = np.zeros((2, 4, 3), dtype=np.float32)  # L=2, H=4, T=3
    alpha[0, :3, 0] = 0.5  # 3 of 4 heads in layer 0
    alpha[1, :1, 0] = 0.9  # 1 of 4 heads in layer 1
    alpha[:, :, 2] = 0.3  # exactly eps is not above eps
    np.testing.assert_allclose(metrics.sink_rate(alpha), [100 * 4 / 8, 0.0, 0.0])
    flags = metrics.sink_layers(alpha, min_queries=1)
    assert flags.tolist() == [[True, False, False], [False, False, False]]
    assert metrics.sink_tokens(alpha, min_queries=1) == [0]
    assert metrics.sink_layers(alpha, head_fraction=0.25, min_queries=1)[1, 0]


def test_keys_seen_by_few_queries_are_never_sinks():
    alpha = np.full((1, 2, 10), 0.9, dtype=np.float32)  # every key above eps in every head
    # key k is seen by the T - k = 10 - k queries i >= k: with the default 8, keys 0..2 can be sinks, 3..9 cannot
    assert metrics.sink_layers(alpha)[0].tolist() == [True] * 3 + [False] * 7
    assert metrics.sink_tokens(alpha, min_queries=4) == list(range(7))
    assert metrics.MIN_QUERIES == 8


def test_massive_needs_both_thresholds():
    h = np.full((4, 5), 0.5, dtype=np.float32)
    h[0, 1] = 150.0  # >= 100 but median*1000 = 500 -> not massive
    h[2, 3] = -600.0  # both -> massive, sign ignored
    med = np.median(np.abs(h))
    assert med == pytest.approx(0.5)
    mask = metrics.massive_mask(h, med)
    assert list(zip(*np.nonzero(mask), strict=True)) == [(2, 3)]
    # torch path agrees, and an absolute threshold alone decides when the median is tiny
    np.testing.assert_array_equal(metrics.massive_mask(torch.from_numpy(h), torch.tensor(med)), mask)
    # the recorder's torch threshold is the same formula
    np.testing.assert_allclose(reduce.massive_threshold(torch.tensor(med), 100.0, 1000.0).numpy(),
                               metrics.massive_threshold(med), rtol=1e-6)
    assert metrics.massive_mask(h, med, abs_threshold=100, rel_threshold=1)[0, 1]


@pytest.mark.parametrize("n", [7, 8])
def test_median_abs_matches_numpy(n):
    x = torch.randn(n, 3)
    assert reduce.median_abs(x).item() == pytest.approx(float(np.median(np.abs(x.numpy()))), rel=1e-6)


def test_find_massive_origin_and_shares():
    rng = np.random.default_rng(0)
    L, T, D = 4, 3, 6
    attn = rng.normal(0, 0.01, (L, T, D)).astype(np.float32)
    mlp = rng.normal(0, 0.01, (L, T, D)).astype(np.float32)
    mlp[1, 0, 2] = 300.0  # the MLP of layer 1 writes a massive value on token 0, feature 2
    attn[1, 0, 2] = 100.0
    hidden = np.cumsum(attn + mlp, axis=0)
    df = metrics.find_massive(hidden, attn, mlp)
    assert set(zip(df.layer, df.token, df.feature, strict=True)) == {(1, 0, 2), (2, 0, 2), (3, 0, 2)}
    origin = metrics.origin_table(df)
    assert origin.loc[0, "origin_layer"] == 1
    assert origin.loc[0, "mlp_share"] == pytest.approx(0.75, abs=1e-3)
    assert origin.loc[0, "attn_share"] == pytest.approx(0.25, abs=1e-3)



@pytest.mark.parametrize("n", [0, 1, 300])
def test_massive_frame_matches_its_definition_in_pandas(n):
    """The numpy massive_frame against the definition written with pandas (groupby min, sort): same rows, order,
    dtypes and values, including a zero update (share inf/nan) and (token, feature) pairs in several layers."""
    rng = np.random.default_rng(n)
    triples = np.unique(np.stack([rng.integers(0, 12, n), rng.integers(0, 6, n), rng.integers(0, 4, n)], 1), axis=0)
    rng.shuffle(triples)
    m = len(triples)
    value, attn, mlp = rng.normal(size=(3, m)).astype(np.float32)
    if m:
        mlp[0] = -attn[0]
    got = metrics.massive_frame(triples[:, 0], triples[:, 1], triples[:, 2], value, attn, mlp)
    df = pd.DataFrame({"layer": triples[:, 0].astype(np.int32), "token": triples[:, 1].astype(np.int32),
                       "feature": triples[:, 2].astype(np.int32), "value": value, "attn_out": attn, "mlp_out": mlp})
    update = df["attn_out"].astype(np.float64) + df["mlp_out"].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        df["attn_share"] = (df["attn_out"] / update).astype(np.float32)
        df["mlp_share"] = (df["mlp_out"] / update).astype(np.float32)
    df["origin_layer"] = df.groupby(["token", "feature"])["layer"].transform("min").astype(np.int32)
    want = df[metrics.MASSIVE_COLUMNS].sort_values(["layer", "token", "feature"], ignore_index=True)
    pd.testing.assert_frame_equal(got, want)
    if m > 1:
        assert (want["origin_layer"] < want["layer"]).any(), "the case must hold pairs massive in several layers"

def test_massive_frames_split_a_batch_and_keep_origins_per_sample():
    """The batched massive_frames equals massive_frame run on each sample alone: the same (token, feature) massive
    from layer 1 in one sample and from layer 2 in another keeps its own origin in each; a sample without records
    gets an empty frame with the same columns and dtypes."""
    rng = np.random.default_rng(3)
    rows = [(0, 2, 5, 7), (1, 1, 5, 7), (0, 3, 5, 7), (1, 2, 0, 1), (3, 1, 4, 2)]  # (sample, layer, token, feature)
    sample, layer, token, feature = map(np.array, zip(*rows, strict=True))
    value, attn, mlp = rng.normal(size=(3, len(rows))).astype(np.float32)
    got = metrics.massive_frames(sample, layer, token, feature, value, attn, mlp, n_samples=4)
    assert len(got) == 4
    for b in range(4):
        k = sample == b
        want = metrics.massive_frame(layer[k], token[k], feature[k], value[k], attn[k], mlp[k])
        pd.testing.assert_frame_equal(got[b], want)
    assert got[0]["origin_layer"].tolist() == [2, 2] and got[1]["origin_layer"].tolist() == [1, 2]
    assert got[2].empty and list(got[2].columns) == metrics.MASSIVE_COLUMNS
    assert (got[2].dtypes == got[0].dtypes).all()


def test_feature_sets_and_jaccard():
    df = pd.DataFrame({"layer": [2, 2, 2, 3], "token": [0, 0, 5, 0], "feature": [7, 9, 7, 7]})
    assert metrics.massive_feature_sets(df) == {2: {7, 9}, 3: {7}}
    assert metrics.massive_feature_sets(df, tokens=[5]) == {2: {7}}
    assert metrics.jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)
    assert metrics.mean_pairwise_jaccard([{1, 2}, {1, 2}, {1}]) == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert np.isnan(metrics.jaccard(set(), set())), "two empty sets share nothing: undefined, not 1"
    assert metrics.jaccard(set(), {1}) == 0.0
    assert metrics.mean_pairwise_jaccard([set(), set(), {1}]) == 0.0  # the one undefined pair is left out
    assert np.isnan(metrics.mean_pairwise_jaccard([set(), set()]))


def test_bos_cosine_and_segments():
    h = np.array([[[1.0, 0.0], [1.0, 1.0], [-2.0, 0.0], [0.0, 3.0]]])  # L=1, T=4
    cos = metrics.bos_cosine(h)
    np.testing.assert_allclose(cos, [[1.0, np.sqrt(0.5), -1.0, 0.0]], atol=1e-6)
    seg = metrics.cosine_by_segment(cos, [("bos", 0, 1), ("audio", 1, 3), ("prompt", 3, 4)])
    assert seg.loc[0, "audio"] == pytest.approx((np.sqrt(0.5) - 1) / 2)
    assert seg.loc[0, "prompt"] == pytest.approx(0.0)


def test_decorrelation_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    B, T, D = 2, 5, 4
    hidden = tuple(torch.randn(B, T, D, requires_grad=True) for _ in range(4))  # embeds, 2 blocks, final
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 0, 1, 0]], dtype=torch.bool)  # position 0 never counts
    loss = decorrelation_loss(hidden, mask)
    expected = []
    for h in hidden[1:3]:
        vals = []
        for b in range(B):
            for i in range(1, T):
                if mask[b, i]:
                    c = torch.dot(h[b, 0], h[b, i]) / (h[b, 0].norm() * h[b, i].norm())
                    vals.append(c**2)
        expected.append(torch.stack(vals).mean())
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    loss.backward()
    assert hidden[1].grad is not None and hidden[0].grad is None and hidden[3].grad is None
    aligned = tuple(torch.ones(1, 3, 2) for _ in range(3))
    assert decorrelation_loss(aligned, torch.ones(1, 3, dtype=torch.bool)).item() == pytest.approx(1.0)


def test_the_reference_formulas_refuse_inputs_of_the_wrong_layout():
    """These are what users recompute the recorder's numbers with: a non-square map, pre-softmax scores, a 2D
    residual stream or a negative threshold returned plausible arrays of the wrong numbers (or an IndexError)."""
    attn = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    cases = [
        (lambda: metrics.attention_received(attn[..., :4]), r"attn must be \[\.\.\., T, T\].*got shape \(2, 3, 5, 4\)"),
        (lambda: metrics.attention_received(attn * 10 - 5), r"span \[-[0-9.]+, [0-9.]+\] \(pre-softmax scores\?\)"),
        (lambda: metrics.attention_received(attn.index_put((torch.tensor(1),), torch.tensor(float("nan")))),
         "non-finite values"),
        (lambda: metrics.attention_received(np.array(["a", "b"])), "must be a numeric array"),
        (lambda: metrics.sink_rate(np.zeros((3, 5))), r"alpha must be \[L, H, T\]; got shape \(3, 5\)"),
        (lambda: metrics.sink_layers(np.zeros(5)), r"alpha must be \[L, H, T\]; got shape \(5,\)"),
        (lambda: metrics.bos_cosine(np.ones((5, 8))), r"hidden must be \[L, T, D\].*got shape \(5, 8\)"),
        (lambda: metrics.find_massive(np.ones((5, 8))), r"hidden must be \[L, T, D\].*got shape \(5, 8\)"),
        (lambda: metrics.find_massive(np.ones((2, 5, 8)), mlp_out=np.ones((2, 5, 7))), "mlp_out must have hidden's"),
        (lambda: metrics.find_massive(np.ones((2, 5, 8)), abs_threshold=-1), "abs_threshold must be a finite number"),
        (lambda: metrics.massive_mask(np.ones((2, 5, 8)), np.ones(3)), "one value per layer of h"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    # the layouts they take are unchanged: one map, a batch of layers, heads, or a 5D stack; a single layer as [None]
    for shape in ((5, 5), (3, 5, 5), (2, 3, 5, 5), (1, 2, 3, 5, 5)):
        assert metrics.attention_received(attn.reshape(-1, 5, 5)[0].expand(*shape)).shape == (*shape[:-2], 5)
    assert metrics.bos_cosine(np.ones((5, 8))[None]).shape == (1, 5)


def test_an_empty_hypothesis_deletes_its_reference_in_wer_and_cer():
    """Scored by hand: 3 + 2 reference words with the first hypothesis empty is 3 errors in 5 words, and 5 of the
    8 reference characters (spaces included). The word "<empty>" used to stand in for it: the same WER, but a CER
    of 7 errors for a 5-character reference."""
    from sinkscope.eval import score

    got = score(["a b c", "d e"], ["", "d e"])
    assert got == {"wer": 3 / 5, "cer": 5 / 8, "n": 2}
    assert score(["a b"], [None])["cer"] == 1.0
    with pytest.raises(ValueError, match=r"reference 1 is empty \(1 of 2\)"):
        score(["a", " "], ["a", "b"])
