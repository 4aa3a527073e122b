"""The AVSR model: compression, token layout, segments, labels, and recording its traces."""

from __future__ import annotations

import numpy as np
import pytest
import tokenizers
import torch
from transformers import PreTrainedTokenizerFast

from sinkscope.errors import RecorderError
from sinkscope.models.avsr import PROMPTS, AVSRConfig, AVSRModel, compress
from sinkscope.models.encoders import AudioEncoderConfig, VideoEncoderConfig
from sinkscope.record import Recorder
from tests.tiny_models import tiny_llama

WORDS = ["<unk>", "<s>", "</s>", "bin", "blue", "at", "f", "two", "now", "lay", "red", "Transcribe", "speech",
         "video", "and", "to", "text", "."]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [tokenizers.pre_tokenizers.Whitespace(), tokenizers.pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def tiny_model(mode: str, compression: str, k_audio: int = 4, k_video: int = 2) -> AVSRModel:
    cfg = AVSRConfig(mode=mode, compression=compression, k_audio=k_audio, k_video=k_video, projector_hidden=32,
                     audio=AudioEncoderConfig(d_model=32, layers=1, heads=2, ffn=64, max_seconds=4.0),
                     video=VideoEncoderConfig(channels=4, d_model=32, layers=1, heads=2))
    torch.manual_seed(0)
    return AVSRModel(cfg, llm=tiny_llama(vocab_size=len(WORDS) + 8), tokenizer=tiny_tokenizer()).eval()


def batch(video_lengths=(13, 9)) -> dict:
    b, t = len(video_lengths), max(video_lengths)
    v_len = torch.tensor(video_lengths)
    return {"ids": [f"u{i}" for i in range(b)], "transcripts": ["bin blue at f two now", "lay red"][:b],
            "audio_features": torch.randn(b, 4 * t, 80), "audio_lengths": 4 * v_len,
            "video": torch.randn(b, t, 88, 88), "video_lengths": v_len}


def test_compress_drops_the_remainder():
    x = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    stacked, n = compress(x, torch.tensor([7, 5]), 3, "stack")
    assert stacked.shape == (2, 2, 9) and n.tolist() == [2, 1]
    assert torch.equal(stacked[0, 1], x[0, 3:6].reshape(-1))
    pooled, _ = compress(x, torch.tensor([7, 5]), 3, "avgpool")
    assert pooled.shape == (2, 2, 3) and torch.allclose(pooled[1, 0], x[1, :3].mean(0))
    with pytest.raises(ValueError, match="'stack' or 'avgpool'"):
        compress(x, torch.tensor([7]), 2, "max")


@pytest.mark.parametrize("mode", ["asr", "vsr", "avsr"])
@pytest.mark.parametrize("compression", ["stack", "avgpool"])
def test_layout_segments_and_labels(mode, compression):
    model = tiny_model(mode, compression)
    b = batch()
    with torch.no_grad():
        built = model.build(b)
    tok = model.tokenizer
    # audio: 4*13 mel frames -> 26 encoder frames -> 26//4 = 6 tokens; 4*9 -> 18 -> 4. video: 13//2 = 6, 9//2 = 4.
    expected_tokens = {"audio": [6, 4], "video": [6, 4]}
    prompt_len = len(tok(PROMPTS[mode], add_special_tokens=False)["input_ids"])
    for i, spans in enumerate(built["segments"]):
        names = [s[0] for s in spans]
        mods = {"asr": ["audio"], "vsr": ["video"], "avsr": ["audio", "video"]}[mode]
        expected_names = ["bos"] + [x for m in mods for x in (f"{m}_start", m, f"{m}_end")] + [
            "prompt", "transcript", "eos"]
        assert names == expected_names
        lengths = {name: e - s for name, s, e in spans}
        for m in mods:
            assert lengths[m] == expected_tokens[m][i]
        assert lengths["prompt"] == prompt_len and lengths["bos"] == 1
        assert [e for _, _, e in spans][-1] == int(built["attention_mask"][i].sum())
        assert all(s2 == e1 for (_, _, e1), (_, s2, _) in zip(spans, spans[1:], strict=False))
        # labels: -100 outside transcript + EOS
        labels = built["labels"][i]
        t0 = dict((n, s) for n, s, _ in spans)["transcript"]
        end = spans[-1][2]
        assert torch.all(labels[:t0] == -100) and torch.all(labels[end:] == -100)
        ids = tok(" " + b["transcripts"][i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert labels[t0:end].tolist() == ids
        assert built["tokens"][i][spans[1][1]] in ("<audio>", "<video>")
    assert built["inputs_embeds"].shape[0] == 2


def test_loss_ignores_padding_and_only_projectors_and_lora_train():
    model = tiny_model("avsr", "stack")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("projector" in n or "lora_" in n for n in trainable)
    b = batch()
    out = model(b)
    built = model.build(b)
    logits = model.llm(inputs_embeds=built["inputs_embeds"], attention_mask=built["attention_mask"]).logits
    shift = built["labels"][:, 1:]
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shift.reshape(-1),
                                               ignore_index=-100)
    torch.testing.assert_close(out["loss"], manual)
    # the reduced-head loss used in training equals HF's own `labels=` loss
    reference = model.llm(inputs_embeds=built["inputs_embeds"], attention_mask=built["attention_mask"],
                          labels=built["labels"]).loss
    torch.testing.assert_close(model.transcript_loss(built)[0], reference)


def test_recorder_writes_av_segments(tmp_path):
    model = tiny_model("avsr", "stack")
    b = batch()
    with torch.no_grad():
        built = model.build(b)
        with Recorder(model.llm) as rec:
            rec.annotate_next(sample_ids=b["ids"], tokens=[t[: int(m.sum())] for t, m in
                                                          zip(built["tokens"], built["attention_mask"], strict=True)],
                              segments=built["segments"], token_ids=built["token_ids"])
            model.llm(inputs_embeds=built["inputs_embeds"], attention_mask=built["attention_mask"])
    from sinkscope.trace import Trace

    tr = Trace.load(rec.save(tmp_path / "av"))
    s = tr.sample("u1")
    assert s.segments == built["segments"][1]
    assert s.tokens[s.segments[1][1]] == "<audio>" and s.tokens[s.segments[2][1]] == "A0"
    # the vocabulary id behind each position, -1 at the encoders' frames; the embedding of an id is what the LLM got
    spans = {name: (a, e) for name, a, e in s.segments}
    frames = np.zeros(len(s), bool)
    for name in ("audio", "video"):
        if name in spans:
            frames[slice(*spans[name])] = True
    assert frames.any() and (s.token_ids[frames] == -1).all() and (s.token_ids[~frames] >= 0).all()
    assert s.token_ids[spans["audio_start"][0]] == model.tokenizer.convert_tokens_to_ids("<audio>")
    n = int(built["attention_mask"][1].sum())
    table = model.llm.get_input_embeddings().weight
    known = torch.from_numpy(np.flatnonzero(~frames))
    torch.testing.assert_close(table[torch.from_numpy(s.token_ids)[known]], built["inputs_embeds"][1, :n][known])
    with Recorder(model.llm) as rec, pytest.raises(RecorderError, match="gave 3 token ids for sample 0"):
        rec.annotate_next(token_ids=[[1, 2, 3]] * len(b["ids"]))
        model.llm(inputs_embeds=built["inputs_embeds"], attention_mask=built["attention_mask"])
    assert s.attention_received.shape[-1] == s.segments[-1][2]
