"""Result tables of training experiments: rows appended atomically (one CSV row per finished measurement, never
duplicated), read back with a check of their columns, and drawn (`decorrelation_wer_figure`,
`decorrelation_sinks_figure`, `mome_comparison_figure`)."""

from __future__ import annotations

import csv
import html
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from filelock import FileLock
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


TABLE_COLUMNS = ("point", "mode", "k_audio", "k_video", "decorrelation", "seed", "epochs", "wer_clean")
"""What the experiment scripts' tables and figures read from a sweep's results CSV, at least."""
NUMERIC_PREFIXES = ("wer_", "cer_", "n_", "sinks_per_utt_", "cos_")
NUMERIC_COLUMNS = ("k_audio", "k_video", "decorrelation", "seed", "epochs", "massive_max", "ce_last")


def load_results(path: str | Path, columns: Sequence[str] = TABLE_COLUMNS) -> list[dict]:
    """The rows of a results CSV that a script tabulates or draws (experiments/decorrelation_table.py, the
    figures): refuses a missing or empty file, missing `columns`, and a value that is not a number where a number
    belongs (a blank, or `nan` for a statistic with no token to average, is allowed), naming the file, the row (its
    line in the file) and the column."""
    path = Path(path)
    if not path.is_file():
        raise SinkscopeError(f"{path}: no results file (run `sinkscope sweep --config ...` to write one)")
    rows = read_rows(path, columns)
    if not rows:
        raise SinkscopeError(f"{path}: has a header but no rows yet")
    for line, row in enumerate(rows, start=2):
        if None in row or None in row.values():  # csv.DictReader's marks of a row longer / shorter than the header
            raise SinkscopeError(f"{path}: line {line} has {'more' if None in row else 'fewer'} fields than the "
                                 "header; the file is damaged (a quoted field with a line break counts its lines)")
        for col, value in row.items():
            if value != "" and (col in NUMERIC_COLUMNS or col.startswith(NUMERIC_PREFIXES)):
                try:
                    float(value)
                except ValueError:
                    raise SinkscopeError(f"{path}: line {line}, column {col!r}: {value!r} is not a number") from None
        if row["mode"] not in MODES:
            raise SinkscopeError(f"{path}: line {line}, column 'mode': {row['mode']!r} is not one of {list(MODES)}")
    return rows


def append_row(path: str | Path, row: dict, columns: Sequence[str]) -> None:
    """Append one row: the whole file is rewritten to a temporary file and renamed into place, so a kill leaves
    either the old table or the new one, never a partial row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # read, add, rename under a lock: two sweeps with --point writing one table at once each read the table before
    # the other's row, and the second rename dropped the first row (a `.NAME.lock` file beside it, git-ignored)
    with FileLock(str(path.with_name(f".{path.name}.lock"))):
        rows = read_rows(path, columns)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows([*rows, row])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


MODES = ("asr", "vsr", "avsr")
LAMBDA_COLORS = {0.0: "#7f7f7f", 1e4: "#d62728", 1e2: "#ff9896", 1e5: "#8c0000"}
SEED_SYMBOLS = ["circle", "diamond", "square", "triangle-up"]


def _frame(rows: Sequence[dict] | pd.DataFrame) -> pd.DataFrame:
    df = pd.DataFrame(rows).copy()
    for col in df.columns:
        if col.startswith(("wer_", "cer_", "sinks_per_utt_", "cos_")) or col in ("decorrelation", "seed", "epochs"):
            df[col] = pd.to_numeric(df[col], errors="coerce")
    df["rate"] = [_rate(r) for r in df.itertuples()]
    df["order"] = [(pd.to_numeric(r.k_audio, errors="coerce") if r.mode != "vsr" else 0,
                    pd.to_numeric(r.k_video, errors="coerce") if r.mode != "asr" else 0) for r in df.itertuples()]
    return df


def main_epochs(df: pd.DataFrame) -> float | None:
    """The sweep's usual number of epochs (the most common): rows with another budget (a learning-curve pair) are
    drawn apart, never averaged into its lines or bars."""
    if "epochs" not in df or df["epochs"].isna().all():
        return None
    return float(df["epochs"].mode().iloc[0])


def _split_epochs(df: pd.DataFrame, usual: float | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows of the usual budget, the other rows); `usual` defaults to `main_epochs(df)`."""
    usual = main_epochs(df) if usual is None else usual
    if usual is None:
        return df, df.iloc[0:0]
    same = df["epochs"] == usual
    return df[same], df[~same]


def _rate(r) -> str:
    if r.mode == "asr":
        return f"K_a={int(float(r.k_audio))}"
    if r.mode == "vsr":
        return f"K_v={int(float(r.k_video))}"
    return f"K_a={int(float(r.k_audio))}, K_v={int(float(r.k_video))}"


def _lam(lam: float) -> str:
    return "off (λ=0)" if lam == 0 else f"λ={lam:g}"


def decorrelation_wer_figure(rows: Sequence[dict] | pd.DataFrame) -> go.Figure:
    """WER against compression rate with the decorrelation loss off and on: one panel per mode, clean (top)
    and babble 0 dB (bottom, where the sweep scored it), a line through the mean over seeds and a marker per
    seed (the marker's shape is the seed). Rows trained for another number of epochs than the sweep's usual one
    are open markers labelled with their epochs, outside the means."""
    df = _frame(rows)
    usual = main_epochs(df)
    tags = [t for t in ("clean", "snr0") if f"wer_{t}" in df and df[f"wer_{t}"].notna().any()]
    modes = [m for m in MODES if (df["mode"] == m).any()]
    fig = make_subplots(rows=len(tags), cols=len(modes), shared_yaxes=False, vertical_spacing=0.16,
                        subplot_titles=[f"{m.upper()}, {'clean' if t == 'clean' else 'babble 0 dB'}"
                                        for t in tags for m in modes])
    shown = set()
    for r_i, tag in enumerate(tags, start=1):
        for c_i, mode in enumerate(modes, start=1):
            scored = df[(df["mode"] == mode) & df[f"wer_{tag}"].notna()]
            if scored.empty:
                # in paper coordinates: plotly.js does not draw the axes of a subplot without traces
                k = (r_i - 1) * len(modes) + c_i
                suffix = str(k) if k > 1 else ""
                xd, yd = fig.layout[f"xaxis{suffix}"].domain, fig.layout[f"yaxis{suffix}"].domain
                fig.add_annotation(text="not scored (no audio to add babble to)" if mode == "vsr" else "not scored",
                                   showarrow=False, font={"color": "#7f7f7f"}, xref="paper", yref="paper",
                                   x=sum(xd) / 2, y=sum(yd) / 2)
                continue
            sub, other = _split_epochs(scored, usual)  # the budget of the whole table, not of this panel
            order = [x for _, x in sorted({(o, r) for o, r in zip(scored["order"], scored["rate"], strict=True)})]
            for lam, group in sub.groupby("decorrelation"):
                name = _lam(lam)
                color = LAMBDA_COLORS.get(lam, "#1f77b4")
                mean = group.groupby("rate")[f"wer_{tag}"].mean().reindex(order).dropna()
                fig.add_trace(go.Scatter(x=mean.index, y=mean.values, mode="lines", name=name, legendgroup=name,
                                         showlegend=name not in shown, line={"color": color}, hoverinfo="skip"),
                              row=r_i, col=c_i)
                shown.add(name)
                for seed, points in group.groupby("seed"):
                    fig.add_trace(go.Scatter(
                        x=points["rate"], y=points[f"wer_{tag}"], mode="markers", name=f"{name}, seed {int(seed)}",
                        legendgroup=name, showlegend=False,
                        marker={"color": color, "size": 9, "symbol": SEED_SYMBOLS[int(seed) % len(SEED_SYMBOLS)]},
                        hovertemplate="%{x}<br>WER %{y:.1%}<extra>" + html.escape(f"{name}, seed {int(seed)}")
                                      + "</extra>"), row=r_i, col=c_i)
            for (lam, epochs), group in other.groupby(["decorrelation", "epochs"]):
                name = f"{_lam(lam)}, {epochs:g} epochs"
                fig.add_trace(go.Scatter(
                    x=group["rate"], y=group[f"wer_{tag}"], mode="markers", name=name, legendgroup=name,
                    showlegend=name not in shown,
                    marker={"color": LAMBDA_COLORS.get(lam, "#1f77b4"), "size": 11, "symbol": "star-open",
                            "line": {"width": 2}},
                    hovertemplate="%{x}<br>WER %{y:.1%}<extra>" + html.escape(name) + "</extra>"), row=r_i, col=c_i)
                shown.add(name)
            fig.update_xaxes(categoryorder="array", categoryarray=order, title_text="compression rate",
                             row=r_i, col=c_i)
            fig.update_yaxes(tickformat=".0%", title_text="WER" if c_i == 1 else None, rangemode="tozero",
                             row=r_i, col=c_i)
    seeds = sorted({int(x) for x in df["seed"].dropna()})
    for seed in seeds if len(seeds) > 1 else []:  # what the marker shapes mean, in the legend
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"seed {seed}", legendgroup="seeds",
                                 marker={"color": "#333333", "size": 9,
                                         "symbol": SEED_SYMBOLS[seed % len(SEED_SYMBOLS)]}), row=1, col=1)
    budget = f"{usual:g} epochs; " if usual is not None else ""
    fig.update_layout(title="WER across compression rates with the decorrelation loss off and on "
                            f"({budget}line: mean over seeds; marker shape: seed)", height=380 * len(tags) + 80,
                      legend={"title": "decorrelation"})
    return fig


def decorrelation_sinks_figure(rows: Sequence[dict] | pd.DataFrame) -> go.Figure:
    """Per point, off vs on: intermediate sinks per utterance (non-BOS input tokens that are sinks in at least
    half of the layers) and mean cos-to-BOS of the non-BOS input tokens at the last layer."""
    df, _ = _split_epochs(_frame(rows))
    groups = [c.removeprefix("sinks_per_utt_") for c in df.columns if c.startswith("sinks_per_utt_")]
    df["sinks"] = df[[f"sinks_per_utt_{g}" for g in groups]].sum(axis=1, min_count=1)
    df["cos_last"] = df[[f"cos_last_{g}" for g in groups]].mean(axis=1)
    df["label"] = df["mode"].str.upper() + " " + df["rate"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["intermediate sinks per utterance",
                                                        "mean cos-to-BOS of non-BOS input tokens, last layer"])
    order = [lab for *_, lab in sorted({(MODES.index(m), o, lab) for m, o, lab in
                                        zip(df["mode"], df["order"], df["label"], strict=True)})]
    for lam, group in df.groupby("decorrelation"):
        mean = group.groupby("label")[["sinks", "cos_last"]].mean().reindex(order)
        for col, field in ((1, "sinks"), (2, "cos_last")):
            fig.add_trace(go.Bar(x=mean.index, y=mean[field], name=_lam(lam), legendgroup=_lam(lam),
                                 showlegend=col == 1, marker_color=LAMBDA_COLORS.get(lam, "#1f77b4"),
                                 hovertemplate="%{x}<br>%{y:.3f}<extra>" + html.escape(_lam(lam)) + "</extra>"),
                          row=1, col=col)
    budget = f"; {main_epochs(df):g}-epoch points" if main_epochs(df) is not None else ""
    fig.update_layout(barmode="group", height=440, title="What the decorrelation loss changes inside "
                      f"(traces of the same held-out utterances; mean over seeds{budget})",
                      legend={"title": "decorrelation"})
    fig.update_yaxes(title_text="sinks / utterance", row=1, col=1)
    fig.update_yaxes(title_text="cos to BOS", range=[-1, 1], row=1, col=2)
    return fig


def mome_comparison_figure(mome_rows: Sequence[dict] | pd.DataFrame, single_rows: Sequence[dict] | pd.DataFrame,
                           mode: str = "asr") -> go.Figure:
    """WER against compression rate for one Matryoshka (MoME) model against the single-rate models at the same
    rates (the λ = 0 rows of the decorrelation sweep): clean (left) and babble 0 dB (right, where scored); single-
    rate lines through the mean over seeds, a marker per seed. Rates with no single-rate row show MoME alone."""
    mome = _frame(mome_rows)
    mome = mome[mome["mode"] == mode]
    single = _frame(single_rows)
    single = single[(single["mode"] == mode) & (single["decorrelation"] == 0)]
    if "epochs" in single and "epochs" in mome and mome["epochs"].notna().any():
        single = single[single["epochs"].isin(set(mome["epochs"].dropna()))]  # the same training budget
    tags = [t for t in ("clean", "snr0") if f"wer_{t}" in mome and mome[f"wer_{t}"].notna().any()]
    order = [x for _, x in sorted({(o, r) for o, r in zip(pd.concat([mome["order"], single["order"]]),
                                                          pd.concat([mome["rate"], single["rate"]]), strict=True)})]
    order = [r for r in order if r in set(mome["rate"])]
    fig = make_subplots(rows=1, cols=len(tags), subplot_titles=[f"{mode.upper()}, "
                                                                + ("clean" if t == "clean" else "babble 0 dB")
                                                                for t in tags])
    for c_i, tag in enumerate(tags, start=1):
        for name, table, color in (("MoME (one model)", mome, "#9467bd"), ("single-rate models", single, "#7f7f7f")):
            table = table[table["rate"].isin(order) & table[f"wer_{tag}"].notna()]
            mean = table.groupby("rate")[f"wer_{tag}"].mean().reindex(order).dropna()
            fig.add_trace(go.Scatter(x=mean.index, y=mean.values, mode="lines+markers", name=name, legendgroup=name,
                                     showlegend=c_i == 1, line={"color": color}, marker={"size": 9},
                                     hovertemplate="%{x}<br>WER %{y:.1%}<extra>" + html.escape(name) + "</extra>"),
                          row=1, col=c_i)
        fig.update_xaxes(categoryorder="array", categoryarray=order, title_text="compression rate", row=1, col=c_i)
        fig.update_yaxes(tickformat=".0%", title_text="WER" if c_i == 1 else None, rangemode="tozero", row=1,
                         col=c_i)
    fig.update_layout(title="One MoME model across rates vs one model per rate (same encoders, epochs, test set)",
                      height=420)
    return fig


def write_figure(fig: go.Figure, stem: str | Path) -> tuple[list[Path], str | None]:
    """`stem.html` (plotly.js from the CDN), and `stem.png` when kaleido can render it (it needs Chromium).
    Returns the files written and, when the PNG could not be made, why."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = [stem.with_suffix(".html")]
    fig.write_html(written[0], include_plotlyjs="cdn")
    try:
        fig.write_image(stem.with_suffix(".png"), width=1200, height=int(fig.layout.height or 500), scale=1)
    except Exception as exc:  # no kaleido, or no browser for it: the HTML is the figure
        return written, f"{stem.with_suffix('.png')} not written ({type(exc).__name__}: {str(exc)[:200]})"
    return [*written, stem.with_suffix(".png")], None
