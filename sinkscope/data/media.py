"""Media constants and readers: one definition of the sample rate, frame rate and mouth-ROI size, WAV and video
reading with errors that name the file, and noise mixing at a set SNR."""

from __future__ import annotations

import functools
import math
import wave
from pathlib import Path

import numpy as np

from sinkscope.errors import SinkscopeError

SAMPLE_RATE = 16000
"""Audio samples per second (Whisper's rate)."""
FPS = 25
"""Video frames per second (LRS2/LRS3, AV-HuBERT)."""
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
MEL_HOP = 160
"""Log-mel hop in samples: 100 feature frames per second (the Whisper encoder halves it to 50 Hz)."""
ROI = 88
"""Side of the square grayscale mouth region of interest, in pixels."""
VIDEO_MEAN, VIDEO_STD = 0.421, 0.165
"""Normalisation of ROI pixels in [0, 1] (the AV-HuBERT / Auto-AVSR values)."""


MIN_RATE, MAX_RATE = 8000, 192000
"""Sample rates a WAV may declare (it is resampled to SAMPLE_RATE); anything else is a corrupt header."""


class DataError(SinkscopeError):
    """A corpus file or manifest row is unusable; the message names the file and the field."""


def read_wav(path: Path, allow_resample: bool = True) -> np.ndarray:
    """Mono float32 audio at 16 kHz."""
    if not path.is_file():
        raise DataError(f"{path}: audio file is missing")
    try:
        with wave.open(str(path), "rb") as w:
            rate, channels, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            if not MIN_RATE <= rate <= MAX_RATE:  # checked before reading: resampling 1 Hz audio takes gigabytes
                raise DataError(f"{path}: header field 'sample rate' is {rate} Hz; expected {MIN_RATE}-{MAX_RATE} Hz "
                                f"(speech at {SAMPLE_RATE} Hz)")
            if not 1 <= channels <= 8:
                raise DataError(f"{path}: header field 'channels' is {channels}; expected 1-8")
            raw = w.readframes(n)
    except DataError:
        raise
    except (wave.Error, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable WAV file ({exc})") from exc
    if width != 2:
        raise DataError(f"{path}: {8 * width}-bit samples; expected 16-bit PCM")
    if len(raw) < n * channels * width:
        raise DataError(f"{path}: truncated WAV ({len(raw)} of {n * channels * width} data bytes)")
    audio = np.frombuffer(raw, "<i2").astype(np.float32).reshape(-1, channels).mean(axis=1) / 32768.0
    if rate != SAMPLE_RATE:
        if not allow_resample:
            raise DataError(f"{path}: sample rate {rate} Hz, expected {SAMPLE_RATE} (allow_resample=True fixes it)")
        from scipy.signal import resample_poly

        g = math.gcd(rate, SAMPLE_RATE)
        audio = resample_poly(audio, SAMPLE_RATE // g, rate // g).astype(np.float32)
    return audio


VIDEO_CACHE_ITEMS = 4096
"""Decoded videos kept in memory per process (about 0.5 MB each for a 2.5 s utterance): training decodes every
utterance once instead of once per epoch, and a sweep once for all its points."""


def read_video(path: Path) -> np.ndarray:
    """uint8 grayscale frames `[T, 88, 88]` (larger crops are centre-cropped), read-only. Decoded once per file
    version (path, size, modification time) and then served from memory."""
    if not path.is_file():
        raise DataError(f"{path}: video file is missing")
    stat = path.stat()
    return _decode_video(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=VIDEO_CACHE_ITEMS)
def _decode_video(name: str, size: int, mtime_ns: int) -> np.ndarray:
    import av

    path = Path(name)
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="gray") for f in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError, IndexError, OSError) as exc:
        raise DataError(f"{path}: corrupt or truncated video ({exc})") from exc
    if not frames:
        raise DataError(f"{path}: the video has no frames (corrupt or truncated)")
    video = np.stack(frames)
    h, w = video.shape[1:]
    if h < ROI or w < ROI:
        raise DataError(f"{path}: frames are {w}x{h}; a mouth ROI needs at least {ROI}x{ROI}")
    top, left = (h - ROI) // 2, (w - ROI) // 2
    video = np.ascontiguousarray(video[:, top:top + ROI, left:left + ROI])
    video.setflags(write=False)
    return video


SNR_DB_RANGE = (-50.0, 100.0)
"""The signal-to-noise ratios (dB) that noise can be mixed at: at -50 dB the speech is 1/100,000 of the power, at
100 dB the noise is 1e-10 of it (clean: no SNR at all); beyond, 10^(SNR/10) overflows or says nothing more."""


def check_snr(snr_db, what: str = "snr") -> float:
    """`snr_db` as a float after checking that it is a finite number of dB within `SNR_DB_RANGE`."""
    low, high = SNR_DB_RANGE
    if isinstance(snr_db, bool) or not isinstance(snr_db, int | float) or not math.isfinite(snr_db) \
            or not low <= snr_db <= high:
        raise ValueError(f"{what} must be a number of dB in [{low:g}, {high:g}], not {snr_db!r}")
    return float(snr_db)


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """`speech + g * noise` with g chosen so that 10 log10(P_speech / P_noise) = snr_db."""
    noise = np.resize(noise, speech.shape)
    p_s, p_n = float(np.mean(speech**2)), float(np.mean(noise**2))
    if p_n == 0.0 or p_s == 0.0:
        return speech.copy()
    gain = math.sqrt(p_s / (p_n * 10 ** (check_snr(snr_db) / 10)))
    return (speech + gain * noise).astype(np.float32)
