"""CTC pretraining of the encoders: greedy decoding, learning, and identical resumption."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sinkscope.data.synth import SynthConfig, synthesize
from sinkscope.errors import SinkscopeError
from sinkscope.models.encoders import AudioEncoderConfig, VideoEncoderConfig
from sinkscope.train.ctc import ALPHABET, PretrainConfig, encode_text, greedy_decode, pretrain


def test_greedy_decode_merges_repeats_and_drops_blanks():
    ids = encode_text("ab b")
    frames = [0, ids[0], ids[0], 0, ids[1], 0, ids[2], ids[3], ids[3], 0]
    log_probs = torch.full((1, len(frames), len(ALPHABET) + 1), -10.0)
    log_probs[0, torch.arange(len(frames)), torch.tensor(frames)] = 0.0
    assert greedy_decode(log_probs, torch.tensor([len(frames)])) == ["ab b"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("ctc-corpus")
    synthesize(out, SynthConfig(n=40, seed=4), workers=2)
    return out


def tiny(data, out, epochs):
    return PretrainConfig(data=str(data), out=str(out), modalities=("audio",), epochs=epochs, batch_size=8,
                          lr=3e-3, warmup_steps=2, max_train=24, max_eval=8,
                          audio=AudioEncoderConfig(d_model=32, layers=1, heads=2, ffn=64, max_seconds=4.0),
                          video=VideoEncoderConfig(channels=4, d_model=32, layers=1, heads=2))


def test_loss_falls_and_a_resumed_run_is_identical(corpus, tmp_path):
    full = pretrain(tiny(corpus, tmp_path / "full", 3), log=lambda m: None)["audio"]
    losses = [h["train_loss"] for h in full["history"]]
    assert losses[-1] < losses[0], losses
    def killed_after_first_epoch(message: str) -> None:
        if message.startswith("audio epoch 1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny(corpus, tmp_path / "split", 3), log=killed_after_first_epoch)
    resumed = pretrain(tiny(corpus, tmp_path / "split", 3), log=lambda m: None)["audio"]
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx(losses, rel=1e-5)
    a = load_file(tmp_path / "full" / "audio" / "epoch-003.safetensors")
    b = load_file(tmp_path / "split" / "audio" / "epoch-003.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    state = json.loads((tmp_path / "split" / "audio" / "state.json").read_text())
    assert state["checkpoint"] == "epoch-003" and not (tmp_path / "split" / "audio" / "epoch-001.safetensors").exists()


def test_resuming_with_other_settings_is_refused(corpus, tmp_path):
    pretrain(tiny(corpus, tmp_path / "run", 1), log=lambda m: None)
    other = tiny(corpus, tmp_path / "run", 2)
    other.lr = 1e-4
    with pytest.raises(SinkscopeError, match=r"used other settings for \['lr'\]"):
        pretrain(other, log=lambda m: None)
