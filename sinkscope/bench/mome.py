"""A MoME training step against single-rate steps: `python -m sinkscope.bench mome`.

One training step (forward, backward, AdamW) on the same real utterances and the real SmolLM2, from the MoME
recipe (`experiments/configs/mome_asr.yaml`: every rate of its set in one step, experts in every block) and from
the single-rate models of the same recipe at each rate (no experts), interleaved, median over repetitions. Also
the trainable and the active parameters (per token: top-k + shared experts and the router) of each."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import typer

from sinkscope.bench import app
from sinkscope.bench.loss import _step


@app.command("mome")
def mome(
    config: Path = typer.Option(Path("experiments/configs/mome_asr.yaml"), help="The MoME training config."),
    data: Path = typer.Option(Path("corpora/grid-2k"), help="Corpus (sinkscope data synth)."),
    batch_size: int = typer.Option(8, min=1),
    reps: int = typer.Option(3, min=1),
    out: Path = typer.Option(None, help="Write JSON here."),
) -> None:
    """Step time of the MoME recipe against its single-rate models; trainable and active parameters."""
    from sinkscope.config import command_line
    from sinkscope.data.dataset import collate
    from sinkscope.models.avsr import AVSRModel, dataset_for
    from sinkscope.models.pretrained import load_encoders
    from sinkscope.train.avsr import read_train_config

    cfg = read_train_config(config, [f"data={data}"])
    models = {"mome": cfg.model}
    for k_a, k_v in cfg.model.rate_set:
        single = read_train_config(config, [f"data={data}", "model.rates=[]", "model.mome=null",
                                            f"model.k_audio={k_a}", f"model.k_video={k_v}"]).model
        models[f"single {k_a},{k_v}"] = single
    built, batch = {}, None
    for name, model_cfg in models.items():
        torch.manual_seed(0)
        model = AVSRModel(model_cfg).train()
        load_encoders(model, cfg.encoders)
        if batch is None:
            dataset = dataset_for(cfg.model, data, "train", limit=batch_size)
            batch = collate([dataset[i] for i in range(batch_size)])
        params = [p for p in model.parameters() if p.requires_grad]
        built[name] = (model, torch.optim.AdamW(params, lr=1e-6), sum(p.numel() for p in params))
    times = {name: [] for name in built}
    for model, opt, _ in built.values():  # warm-up
        _step(model, opt, batch, "ce")
    for _ in range(reps):
        for name, (model, opt, _) in built.items():
            times[name].append(_step(model, opt, batch, "ce"))
    rows = []
    for name, (model, _, trainable) in built.items():
        active = trainable
        if model.mome is not None:
            experts = sum(p.numel() for p in model.mome.parameters())
            active = trainable - experts + model.mome.active_parameters()
        rows.append({"model": name, "step_s": statistics.median(times[name]), "trainable_params": trainable,
                     "active_params": active})
    singles = sum(r["step_s"] for r in rows if r["model"] != "mome")
    result = {"command": command_line(), "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
              "batch_size": batch_size, "reps": reps, "rows": rows,
              "mome_over_sum_of_singles": rows[0]["step_s"] / singles}
    for r in rows:
        print(f"{r['model']}: step {r['step_s']:.2f} s, trainable {r['trainable_params'] / 1e6:.2f} M, active "
              f"{r['active_params'] / 1e6:.2f} M")
    print(f"MoME step / sum of the single-rate steps: {result['mome_over_sum_of_singles']:.2f}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
