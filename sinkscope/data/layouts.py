"""Corpus layouts: listing the utterances of a synthetic corpus (`manifest.jsonl`) or of an LRS2/LRS3 tree in the
Auto-AVSR layout, and reading transcripts. See `sinkscope.data.dataset` for the layouts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from sinkscope.data.media import DataError
from sinkscope.validation import check_record, clean_text, decode_utf8, parse_json

MAX_MANIFEST_BYTES = 1 << 30
Name = Annotated[str, StringConstraints(min_length=1, max_length=512)]


class ManifestRow(BaseModel):
    """One line of a synthetic corpus's `manifest.jsonl` (strict types: a number is not an id)."""

    model_config = ConfigDict(strict=True, extra="allow")
    id: Name
    split: Name
    speaker: str = ""
    video: Name
    audio: Name
    transcript: str
    duration: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    n_frames: int | None = Field(default=None, ge=1, le=10**7)

    @field_validator("video", "audio")
    @classmethod
    def _inside(cls, value: str) -> str:
        path = PurePosixPath(value)
        if path.is_absolute() or ".." in path.parts or "\x00" in value:
            raise ValueError("must be a path relative to the corpus directory, without '..'")
        return value


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
    n_frames: int = 0  # video frames, when the corpus lists them (0: unknown)
    duration: float | None = None  # seconds, when the corpus lists it


def read_manifest_rows(root: Path) -> list[tuple[str, ManifestRow]]:
    """Every row of `root/manifest.jsonl`, validated, with its `file:line`; duplicate ids are refused."""
    manifest = root / "manifest.jsonl"
    if not manifest.is_file():
        raise DataError(f"{manifest} is missing")
    if manifest.stat().st_size > MAX_MANIFEST_BYTES:
        raise DataError(f"{manifest}: larger than {MAX_MANIFEST_BYTES} bytes; not a sinkscope manifest")
    text = decode_utf8(manifest.read_bytes(), str(manifest), DataError)
    rows, seen = [], {}
    for k, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest}:{k}"
        data = parse_json(line, where, DataError)
        if not isinstance(data, dict):
            raise DataError(f"{where}: a manifest line must be a JSON object, not {type(data).__name__}")
        row = check_record(ManifestRow, data, where, DataError)
        if row.id in seen:
            raise DataError(f"{where}: field 'id' is {row.id!r}, already used at line {seen[row.id]}; ids must be "
                            "unique (a duplicate would be scored twice)")
        seen[row.id] = k
        rows.append((where, row))
    return rows


def list_synth(root: Path, split: str | None) -> list[Item]:
    return [Item(id=row.id, split=row.split, speaker=row.speaker, video=root / row.video, audio=root / row.audio,
                 transcript=row.transcript, source=where, n_frames=row.n_frames or 0, duration=row.duration)
            for where, row in read_manifest_rows(root) if split is None or row.split == split]


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
        if path.stat().st_size > 1 << 20:
            raise DataError(f"{path}: {path.stat().st_size} bytes; a transcript file is at most 1 MiB")
        decoded = decode_utf8(path.read_bytes(), f"{path}: transcript", DataError)
        first = decoded.strip().splitlines()[0] if decoded.strip() else ""
        text = re.sub(r"^Text:\s*", "", first)
        where = str(path)
    return clean_text(text, where, DataError)
