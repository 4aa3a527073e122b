"""Training verbs: `pretrain-encoders`, `train`, `eval`, `sweep`, `export`. Each takes its job config from
`--config YAML`, its flags and `--set key=value`, and writes the resolved config, the command, the version and
`results.json` into its output directory."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from sinkscope.cli.common import CONFIG_OPTION, SET_OPTION, clean_errors, console, job_config, progress_bar

UNTIL_OPTION = typer.Option(None, "--until-epoch", min=1,
                            help="Stop after this epoch (the schedule still spans `epochs`); resume later.")


def _train_progress(bar):
    def progress(done: int, total: int, logs: dict) -> None:
        parts = [f"{k} {logs[k]:.3f}" for k in ("ce", "decorrelation", "ctc") if k in logs]
        bar.update(done, total, f"train {' '.join(parts)} lr {logs['lr']:.2e}")

    return progress


def pretrain_encoders(
    config: Path = CONFIG_OPTION,
    sets: list[str] = SET_OPTION,
    data: Path = typer.Option(None, "--data", help="Corpus directory (sinkscope data synth, or LRS)."),
    out: Path = typer.Option(None, "--out", help="Run directory (resumed when it exists)."),
    modality: str = typer.Option(None, help="audio, video or audio,video (default both)."),
    epochs: int = typer.Option(None, min=1, help="Epochs (default 20)."),
    batch_size: int = typer.Option(None, "--batch-size", min=1),
    lr: float = typer.Option(None),
    max_train: int = typer.Option(None, "--max-train", min=1, help="Use only the first N training utterances."),
    seed: int = typer.Option(None),
    until_epoch: int = UNTIL_OPTION,
) -> None:
    """CTC-pretrain the audio and video encoders on a corpus; prints greedy-CTC CER/WER on the test split."""
    from sinkscope.train.ctc import PretrainConfig, pretrain

    mods = None if modality is None else [m.strip() for m in modality.split(",") if m.strip()]
    with clean_errors():
        cfg = job_config(PretrainConfig, config, sets, data=data, out=out, modalities=mods, epochs=epochs,
                         batch_size=batch_size, lr=lr, max_train=max_train, seed=seed)
        with progress_bar("epoch") as bar:
            results = pretrain(cfg, log=bar.log, progress=_train_progress(bar), until_epoch=until_epoch)
    for name, r in results.items():
        console.print(f"{name}: greedy CTC on {r['n']} test utterances after {r['epochs']} epochs: "
                      f"CER {r['cer']:.3f}, WER {r['wer']:.3f}")


def train(
    config: Path = CONFIG_OPTION,
    sets: list[str] = SET_OPTION,
    until_epoch: int = UNTIL_OPTION,
) -> None:
    """Train the AVSR LLM (projectors + LoRA), with or without the decorrelation loss; resumes a killed run."""
    from sinkscope.train.avsr import TrainConfig
    from sinkscope.train.avsr import train as run_training

    with clean_errors():
        cfg = job_config(TrainConfig, config, sets)
        with progress_bar("train") as bar:
            state = run_training(cfg, log=bar.log, progress=_train_progress(bar), until_epoch=until_epoch)
    last = state["history"][-1] if state["history"] else {}
    console.print(f"{cfg.out}: {state['epoch']} epochs; last validation WER {last.get('wer', float('nan')):.3f}")


def evaluate(
    config: Path = CONFIG_OPTION,
    sets: list[str] = SET_OPTION,
    checkpoint: str = typer.Option(None, "--checkpoint", help="A training run directory, an export, or `demo`."),
    data: Path = typer.Option(None, "--data", help="Corpus directory."),
    split: str = typer.Option(None, help="Corpus split (default test)."),
    snr: float = typer.Option(None, help="Mix babble noise at this SNR (dB, -50 to 100); clean when not given."),
    beam: int = typer.Option(None, min=1, max=64, help="Beam size (default 1 = greedy; at most 64)."),
    limit: int = typer.Option(None, min=1, help="Only the first N utterances."),
    out: Path = typer.Option(None, help="Output directory (default CHECKPOINT/eval-TAG, or ./eval-NAME-TAG)."),
    as_json: bool = typer.Option(False, "--json", help="End with one JSON line: wer, cer, n, mode, snr, ..."),
    skip_bad: bool = typer.Option(None, "--skip-bad", help="Skip unusable or too long utterances (listed in "
                                  "OUT/skipped.csv and counted) instead of stopping at the first."),
    rate: str = typer.Option(None, "--rate", help="Rate of a Matryoshka (MoME) model to score: K_a,K_v (AVSR), K_a "
                             "(ASR) or K_v (VSR); default its first."),
) -> None:
    """Decode a split with the trained model and compute WER/CER (jiwer, lower-cased)."""
    from sinkscope.eval import EvalConfig, run_eval

    with clean_errors():
        cfg = job_config(EvalConfig, config, sets, checkpoint=checkpoint, data=data, split=split, snr=snr, beam=beam,
                         limit=limit, out=out, skip_bad=skip_bad, rate=rate)
        result = run_eval(cfg)
    skipped = f"; {result['skipped']} skipped (see {result['out']}/skipped.csv)" if result["skipped"] else ""
    console.print(f"{result['mode']} {cfg.tag}: WER {result['wer']:.3f}, CER {result['cer']:.3f} on {result['n']} "
                  f"utterances (hypotheses in {result['out']}/hypotheses.csv){skipped}")
    if as_json:
        keys = ("wer", "cer", "n", "skipped", "mode", "snr", "beam", "split", "checkpoint")
        print(json.dumps({k: result[k] for k in keys}, allow_nan=False))


def export(
    run: Path = typer.Argument(..., help="A training run, or a `pretrain-encoders` run."),
    out: Path = typer.Argument(..., help="Directory to write (the exported files there are replaced)."),
    encoders: str = typer.Option(None, help="Encoders path to write into the exported config."),
) -> None:
    """Export a run's trainable weights in fp16 with its config and history (how `demo` is made), or a
    `pretrain-encoders` run's encoders as OUT/audio.safetensors and OUT/video.safetensors (fp16)."""
    from sinkscope.models.pretrained import export as run_export

    with clean_errors():
        files = run_export(run, out, encoders)
    size = sum(f.stat().st_size for f in files) / 2**20
    console.print(f"exported {run} to {out}: {', '.join(f.name for f in files)} ({size:.1f} MiB)")


def sweep(
    config: Path = typer.Option(..., "--config", help="Sweep YAML (see experiments/configs/sweep_*.yaml)."),
    sets: list[str] = SET_OPTION,
    until_epoch: int = typer.Option(None, "--until-epoch", min=1, help="Train every point only this far."),
    point: list[str] = typer.Option(None, "--point", help="Run only this point (repeatable); see --list."),
    list_points: bool = typer.Option(False, "--list", help="List the points and whether each has its row."),
) -> None:
    """Run a resumable grid of training runs (rates x decorrelation): train, score, record and summarise every
    point, one results row each, then draw the WER and sink figures next to the results file."""
    from sinkscope.train.results import decorrelation_sinks_figure, decorrelation_wer_figure, write_figure
    from sinkscope.train.sweep import load_sweep, read_results, row_names, run_sweep

    with clean_errors():
        spec = load_sweep(config, sets or [])
        if list_points:
            done = {r["point"] for r in read_results(spec)}
            for name, overrides in spec.all_points:
                finished = all(n in done for n in row_names(spec, name, overrides))
                console.print(f"{'done ' if finished else 'to do'}  {name}  {json.dumps(overrides)}")
            return
        with progress_bar("train") as bar:
            rows = run_sweep(spec, log=bar.log, progress=_train_progress(bar), until_epoch=until_epoch,
                             only=point or None)
    if not rows:
        console.print(f"no finished point yet in {spec.results}")
        return
    stem = Path(spec.results).with_suffix("")
    figures = [(decorrelation_wer_figure, f"{stem}_wer")]
    if "sinks_per_utt_audio" in rows[0]:
        figures.append((decorrelation_sinks_figure, f"{stem}_sinks"))
    for make, path in figures:
        written, problem = write_figure(make(rows), path)
        console.print(f"figure: {', '.join(map(str, written))}" + (f" ({problem})" if problem else ""))
    tags = spec.tags
    table = [f"{r['point']:<32} " + "  ".join(f"WER {t} {float(r[f'wer_{t}']):.3f}" for t in tags if r[f"wer_{t}"])
             for r in rows]
    console.print(f"{len(rows)} of {len(spec.all_points)} points in {spec.results}:\n" + "\n".join(table))


def register(app: typer.Typer) -> None:
    app.command("pretrain-encoders")(pretrain_encoders)
    app.command()(train)
    app.command("eval")(evaluate)
    app.command()(export)
    app.command()(sweep)
