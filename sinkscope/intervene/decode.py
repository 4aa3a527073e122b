"""Decoding an AVSR model under an intervention chosen per batch from that batch's own recorded sinks."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch

from sinkscope.eval import transcribe
from sinkscope.record import Recorder


@torch.no_grad()
def decode_under(model, loader, intervention: Callable | None = None, max_new_tokens: int = 24,
                 recorder_kwargs: dict | None = None) -> pd.DataFrame:
    """Greedy-decode every batch of `loader` with the AVSR `model`, under an intervention chosen per batch.

    For each batch the prefix (everything before the transcript, left-padded as for generation) is first
    recorded with `Recorder`, so the intervention can target this batch's own sinks and massive features:
    `intervention(records, offsets)` gets the per-sample `SampleRecord`s (positions as in the unpadded sample)
    and the left-padding offsets (add them to a position to index the padded batch), and returns a context
    manager (or None for no intervention). Returns one row per utterance: id, reference, hypothesis."""

    def per_batch(batch: dict, built: dict):
        if intervention is None:
            return None
        lengths = built["attention_mask"].sum(1).tolist()
        offsets = [built["attention_mask"].shape[1] - int(n) for n in lengths]
        with Recorder(model.llm, **(recorder_kwargs or {})) as rec:
            rec.annotate_next(sample_ids=batch["ids"], tokens=[t[:n] for t, n in zip(built["tokens"], lengths,
                                                                                    strict=True)],
                              segments=built["segments"],
                              token_ids=[t[:n] for t, n in zip(built["token_ids"], lengths, strict=True)])
            model.llm(inputs_embeds=built["inputs_embeds"], attention_mask=built["attention_mask"])
        return intervention(rec.samples, offsets)

    return transcribe(model, loader, max_new_tokens, intervention=per_batch)
