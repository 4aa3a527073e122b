"""Speech from espeak-ng (the `espeakng-loader` wheel) through ctypes, with word and phoneme timings taken
from espeak's own synthesis events (`audio_position`), resampled to 16 kHz mono."""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, field

import numpy as np
from scipy.signal import resample_poly

from sinkscope.data.media import SAMPLE_RATE

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS, _INIT_DONT_EXIT = 0x0001, 0x8000
_EVENT_END_LIST, _EVENT_WORD, _EVENT_PHONEME, _EVENT_END = 0, 1, 7, 5
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4
_POS_CHARACTER, _CHARS_UTF8 = 1, 1


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass(frozen=True)
class Voice:
    """An espeak voice setting: voice name with variant, words per minute, pitch (0-99), pitch range."""

    name: str
    rate: int
    pitch: int
    range: int


@dataclass
class Speech:
    """Synthesised speech: 16 kHz float32 audio and the timings of words and phonemes (seconds)."""

    audio: np.ndarray
    words: list[tuple[str, float, float]] = field(default_factory=list)
    phonemes: list[tuple[str, float, float]] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE


class Espeak:
    """One espeak-ng engine per process (espeak keeps global state; use processes, not threads, to scale)."""

    _instance: Espeak | None = None
    _lock = threading.Lock()

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise RuntimeError("espeakng-loader is not installed: pip install espeakng-loader") from exc
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                               espeakng_loader.get_data_path().encode(),
                                               _INIT_PHONEME_EVENTS | _INIT_DONT_EXIT)
        if self.rate <= 0:
            raise RuntimeError(f"espeak-ng failed to initialise (returned {self.rate})")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, int, str]] = []
        self._callback = _CALLBACK(self._collect)  # keep a reference: ctypes must not free it
        self.lib.espeak_SetSynthCallback(self._callback)

    @classmethod
    def get(cls) -> Espeak:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _collect(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
        i = 0
        while events[i].type != _EVENT_END_LIST:
            e = events[i]
            name = bytes(e.id).split(b"\0")[0].decode("utf-8", "replace") if e.type == _EVENT_PHONEME else ""
            self._events.append((e.type, e.sample, e.text_position, e.length, name))
            i += 1
        return 0

    def synth(self, text: str, voice: Voice, rand_seed: int = 0, names: list[str] | None = None) -> Speech:
        """Speak `text` with `voice`. Word timings name the words of `text` (split on spaces), or the entries
        of `names` at the same positions. `rand_seed` seeds espeak's breath noise (random otherwise)."""
        with self._lock:
            self.lib.espeak_ng_SetRandSeed(int(rand_seed))
            if self.lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice '{voice.name}'")
            self.lib.espeak_SetParameter(_PARAM_RATE, voice.rate, 0)
            self.lib.espeak_SetParameter(_PARAM_PITCH, voice.pitch, 0)
            self.lib.espeak_SetParameter(_PARAM_RANGE, voice.range, 0)
            self._chunks, self._events = [], []
            data = text.encode("utf-8")
            self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            self.lib.espeak_Synchronize()
            raw = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int16)
            events = list(self._events)
        audio = resample_poly(raw.astype(np.float32) / 32768.0, SAMPLE_RATE, self.rate).astype(np.float32)
        return Speech(audio=audio, **_timings(events, text, len(raw), self.rate, names))


def _timings(events, text: str, n_samples: int, rate: int, names: list[str] | None = None) -> dict:
    """Word and phoneme spans (seconds) from espeak events; each ends where the next begins. A word event is
    tied to its word through its character position in `text`."""
    words_in_text = text.split()
    labels = names if names is not None and len(names) == len(words_in_text) else words_in_text
    starts = np.cumsum([0] + [len(w) + 1 for w in words_in_text])  # 0-based char offset of each word
    word_marks = [(s, pos - 1) for t, s, pos, _, _ in events if t == _EVENT_WORD]  # text_position is 1-based
    phones = [(s, name) for t, s, _, _, name in events if t == _EVENT_PHONEME]
    end_sample = max([s for t, s, *_ in events if t == _EVENT_END] + [n_samples])
    phonemes = []
    for k, (s, name) in enumerate(phones):
        e = phones[k + 1][0] if k + 1 < len(phones) else end_sample
        if e > s:
            phonemes.append((name, s / rate, e / rate))
    speech_end = max((e for n, _, e in phonemes if not n.startswith("_")), default=end_sample / rate)
    words = []
    for k, (s, offset) in enumerate(word_marks):
        idx = int(np.searchsorted(starts, offset, side="right") - 1)
        word = labels[idx] if 0 <= idx < len(labels) else ""
        e = word_marks[k + 1][0] / rate if k + 1 < len(word_marks) else speech_end
        words.append((word, s / rate, max(s / rate, e)))
    return {"words": words, "phonemes": phonemes}
