"""The command line: record, resume, summary and the errors a user can cause."""

from __future__ import annotations

import runpy
import time

import pytest
import tokenizers
import torch
from safetensors.numpy import load_file, save_file
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from typer.testing import CliRunner

from sinkscope.cli import app
from sinkscope.models.llm import load_llm
from sinkscope.record.run import encode_with_bos, record_texts
from sinkscope.trace import Trace
from sinkscope.trace.columns import trace_columns
from tests.tiny_models import tiny_llama

runner = CliRunner()
WORDS = ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "."]
TEXTS = ["the cat sat on the mat .", "a dog ran .", "the dog sat .", "a cat ran on a mat ."]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama().save_pretrained(path)
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    return path


@pytest.fixture()
def prompts(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(TEXTS) + "\n\n", encoding="utf-8")
    return f


def test_record_then_summary(tmp_path, tiny_dir, prompts):
    out = tmp_path / "trace"
    res = runner.invoke(app, ["record", "--model", str(tiny_dir), "--text-file", str(prompts), "--out", str(out),
                              "--batch-size", "3", "--attention-maps", "1:0", "--hidden-states", "2"])
    assert res.exit_code == 0, res.output
    tr = Trace.load(out)
    assert len(tr) == 4 and tr.manifest["model"] == str(tiny_dir)
    assert tr[1].tokens == ["<s>", "a", "dog", "ran", "."]
    assert tr[1].segments == [("bos", 0, 1), ("text", 1, 5)]
    tok = AutoTokenizer.from_pretrained(tiny_dir)  # the ids to feed a model to recompute any field by hand
    assert [s.token_ids.tolist() for s in tr] == [encode_with_bos(tok, t, None) for t in TEXTS]
    assert tr[0].attention_maps[(1, 0)].shape == (8, 8) and tr[0].hidden_states[2].shape == (8, 64)
    assert (out / "index.safetensors").is_file(), "a recording run ends by writing the trace's index"
    assert trace_columns(tr).mean_alpha.shape == (3, sum(len(s) for s in tr)) and tr.index_note is None
    res = runner.invoke(app, ["summary", str(out)])
    assert res.exit_code == 0, res.output
    assert "4 samples" in res.output and "Sink^0.3 pos0 %" in res.output
    rows = [ln for ln in res.output.splitlines() if ln.strip().startswith("│")]
    assert len(rows) == 6, "one row per layer in each table: sinks and massive features, then cos-to-BOS"
    assert "mean cos-to-BOS per segment" in res.output and rows[3].split("│")[1].strip() == "0"
    # a trace whose recording stopped before its first sample: said, not a table of zeros
    import shutil

    for sample in (out / "samples").iterdir():
        shutil.rmtree(sample)
    (out / "index.safetensors").unlink()
    res = runner.invoke(app, ["summary", str(out)])
    assert res.exit_code == 1 and "holds no samples yet" in " ".join(res.output.split()), res.output


def test_interrupted_record_resumes(tmp_path, tiny_dir):
    out = tmp_path / "trace"
    model, tok = load_llm(tiny_dir)

    def stop_after_first_batch(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        record_texts(model, tok, TEXTS, out, batch_size=2, progress=stop_after_first_batch)
    assert len(Trace.load(out)) == 2, "the finished batch is on disk"

    res = runner.invoke(app, ["record", "--model", str(tiny_dir), "--out", str(out)] +
                        [a for t in TEXTS for a in ("--text", t)])
    assert res.exit_code == 1 and "pass --resume" in res.output
    res = runner.invoke(app, ["record", "--model", str(tiny_dir), "--out", str(out), "--resume"] +
                        [a for t in TEXTS for a in ("--text", t)])
    assert res.exit_code == 0, res.output
    assert "recorded 2 samples" in res.output and "2 already there" in res.output
    tr = Trace.load(out)
    assert [s.extra["text"] for s in tr] == TEXTS
    # --n takes the first N prompts
    res = runner.invoke(app, ["record", "--model", str(tiny_dir), "--out", str(tmp_path / "first"), "--n", "1"] +
                        [a for t in TEXTS for a in ("--text", t)])
    assert res.exit_code == 0, res.output
    assert [s.extra["text"] for s in Trace.load(tmp_path / "first")] == TEXTS[:1]


def test_a_prompt_longer_than_the_context_is_refused_before_anything_is_recorded(tmp_path, tiny_dir):
    """The tiny model's context is 256 positions: a 300-word prompt is refused up front (the short prompt before it
    is not recorded either), with --max-length it is truncated and recorded."""
    out = tmp_path / "trace"
    long_prompt = " ".join(["cat"] * 300)
    args = ["record", "--model", str(tiny_dir), "--out", str(out), "--text", TEXTS[0], "--text", long_prompt]
    res = runner.invoke(app, args)
    assert res.exit_code == 1
    assert "prompt 2 of 2" in res.output and "301 tokens with BOS, longer than the model's context of 256" in \
        res.output and "--max-length 256" in res.output, res.output
    assert not (out / "samples").exists() or not any((out / "samples").iterdir())
    res = runner.invoke(app, args + ["--max-length", "256"])
    assert res.exit_code == 0, res.output
    assert [len(s) for s in Trace.load(out)] == [8, 256]


def test_the_recompute_example_checks_a_trace_against_eager(tmp_path, tiny_dir, capsys):
    """examples/recompute.py recomputes alpha, cos-to-BOS, max/median |h| and the massive set from HF eager
    attention and the blocks' outputs with plain numpy: it passes on a fresh recording and fails on a trace with one
    alpha moved by 1e-3 (in range, so the reader accepts it)."""
    out = tmp_path / "trace"
    res = runner.invoke(app, ["record", "--model", str(tiny_dir), "--out", str(out), "--batch-size", "2"] +
                        [a for t in TEXTS for a in ("--text", t)])
    assert res.exit_code == 0, res.output
    recompute = runpy.run_path("examples/recompute.py")["main"]
    assert recompute([str(out), "--samples", "4"]) == 0
    assert "4 samples, float32: all within tolerance" in capsys.readouterr().out
    file = out / "samples" / "000001" / "arrays.safetensors"
    arrays = load_file(str(file))
    arrays["attention_received"][2, 1, 3] += 1e-3
    save_file(arrays, str(file))
    assert recompute([str(out), "--samples", "4"]) == 1
    assert "attention_received 1.00e-03 > 1e-05" in capsys.readouterr().out
    for bad in ("0", "-3"):  # 0 said "no sample to check" as for an old trace; -3 checked every sample
        with pytest.raises(SystemExit) as exit_:
            recompute([str(out), "--samples", bad])
        assert exit_.value.code == 2 and "is not a number of samples" in capsys.readouterr().err


def test_user_errors_are_clear(tmp_path, tiny_dir):
    """Each bad record invocation ends in one message naming the input, and leaves no output directory behind
    (one that existed before is left as it was)."""
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    cases = [
        (["--text-file", str(bad)], "latin1.txt is not UTF-8 text (line 1"),
        (["--text-file", str(tmp_path / "missing.txt")], "missing.txt does not exist"),
        (["--text", "a", "--attention-maps", "3-1"], "'3-1' is not LAYER:HEAD"),
        (["--text", "a", "--attention-maps", "9:0"], "outside the model's 3 layers"),
        ([], "give at least one --text"),
        (["--text", "a", "--dtype", "float8"], "dtype must be float32, bfloat16 or float16, not 'float8'"),
        (["--text", "a", "--data", str(tmp_path)], "data is for AV recording: give a checkpoint"),
        (["--checkpoint", "demo", "--data", str(tmp_path), "--text", "a"],
         "'model', 'text'] apply to text recording only"),
        (["--checkpoint", "demo"], "a checkpoint needs data"),
        (["--text", "a", "--set", "batch_size=zero"], "batch_size: expected an integer, got 'zero'"),
        (["--text", "a", "--text", "  "], "--text 2 (config field text[1]) is empty"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--text", "a", "--device", "cuda"], "CUDA is not available"))
    for args, message in cases:
        res = runner.invoke(app, ["record", "--model", str(tiny_dir), "--out", str(tmp_path / "o")] + args)
        assert res.exit_code != 0, args
        assert message in " ".join(res.output.split()), (args, res.output)
        assert not (tmp_path / "o").exists(), ("a refused record leaves no output directory behind", args)
    (tmp_path / "o").mkdir()  # a directory that was there before stays, empty as it was
    res = runner.invoke(app, ["record", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--text", "a",
                              "--attention-maps", "9:0"])
    assert res.exit_code == 1 and (tmp_path / "o").is_dir() and not any((tmp_path / "o").iterdir())
    res = runner.invoke(app, ["summary", str(tmp_path)])
    assert res.exit_code == 1 and "not a sinkscope trace" in res.output
    for eps in ("nan", "-1", "2"):
        res = runner.invoke(app, ["summary", str(tmp_path), "--eps", eps])
        text = " ".join(res.output.split())
        assert res.exit_code != 0 and "--eps" in text and ("in [0, 1]" in text or "Invalid value" in text), text


def test_help_lists_the_verbs():
    res = runner.invoke(app, ["--help"])
    for verb in ["record", "summary", "data", "pretrain-encoders", "train", "eval", "sweep", "app", "info"]:
        assert verb in res.output


def test_sigkilled_record_resumes_to_the_uninterrupted_trace(tmp_path, tiny_dir):
    """kill -9 during `record`, then `record --resume`: the same samples, bit for bit, as a run never killed
    (batch size 1: every sample is recorded alone in both runs, so no padding differs)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    texts = [" ".join(TEXTS[(i + k) % 4] for k in range(1 + i % 3)) for i in range(50)]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(texts) + "\n", encoding="utf-8")
    args = ["record", "--model", str(tiny_dir), "--text-file", str(prompts), "--batch-size", "1"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sinkscope", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "samples").glob("0*"))) < 3:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(list((killed / "samples").glob("0*")))
    assert 0 < partial < len(texts), "the recording was killed part-way"
    res = runner.invoke(app, [*args, "--out", str(killed), "--resume"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "whole")])
    assert res.exit_code == 0, res.output
    resumed, whole = Trace.load(killed), Trace.load(tmp_path / "whole")
    assert resumed.sample_ids == whole.sample_ids and len(whole) == len(texts)
    for a, b in zip(resumed, whole, strict=True):
        assert a.tokens == b.tokens
        for name in ("attention_received", "bos_cosine", "max_abs", "top_features"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_sinkscope_app_serves(tmp_path):
    """`sinkscope app` starts the server (it once pointed at a file that had moved) and answers its health check."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from sinkscope.browser import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sinkscope", "app", "--root", str(tmp_path), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ),
                            start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=2) as reply:
                    assert reply.status == 200
                    break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"sinkscope app exited: {proc.stdout.read().decode(errors='replace')[-2000:]}")
                assert time.time() < deadline, "sinkscope app did not answer within 90 s"
                time.sleep(0.5)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_an_output_another_process_is_writing_is_refused_and_a_killed_holder_blocks_nothing(tmp_path, tiny_dir):
    """Two jobs into one output directory (a resumed run started twice) would interleave samples, checkpoints or
    rows: the second is refused while the first holds the directory's lock, with nothing changed; the kernel drops
    the lock of a killed process, so a resume after a kill -9 goes ahead."""
    import subprocess
    import sys

    out = tmp_path / "trace"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from sinkscope.config import lock_output; "
         "lock_output(Path(sys.argv[1]), 'record'); print('held', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = runner.invoke(app, ["record", "--model", str(tiny_dir), "--out", str(out), "--text", TEXTS[0]])
        assert res.exit_code == 1
        assert "another process is writing there now" in " ".join(res.output.split()), res.output
        assert list(out.iterdir()) == [], "nothing was written"
    finally:
        holder.kill()
        holder.wait()
    res = runner.invoke(app, ["record", "--model", str(tiny_dir), "--out", str(out), "--text", TEXTS[0]])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["record", "--model", str(tiny_dir), "--out", str(out), "--text", TEXTS[1], "--resume"])
    assert res.exit_code == 0, res.output  # the same process again: its lock was dropped when the command ended
    assert len(Trace.load(out)) == 2
    # from Python (a notebook) too: the job drops its lock when it returns, so another process may go on there
    from sinkscope.record.run import RecordConfig, run_record

    run_record(RecordConfig(out=str(out), model=str(tiny_dir), text=(TEXTS[2],), resume=True))
    probe = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from sinkscope.config import "
                            "lock_output; lock_output(Path(sys.argv[1]), 'record'); print('free')", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "free", probe.stderr


def test_a_forked_worker_does_not_keep_the_output_locked(tmp_path):
    """`data synth` forks its workers: had they inherited the directory's lock, a worker still alive after its
    parent was killed (or after the job returned) would refuse the user's resume."""
    import multiprocessing
    import subprocess
    import sys

    from sinkscope.config import lock_output, release_locks

    out = tmp_path / "corpus"
    out.mkdir()
    lock_output(out, "data synth")
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    child.start()
    try:
        release_locks()
        probe = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from sinkscope.config "
                                "import lock_output; lock_output(Path(sys.argv[1]), 'data synth'); print('free')",
                                str(out)], capture_output=True, text=True, timeout=120)
        assert probe.stdout.strip() == "free", probe.stderr
    finally:
        child.kill()
        child.join()


def test_info_says_which_path_the_recorder_takes(monkeypatch):
    """`sinkscope info` names the recorder's path on each device and why: the C passes or torch's reductions on
    the CPU, the device path (Triton) or the torch path on CUDA, so that a GPU user sees before a long recording
    whether the fast path is on."""
    import torch

    from sinkscope.cli import recorder_paths
    from sinkscope.record import fused_cpu, kernels

    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0 and "recorder cpu" in result.output and "recorder cuda" in result.output
    monkeypatch.setattr(fused_cpu, "available", lambda: True)
    cpu, cuda = recorder_paths()
    assert "per-layer reductions: C passes" in cpu and cuda == "recorder cuda no CUDA device here"
    monkeypatch.setattr(fused_cpu, "available", lambda: False)
    monkeypatch.setenv("SINKSCOPE_CPU_KERNELS", "0")
    assert "torch's (SINKSCOPE_CPU_KERNELS=0)" in recorder_paths()[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "available", lambda device: False)
    assert "torch path (Triton is not installed" in recorder_paths()[1]
    monkeypatch.setenv("SINKSCOPE_TRITON", "0")
    assert recorder_paths()[1] == "recorder cuda torch path (SINKSCOPE_TRITON=0)"
    pytest.importorskip("triton")
    monkeypatch.setattr(kernels, "available", lambda device: True)
    assert "device path (Triton " in recorder_paths()[1]
