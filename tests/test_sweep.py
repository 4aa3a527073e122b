"""`sinkscope sweep` on a tiny model: every grid point trains and is scored once; a killed sweep continues."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml

from sinkscope.errors import SinkscopeError
from sinkscope.models.avsr import AVSRModel
from sinkscope.train.results import sweep_figure
from sinkscope.train.sweep import load_sweep, read_results, run_sweep
from tests.test_avsr_model import WORDS, tiny_tokenizer
from tests.tiny_models import tiny_llama


def tiny_factory(cfg):
    torch.manual_seed(0)
    return AVSRModel(cfg.model, llm=tiny_llama(vocab_size=len(WORDS) + 8), tokenizer=tiny_tokenizer())


@pytest.fixture
def spec_file(make_corpus, tmp_path):
    corpus = make_corpus(24, 3)
    base = {"data": str(corpus), "epochs": 1, "batch_size": 4, "lr": 0.003, "warmup_steps": 2, "max_train": 8,
            "max_new_tokens": 4,
            "model": {"mode": "avsr", "compression": "stack", "projector_hidden": 32,
                      "audio": {"d_model": 32, "layers": 1, "heads": 2, "ffn": 64, "max_seconds": 4.0},
                      "video": {"channels": 4, "d_model": 32, "layers": 1, "heads": 2}}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {"base": str(tmp_path / "base.yaml"), "out": str(tmp_path / "runs"),
             "results": str(tmp_path / "results.csv"),
             "grid": {"rate": [{"model.k_audio": 2, "model.k_video": 1}, {"model.k_audio": 8, "model.k_video": 4}],
                      "decorrelation": [0.0, 1.0]},
             "eval": {"snr": [None, 0], "limit": 3}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    return tmp_path / "sweep.yaml"


def test_sweep_trains_each_point_once_and_resumes(spec_file, tmp_path):
    spec = load_sweep(spec_file)
    assert [name for name, _ in spec.points] == ["ka2-kv1_dec0.0", "ka2-kv1_dec1.0", "ka8-kv4_dec0.0",
                                                 "ka8-kv4_dec1.0"]

    def killed_at_third_point(message: str) -> None:
        if message.startswith("[3/4]") and "training" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, log=killed_at_third_point, model_factory=tiny_factory)
    assert {r["point"] for r in read_results(spec.results)} == {"ka2-kv1_dec0.0", "ka2-kv1_dec1.0"}

    messages: list[str] = []
    rows = run_sweep(spec, log=messages.append, model_factory=tiny_factory)
    assert len(rows) == 8 and {(r["point"], r["snr"]) for r in rows} == {
        (p, s) for p, _ in spec.points for s in ("clean", "0")}
    assert "[1/4] ka2-kv1_dec0.0: done" in messages and "[2/4] ka2-kv1_dec1.0: done" in messages
    by_point = {r["point"]: r for r in rows if r["snr"] == "clean"}
    assert (by_point["ka8-kv4_dec1.0"]["k_audio"], by_point["ka8-kv4_dec1.0"]["k_video"]) == ("8", "4")
    assert float(by_point["ka8-kv4_dec1.0"]["decorrelation"]) == 1.0
    assert all(0 <= float(r["wer"]) and r["n"] == "3" for r in rows)
    # every row names the sweep file, the point's config (hash of the run's config.yaml) and the command
    assert all(r["sweep"] == str(spec_file) and len(r["config_hash"]) == 12 and r["command"] for r in rows)
    assert len({r["config_hash"] for r in rows}) == 4
    # the stacked projector really is wider at the higher rate
    trained = yaml.safe_load((tmp_path / "runs" / "ka8-kv4_dec1.0" / "config.yaml").read_text())
    assert trained["model"]["k_audio"] == 8 and trained["decorrelation"] == 1.0

    fig = sweep_figure(pd.DataFrame(rows))
    clean_off = [t for t in fig.data if t.name == "decorrelation off" and t.xaxis == "x"][0]
    assert list(clean_off.x) == ["K_a=2, K_v=1", "K_a=8, K_v=4"]
    assert list(clean_off.y) == [float(by_point[p]["wer"]) for p in ("ka2-kv1_dec0.0", "ka8-kv4_dec0.0")]

    again: list[str] = []
    assert run_sweep(spec, log=again.append, model_factory=tiny_factory) == rows
    assert all(m.endswith(": done") for m in again)


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
    foreign = tmp_path / "r.csv"
    foreign.write_text("a,b\n1,2\n")
    with pytest.raises(SinkscopeError, match="not a sweep results file"):
        read_results(foreign)
