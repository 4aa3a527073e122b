"""MoME: Matryoshka rates and mixture-of-experts adapters on a tiny AVSR model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sinkscope.errors import SinkscopeError
from sinkscope.models.avsr import AVSRConfig, AVSRModel
from sinkscope.models.encoders import AudioEncoderConfig, VideoEncoderConfig
from sinkscope.models.mome import MoMEAdapter, MoMEConfig, balance_loss, route
from sinkscope.record.recorder import Recorder
from tests.test_avsr_model import WORDS, batch, tiny_tokenizer
from tests.tiny_models import tiny_llama

RATES = ((4, 2), (8, 4))


def tiny(mome: MoMEConfig | None = None, rates=RATES, seed: int = 0) -> AVSRModel:
    cfg = AVSRConfig(mode="avsr", compression="avgpool", projector_hidden=32, rates=rates, mome=mome,
                     audio=AudioEncoderConfig(d_model=32, layers=1, heads=2, ffn=64, max_seconds=4.0),
                     video=VideoEncoderConfig(channels=4, d_model=32, layers=1, heads=2))
    torch.manual_seed(seed)
    return AVSRModel(cfg, llm=tiny_llama(vocab_size=len(WORDS) + 8), tokenizer=tiny_tokenizer()).eval()


def _logits(model: AVSRModel, b: dict, rate: int = 0) -> torch.Tensor:
    model.set_rate(rate)
    built = model.build(b)
    with torch.no_grad():
        return model.llm(inputs_embeds=built["inputs_embeds"], attention_mask=built["attention_mask"]).logits


@pytest.mark.parametrize("location", ["mlp", "attn", "block"])
def test_zero_initialised_experts_leave_the_base_model_unchanged(location):
    b = batch()
    base, mome = tiny(), tiny(MoMEConfig(experts=4, shared=1, top_k=2, location=location))
    mome.load_state_dict(base.state_dict(), strict=False)
    for rate in range(len(RATES)):
        torch.testing.assert_close(_logits(mome, b, rate), _logits(base, b, rate), rtol=0, atol=0)
    assert len(mome.mome.routing) == 3, "every block routed"


def test_router_picks_k_experts_with_gates_that_sum_to_one_and_shared_experts_always_contribute():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 6)
    ids, gates, probs = route(logits, 2)
    assert ids.shape == (2, 5, 2) and torch.equal(ids, logits.topk(2, dim=-1).indices)
    torch.testing.assert_close(gates.sum(-1), torch.ones(2, 5))
    torch.testing.assert_close(gates, probs.gather(-1, ids) / probs.gather(-1, ids).sum(-1, keepdim=True))
    adapter = MoMEAdapter(8, MoMEConfig(experts=6, shared=2, top_k=2, bottleneck=4), n_rates=1)
    for expert in [*adapter.experts, *adapter.shared]:
        torch.nn.init.normal_(expert.up.weight)
    x = torch.randn(2, 5, 8)
    out, routing = adapter(x)
    expected = sum(e(x) for e in adapter.shared)
    for k in range(2):
        picked = torch.stack([torch.stack([adapter.experts[int(routing["ids"][i, t, k])](x[i, t]) for t in range(5)])
                              for i in range(2)])
        expected = expected + routing["gates"][..., k:k + 1] * picked
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for expert in adapter.experts:  # routed experts off: the shared ones still contribute
        torch.nn.init.zeros_(expert.up.weight)
    out, _ = adapter(x)
    torch.testing.assert_close(out, sum(e(x) for e in adapter.shared))


def test_shared_router_is_one_gate_for_every_rate():
    shared = tiny(MoMEConfig(shared_router=True))
    per_rate = tiny(MoMEConfig(shared_router=False))
    assert all(len(a.routers) == 1 for a in shared.mome.adapters)
    assert all(len(a.routers) == len(RATES) for a in per_rate.mome.adapters)
    adapter = per_rate.mome.adapters[0]
    x = torch.randn(1, 3, adapter.routers[0].in_features)
    torch.nn.init.normal_(adapter.routers[1].weight)
    assert not torch.equal(adapter(x, rate=0)[1]["probs"], adapter(x, rate=1)[1]["probs"])
    adapter = shared.mome.adapters[0]
    assert torch.equal(adapter(x, rate=0)[1]["probs"], adapter(x, rate=1)[1]["probs"])


def test_balance_loss_is_minimal_for_uniform_routing():
    n = 4
    uniform_ids = torch.arange(8).remainder(n).reshape(1, 8, 1)
    uniform = balance_loss(uniform_ids, torch.full((1, 8, n), 1 / n))
    assert float(uniform) == pytest.approx(1.0)
    skewed_probs = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(1, 8, n)
    skewed = balance_loss(torch.zeros(1, 8, 1, dtype=torch.long), skewed_probs)
    assert float(skewed) == pytest.approx(n * 0.7) and float(skewed) > float(uniform)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]])  # padding does not count
    assert float(balance_loss(uniform_ids, torch.full((1, 8, n), 1 / n), mask)) == pytest.approx(1.0)


def test_matryoshka_loss_is_the_weighted_sum_of_the_per_rate_losses():
    b = batch()
    model = tiny(MoMEConfig(balance=0.5))
    for adapter in model.mome.adapters:
        for expert in [*adapter.experts, *adapter.shared]:
            torch.nn.init.normal_(expert.up.weight, std=0.1)
    model.cfg.rate_weights = (1.0, 0.5)
    with torch.no_grad():
        out = model(b)
        separate = []
        for rate in range(len(RATES)):
            model.set_rate(rate)
            separate.append(model._forward_at_rate(b, False))
    model.set_rate(0)
    for bad in (len(RATES), -1, 0.5, True):  # 0.5 passed the range check and failed later with a TypeError
        with pytest.raises(ValueError, match=rf"rate index must be a whole number in \[0, {len(RATES) - 1}\]"):
            model.set_rate(bad)
    expected_ce = separate[0]["loss"] + 0.5 * separate[1]["loss"]
    balance = (separate[0]["balance"] + separate[1]["balance"]) / 2
    torch.testing.assert_close(out["loss"], expected_ce + 0.5 * balance)
    assert out["per_rate"][1]["width"] < out["per_rate"][0]["width"], "the higher rate has fewer tokens"
    assert model.rate_index == 0


def test_rate_set_config_is_checked_and_the_crop_serves_every_rate():
    cfg = AVSRConfig(compression="avgpool", rates=((4, 2), (16, 5)))
    assert cfg.video_multiple == math.lcm(2, 5) and cfg.rate_set == [(4, 2), (16, 5)]
    for bad, message in ((dict(compression="stack", rates=((4, 2),)), "needs compression: avgpool"),
                         (dict(compression="avgpool", rates=((4,),)), "pairs"),
                         (dict(compression="avgpool", rates=((4, 2),), rate_weights=(1.0, 2.0)), "one weight"),
                         (dict(mome=MoMEConfig(top_k=5, experts=4)), "top_k"),
                         (dict(mome=MoMEConfig(location="ffn")), "location")):
        with pytest.raises(ValueError, match=message):
            AVSRConfig(**bad).check()
    from sinkscope.config import load_config
    from sinkscope.train.avsr import TrainConfig

    with pytest.raises(SinkscopeError, match="mome: unknown field"):
        load_config(TrainConfig, None, ["model.mome={'experts': 2, 'nope': 1}"])
    parsed = load_config(TrainConfig, None, ["model.compression=avgpool", "model.rates=[[4, 2], [16, 5]]",
                                             "model.mome={'experts': 3, 'top_k': 1}"])
    assert parsed.model.mome == MoMEConfig(experts=3, top_k=1) and parsed.model.rates == ((4, 2), (16, 5))


def test_the_recorder_sees_the_adapters_and_matches_eager():
    """The adapters' output reaches the residual stream through the hooked modules: the recorder's α and
    block outputs on the MoME model equal HF eager attention's, and differ from the base model's."""
    b = batch()
    model = tiny(MoMEConfig(location="mlp"))
    for adapter in model.mome.adapters:
        for expert in [*adapter.experts, *adapter.shared]:
            torch.nn.init.normal_(expert.up.weight, std=0.5)
    built = model.build(b)
    with Recorder(model.llm) as rec, torch.no_grad():
        model.llm(inputs_embeds=built["inputs_embeds"], attention_mask=built["attention_mask"])
    llm = model.llm.get_base_model()
    llm.config._attn_implementation = "eager"
    with torch.no_grad():
        eager = llm(inputs_embeds=built["inputs_embeds"], attention_mask=built["attention_mask"],
                    output_attentions=True, output_hidden_states=True)
    llm.config._attn_implementation = "sdpa"
    mask = built["attention_mask"][0].bool()
    T = int(mask.sum())
    for layer, att in enumerate(eager.attentions):
        a = att[0, :, :T, :T]  # [H, T, T] of sample 0 (right-padded)
        counts = torch.arange(T, 0, -1, dtype=a.dtype)
        alpha = a.sum(dim=1) / counts
        np.testing.assert_allclose(rec.samples[0].attention_received[layer], alpha.numpy(), rtol=1e-4, atol=1e-6)
        if layer + 1 < len(eager.attentions):  # HF's last hidden state is after the final norm
            hidden = eager.hidden_states[layer + 1][0, :T]
            np.testing.assert_allclose(rec.samples[0].max_abs[layer], hidden.abs().amax(-1).numpy(), rtol=1e-4)
    base = tiny()
    base.load_state_dict(model.state_dict(), strict=False)
    base_built = base.build(b)
    with Recorder(base.llm) as base_rec, torch.no_grad():
        base.llm(inputs_embeds=base_built["inputs_embeds"], attention_mask=base_built["attention_mask"])
    assert not np.allclose(base_rec.samples[0].max_abs, rec.samples[0].max_abs)


def test_a_killed_mome_training_run_resumes_identically(make_corpus, tmp_path):
    from safetensors.torch import load_file

    from sinkscope.train.avsr import read_train_config, train

    corpus = make_corpus(16, 7)

    def factory(cfg):
        return tiny(MoMEConfig(experts=3, shared=1, top_k=2, bottleneck=8))

    def config(out):
        cfg = read_train_config(None, [f"data={corpus}", f"out={out}", "epochs=2", "batch_size=4", "lr=0.003",
                                       "warmup_steps=1", "max_train=8", "max_eval=2", "max_new_tokens=3"])
        cfg.model = factory(None).cfg
        return cfg

    full = train(config(tmp_path / "full"), log=lambda m: None, model_factory=factory)
    assert all("balance" in h and "ce_rate1" in h for h in full["history"])

    def killed(message: str) -> None:
        if message.startswith("epoch 1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "split"), log=killed, model_factory=factory)
    resumed = train(config(tmp_path / "split"), log=lambda m: None, model_factory=factory)
    assert [h["ce"] for h in resumed["history"]] == pytest.approx([h["ce"] for h in full["history"]], rel=1e-5)
    a = load_file(tmp_path / "full" / "epoch-002.safetensors")
    b = load_file(tmp_path / "split" / "epoch-002.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("mome.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_eval_rate_picks_one_rate_of_the_set():
    from sinkscope.eval import rate_index

    cfg = AVSRConfig(compression="avgpool", rates=((4, 2), (16, 5)))
    assert rate_index(cfg, "16,5") == 1 and rate_index(cfg, "4,2") == 0
    with pytest.raises(SinkscopeError, match=r"runs at \['4,2', '16,5'\]"):
        rate_index(cfg, "8,2")
    asr = AVSRConfig(mode="asr", compression="avgpool", rates=((4, 1), (32, 1)))
    assert rate_index(asr, "32") == 1
    with pytest.raises(SinkscopeError, match="runs at"):
        rate_index(asr, "fast")


def _recorded_mome(path):
    """A tiny MoME model with random routers, one batch recorded into a trace at `path`; returns the model."""
    b = batch()
    model = tiny(MoMEConfig(experts=4, top_k=2))
    for adapter in model.mome.adapters:
        torch.nn.init.normal_(adapter.routers[0].weight)
    built = model.build(b)
    with Recorder(model.llm, routing=model.mome) as rec, torch.no_grad():
        rec.annotate_next(sample_ids=b["ids"], segments=built["segments"])
        model.llm(inputs_embeds=built["inputs_embeds"], attention_mask=built["attention_mask"])
    rec.save(path)
    return model


def test_router_fields_round_trip_through_a_trace(tmp_path):
    from sinkscope.trace import Trace

    model = _recorded_mome(tmp_path / "tr")
    expected = {i: model.mome.routing[i] for i in range(3)}
    tr = Trace.load(tmp_path / "tr")
    for k, sample in enumerate(tr):
        T = len(sample)
        assert sample.router_ids.shape == (3, T, 2) and sample.router_gates.shape == (3, T, 2)
        np.testing.assert_allclose(sample.router_gates.sum(-1), 1.0, rtol=1e-5)
        for layer in range(3):
            np.testing.assert_array_equal(sample.router_ids[layer], expected[layer]["ids"][k, :T].numpy())
        # ARCHITECTURE.md's form: layer -> (expert ids [T, k], gates [T, k])
        assert sorted(sample.router) == [0, 1, 2]
        ids, gates = sample.router[1]
        np.testing.assert_array_equal(ids, sample.router_ids[1])
        np.testing.assert_array_equal(gates, sample.router_gates[1])
    plain = Recorder(tiny().llm)  # a model without MoME: no router fields, and the trace stays valid
    assert plain.routing is None
    with plain, torch.no_grad():
        plain.hf_model(input_ids=torch.randint(3, plain.hf_model.config.vocab_size, (1, 5)))
    assert plain.samples[0].router_ids is None and plain.samples[0].router == {}


def test_expert_usage_by_segment_and_for_sink_tokens(tmp_path):
    from sinkscope import analysis, viz
    from sinkscope.trace import Trace

    _recorded_mome(tmp_path / "tr")
    tr = Trace.load(tmp_path / "tr")
    table = analysis.expert_usage(tr, layer=1, eps=0.05)
    experts = [c for c in table.columns if c != "tokens"]
    np.testing.assert_allclose(table[experts].sum(axis=1), 1.0, rtol=1e-6)
    s = tr[0]  # the audio row by hand, for sample 0 alone
    one = analysis.expert_usage([s], layer=1, eps=0.05)
    audio = [t for t, (name, a, e) in enumerate(s.segments) for t in range(a, e) if name == "audio"]
    mass = np.zeros(len(experts))
    for t in audio:
        for e, g in zip(s.router_ids[1, t], s.router_gates[1, t], strict=True):
            mass[e] += g
    np.testing.assert_allclose(one.loc["audio", experts].to_numpy(dtype=float), mass / mass.sum(), rtol=1e-5)
    assert one.loc["audio", "tokens"] == len(audio)
    if "sinks" in table.index:
        assert table.index[-1] == "sinks"
    fig = viz.expert_usage_figure(table, 1)
    assert list(fig.data[0].x) == experts
    # the title names the sink row only where there is one
    no_sinks = viz.expert_usage_figure(table.drop(index="sinks", errors="ignore"), 1).layout.title.text
    assert "no token is a sink at this layer" in no_sinks and "last row" not in no_sinks
    if "sinks" in table.index:
        assert "last row: sink tokens" in fig.layout.title.text
    assert analysis.expert_usage(Trace.load(tmp_path / "tr"), 0).shape[0] >= 1
