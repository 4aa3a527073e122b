"""The benchmark's verdicts (no model): the CPU memory target is judged on the process peak RSS when it was
measured, and a missed target says MISSED."""

from __future__ import annotations

from sinkscope.bench.record import markdown


def _result(rss: bool) -> dict:
    rows = []
    for t, ratio, live, maxrss in ((512, 1.08, 1.0, 20.0), (2048, 1.31, 11.0, 120.0)):
        for method, r, extra_live, extra_rss in (("sdpa", 1.0, 0.0, 0.0), ("recorder", ratio, live, maxrss)):
            row = {"T": t, "method": method, "median_s": r, "ratio": r, "peak_mib": 100 + extra_live,
                   "extra_peak_mib": extra_live, "reps": 5}
            if rss:
                row.update(maxrss_mib=1500 + extra_rss, extra_maxrss_mib=extra_rss)
            rows.append(row)
    info = {"model": "m", "device": "cpu", "threads": 2, "torch": "x", "date": "d", "recorder_compile": False}
    return {"info": info, "rows": rows}


def test_verdicts_use_the_process_peak_rss_when_measured():
    table = markdown(_result(rss=True))
    assert "T=512: recorder 1.08x SDPA, target <= 1.10x: met" in table
    assert "T=2048: recorder 1.31x SDPA, target <= 1.25x: MISSED" in table
    assert "process peak RSS over SDPA's (default allocator) +120 MiB, target <= 96 MiB: MISSED" in table
    assert "| 2048 | recorder | 1.310 | 1.31x | 1620 | +120 | 111 | +11 |" in table
    live_only = markdown(_result(rss=False))
    assert "extra peak memory +11 MiB, target <= 96 MiB: met" in live_only
