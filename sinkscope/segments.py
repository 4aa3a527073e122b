"""Segment names of a sample (ARCHITECTURE.md, "Token layout") and the one colour each is drawn in.

    [BOS] <audio> A_1..A_n </audio> <video> V_1..V_m </video> [prompt tokens] [transcript tokens] [EOS]

A plain text prompt uses `bos` and `text`.
"""

from __future__ import annotations

SEGMENTS = ("bos", "audio_start", "audio", "audio_end", "video_start", "video", "video_end", "prompt",
            "transcript", "eos", "text")
OUTPUT_SEGMENTS = frozenset({"bos", "transcript", "eos"})
"""Segments that are not model input context: the decorrelation loss leaves them out."""

SEGMENT_COLORS = dict(zip(SEGMENTS, (
    "#d62728",  # bos
    "#6a51a3", "#1f77b4", "#bcbddc",  # audio_start, audio, audio_end
    "#8c564b", "#2ca02c", "#d9b38c",  # video_start, video, video_end
    "#ff7f0e", "#e377c2", "#525252",  # prompt, transcript, eos
    "#17becf",  # text
), strict=True))
OTHER_COLOR = "#bcbd22"


def segment_color(name: str) -> str:
    """The colour of a segment (one for names outside SEGMENTS)."""
    return SEGMENT_COLORS.get(name, OTHER_COLOR)
