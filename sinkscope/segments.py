"""Segment names of a sample (ARCHITECTURE.md, "Token layout") and the one colour each is drawn in.

    [BOS] <audio> A_1..A_n </audio> <video> V_1..V_m </video> [prompt tokens] [transcript tokens] [EOS]

A plain text prompt uses `bos` and `text`.
"""

from __future__ import annotations

SEGMENTS = ("bos", "audio_start", "audio", "audio_end", "video_start", "video", "video_end", "prompt",
            "transcript", "eos", "text")
OUTPUT_SEGMENTS = frozenset({"bos", "transcript", "eos"})
"""Segments that are not model input context: the decorrelation loss leaves them out."""

SEGMENT_COLORS = {
    "bos": "#d62728",
    "audio_start": "#6a51a3", "audio": "#1f77b4", "audio_end": "#bcbddc",
    "video_start": "#8c564b", "video": "#2ca02c", "video_end": "#d9b38c",
    "prompt": "#ff7f0e", "transcript": "#e377c2", "eos": "#525252", "text": "#17becf",
}
OTHER_COLOR = "#bcbd22"


def segment_color(name: str) -> str:
    """The colour of a segment (one for names outside SEGMENTS)."""
    return SEGMENT_COLORS.get(name, OTHER_COLOR)
