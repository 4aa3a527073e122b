"""Interventions: feature ablation on the residual stream, and its effect on SmolLM2."""

from __future__ import annotations

import torch

from sinkscope.intervene import ablate_features, block_attention, next_token_loss, rotate_states, rotate_toward
from sinkscope.record import Recorder
from sinkscope.record.run import encode_with_bos
from tests.tiny_models import tiny_llama


def test_ablation_sets_the_features_and_is_removed_afterwards():
    model = tiny_llama()
    ids = torch.randint(3, 128, (2, 9))
    seen = []
    with torch.no_grad():
        before = model(input_ids=ids, output_hidden_states=True).hidden_states
        with ablate_features(model, layer=1, features=[3, 7], tokens=[0, 4], value=5.0):
            probe = model.model.layers[1].register_forward_hook(lambda m, a, o: seen.append(o.clone()))
            during = model(input_ids=ids, output_hidden_states=True).hidden_states
            probe.remove()
        after = model(input_ids=ids, output_hidden_states=True).hidden_states
    h = seen[0]  # what block 2 receives: the output of block 1 after the ablation
    assert torch.all(h[:, [0, 4]][..., [3, 7]] == 5.0)
    torch.testing.assert_close(h[:, [1, 2, 3]], before[2][:, [1, 2, 3]])  # other tokens untouched at this layer
    torch.testing.assert_close(during[1], before[1])  # earlier layers untouched
    assert not torch.allclose(during[3], before[3]), "the change propagates to later layers"
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b)


def test_zeroing_smollm2_massive_activation_breaks_the_model(smollm2):
    """Measured on examples/prompts.txt (2026-11-24): zeroing feature 507 of BOS after layer 11 raises the mean
    next-token loss from 5.41 to 16-17 nats and lowers the BOS Sink^0.3 from 82.8% to about 70%; zeroing a
    random feature of the same token changes the loss by less than 0.2 nats."""
    model, tok = smollm2
    text = "The committee will meet on Thursday to review the budget, and then it will vote."
    ids = torch.tensor([encode_with_bos(tok, text, None)])
    base = next_token_loss(model, ids)
    with ablate_features(model, 11, [507], tokens=[0]):
        ablated = next_token_loss(model, ids)
        with Recorder(model) as rec:
            model(input_ids=ids)
    with ablate_features(model, 11, [100], tokens=[0]):
        control = next_token_loss(model, ids)
    with Recorder(model) as ref:
        model(input_ids=ids)
    assert ablated > base + 5.0
    assert abs(control - base) < 0.5
    assert rec.samples[0].attention_received[12:, :, 0].mean() < ref.samples[0].attention_received[12:, :, 0].mean()


def _attn_impl(model, impl: str):
    model.config._attn_implementation = impl
    for layer in model.model.layers:
        layer.self_attn.config._attn_implementation = impl
    return model


def test_block_attention_zeroes_the_blocked_columns_only_in_chosen_layers():
    model = _attn_impl(tiny_llama(), "eager")
    ids = torch.randint(3, 128, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second sample
    keys = [[0, 5], [3, 6]]  # per sample, in padded positions
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        with block_attention(model, keys, layers=[1, 2]):
            blocked = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(blocked.attentions[0], plain.attentions[0])
    for layer in (1, 2):
        a = blocked.attentions[layer]
        torch.testing.assert_close(a.sum(-1)[1, :, 3:], torch.ones_like(a.sum(-1)[1, :, 3:]))
        for i, cols in enumerate(keys):
            for c in cols:
                others = [q for q in range(ids.shape[1]) if q != c and mask[i, q]]  # real queries
                assert torch.all(a[i, :, others, c] == 0)
                assert torch.all(a[i, :, c, c] > 0), "a blocked token still attends to itself"
    # SDPA (whose mask may be None) gives the same result as eager
    sdpa = _attn_impl(tiny_llama(), "sdpa")
    with torch.no_grad(), block_attention(sdpa, keys, layers=[1, 2]):
        real = mask.bool()  # padded query rows differ between implementations, with or without blocking
        torch.testing.assert_close(sdpa(input_ids=ids, attention_mask=mask).logits[real], blocked.logits[real],
                                   atol=1e-5, rtol=1e-4)
    with torch.no_grad(), block_attention(sdpa, [0, 5], layers=[1, 2]):
        no_mask = sdpa(input_ids=ids[:1]).logits
    with torch.no_grad(), block_attention(model, [0, 5], layers=[1, 2]):
        torch.testing.assert_close(no_mask, model(input_ids=ids[:1]).logits, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(no_mask, sdpa(input_ids=ids[:1]).logits, atol=1e-3), "the block took effect"


def test_interventions_hold_during_cached_generation():
    model = _attn_impl(tiny_llama(), "sdpa")
    ids = torch.randint(3, 128, (2, 8))
    with torch.no_grad(), block_attention(model, [2, 4], layers=[0, 2]), rotate_states(model, 1, [3, 5]):
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        # the last step, recomputed without a cache over the whole sequence, picks the same tokens
        full = model(input_ids=out[:, :-1]).logits[:, ids.shape[1] - 1:].argmax(-1)
    assert torch.equal(full, out[:, ids.shape[1]:])


def test_rotate_states_sets_the_cosine_and_keeps_the_norm():
    model = tiny_llama()
    ids = torch.randint(3, 128, (2, 9))
    seen = []
    with torch.no_grad():
        before = model(input_ids=ids, output_hidden_states=True).hidden_states
        with rotate_states(model, layer=1, tokens=[[2, 6], [4]], reference=0, cosine=0.25):
            probe = model.model.layers[1].register_forward_hook(lambda m, a, o: seen.append(o.clone()))
            model(input_ids=ids)
            probe.remove()
    h, old = seen[0], before[2]
    for i, toks in enumerate([[2, 6], [4]]):
        cos = torch.nn.functional.cosine_similarity(h[i, toks], h[i, :1], dim=-1)
        torch.testing.assert_close(cos, torch.full_like(cos, 0.25))
        torch.testing.assert_close(h[i, toks].norm(dim=-1), old[i, toks].norm(dim=-1))
        rest = [t for t in range(9) if t not in toks]
        torch.testing.assert_close(h[i, rest], old[i, rest])
    # cosine 1 makes the state parallel to the reference
    r = rotate_toward(torch.tensor([[0.0, 2.0]]), torch.tensor([[3.0, 0.0]]), 1.0)
    torch.testing.assert_close(r, torch.tensor([[2.0, 0.0]]))


def test_out_of_range_features_and_negative_positions_are_refused_before_the_forward():
    """A feature past the model's width used to fail mid-forward with torch's IndexError, a negative one to wrap
    around to another feature, and a negative position (meant as "the last token") to match nothing: an edit
    that silently did nothing."""
    import pytest

    from sinkscope.intervene import lens

    model = tiny_llama()  # hidden size 64
    cases = [(lambda: ablate_features(model, 1, [64]), r"features: 64 is outside the residual stream's features, "
                                                         r"\[0, 64\)"),
             (lambda: ablate_features(model, 1, [-1]), r"features: -1 is outside"),
             (lambda: ablate_features(model, 1, [1.5]), r"features: 1\.5 is not a feature index"),
             (lambda: ablate_features(model, 1, []), r"features: the list is empty"),
             (lambda: ablate_features(model, 1, [3], tokens=[0, -1]), r"tokens: position -1 is negative"),
             (lambda: rotate_states(model, 1, [[2], [-3]]), r"tokens: position -3 is negative"),
             (lambda: rotate_states(model, 1, [2], reference=-1), r"reference: position -1 is negative"),
             (lambda: block_attention(model, ["0"]), r"keys: '0' is not a position"),
             (lambda: block_attention(model, [-1]), r"keys: position -1 is negative")]
    for make, message in cases:
        with pytest.raises(ValueError, match=message), make():
            pass
    with pytest.raises(ValueError, match="tokens: position -1 is negative"):
        lens.ablate_features(1, [3], tokens=[-1])
    with pytest.raises(ValueError, match="features: -2 is outside"):
        lens.ablate_features(1, [-2])
    with pytest.raises(ValueError, match="keys: position -5 is negative"):
        lens.block_attention([-5], layers=[0])
    (_, hook), = lens.ablate_features(1, [64])  # the width is known at the hook
    with pytest.raises(ValueError, match=r"features: 64 is outside the residual stream's features, \[0, 64\)"):
        hook(torch.zeros(1, 3, 64))
    ids = torch.randint(3, 128, (2, 6))  # valid positions in both forms still work, numpy integers too
    import numpy as np

    with torch.no_grad(), ablate_features(model, 1, [np.int64(3)], tokens=[[0], [np.int64(5)]]), \
            rotate_states(model, 1, [3], reference=np.int64(0)), block_attention(model, [0, 2], layers=[2]):
        model(input_ids=ids)


def test_positions_no_forward_reached_are_named_and_odd_arguments_refused():
    """A position past every forward's end changed nothing without a word; a float layer was truncated, a NaN
    value written into the stream, and a loss over no predicted token returned NaN."""
    import warnings

    import pytest

    model = tiny_llama()
    ids = torch.randint(3, 128, (2, 6))
    for make, what in ((lambda: ablate_features(model, 1, [3], tokens=[2, 40]), r"tokens \[40\]"),
                       (lambda: rotate_states(model, 1, [2], reference=9), r"reference \[9\]"),
                       (lambda: block_attention(model, [[0], [7]]), r"keys \[7\]")):
        with pytest.warns(UserWarning, match=what + r" never came up: .* at most 6 positions, so nothing was "
                                                    "changed there"), torch.no_grad(), make():
            model(input_ids=ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with make():  # no forward inside: nothing to say
            pass
        with torch.no_grad(), ablate_features(model, 1, [3], tokens=[5]):  # the last position comes up
            model(input_ids=ids)
        with torch.no_grad(), block_attention(model, [7]):  # reached during generation, through the cache
            model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    for make, message in ((lambda: ablate_features(model, 1.5, [3]), "layers must be whole numbers, not 1.5"),
                          (lambda: ablate_features(model, 1, [3], value=float("nan")), "value must be a finite"),
                          (lambda: block_attention(model, [0], layers=[True]), "whole numbers, not True")):
        with pytest.raises(ValueError, match=message), make():
            pass
    with pytest.raises(ValueError, match=r"needs a real token after the first one; got input_ids of shape \(2, 1\)"):
        next_token_loss(model, ids[:, :1])
    with pytest.raises(ValueError, match="with 0 real tokens"):
        next_token_loss(model, ids, torch.zeros_like(ids))
