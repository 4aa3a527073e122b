"""AVSR training on a tiny config: the loss falls, decoding runs, a resumed run is identical, configs check."""

from __future__ import annotations

import re
import time

import pytest
import torch
from safetensors.torch import load_file

from sinkscope.errors import SinkscopeError
from sinkscope.eval import score
from sinkscope.train.avsr import read_train_config as load_config
from sinkscope.train.avsr import train
from sinkscope.train.losses import context_mask
from tests.test_avsr_model import tiny_model


def TINY(cfg):
    return tiny_model("avsr", "stack")


@pytest.fixture(scope="module")
def corpus(make_corpus):
    return make_corpus(30, 5)


def config(corpus, out, epochs):
    cfg = load_config(None, [f"data={corpus}", f"out={out}", f"epochs={epochs}", "batch_size=4", "lr=0.003",
                             "warmup_steps=2", "max_train=12", "max_eval=4", "max_new_tokens=4",
                             "decorrelation=10.0"])
    cfg.model = tiny_model("avsr", "stack").cfg
    return cfg


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory):
    """An uninterrupted 3-epoch run: what every interrupted and resumed run must reproduce."""
    out = tmp_path_factory.mktemp("full") / "run"
    return out, train(config(corpus, out, 3), log=lambda m: None, model_factory=TINY)


def test_loss_falls_and_resume_is_identical(corpus, full_run, tmp_path):
    full_dir, full = full_run
    ce = [h["ce"] for h in full["history"]]
    assert ce[-1] < ce[0], ce
    assert all(h["decorrelation"] > 0 for h in full["history"])
    assert all(0 <= h["wer"] for h in full["history"])
    def killed_after_first_epoch(message: str) -> None:
        if message.startswith("epoch 1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(corpus, tmp_path / "split", 3), log=killed_after_first_epoch, model_factory=TINY)
    # then a slice (until epoch 2 of the 3-epoch schedule), then the rest
    sliced = train(config(corpus, tmp_path / "split", 3), log=lambda m: None, model_factory=TINY,
                   until_epoch=2)
    assert sliced["epoch"] == 2
    resumed = train(config(corpus, tmp_path / "split", 3), log=lambda m: None, model_factory=TINY)
    assert [h["ce"] for h in resumed["history"]] == pytest.approx(ce, rel=1e-5)
    a = load_file(full_dir / "epoch-003.safetensors")
    b = load_file(tmp_path / "split" / "epoch-003.safetensors")
    assert a.keys() == b.keys() and all("projector" in k or "lora_" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_context_mask_and_config_errors(tmp_path):
    mask = context_mask([[("bos", 0, 1), ("audio_start", 1, 2), ("audio", 2, 5), ("prompt", 5, 7),
                          ("transcript", 7, 9), ("eos", 9, 10)]], 12)
    assert mask[0].tolist() == [False] + [True] * 6 + [False] * 5
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(SinkscopeError, match=r"bad\.yaml: unknown field\(s\) \['learning_rate'\]"):
        load_config(bad)
    bad.write_text("model: [1, 2\n")
    with pytest.raises(SinkscopeError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(SinkscopeError, match="expected key=value"):
        load_config(None, ["epochs"])
    assert load_config(None, ["model.k_audio=8", "decorrelation=1e4"]).model.k_audio == 8


def test_train_and_eval_from_the_command_line(corpus, tmp_path):
    import json

    import yaml
    from typer.testing import CliRunner

    from sinkscope.cli import app
    from tests.test_avsr_model import WORDS, tiny_tokenizer
    from tests.tiny_models import tiny_llama

    llm_dir = tmp_path / "tiny-llm"
    tiny_llama(vocab_size=len(WORDS) + 8).save_pretrained(llm_dir)
    tiny_tokenizer().save_pretrained(llm_dir)
    model_cfg = {"llm": str(llm_dir), "mode": "avsr", "projector_hidden": 32,
                 "audio": {"d_model": 32, "layers": 1, "heads": 2, "ffn": 64, "max_seconds": 4.0},
                 "video": {"channels": 4, "d_model": 32, "layers": 1, "heads": 2}}
    cfg = {"data": str(corpus), "out": str(tmp_path / "run"), "model": model_cfg, "epochs": 1, "batch_size": 4,
           "max_train": 8, "max_eval": 4, "max_new_tokens": 4}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--config", str(tmp_path / "cfg.yaml"), "--set", "lr=0.002"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(corpus), "--limit", "4",
                              "--snr", "0", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output.strip().splitlines()[-1])
    assert result["n"] == 4 and result["snr"] == 0 and result["mode"] == "avsr" and result["wer"] >= 0
    evaluated = tmp_path / "run" / "eval-test-snr0-beam1"
    assert (evaluated / "hypotheses.csv").is_file()
    assert json.loads((evaluated / "results.json").read_text())["wer"] == result["wer"]
    assert yaml.safe_load((evaluated / "config.yaml").read_text())["snr"] == 0
    # the run directory says how it was made
    run_info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_info["verb"] == "train" and run_info["sinkscope_version"]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["lr"] == 0.002
    assert json.loads((tmp_path / "run" / "results.json").read_text())["epoch"] == 1
    res = runner.invoke(app, ["record", "--checkpoint", str(tmp_path / "run"), "--data", str(corpus), "--n", "3",
                              "--out", str(tmp_path / "av-trace")])
    assert res.exit_code == 0, res.output
    from sinkscope.trace import Trace

    tr = Trace.load(tmp_path / "av-trace")
    s = tr[0]
    names = [name for name, _, _ in s.segments]
    assert names == ["bos", "audio_start", "audio", "audio_end", "video_start", "video", "video_end", "prompt",
                     "transcript", "eos"]
    assert s.tokens[1] == "<audio>" and s.tokens[2] == "A0" and len(tr) == 3
    assert s.extra["mode"] == "avsr" and tr.manifest["config"]["k_audio"] == 4
    # each sample carries the model's greedy hypothesis and its WER against the reference
    for sample in tr:
        assert isinstance(sample.extra["hypothesis"], str) and 0 <= sample.extra["wer"]
        assert sample.extra["wer"] == score([sample.extra["transcript"]], [sample.extra["hypothesis"]])["wer"]
    (tmp_path / "run" / "state.json").write_text("{broken")
    res = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(corpus)])
    assert res.exit_code == 1 and "state.json: not valid JSON" in res.output


@pytest.mark.parametrize("override,message", [
    ("epochs=0", "epochs must be >= 1, not 0"),
    ("batch_size=-4", "batch_size must be >= 1, not -4"),
    ("max_train=-3", "max_train must be >= 1"),
    ("decorrelation=-1", "decorrelation, warmup_steps >= 0"),
    ("decorrelation=.nan", "decorrelation: expected a finite number"),
    ("epochs=ten", "epochs: expected an integer, got 'ten'"),
    ("lr=fast", "lr: expected a number, got 'fast'"),
    ("lr=-0.001", "lr must be > 0"),
    ("model.k_video=-2", "k_video must be >= 1, not -2"),
    ("model.lora_r=0", "lora_r must be >= 1, not 0"),
    ("model=5", "model: expected a mapping of fields, got 5"),
    ("model.k_audio=[1, 2]", "k_audio: expected an integer, got [1, 2]"),
    ("model.mode=asrr", "mode must be one of"),
])
def test_training_config_values_are_checked(override, message):
    with pytest.raises(SinkscopeError, match=re.escape(message)):
        load_config(None, [override])


def test_yaml_aliases_are_refused_at_once(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}]" for i in range(1, 10)]
    lines.append("snr: *a9")
    bomb.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(SinkscopeError, match=r"bomb\.yaml: not valid YAML .*aliases"):
        load_config(bomb)
    assert time.perf_counter() - start < 1.0


KILLER = """
import os, signal, sys
from tests.test_avsr_train import TINY, config
from sinkscope.train.avsr import train
calls = []
def progress(*args):
    calls.append(1)
    if len(calls) == 5:  # the second step of epoch 2 (3 steps per epoch), after epoch 1's checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
train(config(sys.argv[1], sys.argv[2], 3), log=lambda m: None, progress=progress, model_factory=TINY)
"""


def test_sigkill_mid_epoch_then_resume_is_identical(corpus, full_run, tmp_path):
    """kill -9 in the middle of epoch 2, then the same command: the checkpoints of an uninterrupted run."""
    import subprocess
    import sys

    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(corpus), str(killed)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (killed / "epoch-001.safetensors").exists() and not (killed / "epoch-002.safetensors").exists()
    resumed = train(config(corpus, killed, 3), log=lambda m: None, model_factory=TINY)
    full_dir, full = full_run
    assert [h["ce"] for h in resumed["history"]] == pytest.approx([h["ce"] for h in full["history"]], rel=1e-5)
    a, b = load_file(full_dir / "epoch-003.safetensors"), load_file(killed / "epoch-003.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
