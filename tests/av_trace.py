"""Small AV-shaped traces recorded from tiny models, for the app and viz tests."""

from __future__ import annotations

from pathlib import Path

import torch

from sinkscope.record import Recorder
from tests.tiny_models import tiny_llama

AV_SEGMENTS = [("bos", 0, 1), ("audio_start", 1, 2), ("audio", 2, 30), ("audio_end", 30, 31),
               ("video_start", 31, 32), ("video", 32, 46), ("video_end", 46, 47), ("prompt", 47, 55),
               ("transcript", 55, 63), ("eos", 63, 64)]
T_AV = 64


def av_tokens() -> list[str]:
    names = {"bos": "<s>", "audio_start": "<audio>", "audio_end": "</audio>", "video_start": "<video>",
             "video_end": "</video>", "eos": "</s>"}
    tokens = []
    for name, s, e in AV_SEGMENTS:
        for i in range(s, e):
            tokens.append(names.get(name) or {"audio": "A", "video": "V", "prompt": "p", "transcript": "w"}[name]
                          + str(i - s))
    return tokens


def write_av_trace(path: Path, seed: int = 0, n: int = 3, attention_maps=((1, 0),), prefix: str = "utt") -> Path:
    model = tiny_llama(seed=seed)
    gen = torch.Generator().manual_seed(100)
    ids = torch.randint(3, 128, (n, T_AV), generator=gen)
    ids[:, 0] = 1
    with Recorder(model, attention_maps=attention_maps, hidden_states=[2], abs_threshold=0.01,
                  rel_threshold=3.0) as rec:
        rec.annotate_next(sample_ids=[f"{prefix}{i:02d}" for i in range(n)], tokens=[av_tokens()] * n,
                          segments=[AV_SEGMENTS] * n,
                          extra=[{"transcript": t} for t in ["bin blue at f two now", "lay red by g five again",
                                                             "set white in k nine soon"][:n]])
        model(input_ids=ids)
    return rec.save(path, config={"kind": "test-av", "seed": seed})
