"""Transcripts: the GRID grammar (Cooke et al., 2006) and a parser that checks it."""

from __future__ import annotations

import numpy as np

GRID = {
    "command": ["bin", "lay", "place", "set"],
    "color": ["blue", "green", "red", "white"],
    "preposition": ["at", "by", "in", "with"],
    "letter": list("abcdefghijklmnopqrstuvxyz"),  # GRID has no "w"
    "digit": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "adverb": ["again", "now", "please", "soon"],
}
GRID_ORDER = ["command", "color", "preposition", "letter", "digit", "adverb"]
GRID_VOCAB = sorted({w for words in GRID.values() for w in words})  # 51 words


def grid_sentence(rng: np.random.Generator) -> str:
    """One GRID sentence, e.g. "bin blue at f two now"."""
    return " ".join(GRID[slot][int(rng.integers(len(GRID[slot])))] for slot in GRID_ORDER)


def parse_grid(text: str) -> dict[str, str] | None:
    """The slots of a GRID sentence, or None when `text` does not follow the grammar."""
    words = text.strip().lower().split()
    if len(words) != len(GRID_ORDER):
        return None
    slots = {}
    for slot, word in zip(GRID_ORDER, words, strict=True):
        if word not in GRID[slot]:
            return None
        slots[slot] = word
    return slots


def spoken_form(text: str) -> str:
    """What espeak is given: GRID letters are spelled as letters ("f" -> "F." would add a pause; a capital
    single letter is read as its name)."""
    return " ".join(w.upper() if len(w) == 1 else w for w in text.split())


def _open_vocabulary(size: int = 3000) -> tuple[list[str], list[str], np.ndarray]:
    """Function words (the 60 most frequent) and content words (the next ones, alphabetic) of English, from
    wordfreq's frequency list, with sampling weights proportional to sqrt(frequency)."""
    from wordfreq import top_n_list, word_frequency

    words = [w for w in top_n_list("en", size + 500) if w.isalpha() and (len(w) > 1 or w in ("a", "i"))][:size]
    function, content = words[:60], words[60:]
    weights = np.sqrt(np.array([word_frequency(w, "en") for w in content]))
    return function, content, weights / weights.sum()


_OPEN_CACHE: dict[str, tuple] = {}


def open_sentence(rng: np.random.Generator) -> str:
    """A 4-12 word sentence over ~3,000 common English words: a template that alternates function words and
    frequency-weighted content words (grammatical only by chance, like a word-level language model's samples)."""
    if "vocab" not in _OPEN_CACHE:
        _OPEN_CACHE["vocab"] = _open_vocabulary()
    function, content, weights = _OPEN_CACHE["vocab"]
    n = int(rng.integers(4, 13))
    template = ["F" if rng.random() < 0.35 else "C" for _ in range(n)]
    template[-1] = "C"
    return " ".join(function[int(rng.integers(len(function)))] if slot == "F"
                    else content[int(rng.choice(len(content), p=weights))] for slot in template)
