"""sinkscope.lens (TransformerLens 4 hooks) and sinkscope.intervene (HF hooks) give the same interventions."""

from __future__ import annotations

import pytest
import torch

from sinkscope import intervene
from sinkscope.intervene import lens


@pytest.fixture(scope="module")
def bridge_and_model(smollm2):
    model, tok = smollm2
    ids = torch.tensor([[tok.bos_token_id] + tok("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    return lens.boot("smollm2-135m", device="cpu"), model, ids


CASES = {
    "ablate": (lambda: lens.ablate_features(11, [507], [0]), lambda m: intervene.ablate_features(m, 11, [507], [0])),
    "block": (lambda: lens.block_attention([0, 3], layers=[4, 9]),
              lambda m: intervene.block_attention(m, [0, 3], layers=[4, 9])),
    "rotate": (lambda: lens.rotate_states(6, [2, 5], reference=0, cosine=0.3),
               lambda m: intervene.rotate_states(m, 6, [2, 5], reference=0, cosine=0.3)),
}


@pytest.mark.parametrize("case", CASES)
def test_lens_hooks_match_hf_interventions(bridge_and_model, case):
    bridge, model, ids = bridge_and_model
    tl_hooks, hf_context = CASES[case]
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        torch.testing.assert_close(bridge(ids, return_type="logits"), plain, atol=1e-3, rtol=1e-3)
        via_lens = bridge.run_with_hooks(ids, return_type="logits", fwd_hooks=tl_hooks())
        with hf_context(model):
            via_hf = model(input_ids=ids).logits
    assert (via_lens - plain).abs().max() > 0.1, "the intervention changed the output"
    torch.testing.assert_close(via_lens, via_hf, atol=2e-3, rtol=1e-3)
