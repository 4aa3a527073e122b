"""The synthetic audio-visual speech corpus (`sinkscope data synth`): offline, reproducible, resumable.

Layout (LRS3-like), for utterance index i spoken by speaker s in split p:

    OUT/synth_config.json                 the generation arguments (a resumed run must match them)
    OUT/manifest.jsonl                    id, split, speaker, duration, n_frames, transcript, paths
    OUT/p/s/i.mp4                         25 fps 88x88 grayscale mouth ROI, h264
    OUT/p/s/i.wav                         16 kHz mono 16-bit PCM
    OUT/p/s/i.txt                         the transcript
    OUT/p/s/i.json                        word and phoneme alignment (seconds); written last

Every random choice of utterance i comes from `numpy.random.default_rng([seed, i])`. espeak-ng keeps hidden
state from one utterance to the next (its output changes by a few samples with what was spoken before, even
across espeak_Terminate), so utterances are split into SHARDS fixed shards (i mod SHARDS), and each shard is
spoken in order by a fresh process. A resumed shard speaks its finished utterances again (3 ms each) without
writing them, so the files depend neither on the number of workers nor on interruptions. Each file is written
under a temporary name and renamed; the alignment JSON is the completion marker.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import wave
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from queue import Empty

import numpy as np

from sinkscope import __version__
from sinkscope.config import lock_output, make_writable_dir, releases_locks
from sinkscope.data.media import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from sinkscope.data.text import grid_sentence, open_sentence, spoken_form
from sinkscope.data.tts import Espeak, Voice
from sinkscope.data.video import Appearance, mouth_tracks, render_frames
from sinkscope.errors import SinkscopeError

SPEAKERS: list[Voice] = [
    Voice("en-us+m1", 150, 40, 40), Voice("en-us+m3", 170, 55, 50), Voice("en-us+f2", 155, 65, 60),
    Voice("en-us+f4", 175, 70, 45), Voice("en+m2", 160, 35, 30), Voice("en+f3", 145, 60, 55),
    Voice("en-us+m5", 185, 45, 60), Voice("en-us+f1", 165, 75, 40),
    # held out: the test split's speakers never appear in training
    Voice("en+m4", 158, 50, 45), Voice("en-us+f5", 168, 62, 52),
]
TEST_SPEAKERS = {8, 9}
SHARDS = 16
MAX_UTTERANCES = 1_000_000


@dataclass(frozen=True)
class SynthConfig:
    n: int
    seed: int = 0
    vocab: str = "grid"

    def check(self) -> None:
        if self.n < 1:
            raise SinkscopeError(f"--n must be at least 1, not {self.n}")
        if self.n > MAX_UTTERANCES:
            raise SinkscopeError(f"--n {self.n:,} is more than the {MAX_UTTERANCES:,} utterances one corpus holds (its "
                                 "plan, one entry an utterance, is made in memory before the first is spoken; at a few "
                                 "utterances a second a million already takes days): make several corpora")
        if self.seed < 0:
            raise SinkscopeError(f"--seed must be a whole number >= 0, not {self.seed}")
        if self.vocab not in ("grid", "open"):
            raise SinkscopeError(f"--vocab must be grid or open, not {self.vocab!r}")


def speaker_name(index: int) -> str:
    return f"spk{index:02d}"


def utterance(index: int, cfg: SynthConfig, render: bool = True) -> dict:
    """Everything about utterance `index`: transcript, speaker, audio, frames, alignment (deterministic given
    what this process has spoken before; see the module docstring). `render=False` skips the video."""
    rng = np.random.default_rng([cfg.seed, index])
    text = grid_sentence(rng) if cfg.vocab == "grid" else open_sentence(rng)
    speaker = int(rng.integers(len(SPEAKERS)))
    speech = Espeak.get().synth(spoken_form(text), SPEAKERS[speaker], rand_seed=int(rng.integers(2**31)),
                                names=text.split())
    lead, trail = rng.uniform(0.15, 0.35), rng.uniform(0.15, 0.35)
    n_frames = int(np.ceil((lead + speech.duration + trail) * FPS))
    audio = np.zeros(n_frames * SAMPLES_PER_FRAME, dtype=np.float32)
    start = int(round(lead * SAMPLE_RATE))
    audio[start:start + len(speech.audio)] = speech.audio[: len(audio) - start]
    shift = start / SAMPLE_RATE
    words = [(w, s + shift, e + shift) for w, s, e in speech.words]
    phonemes = [(p, s + shift, e + shift) for p, s, e in speech.phonemes]
    frames = render_frames(mouth_tracks(phonemes, n_frames), Appearance.for_speaker(speaker), rng) \
        if render else None
    return {
        "index": index, "id": f"{index:06d}", "split": "test" if speaker in TEST_SPEAKERS else "train",
        "speaker": speaker_name(speaker), "transcript": text, "audio": audio, "frames": frames,
        "duration": n_frames / FPS, "n_frames": n_frames,
        "words": [[w, round(s, 4), round(e, 4)] for w, s, e in words],
        "phonemes": [[p, round(s, 4), round(e, 4)] for p, s, e in phonemes],
    }


def _paths(out: Path, rec: dict) -> dict[str, Path]:
    base = out / rec["split"] / rec["speaker"] / rec["id"]
    return {ext: base.with_suffix("." + ext) for ext in ("mp4", "wav", "txt", "json")}


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_mp4(path: Path, frames: np.ndarray) -> None:
    """Grayscale frames as h264 (yuv420p, single-threaded x264, so the bytes are reproducible)."""
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "12", "threads": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_wav(path: Path, audio: np.ndarray) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())


def write_utterance(out: Path, rec: dict) -> dict:
    """Write the files of one utterance atomically (alignment JSON last) and return its manifest row."""
    paths = _paths(out, rec)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    write_mp4(_tmp(paths["mp4"]), rec["frames"])
    os.replace(_tmp(paths["mp4"]), paths["mp4"])
    write_wav(_tmp(paths["wav"]), rec["audio"])
    os.replace(_tmp(paths["wav"]), paths["wav"])
    _tmp(paths["txt"]).write_text(rec["transcript"] + "\n", encoding="utf-8")
    os.replace(_tmp(paths["txt"]), paths["txt"])
    row = manifest_row(out, rec)
    meta = dict(row, words=rec["words"], phonemes=rec["phonemes"])
    _tmp(paths["json"]).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(_tmp(paths["json"]), paths["json"])
    return row


def manifest_row(out: Path, rec: dict) -> dict:
    paths = _paths(out, rec)
    return {"id": rec["id"], "split": rec["split"], "speaker": rec["speaker"], "duration": rec["duration"],
            "n_frames": rec["n_frames"], "transcript": rec["transcript"],
            "video": str(paths["mp4"].relative_to(out)), "audio": str(paths["wav"].relative_to(out))}


def _finished(out: Path, index: int) -> dict | None:
    """The manifest row of utterance `index` if all its files are complete."""
    for marker in out.glob(f"*/*/{index:06d}.json"):
        try:
            meta = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        base = marker.with_suffix("")
        if all(base.with_suffix(ext).is_file() for ext in (".mp4", ".wav", ".txt")):
            return {k: meta[k] for k in ("id", "split", "speaker", "duration", "n_frames", "transcript", "video",
                                         "audio")}
    return None


def _die_with(parent: int) -> None:
    """In a worker: die with the main process, so that a `kill -9` of `data synth` leaves no worker writing."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the main process died before prctl took effect
        os._exit(1)


def _shard(out: str, shard: int, cfg_dict: dict, todo: set[int], queue, parent: int) -> None:
    """Speak every utterance of one shard in order, in a fresh process (espeak's state must start clean); write
    the unfinished ones and send their manifest rows to the main process."""
    _die_with(parent)
    try:
        cfg = SynthConfig(**cfg_dict)
        for i in range(shard, cfg.n, SHARDS):
            if i in todo:
                queue.put(("row", write_utterance(Path(out), utterance(i, cfg))))
            else:
                utterance(i, cfg, render=False)  # replays espeak's hidden state
        queue.put(("done", shard))
    except BaseException as exc:
        queue.put(("error", f"shard {shard}: {type(exc).__name__}: {exc}"))
        raise


def _run_shards(jobs: list[tuple], workers: int, progress: Callable[[int], None] | None) -> list[dict]:
    """Run the shards in at most `workers` processes (each started by this thread, so that they die with it)."""
    context = get_context("fork")
    queue = context.Queue()
    pending, running, rows = list(jobs), {}, []
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                proc = context.Process(target=_shard, args=(*job, queue, os.getpid()), daemon=True)
                proc.start()
                running[job[1]] = proc
            try:
                kind, value = queue.get(timeout=1.0)
            except Empty:
                dead = {k: p.exitcode for k, p in running.items() if p.exitcode not in (None, 0)}
                if dead:
                    raise SinkscopeError(f"synth workers died with exit codes {dead}; rerun to resume") from None
                continue
            if kind == "row":
                rows.append(value)
                if progress is not None:
                    progress(1)
            elif kind == "done":
                running.pop(value).join()
            else:
                raise SinkscopeError(f"a synth worker failed ({value}); rerun to resume")
    finally:
        for proc in running.values():
            proc.kill()
            proc.join()
    return rows


@releases_locks
def synthesize(out: str | os.PathLike, cfg: SynthConfig, workers: int = 1,
               progress: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Generate (or resume) the corpus at `out`; return (utterances generated now, already there)."""
    cfg.check()
    out = Path(out)
    config_file = out / "synth_config.json"
    if out.exists() and not out.is_dir():
        raise SinkscopeError(f"--out {out} is a file, not a corpus directory; choose another --out")
    if out.is_dir() and not config_file.is_file() and any(out.iterdir()):
        found = ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise SinkscopeError(f"--out {out} is not empty ({found}, ...) and is not a corpus of `sinkscope data synth` "
                             "(no synth_config.json): nothing was written; choose an empty or new directory")
    make_writable_dir(out, f"--out {out}")
    lock_output(out, "data synth")
    wanted = {"sinkscope_version": __version__, **asdict(cfg)}
    if cfg.vocab == "open":
        from importlib.metadata import version

        wanted["wordfreq_version"] = version("wordfreq")
    if config_file.exists():
        try:
            previous = json.loads(config_file.read_text(encoding="utf-8"))
            had = int(previous.get("n", 0))
        except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as exc:
            raise SinkscopeError(f"{config_file}: not readable ({exc}); nothing was changed") from exc
        for key in ("seed", "vocab"):
            if previous.get(key) != wanted[key]:
                raise SinkscopeError(f"{config_file}: this corpus was generated with {key}={previous.get(key)!r}, "
                                     f"not {wanted[key]!r}; use another --out (nothing was changed)")
        if cfg.n < had:
            raise SinkscopeError(f"{out} holds a corpus of {had} utterances; --n {cfg.n} would shrink it. Pass "
                                 f"--n {had} or more to resume or extend it, or choose another --out "
                                 "(nothing was changed)")
    _tmp(config_file).write_text(json.dumps(wanted, indent=2), encoding="utf-8")
    os.replace(_tmp(config_file), config_file)
    for stale in out.glob("*/*/.*.tmp"):
        stale.unlink(missing_ok=True)
    rows: dict[int, dict] = {}
    todo = []
    for i in range(cfg.n):
        row = _finished(out, i)
        if row is None:
            todo.append(i)
        else:
            rows[i] = row
    if progress is not None and rows:
        progress(len(rows))
    todo_set = set(todo)
    jobs = [(str(out), k, asdict(cfg), {i for i in todo_set if i % SHARDS == k}) for k in range(SHARDS)]
    for row in _run_shards([job for job in jobs if job[3]], max(1, workers), progress):
        rows[int(row["id"])] = row
    lines = "".join(json.dumps(rows[i]) + "\n" for i in sorted(rows))
    _tmp(out / "manifest.jsonl").write_text(lines, encoding="utf-8")
    os.replace(_tmp(out / "manifest.jsonl"), out / "manifest.jsonl")
    return len(todo), cfg.n - len(todo)
