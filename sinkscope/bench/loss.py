"""The decorrelation loss's share of a training step: `python -m sinkscope.bench decorrelation`.

One training step (forward, backward, AdamW step) of the AVSR recipe on real utterances and the real SmolLM2,
timed three ways, interleaved, median over repetitions:

- `ce`: cross-entropy only (hidden states not returned);
- `ce+logged`: what a lambda = 0 run does: the decorrelation term computed without gradient, for the log;
- `ce+decorrelation`: cross-entropy + lambda * decorrelation (lambda > 0).

The share is `(t[ce+decorrelation] - t[ce]) / t[ce+decorrelation]` (target <= 5 %). A step takes seconds on a CPU
and the difference is small, so the loss is also timed alone (`loss_alone_s`: its forward and backward on that
batch's hidden states, detached, median of 20) and given as a share of the cross-entropy step.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import typer

from sinkscope.bench import app

VARIANTS = ("ce", "ce+logged", "ce+decorrelation")


def _step(model, optimiser, batch, variant: str) -> float:
    from sinkscope.train.losses import context_mask, decorrelation_loss

    start = time.perf_counter()
    out = model(batch, output_hidden_states=variant != "ce")
    loss = out["loss"]
    if variant != "ce":
        with torch.set_grad_enabled(variant == "ce+decorrelation"):
            dec = decorrelation_loss(out["hidden_states"], context_mask(out["segments"], out["width"]))
        if variant == "ce+decorrelation":
            loss = loss + 1e4 * dec
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    return time.perf_counter() - start


@app.command("decorrelation")
def decorrelation(
    data: Path = typer.Option(Path("corpora/grid-2k"), help="Corpus (sinkscope data synth)."),
    rates: str = typer.Option("avsr:4:2,avsr:16:5", help="mode:K_a:K_v points, comma-separated."),
    batch_size: int = typer.Option(8, min=1),
    reps: int = typer.Option(5, min=1),
    out: Path = typer.Option(None, help="Write JSON here."),
) -> None:
    """Share of a training step spent on the decorrelation loss (target <= 5 %)."""
    from sinkscope.config import command_line
    from sinkscope.data.dataset import collate
    from sinkscope.models.avsr import AVSRModel, dataset_for
    from sinkscope.train.avsr import read_train_config
    from sinkscope.train.losses import context_mask, decorrelation_loss

    base = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "decorrelation" / "base.yaml"
    result = {"command": command_line(), "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
              "batch_size": batch_size, "reps": reps, "rows": []}
    for spec in rates.split(","):
        mode, k_a, k_v = spec.split(":")
        cfg = read_train_config(base, [f"model.mode={mode}", f"model.k_audio={k_a}", f"model.k_video={k_v}",
                                       f"data={data}"])
        torch.manual_seed(0)
        model = AVSRModel(cfg.model).train()
        from sinkscope.models.pretrained import load_encoders

        load_encoders(model, cfg.encoders)
        dataset = dataset_for(cfg.model, data, "train", limit=batch_size)
        batch = collate([dataset[i] for i in range(batch_size)])
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        times = {v: [] for v in VARIANTS}
        for v in VARIANTS:  # warm-up
            _step(model, optimiser, batch, v)
        for _ in range(reps):
            for v in VARIANTS:
                times[v].append(_step(model, optimiser, batch, v))
        med = {v: statistics.median(t) for v, t in times.items()}
        with torch.no_grad():
            forward = model(batch, output_hidden_states=True)
        hidden = [h.detach().requires_grad_(True) for h in forward["hidden_states"]]
        mask = context_mask(forward["segments"], forward["width"])
        alone = []
        for _ in range(20):
            start = time.perf_counter()
            decorrelation_loss(hidden, mask).backward()
            alone.append(time.perf_counter() - start)
        med["loss_alone"] = statistics.median(alone)
        share = (med["ce+decorrelation"] - med["ce"]) / med["ce+decorrelation"]
        tokens = int(model.build(batch)["attention_mask"].sum())
        row = {"point": spec, "tokens_in_batch": tokens, **{f"{v}_s": med[v] for v in [*VARIANTS, "loss_alone"]},
               "loss_share": share, "logged_share": (med["ce+logged"] - med["ce"]) / med["ce+logged"],
               "loss_alone_share": med["loss_alone"] / med["ce"]}
        result["rows"].append(row)
        print(f"{spec}: {tokens} tokens/batch; step {med['ce']:.3f} s (ce), {med['ce+logged']:.3f} s (ce+logged), "
              f"{med['ce+decorrelation']:.3f} s (ce+decorrelation): the loss is {100 * share:.1f} % of the step "
              f"(target <= 5 %: {'met' if share <= 0.05 else 'MISSED'}); alone {1000 * med['loss_alone']:.1f} ms, "
              f"{100 * row['loss_alone_share']:.2f} % of the cross-entropy step")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
