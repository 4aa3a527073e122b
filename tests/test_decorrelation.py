"""The decorrelation loss of the sinks paper: its formula against a literal reimplementation of the paper code,
what it excludes, where its gradient goes, that lambda = 0 is exactly the cross-entropy run, and that a large
lambda really decorrelates the non-output tokens from BOS."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sinkscope.train import avsr as train_avsr
from sinkscope.train.avsr import AVSRTask, read_train_config, train
from sinkscope.train.losses import context_mask, decorrelation_loss
from tests.test_avsr_model import batch, tiny_model


def paper_code_loss(hidden_states, non_output_tokens_count: int) -> torch.Tensor:
    """Llama-AVSR `models/modeling_AVSRLLM.py`, `forward` (add_sink_loss), without the factor: one count of
    non-output tokens for the whole batch, positions 0..count, BOS masked out, layers 1..len-2."""
    losses = []
    for layer_idx in range(1, len(hidden_states) - 1):
        hidden_state = hidden_states[layer_idx][:, :non_output_tokens_count + 1, :]
        bos_direction = F.normalize(hidden_state[:, 0, :], dim=-1)
        token_directions = F.normalize(hidden_state, dim=-1)
        cosine_similarity = torch.einsum("bd,bsd->bs", bos_direction, token_directions)
        mask = torch.ones_like(cosine_similarity)
        mask[:, 0] = 0
        losses.append(((cosine_similarity**2) * mask).sum() / mask.sum())
    return torch.stack(losses).mean()


def layout(n_context: int, n_transcript: int) -> list[tuple[str, int, int]]:
    """BOS, then n_context input tokens (delimiters, modality tokens, prompt), then the transcript and EOS."""
    spans = [("bos", 0, 1), ("audio_start", 1, 2), ("audio", 2, n_context - 1), ("prompt", n_context - 1,
                                                                                   n_context + 1)]
    start = n_context + 1
    return [*spans, ("transcript", start, start + n_transcript), ("eos", start + n_transcript, start +
                                                                            n_transcript + 1)]


def test_matches_the_paper_code_and_excludes_bos_transcript_and_padding():
    torch.manual_seed(0)
    b, t, d, n_layers = 3, 20, 16, 5
    hidden = tuple(torch.randn(b, t, d) for _ in range(n_layers + 1))
    # the paper's setting: every sample has the same number of non-output tokens (9), then its transcript
    same = [layout(9, 5)] * b
    ours = decorrelation_loss(hidden, context_mask(same, t))
    torch.testing.assert_close(ours, paper_code_loss(hidden, 9), rtol=1e-6, atol=1e-7)
    # scaling BOS, or changing the transcript, EOS or the padding after them, changes nothing
    edited = [h.clone() for h in hidden]
    for h in edited:
        h[:, 0] = h[:, 0] * 3.0  # BOS's norm (its direction is what counts)
        h[:, 10:] = torch.randn(b, t - 10, d)
    torch.testing.assert_close(decorrelation_loss(tuple(edited), context_mask(same, t)), ours)
    # samples of different lengths: each sample's own non-output tokens, pooled over the batch as the paper pools
    mixed = [layout(9, 5), layout(6, 3), layout(12, 4)]
    expected = []
    for layer in hidden[1:-1]:
        cos2 = [F.cosine_similarity(layer[i, :1], layer[i, 1:n + 1], dim=-1) ** 2 for i, n in enumerate((9, 6, 12))]
        expected.append(torch.cat(cos2).mean())
    torch.testing.assert_close(decorrelation_loss(hidden, context_mask(mixed, t)), torch.stack(expected).mean())


def test_gradient_reaches_lora_and_projectors_only_through_trainable_weights():
    model = tiny_model("avsr", "avgpool")  # eval mode: no dropout, so both forwards below are the same
    cfg = read_train_config(None, ["decorrelation=1e4"])
    torch.manual_seed(1)
    inputs = batch()
    loss, logs = AVSRTask(cfg).loss(model, inputs)
    out = model(inputs, output_hidden_states=True)
    dec_only = decorrelation_loss(out["hidden_states"], context_mask(out["segments"], out["width"]))
    dec_only.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert any("projector" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert logs["decorrelation"] == pytest.approx(float(dec_only.detach()), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(logs["ce"] + 1e4 * logs["decorrelation"], rel=1e-5)


@pytest.fixture(scope="module")
def corpus(make_corpus):
    return make_corpus(30, 5)


def _config(corpus, out, lam):
    cfg = read_train_config(None, [f"data={corpus}", f"out={out}", "epochs=2", "batch_size=4", "lr=0.003",
                                   "warmup_steps=2", "max_train=12", "max_eval=2", "max_new_tokens=2",
                                   f"decorrelation={lam}"])
    cfg.model = tiny_model("avsr", "avgpool").cfg
    return cfg


def _tiny(cfg):
    return tiny_model("avsr", "avgpool")


def test_lambda_zero_is_exactly_the_cross_entropy_run(corpus, tmp_path, monkeypatch):
    train(_config(corpus, tmp_path / "zero", 0.0), log=lambda m: None, model_factory=_tiny)

    def cross_entropy_only(self, model, batch):
        result = model(batch)
        return result["loss"], {"ce": float(result["loss"].detach())}

    monkeypatch.setattr(train_avsr.AVSRTask, "loss", cross_entropy_only)
    train(_config(corpus, tmp_path / "ce", 0.0), log=lambda m: None, model_factory=_tiny)
    a, b = load_file(tmp_path / "zero" / "epoch-002.safetensors"), load_file(tmp_path / "ce" / "epoch-002.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_large_lambda_decorrelates_non_output_tokens_from_bos(corpus, tmp_path):
    from sinkscope.data.dataset import collate
    from sinkscope.models.avsr import dataset_for
    from sinkscope.models.pretrained import load_trainable
    from sinkscope.train.checkpoint import load_weights

    probe = collate([dataset_for(_tiny(None).cfg, corpus, "test")[i] for i in range(4)])

    def mean_cos2(run=None) -> float:
        model = _tiny(None)
        if run is not None:
            load_trainable(model, load_weights(run)[1], run)
        with torch.no_grad():
            out = model.eval()(probe, output_hidden_states=True)
            return float(decorrelation_loss(out["hidden_states"], context_mask(out["segments"], out["width"])))

    before = mean_cos2()
    for lam in (0.0, 1e4):
        train(_config(corpus, tmp_path / f"lam{lam:g}", lam), log=lambda m: None, model_factory=_tiny)
    off, on = mean_cos2(tmp_path / "lam0"), mean_cos2(tmp_path / "lam10000")
    assert on < 0.25 * before and on < 0.7 * off, (before, off, on)  # measured: 0.044, 0.0165, 0.0088
