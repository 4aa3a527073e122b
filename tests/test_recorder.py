"""The streamed recorder against HF eager attentions and hidden states, on tiny models and on SmolLM2."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from sinkscope import metrics
from sinkscope.errors import RecorderError
from sinkscope.record import Recorder
from sinkscope.record.run import encode_with_bos
from tests.tiny_models import tiny_llama, tiny_qwen2

PROMPTS = [line for line in open("examples/prompts.txt", encoding="utf-8").read().splitlines() if line]


def eager_reference(model, input_ids):
    """Full attentions [L,H,T,T] and residual streams [L,T,D] of one unpadded sample, from HF eager."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, output_attentions=True, output_hidden_states=True)
    finally:
        model.set_attn_implementation(previous)
    attn = torch.stack([a[0] for a in out.attentions]).float()
    # hidden_states[l + 1] is the output of block l, except the last entry, which HF returns after the final norm
    hidden = list(out.hidden_states[1:])
    return attn, hidden, out.hidden_states[0][0]


def block_outputs(model, input_ids):
    """Pre-norm outputs of every block, via plain forward hooks (HF returns the last one normed)."""
    outs = []
    hooks = [blk.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o)[0]))
             for blk in model.model.layers]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for hk in hooks:
            hk.remove()
    return torch.stack(outs).float()


def padded_batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (3, 24))
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # right padding
    mask[2, :6] = 0  # left padding
    ids[2, 6] = 1
    return ids, mask


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_matches_eager_with_padding(factory):
    model = factory()
    ids, mask = padded_batch()
    with Recorder(model, attention_maps=[(1, 3)], hidden_states=[2], abs_threshold=0.01, rel_threshold=3.0) as rec:
        model(input_ids=ids, attention_mask=mask)
    assert model.config._attn_implementation == "sdpa", "the recorder must restore the attention implementation"
    assert len(rec.samples) == 3
    for b, s in enumerate(rec.samples):
        keep = mask[b].bool()
        one = ids[b : b + 1, keep]
        attn, _, _ = eager_reference(model, one)
        hidden = block_outputs(model, one)  # [L, T, D]
        assert s.attention_received.shape == (3, 4, int(keep.sum()))
        np.testing.assert_allclose(s.attention_received, metrics.attention_received(attn), atol=1e-4)
        np.testing.assert_allclose(s.attention_maps[(1, 3)], attn[1, 3].numpy(), atol=1e-5)
        np.testing.assert_allclose(s.hidden_states[2], hidden[2].numpy(), atol=1e-5)
        np.testing.assert_allclose(s.bos_cosine, metrics.bos_cosine(hidden), atol=1e-4)
        np.testing.assert_allclose(s.max_abs, hidden.abs().amax(-1).numpy(), atol=1e-4)
        np.testing.assert_allclose(s.median_abs, np.median(np.abs(hidden.numpy()).reshape(3, -1), axis=1), rtol=1e-5)
        ref = metrics.find_massive(hidden, abs_threshold=0.01, rel_threshold=3.0)
        assert len(ref) > 0
        got = s.massive[["layer", "token", "feature"]].to_numpy()
        np.testing.assert_array_equal(got, ref[["layer", "token", "feature"]].to_numpy())
        np.testing.assert_allclose(s.massive["value"], ref["value"], rtol=1e-5)
        # the recorded split reproduces the residual update of each block
        prev = np.concatenate([np.zeros((1,) + hidden.shape[1:]), hidden[:-1].numpy()])
        delta = (hidden.numpy() - prev)[s.massive.layer, s.massive.token, s.massive.feature]
        rows = s.massive.layer > 0
        np.testing.assert_allclose((s.massive.attn_out + s.massive.mlp_out)[rows], delta[rows], atol=1e-4)
        np.testing.assert_allclose((s.massive.attn_share + s.massive.mlp_share)[rows], 1.0, atol=1e-4)


def test_smollm2_matches_eager(smollm2):
    model, tok = smollm2
    ids = torch.tensor([encode_with_bos(tok, PROMPTS[3], None)])
    with Recorder(model, tokenizer=tok) as rec:
        model(input_ids=ids)
    s = rec.samples[0]
    attn, _, _ = eager_reference(model, ids)
    hidden = block_outputs(model, ids)
    np.testing.assert_allclose(s.attention_received, metrics.attention_received(attn), atol=1e-4)
    np.testing.assert_allclose(s.bos_cosine, metrics.bos_cosine(hidden), atol=1e-4)
    np.testing.assert_allclose(s.max_abs, hidden.abs().amax(-1).numpy(), rtol=1e-4, atol=1e-3)
    ref = metrics.find_massive(hidden)
    assert s.massive[["layer", "token", "feature"]].equals(ref[["layer", "token", "feature"]])
    assert s.tokens[0] == tok.bos_token and "".join(s.tokens[1:]) == PROMPTS[3]


def test_smollm2_sinks_massive_activations_and_bos_alignment(smollm2):
    """Measured on examples/prompts.txt (6 prompts), fp32 CPU, on 2026-11-24:
    - position 0 is a sink (>= half the heads with alpha > 0.3) in 82-93% of layers 2..29;
    - massive activations (>= 100 and >= 1000x median) appear on position 0 from layer 11, feature 507 in every
      prompt (value ~2.5e4, 99.9% written by the MLP of layer 11), feature 247 in one; Jaccard of the position-0
      feature sets across prompts = 0.83;
    - in layers 2..8 the intermediate sinks (' the', 'Trans', 'Mass', ...) have cos-to-BOS 0.97-0.99, while
      the other tokens average 0.43-0.55.
    """
    model, tok = smollm2
    with Recorder(model, tokenizer=tok) as rec:
        for text in PROMPTS:
            model(input_ids=torch.tensor([encode_with_bos(tok, text, None)]))
    feature_sets = []
    for s in rec.samples:
        flags = metrics.sink_layers(s.attention_received, min_queries=1)  # [L, T]; one prompt has 7 tokens
        assert flags[2:, 0].mean() >= 0.75, s.tokens
        assert metrics.sink_rate(s.attention_received)[0] >= 60.0
        m = s.massive
        assert len(m) and set(m.token) == {0}, "massive activations sit on position 0"
        assert (m.value.abs() >= 100).all() and (m.value.abs() >= 1000 * s.median_abs[m.layer]).all()
        origin = metrics.origin_table(m)
        assert (origin.mlp_share > 0.9).all(), "the jump comes from an MLP"
        feature_sets.append(set(m.feature))
        cos = s.bos_cosine
        sink_cos = [cos[layer, k] for layer in range(2, 9) for k in range(1, len(s)) if flags[layer, k]]
        other_cos = [cos[layer, k] for layer in range(2, 9) for k in range(1, len(s)) if not flags[layer, k]]
        assert sink_cos, f"no intermediate sink in layers 2..8 of {s.tokens}"
        assert np.median(sink_cos) >= 0.95
        assert np.mean(other_cos) <= 0.65
    assert metrics.mean_pairwise_jaccard(feature_sets) >= 0.75
    assert set.intersection(*feature_sets) == {507}


def test_lora_zero_init_records_the_same_numbers():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    ids, mask = padded_batch()
    with Recorder(base) as rec_base:
        base(input_ids=ids, attention_mask=mask)
    wrapped = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with Recorder(wrapped) as rec_lora:
        wrapped(input_ids=ids, attention_mask=mask)
    assert wrapped.base_model.model.config._attn_implementation == "sdpa"
    for a, b in zip(rec_base.samples, rec_lora.samples, strict=True):
        np.testing.assert_allclose(a.attention_received, b.attention_received, atol=1e-6)
        np.testing.assert_allclose(a.bos_cosine, b.bos_cosine, atol=1e-6)
        np.testing.assert_allclose(a.max_abs, b.max_abs, atol=1e-6)


def test_inputs_embeds_and_annotations():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 10))
    embeds = model.get_input_embeddings()(ids)
    with Recorder(model) as rec:
        rec.annotate_next(sample_ids=["utt-1"], tokens=[[f"t{i}" for i in range(10)]],
                          segments=[[("bos", 0, 1), ("audio", 1, 6), ("prompt", 6, 10)]], extra=[{"mode": "asr"}])
        model(inputs_embeds=embeds)
        model(input_ids=ids)
    first, second = rec.samples
    assert first.sample_id == "utt-1" and first.tokens[3] == "t3" and first.extra == {"mode": "asr"}
    assert first.segments[1] == ("audio", 1, 6)
    np.testing.assert_allclose(first.attention_received, second.attention_received, atol=1e-6)
    assert second.sample_id != first.sample_id


def test_recorder_refuses_cached_decoding_and_bad_requests():
    model = tiny_llama()
    with pytest.raises(RecorderError, match="outside the model"):
        Recorder(model, attention_maps=[(7, 0)])
    for kwargs, message in ((dict(top_k=0), r"top_k must be a whole number >= 1 \(the number of features kept"),
                            (dict(abs_threshold=-1.0), "abs_threshold must be a finite number >= 0"),
                            (dict(rel_threshold=float("nan")), "rel_threshold must be a finite number >= 0"),
                            (dict(hidden_dtype=torch.int8), "hidden_dtype must be a floating-point torch dtype"),
                            (dict(attention_maps=[(0.5, 1)]), "0.5 is not one"),
                            (dict(hidden_states=["2"]), "'2' is not one")):
        with pytest.raises(RecorderError, match=message):  # before: a crash mid-forward, or accepted silently
            Recorder(model, **kwargs)
    Recorder(model, top_k=10**6, abs_threshold=np.float32(50), rel_threshold=0)  # top_k is capped at the width
    ids = torch.randint(3, 128, (1, 6))
    out = model(input_ids=ids, use_cache=True)
    # transformers 5.2x calls the cache `cache` (`past_key_values` is deprecated); older 5.x only takes the latter
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    with Recorder(model), pytest.raises(RecorderError, match="full forward passes"):
        model(input_ids=ids[:, -1:], **{name: out.past_key_values})
    assert model.config._attn_implementation == "sdpa"
    # a batch row without real tokens (an all-zero mask row) is named, not a numpy error from deep in a reduction;
    # the recorder stays usable for the next forward
    ids, mask = torch.randint(3, 128, (3, 6)), torch.ones(3, 6, dtype=torch.long)
    mask[2] = 0
    with Recorder(model) as rec, torch.no_grad():
        with pytest.raises(RecorderError, match=r"sample 2 of this batch of 3 has no real tokens"):
            model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids[:2], attention_mask=mask[:2])
    assert [len(s) for s in rec.samples] == [6, 6]
    with Recorder(model), torch.no_grad(), pytest.raises(RecorderError, match=r"empty batch \(input_ids of shape "
                                                                          r"\(1, 0\)\)"):
        model(input_ids=ids[:1, :0])  # before: transformers' reshape error


def test_two_models_record_side_by_side_and_one_model_takes_one_recorder():
    """Recorders on two models, one inside the other (comparing a model with its fine-tuned copy), each record
    their own model as they would alone; a second recorder on the same model, or the same one entered twice, is
    refused by name (before: both failed with "layers ... were not recorded"), and the first goes on recording."""
    a, b = tiny_llama(), tiny_qwen2()
    ids = torch.randint(3, 128, (1, 9))
    ids[0, 0] = 1
    alone = {}
    for name, model in (("a", a), ("b", b)):
        with Recorder(model) as rec, torch.no_grad():
            model(input_ids=ids)
        alone[name] = rec.samples[0]
    with Recorder(a) as ra, Recorder(b) as rb, torch.no_grad():
        b(input_ids=ids)
        a(input_ids=ids)
        with pytest.raises(RecorderError, match="another Recorder is already active on this LlamaForCausalLM"):
            Recorder(a).__enter__()
        with pytest.raises(RecorderError, match="this Recorder is already active"):
            ra.__enter__()
        a(input_ids=ids)
    for got, ref in ((ra.samples[0], alone["a"]), (ra.samples[1], alone["a"]), (rb.samples[0], alone["b"])):
        np.testing.assert_array_equal(got.attention_received, ref.attention_received)
        np.testing.assert_array_equal(got.bos_cosine, ref.bos_cosine)
    assert len(ra.samples) == 2 and len(rb.samples) == 1
    assert a.config._attn_implementation == b.config._attn_implementation == "sdpa"
    with Recorder(a) as again, torch.no_grad():  # free again once the first left its block
        a(input_ids=ids)
    assert len(again.samples) == 1


def test_recorder_refuses_softcapped_attention_by_name():
    """Gemma 2's logit softcapping is not plain softmax attention: the recorder says so in one RecorderError naming
    the attention module (not a NotImplementedError, which the CLI would report as a sinkscope bug), and leaves the
    model as it was."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           vocab_size=64)).eval()
    ids = torch.randint(0, 64, (1, 5))
    before = model(ids).logits
    with pytest.raises(RecorderError, match=r"Gemma2Attention uses attention with logit softcapping \(softcap=50"):
        with Recorder(model):
            model(ids)
    torch.testing.assert_close(model(ids).logits, before)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    model = tiny_llama()
    ids, mask = padded_batch()
    with Recorder(model) as rec_cpu:
        model(input_ids=ids, attention_mask=mask)
    model = model.cuda()
    with Recorder(model) as rec_gpu:
        model(input_ids=ids.cuda(), attention_mask=mask.cuda())
    for a, b in zip(rec_cpu.samples, rec_gpu.samples, strict=True):
        np.testing.assert_allclose(a.attention_received, b.attention_received, atol=1e-4)
        np.testing.assert_allclose(a.bos_cosine, b.bos_cosine, atol=1e-4)
        np.testing.assert_allclose(a.max_abs, b.max_abs, rtol=1e-4, atol=1e-4)


def test_median_bracket_on_many_draws():
    """The bracketed median equals np.median, bit for bit, over 100 arrays of several sizes and distributions (heavy
    tails, a massive outlier, ties from rounding), each drawing its own random bracket."""
    from sinkscope.record.reduce import median_nonneg

    rng = np.random.default_rng(1)
    for i in range(100):
        n = int(rng.integers(65_537, 400_000))
        kind = i % 4
        x = (rng.standard_normal(n) if kind == 0 else rng.standard_t(2, n) if kind == 1 else
             np.round(rng.standard_normal(n), 2) if kind == 2 else np.r_[rng.standard_normal(n - 1), 3e4])
        a = np.abs(x).astype(np.float32)
        assert median_nonneg(torch.from_numpy(a)).item() == np.float32(np.median(a)), (i, n, kind)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_device_path_matches_eager_with_padding(dtype):
    """On CUDA (the device path: Triton column sums, radix median) against HF eager attentions, padded batch.
    fp32: within 1e-5. bf16: within 2e-3, because eager rounds each probability to bf16 (relative 2**-9) before
    the recorder's reference sums them; the kernel's own bf16 error against float64 on the same Q and K is
    bounded at 1e-3 in tests/test_kernels.py."""
    model = tiny_llama().to("cuda", dtype)
    ids, mask = padded_batch()
    with Recorder(model) as rec:
        model(input_ids=ids.cuda(), attention_mask=mask.cuda())
    for b, s in enumerate(rec.samples):
        keep = mask[b].bool()
        attn, _, _ = eager_reference(model, ids[b : b + 1, keep].cuda())
        want = metrics.attention_received(attn.cpu())
        np.testing.assert_allclose(s.attention_received, want, atol=1e-5 if dtype == torch.float32 else 2e-3)
        hidden = block_outputs(model, ids[b : b + 1, keep].cuda()).cpu()
        np.testing.assert_allclose(s.bos_cosine, metrics.bos_cosine(hidden), atol=1e-4 if dtype == torch.float32
                                   else 1e-2)
        np.testing.assert_allclose(s.median_abs, np.median(np.abs(hidden.numpy()).reshape(3, -1), axis=1),
                                   rtol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama-2kv", "qwen2-1kv"])
def test_cuda_unpadded_bf16_grouped_heads_match_eager(make):
    """Unpadded bf16 on CUDA takes cuDNN's attention with the grouped-query K and V as they are (not repeated):
    its output (through the logits) and its log-sum-exp (through alpha) against HF eager."""
    model = make().to("cuda", torch.bfloat16)
    ids = torch.randint(3, 128, (2, 40), device="cuda")
    ids[:, 0] = 1
    with torch.no_grad():
        plain = model(input_ids=ids).logits.float()
        with Recorder(model) as rec:
            recorded = model(input_ids=ids).logits.float()
    torch.testing.assert_close(recorded, plain, atol=2e-2, rtol=2e-2)
    for b, s in enumerate(rec.samples):
        attn, _, _ = eager_reference(model, ids[b : b + 1])
        np.testing.assert_allclose(s.attention_received, metrics.attention_received(attn.cpu()), atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_cuda_graphs_replay_the_same_record(padded, monkeypatch):
    """`kernels.CUDA_GRAPHS` (session 20, first run on a GPU by this test): six forwards of one batch in one
    recorder, whose layers are captured as CUDA graphs once their inputs sit at the same addresses twice and
    replayed after; every forward's record is the one without graphs, bit for bit, and graphs were replayed
    (if the caching allocator gave other addresses each forward they never would be: then graphs cannot help)."""
    from sinkscope.record import kernels

    model = tiny_llama().to("cuda", torch.bfloat16)
    ids, mask = padded_batch()
    if not padded:
        mask = torch.ones_like(mask)
    ids, mask = ids.cuda(), mask.cuda()

    def record(graphs: bool, forwards: int):
        monkeypatch.setattr(kernels, "CUDA_GRAPHS", graphs)
        with Recorder(model, rel_threshold=3.0) as rec, torch.no_grad():
            for _ in range(forwards):
                model(input_ids=ids, attention_mask=mask)
        return rec

    want = record(False, 1).samples
    rec = record(True, 6)
    state = rec._device_state
    assert not kernels._GRAPHS_FAILED, kernels._GRAPHS_FAILED
    assert state.graphs.captures > 0 and state.graphs.replays > 0, (state.graphs.captures, state.graphs.replays)
    for i, s in enumerate(rec.samples):
        w = want[i % len(want)]
        for field in ("attention_received", "bos_cosine", "max_abs", "median_abs", "top_features", "top_values",
                      "feature_max_abs", "mlp_feature_max_abs"):
            np.testing.assert_array_equal(getattr(s, field), getattr(w, field), err_msg=f"{field}, sample {i}")
        assert s.massive.equals(w.massive)


@pytest.mark.parametrize("case", ["odd", "even", "ties", "bracket-miss", "small"])
def test_median_is_numpys_exactly(case):
    """The CPU median (a random bracket, then a selection inside it; numpy) and its torch twin (what GPU tensors
    take on the torch path) against np.median, bit for bit, also where the bracket misses (half the entries equal,
    the rest spread) and the full selection runs."""
    from sinkscope.record.reduce import _median_torch, median_nonneg

    rng = np.random.default_rng(0)
    x = {"odd": lambda: rng.standard_normal(200_001),
         "even": lambda: rng.standard_normal(300_000),
         "ties": lambda: np.full(100_000, 3.0),
         "bracket-miss": lambda: np.concatenate([np.zeros(60_000), rng.uniform(1, 2, 60_001)]),
         "small": lambda: rng.standard_normal(10)}[case]()
    a = np.abs(x).astype(np.float32)
    got = median_nonneg(torch.from_numpy(a))
    assert got.dtype == torch.float32 and got.item() == np.float32(np.median(a)), (got.item(), np.median(a))
    # the torch implementation that GPU tensors take (the same bracket, kthvalue for the selections), here on the CPU
    got = _median_torch(torch.from_numpy(a))
    assert got.dtype == torch.float32 and got.item() == np.float32(np.median(a)), (got.item(), np.median(a))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_pass_attention_matches_sdpa_and_explicit_softmax(dtype):
    """The CPU's one pass (output and column sums together): the output against SDPA, the column sums against the
    explicit causal softmax in float64, with grouped-query heads and a length that is not a multiple of the chunk."""
    from sinkscope.record.attention import CHUNK_ROWS, attention_with_column_sums

    torch.manual_seed(0)
    t = 2 * CHUNK_ROWS + 23
    q, k, v = torch.randn(2, 6, t, 16) * 3, torch.randn(2, 2, t, 16) * 3, torch.randn(2, 2, t, 16)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out, colsum = attention_with_column_sums(q, k, v, 0.25)
    out = out.transpose(1, 2)  # returned as [B, T, H, d], the AttentionInterface's layout
    kr, vr = (x.repeat_interleave(3, dim=1) for x in (k, v))
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), kr.double(), vr.double(), is_causal=True,
                                                            scale=0.25)
    assert out.dtype == dtype and out.shape == want.shape
    torch.testing.assert_close(out.double(), want, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)
    scores = (q.double() @ kr.double().transpose(-1, -2)) * 0.25
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(colsum.double(), scores.softmax(-1).sum(dim=2), atol=1e-4, rtol=1e-5)


def test_recorder_uses_the_one_pass_on_cpu_and_keeps_the_models_output():
    """An unpadded CPU forward under the recorder goes through the one pass in every layer, and the model's logits
    are those of a plain forward (float32)."""
    from sinkscope.record import attention

    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 40))
    ids[0, 0] = 1
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    calls = []
    original = attention.attention_with_column_sums
    attention.attention_with_column_sums = lambda *a: calls.append(1) or original(*a)
    try:
        with torch.no_grad(), Recorder(model) as rec:
            recorded = model(input_ids=ids).logits
    finally:
        attention.attention_with_column_sums = original
    assert len(calls) == model.config.num_hidden_layers and len(rec.samples) == 1
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)


def test_recorder_restores_the_attention_implementation_it_found():
    """Entering a Recorder switches the model to sinkscope's attention and leaving restores what was there; the
    second and later entries replay the first switch directly (transformers' setter costs milliseconds), and a
    change the user made in between (here to eager) is seen and restored as well, also around a refused second
    recorder on the same model."""
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 9))
    assert model.config._attn_implementation == "sdpa"
    for _ in range(3):
        with Recorder(model) as rec:
            assert model.config._attn_implementation == "sinkscope"
            assert model.model.config._attn_implementation == "sinkscope"
            model(input_ids=ids)
        assert model.config._attn_implementation == "sdpa"
        assert len(rec.samples) == 1
    model.set_attn_implementation("eager")
    with Recorder(model):
        assert model.config._attn_implementation == "sinkscope"
        with pytest.raises(RecorderError, match="another Recorder is already active"), Recorder(model):
            pass
        assert model.config._attn_implementation == "sinkscope", "the refused recorder leaves the outer one's switch"
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("padded", [False, True])
def test_reductions_in_token_chunks_equal_one_chunk(monkeypatch, padded):
    """A layer reduced in token chunks (long contexts: every temporary bounded) gives the fields and massive entries
    of the layer reduced at once, with the workspace's |h| and |mlp_out| blocks reused from chunk to chunk."""
    from sinkscope.record import reduce as R

    gen = torch.Generator().manual_seed(0)
    h, a, m = (torch.randn(3, 50, 16, generator=gen) for _ in range(3))
    h[:, :, 5] *= 40  # a massive feature on every token, and one token with many
    h[1, 7] *= 30
    valid = torch.ones(3, 50, dtype=torch.bool)
    if padded:
        valid[1, 40:] = False
        valid[2, :9] = False
    args = (h, a, m, valid, padded, 4, 10.0, 20.0)
    whole, whole_massive = R.reduce_layer(*args, workspace={})
    monkeypatch.setattr(R, "CHUNK_ELEMENTS", 3 * 16 * 7)  # chunks of 7 tokens
    parts, parts_massive = R.reduce_layer(*args, workspace={})
    assert len(whole_massive) == 1 and len(parts_massive) > 1
    for key, value in whole.items():
        if key == "bos_cosine":
            torch.testing.assert_close(parts[key], value, atol=1e-6, rtol=0)
        else:
            assert torch.equal(parts[key], value), key
    def by_position(found):  # chunks list their entries chunk by chunk: order them by (batch, token, feature)
        cols = [torch.cat([f[i] for f in found]) for i in range(6)]
        order = torch.argsort(cols[0] * 10**6 + cols[1] * 10**3 + cols[2])
        return [c[order] for c in cols]

    for i, (got, want) in enumerate(zip(by_position(parts_massive), by_position(whole_massive), strict=True)):
        assert torch.equal(got, want), i
    tokens = whole_massive[0][0] * 100 + whole_massive[0][1]
    assert int(torch.unique(tokens, return_counts=True)[1].max()) > 3  # several entries on one token


def test_cos_to_bos_is_the_same_on_the_elementwise_branch():
    """cos-to-BOS takes an elementwise dot product on CUDA and whenever float32 matmuls may round (TF32 / bf16); on
    the CPU at full precision a batched matmul. Both give the same values for a batch of several samples (the
    elementwise branch once broadcast BOS over the wrong axis and failed for B > 1: caught on an H200, session 15),
    and both equal torch's cosine similarity."""
    from sinkscope.record import reduce as R

    gen = torch.Generator().manual_seed(1)
    h, a, m = (torch.randn(3, 20, 16, generator=gen) for _ in range(3))
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[2, :4] = False  # left padding: BOS of sample 2 is position 4
    args = (h, a, m, valid, True, 4, 10.0, 20.0)
    exact, _ = R.reduce_layer(*args, workspace={})
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        elementwise, _ = R.reduce_layer(*args, workspace={})
    finally:
        torch.set_float32_matmul_precision(previous)
    torch.testing.assert_close(elementwise["bos_cosine"], exact["bos_cosine"], atol=1e-6, rtol=0)
    first = valid.int().argmax(dim=1)
    want = torch.nn.functional.cosine_similarity(h, h[torch.arange(3), first][:, None, :], dim=-1)
    torch.testing.assert_close(exact["bos_cosine"][valid], want[valid], atol=1e-6, rtol=0)


def test_sliding_window_attention_is_recorded_as_eager_sees_it():
    """A model whose layers attend within a sliding window shorter than the input (Mistral, window 6, T=20): the
    window's mask reaches the column sums (no one-pass shortcut over the full causal triangle), so alpha equals HF
    eager's attentions."""
    from transformers import MistralConfig, MistralForCausalLM

    from tests.tiny_models import BASE

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**{**BASE, "num_key_value_heads": 2, "sliding_window": 6})).eval()
    ids = torch.randint(3, 128, (1, 20))
    ids[0, 0] = 1
    with Recorder(model) as rec:
        model(input_ids=ids)
    attn, _, _ = eager_reference(model, ids)
    assert int((attn[0, 0, -1] > 0).sum()) == 6  # eager applies the window
    np.testing.assert_allclose(rec.samples[0].attention_received, metrics.attention_received(attn), atol=1e-6)


def test_cpu_recording_sets_glibc_malloc_once_and_can_be_told_not_to(monkeypatch):
    """A CPU recording sets glibc's mmap and trim thresholds once per process (sinkscope.record._malloc: the heap
    churn that made some processes' recorded forwards 10 % slower); SINKSCOPE_MALLOPT=0 leaves malloc alone, and
    non-glibc systems are a no-op."""
    import sys

    from sinkscope.record import _malloc

    monkeypatch.setattr(_malloc, "_STATE", [])
    monkeypatch.setenv("SINKSCOPE_MALLOPT", "0")
    assert _malloc.tune() is False and _malloc._STATE == [False]
    monkeypatch.setattr(_malloc, "_STATE", [])
    monkeypatch.delenv("SINKSCOPE_MALLOPT")
    model = tiny_llama()
    with Recorder(model):
        model(input_ids=torch.randint(3, 128, (1, 8)))
    import ctypes

    glibc = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    assert _malloc._STATE == [glibc]


def test_cpu_recording_gives_the_freed_heap_back_once_a_forward(monkeypatch):
    """After the decoder body, a CPU recording hands the heap's free pages back (`malloc_trim(0)`) before the
    logits are allocated (sinkscope.record._malloc.trim: the retained heap raised the peak RSS); not when
    SINKSCOPE_MALLOPT=0 left malloc alone."""
    import ctypes
    import sys

    from sinkscope.record import _malloc

    model = tiny_llama()
    ids = torch.randint(3, 128, (2, 8))
    monkeypatch.setattr(_malloc, "_STATE", [])
    monkeypatch.setattr(_malloc, "_TRIM", [])
    monkeypatch.setenv("SINKSCOPE_MALLOPT", "0")
    with Recorder(model) as rec:
        model(input_ids=ids)
    assert _malloc._STATE == [False] and _malloc._TRIM == [] and len(rec.samples) == 2
    if not (sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")):
        pytest.skip("not glibc: nothing to trim")
    monkeypatch.setattr(_malloc, "_STATE", [])
    monkeypatch.delenv("SINKSCOPE_MALLOPT")
    assert _malloc.tune() and len(_malloc._TRIM) == 1
    calls = []
    monkeypatch.setattr(_malloc, "_TRIM", [calls.append])
    with Recorder(model) as rec:
        model(input_ids=ids)
        assert calls == [0]
        model(input_ids=ids)
    assert calls == [0, 0] and len(rec.samples) == 4


def _tiny(name: str):
    """A tiny random decoder of an architecture family whose blocks add their updates differently."""
    import transformers as hf

    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, vocab_size=64)
    gqa = dict(base, num_key_value_heads=1)
    configs = {
        "olmo2": (hf.Olmo2Config(**gqa, pad_token_id=0), hf.Olmo2ForCausalLM),  # post-norms on both updates
        "gemma3": (hf.Gemma3TextConfig(**gqa, head_dim=16, sliding_window=4, layer_types=[  # post-norms; windows
            "sliding_attention", "full_attention", "sliding_attention"]), hf.Gemma3ForCausalLM),  # of 4 < T = 9
        "granite": (hf.GraniteConfig(**gqa, residual_multiplier=0.22), hf.GraniteForCausalLM),  # scaled updates
        "phi": (hf.PhiConfig(**base), hf.PhiForCausalLM),  # attention and MLP in parallel
        "qwen3": (hf.Qwen3Config(**gqa, head_dim=16), hf.Qwen3ForCausalLM),
        "glm4": (hf.Glm4Config(**gqa, head_dim=16, pad_token_id=0), hf.Glm4ForCausalLM),  # its own post-norm names
        "mixtral": (hf.MixtralConfig(**gqa, num_local_experts=4, num_experts_per_tok=2), hf.MixtralForCausalLM),
    }
    config, cls = configs[name]
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.mark.parametrize("name", ["olmo2", "gemma3", "granite", "phi", "qwen3", "glm4", "mixtral"])
def test_attention_and_mlp_updates_add_up_in_other_architectures(name, recwarn):
    """Blocks that norm their updates before adding them (OLMo 2, Gemma 3, GLM-4), scale them (Granite), run
    attention and MLP in parallel (Phi) or route the MLP over experts (Mixtral): the recorded attn_out + mlp_out
    of every massive entry is the block's update h_l - h_(l-1) (before session 22 the post-norm and scaled
    families recorded the raw module outputs, off by ~100 %), alpha matches eager, and the recorder's own check
    of the split stays silent."""
    model = _tiny(name)
    ids = torch.randint(1, 64, (1, 9))
    with Recorder(model, abs_threshold=0.0, rel_threshold=0.0, hidden_states=[0, 1, 2]) as rec:
        model(input_ids=ids)
    s = rec.samples[0]
    hidden = np.stack([s.hidden_states[layer] for layer in range(3)])
    prev = np.concatenate([np.zeros((1,) + hidden.shape[1:]), hidden[:-1]])
    m = s.massive[s.massive.layer > 0]
    delta = (hidden - prev)[m.layer, m.token, m.feature]
    np.testing.assert_allclose(m.attn_out + m.mlp_out, delta, rtol=1e-3, atol=1e-5)
    assert rec.split_exact is True and not [w for w in recwarn if "update is not the sum" in str(w.message)]
    if name == "gemma3":  # per-layer windows: the global layer is not taken for a windowed one (torch path on GPU)
        assert rec._windows == [4, None, 4]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions
    want = np.stack([metrics.attention_received(a[0].numpy()) for a in attentions])
    np.testing.assert_allclose(s.attention_received, want, atol=1e-5)


def test_a_block_whose_update_is_not_attn_plus_mlp_is_warned_about_once():
    """A hook that adds to a block's output (an intervention, an adapter on the whole block): the recorder's check
    at the first block warns once, naming the block, and says which fields stop describing the updates."""
    model = tiny_llama()
    handle = model.model.layers[0].register_forward_hook(lambda mod, args, out: out + 0.5)
    try:
        rec = Recorder(model)
        with pytest.warns(RuntimeWarning, match="LlamaDecoderLayer's update is not the sum") as caught:
            for _ in range(2):
                with rec:
                    model(input_ids=torch.randint(3, 128, (1, 6)))
        assert len([w for w in caught if "update is not the sum" in str(w.message)]) == 1
        assert rec.split_exact is False and len(rec.samples) == 2
    finally:
        handle.remove()
