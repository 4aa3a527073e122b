"""Corpus layouts: listing the utterances of a synthetic corpus (`manifest.jsonl`) or of an LRS2/LRS3 tree in the
Auto-AVSR layout, and reading transcripts. See `sinkscope.data.dataset` for the layouts."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sinkscope.data.media import DataError


@dataclass(frozen=True)
class Item:
    """One utterance as listed by a corpus (paths only; media are read on access)."""

    id: str
    split: str
    speaker: str
    video: Path
    audio: Path
    transcript: str | None = None  # None: read from `text`
    text: Path | None = None
    source: str = ""  # where the row came from (manifest line), for error messages


def list_synth(root: Path, split: str | None) -> list[Item]:
    manifest = root / "manifest.jsonl"
    items = []
    for k, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest}:{k}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc})") from exc
        for key in ("id", "split", "video", "audio", "transcript"):
            if key not in row:
                raise DataError(f"{where}: field '{key}' is missing")
        if split is not None and row["split"] != split:
            continue
        items.append(Item(id=str(row["id"]), split=row["split"], speaker=str(row.get("speaker", "")),
                          video=root / row["video"], audio=root / row["audio"], transcript=row["transcript"],
                          source=where))
    return items


def list_lrs(root: Path, split: str | None) -> list[Item]:
    video_roots = sorted(p for p in root.glob("*_video_seg*s") if p.is_dir()) or [root]
    items = []
    for vroot in video_roots:
        troot = root / vroot.name.replace("_video_", "_text_") if vroot != root else root
        pattern = f"{split}/*/*.mp4" if split else "*/*/*.mp4"
        for video in sorted(vroot.glob(pattern)):
            rel = video.relative_to(vroot)
            text = (troot / rel).with_suffix(".txt")
            if not text.exists():
                text = video.with_suffix(".txt")
            items.append(Item(id=str(rel.with_suffix("")), split=rel.parts[0], speaker=rel.parts[1], video=video,
                              audio=video.with_suffix(".wav"), text=text, source=str(video)))
    return items


def detect_layout(root: Path) -> str:
    if (root / "manifest.jsonl").is_file():
        return "synth"
    if any(root.glob("*_video_seg*s")) or any(root.glob("*/*/*.mp4")):
        return "lrs"
    raise DataError(f"{root} holds neither a manifest.jsonl (synthetic corpus) nor an LRS-style tree of "
                    "<split>/<speaker>/<utt>.mp4 files")


def read_transcript(item: Item) -> str:
    if item.transcript is not None:
        text = item.transcript
        where = f"{item.source}: field 'transcript'"
    else:
        path = item.text
        if path is None or not path.is_file():
            raise DataError(f"{path}: transcript file is missing (for video {item.video})")
        raw = path.read_bytes()
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: transcript is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
        first = decoded.strip().splitlines()[0] if decoded.strip() else ""
        text = re.sub(r"^Text:\s*", "", first)
        where = str(path)
    text = " ".join(text.lower().split())
    if not text:
        raise DataError(f"{where}: transcript is empty")
    return text
