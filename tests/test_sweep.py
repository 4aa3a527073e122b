"""`sinkscope sweep` on a tiny model: every point trains, is scored, recorded and summarised once, one row each;
a killed sweep continues; a row is never half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sinkscope.errors import SinkscopeError
from sinkscope.train import results as results_mod
from sinkscope.train.results import decorrelation_sinks_figure, decorrelation_wer_figure
from sinkscope.train.sweep import STAT_COLUMNS, load_sweep, read_results, run_sweep
from tests.test_avsr_model import WORDS, tiny_tokenizer
from tests.tiny_models import tiny_llama


@pytest.fixture
def spec_file(make_corpus, tmp_path):
    corpus = make_corpus(24, 3)
    llm_dir = tmp_path / "tiny-llm"
    tiny_llama(vocab_size=len(WORDS) + 8).save_pretrained(llm_dir)
    tiny_tokenizer().save_pretrained(llm_dir)
    base = {"data": str(corpus), "epochs": 1, "batch_size": 4, "lr": 0.003, "warmup_steps": 2, "max_train": 8,
            "max_eval": 3, "max_new_tokens": 4,
            "model": {"llm": str(llm_dir), "mode": "avsr", "compression": "avgpool", "projector_hidden": 32,
                      "audio": {"d_model": 32, "layers": 1, "heads": 2, "ffn": 64, "max_seconds": 4.0},
                      "video": {"channels": 4, "d_model": 32, "layers": 1, "heads": 2}}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {"base": str(tmp_path / "base.yaml"), "out": str(tmp_path / "runs"),
             "results": str(tmp_path / "results.csv"),
             "grid": {"rate": [{"model.k_audio": 2, "model.k_video": 1}, {"model.k_audio": 8, "model.k_video": 4}],
                      "decorrelation": [0.0, 100.0]},
             "points": [{"model.mode": "vsr", "model.k_video": 2, "decorrelation": 100.0, "seed": 1}],
             "eval": {"snr": [None, 0], "limit": 3}, "record": {"n": 2}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    return tmp_path / "sweep.yaml"


def test_sweep_runs_each_point_once_and_resumes(spec_file, tmp_path):
    spec = load_sweep(spec_file)
    names = [name for name, _ in spec.all_points]
    assert names == ["ka2-kv1-dec0", "ka2-kv1-dec100", "ka8-kv4-dec0", "ka8-kv4-dec100", "vsr-kv2-dec100-seed1"]

    def killed_at_third_point(message: str) -> None:
        if message.startswith("[3/5]") and "training" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, log=killed_at_third_point)
    assert [r["point"] for r in read_results(spec)] == names[:2]

    messages: list[str] = []
    rows = run_sweep(spec, log=messages.append)
    assert [r["point"] for r in rows] == names and "[1/5] ka2-kv1-dec0: done" in messages
    by_point = {r["point"]: r for r in rows}
    on = by_point["ka8-kv4-dec100"]
    assert (on["mode"], on["k_audio"], on["k_video"], float(on["decorrelation"])) == ("avsr", "8", "4", 100.0)
    assert all(r["n_clean"] == "3" and 0 <= float(r["wer_clean"]) for r in rows)
    vsr = by_point["vsr-kv2-dec100-seed1"]
    assert vsr["k_audio"] == "" and vsr["seed"] == "1" and vsr["wer_snr0"] == "" and on["n_snr0"] == "3"
    # every row names the sweep file, the point's config (hash of its config.yaml) and the command
    assert all(r["sweep"] == str(spec_file) and len(r["config_hash"]) == 12 and r["command"] for r in rows)
    assert len({r["config_hash"] for r in rows}) == 5
    # the sink statistics come from the point's own trace of the first 2 test utterances
    assert all(r["trace_samples"] == "2" and set(STAT_COLUMNS) <= set(r) for r in rows)
    assert float(on["cos_last_audio"]) == pytest.approx(float(on["cos_last_audio"])) and -1 <= float(
        on["cos_last_audio"]) <= 1
    trained = yaml.safe_load((tmp_path / "runs" / "ka8-kv4-dec100" / "config.yaml").read_text())
    assert trained["model"]["k_audio"] == 8 and trained["decorrelation"] == 100.0
    history = json.loads((tmp_path / "runs" / "ka8-kv4-dec100" / "state.json").read_text())["history"]
    assert history[0]["decorrelation"] > 0 and on["val_wer_by_epoch"] == f"{history[0]['wer']:.4f}"

    fig = decorrelation_wer_figure(pd.DataFrame(rows))
    panels = [a.text for a in fig.layout.annotations]
    assert panels == ["VSR, clean", "AVSR, clean", "VSR, babble 0 dB", "AVSR, babble 0 dB",
                      "not scored (no audio to add babble to)"]  # VSR at 0 dB: said, not left blank
    clean_off = [t for t in fig.data if t.name == "off (λ=0)" and t.mode == "lines" and t.xaxis == "x2"][0]
    assert list(clean_off.x) == ["K_a=2, K_v=1", "K_a=8, K_v=4"]
    assert list(clean_off.y) == [float(by_point[p]["wer_clean"]) for p in ("ka2-kv1-dec0", "ka8-kv4-dec0")]
    sinks = decorrelation_sinks_figure(rows)
    assert {t.name for t in sinks.data} == {"off (λ=0)", "λ=100"}

    again: list[str] = []
    assert run_sweep(spec, log=again.append) == rows
    assert all(m.endswith(": done") for m in again)


def test_a_killed_append_leaves_the_table_whole(tmp_path, monkeypatch):
    path = tmp_path / "r.csv"
    results_mod.append_row(path, {"a": 1, "b": 2}, ["a", "b"])
    before = path.read_bytes()

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(results_mod.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        results_mod.append_row(path, {"a": 3, "b": 4}, ["a", "b"])
    assert path.read_bytes() == before
    monkeypatch.undo()
    results_mod.append_row(path, {"a": 3, "b": 4}, ["a", "b"])
    assert results_mod.read_rows(path, ["a", "b"]) == [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]


def test_sweep_file_errors(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("base: b.yaml\nout: o\nresults: r.csv\ngrid: {decorrelation: 0.1}\n")
    with pytest.raises(SinkscopeError, match=r"s\.yaml: grid\.decorrelation must be a non-empty list"):
        load_sweep(bad)
    bad.write_text("base: b.yaml\nout: o\ngrid: {}\nepochs: 3\n")
    with pytest.raises(SinkscopeError, match=r"unknown field\(s\) \['epochs'\]"):
        load_sweep(bad)
    bad.write_text("base: b.yaml\nout: o\ngrid: {}\n")
    with pytest.raises(SinkscopeError, match=r"missing field\(s\) \['results'\]"):
        load_sweep(bad)
    bad.write_text("base: b.yaml\nout: o\nresults: r.csv\npoints: [{seed: 1}, {seed: 1}]\n")
    with pytest.raises(SinkscopeError, match=r"points \['seed1'\] are listed twice"):
        load_sweep(bad)
    foreign = tmp_path / "r.csv"
    foreign.write_text("a,b\n1,2\n")
    with pytest.raises(SinkscopeError, match="not a sweep results file"):
        results_mod.read_rows(foreign, ["point"])


def test_sigkilled_sweep_resumes_to_the_uninterrupted_rows(spec_file, tmp_path):
    """kill -9 of `sinkscope sweep` while the second point trains, then the same command: the rows of a sweep
    that was never killed (the finished point is not redone; the killed one restarts from its last checkpoint)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    points = ["--point", "ka2-kv1-dec0", "--point", "ka2-kv1-dec100"]
    cmd = [sys.executable, "-m", "sinkscope", "sweep", "--config", str(spec_file), *points]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    second = tmp_path / "runs" / "ka2-kv1-dec100"
    deadline = time.time() + 300
    while time.time() < deadline and not (second / "run.json").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    spec = load_sweep(spec_file)
    assert [r["point"] for r in read_results(spec)] == ["ka2-kv1-dec0"], "killed during the second point"
    assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0
    resumed = read_results(spec)

    whole_file = tmp_path / "whole.yaml"
    whole = yaml.safe_load(spec_file.read_text())
    whole.update(out=str(tmp_path / "runs-whole"), results=str(tmp_path / "whole.csv"))
    whole_file.write_text(yaml.safe_dump(whole, sort_keys=False))
    assert subprocess.run([sys.executable, "-m", "sinkscope", "sweep", "--config", str(whole_file), *points],
                          capture_output=True, timeout=600).returncode == 0
    uninterrupted = read_results(load_sweep(whole_file))
    varying = {"train_minutes", "run", "trace", "sweep", "command"}
    assert [{k: v for k, v in r.items() if k not in varying} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in varying} for r in uninterrupted]


def test_a_matryoshka_point_gives_one_row_per_rate(spec_file, tmp_path):
    """A MoME point (issue 15) trains once, then is scored and recorded at each rate of its set: one row each."""
    from sinkscope.trace import Trace

    sweep = yaml.safe_load(spec_file.read_text())
    sweep.update(results=str(tmp_path / "mome.csv"), out=str(tmp_path / "mome-runs"), grid={},
                 eval={"snr": [None], "limit": 3},
                 points=[{"model.rates": [[2, 1], [8, 4]], "seed": 2,
                          "model.mome": {"experts": 2, "shared": 1, "top_k": 1, "bottleneck": 8}}])
    (tmp_path / "mome.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    spec = load_sweep(tmp_path / "mome.yaml")
    [(name, _)] = spec.all_points
    rows = run_sweep(spec, log=lambda m: None)
    assert [r["point"] for r in rows] == [f"{name}-ka2-kv1", f"{name}-ka8-kv4"]
    assert [(r["k_audio"], r["k_video"]) for r in rows] == [("2", "1"), ("8", "4")]
    assert all(r["n_clean"] == "3" and r["trace_samples"] == "2" for r in rows)
    assert rows[0]["run"] == rows[1]["run"] and rows[0]["val_wer_by_epoch"] == rows[1]["val_wer_by_epoch"]
    for row in rows:  # each trace recorded at its own rate, with its router
        assert Trace.load(row["trace"])[0].router_ids is not None
    lengths = [sum(e - s for seg, s, e in Trace.load(r["trace"])[0].segments if seg == "video") for r in rows]
    assert lengths[0] == 4 * lengths[1], "K_v = 1 gives four times the video tokens of K_v = 4"
    messages: list[str] = []
    assert [r["point"] for r in run_sweep(spec, log=messages.append)] == [r["point"] for r in rows]
    assert messages == [f"[1/1] {name}: done"]


def test_wer_figure_keeps_other_epoch_budgets_out_of_the_means():
    """A learning-curve point (6 epochs where the sweep trains 3) is drawn as its own marker, not averaged with the
    3-epoch seeds; the legend says what the marker shapes (seeds) mean."""
    def row(point, lam, seed, epochs, wer):
        return {"point": point, "mode": "vsr", "k_audio": "", "k_video": "5", "decorrelation": lam, "seed": seed,
                "epochs": epochs, "wer_clean": wer, "wer_snr0": ""}

    rows = [row("a", "0.0", "0", "3", "0.14"), row("b", "0.0", "1", "3", "0.16"), row("c", "10000.0", "0", "3", "0.43"),
            row("d", "10000.0", "0", "6", "0.20"), row("e", "0.0", "0", "6", "0.12")]
    fig = decorrelation_wer_figure(pd.DataFrame(rows))
    lines = {t.name: t for t in fig.data if t.mode == "lines"}
    assert lines["off (λ=0)"].y[0] == pytest.approx(0.15) and lines["λ=10000"].y[0] == pytest.approx(0.43)
    apart = {t.name: list(t.y) for t in fig.data if t.name and "epochs" in t.name}
    assert apart == {"off (λ=0), 6 epochs": [0.12], "λ=10000, 6 epochs": [0.20]}
    assert {t.name for t in fig.data if t.legendgroup == "seeds"} == {"seed 0", "seed 1"}
    assert "3 epochs" in fig.layout.title.text
    sinks = decorrelation_sinks_figure([{**r, "sinks_per_utt_video": "1.0", "cos_last_video": "0.5"} for r in rows])
    assert all(len(t.x) == 1 for t in sinks.data) and len(sinks.data) == 4  # the 3-epoch points only


def test_mome_comparison_figure_puts_each_rate_against_its_single_rate_model():
    from sinkscope.train.results import mome_comparison_figure

    mome = [{"point": f"seed0-ka{k}", "mode": "asr", "k_audio": str(k), "k_video": "", "decorrelation": "0.0",
             "seed": "0", "wer_clean": str(w), "wer_snr0": str(w + 0.2)} for k, w in ((4, 0.10), (16, 0.15), (32, 0.2))]
    single = [{"point": "asr-ka32-dec0", "mode": "asr", "k_audio": "32", "k_video": "", "decorrelation": "0.0",
               "seed": "0", "wer_clean": "0.24", "wer_snr0": "0.46"},
              {"point": "asr-ka32-dec0-seed1", "mode": "asr", "k_audio": "32", "k_video": "", "decorrelation": "0.0",
               "seed": "1", "wer_clean": "0.26", "wer_snr0": "0.48"},
              {"point": "asr-ka32-dec10000", "mode": "asr", "k_audio": "32", "k_video": "",
               "decorrelation": "10000.0", "seed": "0", "wer_clean": "0.51", "wer_snr0": "0.66"},
              {"point": "vsr-kv5-dec0", "mode": "vsr", "k_audio": "", "k_video": "5", "decorrelation": "0.0",
               "seed": "0", "wer_clean": "0.14", "wer_snr0": ""}]
    fig = mome_comparison_figure(mome, single)
    assert [a.text for a in fig.layout.annotations] == ["ASR, clean", "ASR, babble 0 dB"]
    mome_clean, single_clean = fig.data[0], fig.data[1]
    assert list(mome_clean.x) == ["K_a=4", "K_a=16", "K_a=32"] and list(mome_clean.y) == [0.10, 0.15, 0.2]
    # single-rate: only lambda = 0 rows of the same mode, mean over seeds
    assert list(single_clean.x) == ["K_a=32"] and single_clean.y[0] == pytest.approx(0.25)
    assert fig.data[3].y[0] == pytest.approx(0.47)


def _append_rows(path: str, who: str, n: int, barrier) -> None:
    barrier.wait()  # both processes start appending together
    for i in range(n):
        results_mod.append_row(path, {"who": who, "i": i}, ["who", "i"])


def test_rows_appended_by_two_processes_at_once_are_all_kept(tmp_path):
    """Two sweeps run point by point in parallel (`--point`) append to one results table: each append reads the
    table, adds its row and renames the new file into place, under a lock, so that no process renames over a row it
    did not read (without the lock, three runs here kept 159, 157 and 177 of these 300 rows)."""
    import multiprocessing

    path = str(tmp_path / "results.csv")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    workers = [ctx.Process(target=_append_rows, args=(path, who, 150, barrier)) for who in ("a", "b")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    rows = results_mod.read_rows(path, ["who", "i"])
    assert sorted((r["who"], int(r["i"])) for r in rows) == [(w, i) for w in "ab" for i in range(150)]


def test_the_experiment_scripts_refuse_a_damaged_results_file_by_line_and_column(tmp_path):
    """experiments/decorrelation_table.py and the figure scripts read results through `load_results`: a damaged
    CSV is named with its line and column, never a pandas traceback; the committed table still reads."""
    import csv
    import subprocess
    import sys

    from sinkscope.train.results import load_results

    committed = Path(__file__).resolve().parents[1] / "experiments" / "results" / "decorrelation.csv"
    rows = list(csv.reader(committed.open(newline="")))
    assert len(load_results(committed)) == len(rows) - 1

    def damaged(name, edit):
        copy = [list(r) for r in rows[:3]]
        edit(copy)
        path = tmp_path / f"{name}.csv"
        with path.open("w", newline="") as f:
            csv.writer(f).writerows(copy)
        return path

    col = rows[0].index("decorrelation")
    cases = {
        damaged("number", lambda r: r[2].__setitem__(col, "lots")): r"line 3, column 'decorrelation': 'lots' is not",
        damaged("mode", lambda r: r[1].__setitem__(1, "xsr")): r"line 2, column 'mode': 'xsr' is not one of",
        damaged("short", lambda r: r.__setitem__(2, r[2][:10])): "line 3 has fewer fields than the header",
        damaged("empty", lambda r: r.__delitem__(slice(1, None))): "has a header but no rows yet",
        tmp_path / "absent.csv": "no results file",
    }
    for path, message in cases.items():
        with pytest.raises(SinkscopeError, match=message):
            load_results(path)
    script = Path(__file__).resolve().parents[1] / "experiments" / "decorrelation_table.py"
    res = subprocess.run([sys.executable, str(script), str(next(iter(cases)))], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1 and "is not a number" in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("| mode | rate | λ |") and res.stdout.count("\n") > 2, res.stdout


def test_every_experiment_script_answers_help_and_writes_nothing():
    """`decorrelation_figures.py --help` and `mome_figure.py --help` redrew the committed figures,
    `decorrelation_table.py --help` read `--help` as a results file and `summarize_eval.py --help` printed its
    table: each script now has its options, and asking for them writes nothing."""
    import subprocess
    import sys

    experiments = Path(__file__).resolve().parents[1] / "experiments"
    before = {p: p.stat().st_mtime_ns for p in experiments.rglob("*") if p.is_file()}
    scripts = sorted(experiments.glob("*.py"))
    procs = {s.name: subprocess.Popen([sys.executable, str(s), "--help"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for s in scripts}
    # the shell scripts' --help printed nothing (train_demo_models.sh) or started the sweep in a new worktree
    shells = {s.name: subprocess.Popen(["bash", str(s), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True) for s in (experiments / "run_decorrelation_sweep.sh",
                                                            experiments / "train_demo_models.sh")}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.startswith("usage: "), (name, out[-500:], err[-2000:])
    for name, proc in shells.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "resum" in out.lower(), (name, out, err)
        assert "sweep started" not in out and not err, (name, out, err)
    after = {p: p.stat().st_mtime_ns for p in experiments.rglob("*") if p.is_file()}
    assert after == before, [p for p in after if before.get(p) != after[p]]
    assert {"decorrelation_figures.py", "mome_figure.py", "summarize_eval.py", "decorrelation_table.py"} <= set(procs)
