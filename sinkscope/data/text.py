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
