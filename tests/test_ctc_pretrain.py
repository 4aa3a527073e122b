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
def corpus(make_corpus):
    return make_corpus(40, 4)


def tiny(data, out, epochs):
    return PretrainConfig(data=str(data), out=str(out), modalities=("audio",), epochs=epochs, batch_size=8,
                          lr=3e-3, warmup_steps=2, max_train=24, max_eval=8,
                          audio=AudioEncoderConfig(d_model=32, layers=1, heads=2, ffn=64, max_seconds=4.0),
                          video=VideoEncoderConfig(channels=4, d_model=32, layers=1, heads=2))


def test_loss_falls_and_a_resumed_run_is_identical(corpus, tmp_path):
    full = pretrain(tiny(corpus, tmp_path / "full", 3), log=lambda m: None)["audio"]
    losses = [h["ctc"] for h in full["history"]]
    assert losses[-1] < losses[0], losses
    def killed_after_first_epoch(message: str) -> None:
        if message.startswith("audio: epoch 1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny(corpus, tmp_path / "split", 3), log=killed_after_first_epoch)
    resumed = pretrain(tiny(corpus, tmp_path / "split", 3), log=lambda m: None)["audio"]
    assert [h["ctc"] for h in resumed["history"]] == pytest.approx(losses, rel=1e-5)
    a = load_file(tmp_path / "full" / "audio" / "epoch-003.safetensors")
    b = load_file(tmp_path / "split" / "audio" / "epoch-003.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    state = json.loads((tmp_path / "split" / "audio" / "state.json").read_text())
    assert state["checkpoint"] == "epoch-003" and not (tmp_path / "split" / "audio" / "epoch-001.safetensors").exists()
    results = json.loads((tmp_path / "split" / "results.json").read_text())
    assert results["audio"]["epochs"] == 3 and results["audio"]["cer"] == full["cer"]
    assert json.loads((tmp_path / "split" / "run.json").read_text())["verb"] == "pretrain-encoders"


def test_resuming_with_other_settings_is_refused(corpus, tmp_path):
    pretrain(tiny(corpus, tmp_path / "run", 1), log=lambda m: None)
    other = tiny(corpus, tmp_path / "run", 2)
    other.lr = 1e-4
    with pytest.raises(SinkscopeError, match=r"used other settings for \['lr'\]"):
        pretrain(other, log=lambda m: None)


def test_export_encoders_writes_fp16_and_keeps_the_other_modality(corpus, tmp_path):
    from sinkscope.models.pretrained import export_encoders

    pretrain(tiny(corpus, tmp_path / "run", 1), log=lambda m: None)
    out = tmp_path / "encoders"
    out.mkdir()
    (out / "video.safetensors").write_bytes(b"kept as it is")
    [written] = export_encoders(tmp_path / "run", out)
    assert written == out / "audio.safetensors"
    assert (out / "video.safetensors").read_bytes() == b"kept as it is"
    full = load_file(tmp_path / "run" / "audio" / "epoch-001.safetensors")
    half = load_file(written)
    assert half.keys() == full.keys() and all(v.dtype == torch.float16 for v in half.values())
    for k in full:
        torch.testing.assert_close(half[k].float(), full[k], rtol=1e-3, atol=1e-3)
    with pytest.raises(SinkscopeError, match="not a `sinkscope pretrain-encoders` run"):
        export_encoders(out, tmp_path / "elsewhere")


@pytest.mark.parametrize("modality,max_cer", [("audio", 0.25), ("video", 0.2)])
def test_shipped_encoders_carry_information(modality, max_cer, tmp_path):
    """The fp16 encoders of the demo model (experiments/weights/encoders-grid-2k-v2: audio 24 epochs, video 8, on
    corpora/grid-2k) reached greedy-CTC CER 0.059 (audio) and 0.055 (video) on 200 held-out-speaker utterances;
    on this fresh corpus of another seed (9 test utterances) they measured 0.108 and 0.047, far better than
    chance (~0.9 CER)."""
    from pathlib import Path

    from sinkscope.train.ctc import CTCModel, CTCTask

    weights = Path(__file__).resolve().parents[1] / "experiments" / "weights" / "encoders-grid-2k-v2"
    corpus = tmp_path / "fresh"
    synthesize(corpus, SynthConfig(n=60, seed=11), workers=2)
    cfg = PretrainConfig(data=str(corpus), out=str(tmp_path / "unused"))
    model = CTCModel(modality, cfg.audio, cfg.video)
    state = load_file(weights / f"{modality}.safetensors")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    result = CTCTask(cfg, modality).evaluate(model)
    assert result["n"] >= 5 and result["cer"] < max_cer, result
