"""Mouth-ROI video rendered from a viseme timeline: 25 fps, 88 x 88 grayscale (the AV-HuBERT / Auto-AVSR input).

Each espeak phoneme maps to a viseme: a target of mouth opening, width, rounding, teeth and tongue visibility.
Targets are sampled at the frame times, smoothed (coarticulation) and drawn with vectorised numpy: skin with a
lighting gradient, lips as an elliptic ring, the dark mouth cavity, upper teeth and the tongue. Each speaker has
an appearance of its own (skin and lip tone, mouth size, lighting direction), and every utterance adds head
jitter, a brightness change and sensor noise. Lips move only while a phoneme is spoken; pauses close the mouth.
Visemes are many-to-one (p/b/m look alike), so lip reading is possible but ambiguous, as with real lips.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sinkscope.data.media import FPS
from sinkscope.data.media import ROI as SIZE

REST = (0.0, 0.55, 0.2, 0.0, 0.0)  # opening, width, rounding, teeth, tongue

# viseme targets: opening, width, rounding, teeth, tongue
VISEMES = {
    "closed": (0.0, 0.55, 0.25, 0.0, 0.0),  # p b m
    "labiodental": (0.12, 0.6, 0.1, 1.0, 0.0),  # f v
    "dental": (0.3, 0.6, 0.1, 0.8, 1.0),  # T D
    "alveolar": (0.25, 0.65, 0.1, 0.9, 0.4),  # t d n l s z r
    "postalveolar": (0.3, 0.5, 0.7, 0.8, 0.0),  # S Z tS dZ
    "velar": (0.4, 0.6, 0.2, 0.3, 0.3),  # k g N h j
    "w": (0.15, 0.35, 1.0, 0.0, 0.0),
    "open": (1.0, 0.7, 0.1, 0.5, 0.3),  # a A aI aU
    "mid": (0.6, 0.8, 0.1, 0.6, 0.2),  # E e eI @ 3 V
    "spread": (0.35, 1.0, 0.0, 0.9, 0.1),  # i I i:
    "round": (0.6, 0.45, 0.8, 0.2, 0.1),  # O o oU O: OI
    "tight_round": (0.3, 0.35, 1.0, 0.1, 0.0),  # u u: U
}


def viseme_of(phoneme: str) -> str | None:
    """The viseme class of an espeak phoneme mnemonic (stress marks ignored); None for pauses."""
    p = phoneme.strip("'ˈˌ,%=#").rstrip(":#")
    if not p or p.startswith("_"):
        return None
    first = p[0]
    if p in ("tS", "dZ") or first in "SZ":
        return "postalveolar"
    if first in "pbm":
        return "closed"
    if first in "fv":
        return "labiodental"
    if first in "TD":
        return "dental"
    if first in "tdnlszr":
        return "alveolar"
    if first in "kgNhj" or first == "x":
        return "velar"
    if first == "w":
        return "w"
    if first in "aA":
        return "open"
    if first in "iI":
        return "spread"
    if first in "uU":
        return "tight_round"
    if first in "oO":
        return "round"
    return "mid"  # e E @ 3 V and the rest


def mouth_tracks(phonemes: list[tuple[str, float, float]], n_frames: int) -> np.ndarray:
    """`[n_frames, 5]` mouth parameters sampled at frame centres, smoothed across neighbouring frames."""
    times = (np.arange(n_frames) + 0.5) / FPS
    targets = np.tile(np.array(REST, dtype=np.float32), (n_frames, 1))
    for name, start, end in phonemes:
        vis = viseme_of(name)
        if vis is None:
            continue
        sel = (times >= start) & (times < end)
        if not sel.any():  # a phoneme shorter than a frame still pulls the nearest frame
            k = min(n_frames - 1, int((start + end) / 2 * FPS))
            sel = np.zeros(n_frames, dtype=bool)
            sel[k] = True
            targets[sel] = 0.5 * targets[sel] + 0.5 * np.array(VISEMES[vis], dtype=np.float32)
            continue
        targets[sel] = VISEMES[vis]
    kernel = np.array([0.25, 0.5, 0.25], dtype=np.float32)
    padded = np.concatenate([targets[:1], targets, targets[-1:]])
    return sum(kernel[i] * padded[i:i + n_frames] for i in range(3)).astype(np.float32)


@dataclass(frozen=True)
class Appearance:
    """How one speaker looks."""

    skin: float  # base skin brightness 0..1
    lip: float  # lip brightness relative to skin (darker < 0)
    mouth_width: float  # half-width of the mouth at width=1, pixels
    mouth_height: float  # half-height of the fully open mouth, pixels
    light_angle: float  # direction of the lighting gradient, radians
    light_strength: float
    noise: float  # sensor noise std (0..1 scale)

    @classmethod
    def for_speaker(cls, index: int) -> Appearance:
        rng = np.random.default_rng(10_000 + index)
        return cls(skin=float(rng.uniform(0.45, 0.75)), lip=float(rng.uniform(-0.25, -0.12)),
                   mouth_width=float(rng.uniform(20, 27)), mouth_height=float(rng.uniform(13, 18)),
                   light_angle=float(rng.uniform(0, 2 * np.pi)), light_strength=float(rng.uniform(0.08, 0.2)),
                   noise=float(rng.uniform(0.01, 0.03)))


def render_frames(tracks: np.ndarray, look: Appearance, rng: np.random.Generator) -> np.ndarray:
    """`[n_frames, 88, 88]` uint8 frames for mouth tracks `[n_frames, 5]`."""
    n = len(tracks)
    opening, width, rounding, teeth, tongue = (tracks[:, i][:, None, None] for i in range(5))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    # head jitter: a slow random walk of the mouth centre, and a per-utterance brightness change
    jitter = np.cumsum(rng.normal(0, 0.35, size=(n, 2)), axis=0).astype(np.float32)
    jitter -= jitter.mean(axis=0)
    cx = SIZE / 2 + jitter[:, 0][:, None, None]
    cy = SIZE / 2 + 4 + jitter[:, 1][:, None, None]
    gain = float(rng.uniform(0.85, 1.15))
    light = look.light_strength * ((xx - SIZE / 2) * np.cos(look.light_angle) +
                                   (yy - SIZE / 2) * np.sin(look.light_angle)) / SIZE
    img = np.broadcast_to(look.skin + light, (n, SIZE, SIZE)).copy()
    half_w = look.mouth_width * (0.55 + 0.45 * width) * (1 - 0.35 * rounding)  # [n,1,1]
    half_h = 2.0 + look.mouth_height * opening
    dx, dy = (xx - cx) / half_w, (yy - cy)
    lips_h = half_h + 4.5 + 2.5 * rounding  # lips thicken when rounded
    lips = dx**2 + (dy / lips_h) ** 2 <= 1.0
    img = np.where(lips, img + look.lip, img)
    cavity = (dx**2 + (dy / half_h) ** 2 <= 1.0) & (opening > 0.04)
    img = np.where(cavity, 0.08, img)
    teeth_band = cavity & (dy < -half_h * 0.45) & (teeth > 0.3)
    img = np.where(teeth_band, 0.85, img)
    tongue_blob = cavity & (dy > half_h * 0.35) & (tongue > 0.3)
    img = np.where(tongue_blob, 0.35, img)
    img = img * gain + rng.normal(0, look.noise, size=img.shape).astype(np.float32)
    return np.clip(img * 255.0, 0, 255).astype(np.uint8)


def mouth_opening_signal(frames: np.ndarray) -> np.ndarray:
    """A per-frame measure of how open the mouth is, from pixels alone: the share of dark pixels in the
    central mouth region. Used to check audio-visual alignment."""
    centre = frames[:, SIZE // 2 - 18:SIZE // 2 + 26, SIZE // 2 - 26:SIZE // 2 + 26].astype(np.float32) / 255.0
    return (centre < 0.2).mean(axis=(1, 2))
