"""The benchmark's verdicts (no model): the CPU memory target is judged on the process peak RSS when it was
measured, and a missed target says MISSED."""

from __future__ import annotations

from sinkscope.bench.record import markdown


def _result(rss: bool) -> dict:
    rows = []
    for t, ratio, live, maxrss in ((512, 1.08, 1.0, 20.0), (2048, 1.31, 11.0, 120.0)):
        for method, r, extra_live, extra_rss in (("sdpa", 1.0, 0.0, 0.0), ("recorder", ratio, live, maxrss)):
            row = {"T": t, "method": method, "median_s": r, "ratio": r, "paired_ratio": r - 0.01 * (r > 1),
                   "peak_mib": 100 + extra_live, "extra_peak_mib": extra_live, "reps": 5}
            if rss:
                row.update(maxrss_mib=1500 + extra_rss, extra_maxrss_mib=extra_rss)
            rows.append(row)
    info = {"model": "m", "device": "cpu", "threads": 2, "torch": "x", "date": "d", "recorder_compile": False}
    return {"info": info, "rows": rows}


def test_verdicts_use_the_process_peak_rss_when_measured():
    table = markdown(_result(rss=True))
    assert "T=512: recorder 1.08x SDPA, target <= 1.10x: met (paired: 1.07x)" in table
    assert "T=2048: recorder 1.31x SDPA, target <= 1.25x: MISSED (paired: 1.30x)" in table
    assert "process peak RSS over SDPA's (default allocator) +120 MiB, target <= 96 MiB: MISSED" in table
    assert "| 2048 | recorder | 1.310 | 1.31x | 1.30x | 1620 | +120 | 111 | +11 |" in table
    live_only = markdown(_result(rss=False))
    assert "extra peak memory +11 MiB, target <= 96 MiB: met" in live_only


def test_bad_benchmark_arguments_are_refused_by_name(monkeypatch, capsys):
    """A device that is not here, an unknown shape or method, a length that is not one: a one-line error naming
    the option (it was a raw AssertionError for --device cuda without CUDA, and an unknown shape or method ran
    nothing, or less than asked, without a word)."""
    import pytest
    from typer.testing import CliRunner

    from sinkscope.bench import app, gpu

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    runner = CliRunner()
    for args, message in ((["--device", "cuda", "--random-weights"], "CUDA is not available here"),
                          (["--device", "tpu"], "'tpu': cpu, cuda or cuda:N"),
                          (["--random-weights", "--shapes", "nope"], "unknown ['nope']"),
                          (["--shapes", "llama-3.2-1b"], "shapes are for --random-weights"),
                          (["--lengths", "0"], "'0' is not a sequence length"),
                          (["--lengths", "512,abc"], "'abc' is not a sequence length"),
                          (["--methods", "sdpa,foo"], "unknown ['foo']"),
                          # a CPU smoke run must not land on the GPU's committed results (it did, in session 25)
                          (["--random-weights", "--shapes", "smollm2-135m"], "give it --out DIR")):
        res = runner.invoke(app, ["record", "--device", "cpu", *args])
        assert res.exit_code == 2 and message in " ".join(res.output.replace("│", "").split()), (args, res.output)
    for argv, message in ((["--device", "cuda"], "this torch has no CUDA device here"),
                          (["--device", "cpu", "--shapes", "llama-9b"], "--shapes: unknown ['llama-9b']"),
                          (["--device", "cpu", "--cases", "llama-3.2-1b:0:256"], "is not SHAPE:B:T"),
                          (["--device", "cpu", "--cases", "llama-3.2-1b:32"], "is not SHAPE:B:T")):
        with pytest.raises(SystemExit) as stop:
            gpu.main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    seen = []  # --lengths with --random-weights: those lengths at B=1 for each shape, instead of the cases
    monkeypatch.setattr(gpu, "main", seen.append)
    res = runner.invoke(app, ["record", "--device", "cpu", "--random-weights", "--shapes", "smollm2-135m,llama-3.2-1b",
                              "--lengths", "4096,65536", "--out", "unused"])
    assert res.exit_code == 0, res.output
    argv = seen[0]
    assert argv[argv.index("--cases") + 1] == ("smollm2-135m:1:4096,smollm2-135m:1:65536,llama-3.2-1b:1:4096,"
                                               "llama-3.2-1b:1:65536")
    assert argv[argv.index("--max-t") + 1] == "65536"


def test_paired_ratio_cancels_a_drift_the_ratio_of_medians_keeps():
    """Interleaved repetitions on a machine that slows down half-way: every recorder run is 5 % slower than the
    plain run beside it, which the paired ratio reports; the ratio of the medians mixes the two speeds."""
    import statistics

    from sinkscope.bench.record import paired_ratio

    base = [1.0, 1.0, 1.0, 1.4, 1.4, 1.4, 1.4]
    recorder = [b * 1.05 for b in base]
    assert abs(paired_ratio(recorder, base) - 1.05) < 1e-12
    recorder[-1] = 1.0 * 1.05  # one repetition where the drift hit the baseline only
    assert abs(paired_ratio(recorder, base) - 1.05) < 1e-12
    assert statistics.median(recorder) / statistics.median(base) < 1.0
