"""Result tables of training experiments: rows appended atomically (one CSV row per finished measurement, never
duplicated), read back with a check of their columns, and drawn (`sweep_figure`)."""

from __future__ import annotations

import csv
import html
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from sinkscope.errors import SinkscopeError


def read_rows(path: str | Path, columns: Sequence[str]) -> list[dict]:
    """The rows of a results CSV ([] when it does not exist); refuses a file without `columns`."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SinkscopeError(f"{path}: not a readable results CSV ({exc}); move it away") from exc
    missing = sorted(set(columns) - set(header))
    if missing:
        raise SinkscopeError(f"{path}: not a sweep results file (columns {sorted(header)}, missing {missing}); "
                             "move it away")
    return rows


def append_row(path: str | Path, row: dict, columns: Sequence[str]) -> None:
    """Append one row: the whole file is rewritten to a temporary file and renamed into place, so a kill leaves
    either the old table or the new one, never a partial row."""
    path = Path(path)
    rows = read_rows(path, columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows([*rows, row])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sweep_figure(results: pd.DataFrame) -> go.Figure:
    """Test WER against the compression rate of a `sinkscope sweep` (one line per decorrelation weight, one
    panel per SNR). `results` holds the rows of the sweep results CSV."""
    df = results.copy()
    for col in ("k_audio", "k_video", "wer", "decorrelation"):
        df[col] = pd.to_numeric(df[col])
    df["rate"] = "K_a=" + df["k_audio"].astype(int).astype(str) + ", K_v=" + df["k_video"].astype(int).astype(str)
    order = df.sort_values(["k_audio", "k_video"])["rate"].unique().tolist()
    snrs = list(dict.fromkeys(df["snr"]))
    fig = make_subplots(rows=1, cols=len(snrs), shared_yaxes=True,
                        subplot_titles=[f"{'clean' if s == 'clean' else s + ' dB babble'}" for s in snrs])
    for c, snr in enumerate(snrs, start=1):
        for lam, group in df[df["snr"] == snr].groupby("decorrelation"):
            group = group.set_index("rate").reindex(order).dropna(subset=["wer"])
            name = "decorrelation off" if lam == 0 else f"decorrelation λ={lam:g}"
            fig.add_trace(go.Scatter(x=group.index, y=group["wer"], mode="lines+markers", name=name,
                                     legendgroup=name, showlegend=c == 1,
                                     line_color="#7f7f7f" if lam == 0 else "#d62728",
                                     hovertemplate="%{x}<br>WER %{y:.1%}<extra>" + html.escape(name) + "</extra>"),
                          row=1, col=c)
        fig.update_xaxes(title_text="compression rate", categoryorder="array", categoryarray=order, row=1, col=c)
    fig.update_yaxes(title_text="test WER", tickformat=".0%", row=1, col=1)
    fig.update_layout(title="WER across compression rates, with and without the decorrelation loss", height=420)
    return fig
