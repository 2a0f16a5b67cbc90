"""Synthetic anomalies pasted into normal frames: the known positives of every gate (adapters and banks).

A gate that validates only on frames the base model already admitted as normal is circular: it can
never see a defect the candidate learned as normal. Pasting a synthetic defect into a held-out frame
gives a frame with a known defect mask, whatever either model thinks of it. Two kinds, as in the
self-supervised anomaly literature:

* `cutpaste` (CutPaste, Li et al. 2021): a rectangle cut from the frame itself, colour-jittered and
  pasted elsewhere: a local structural break made of the product's own material.
* `perlin` (DRAEM, Zavrtanik et al. 2021): a Perlin-noise blob mask filled with a foreign texture
  (procedural stripes, blended with the frame): a stain or contamination of unknown appearance.

Pure numpy and deterministic in the seed. The drawing code is this module's own: the adaptation wing may
not import the evaluation wing's synthetic data (`tests/unit/test_layout.py`).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from pipeline.model.tta_params import stream_seed

KINDS = ("cutpaste", "perlin")


@dataclass
class SyntheticAnomaly:
    image: np.ndarray
    """HxWx3 uint8: the frame with the defect pasted in."""
    mask: np.ndarray
    """HxW bool: where it was pasted (the label)."""
    kind: str


def _check(image: np.ndarray) -> tuple[int, int]:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}")
    h, w = image.shape[:2]
    if min(h, w) < 8:
        raise ValueError(f"image of {w}x{h} is too small to paste a defect into (need 8x8)")
    return h, w


def perlin_noise(h: int, w: int, cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """HxW gradient (Perlin) noise over `cells` = (rows, cols) lattice cells; values roughly in [-1, 1]."""
    ry, rx = max(1, int(cells[0])), max(1, int(cells[1]))
    gy = np.linspace(0, ry, h, endpoint=False)
    gx = np.linspace(0, rx, w, endpoint=False)
    yi, xi = gy.astype(int), gx.astype(int)
    yf, xf = gy - yi, gx - xi
    angles = rng.uniform(0, 2 * math.pi, (ry + 1, rx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], axis=-1)

    def corner(oy: int, ox: int) -> np.ndarray:
        g = grad[yi[:, None] + oy, xi[None, :] + ox]
        return g[..., 0] * (yf[:, None] - oy) + g[..., 1] * (xf[None, :] - ox)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    u, v = fade(yf)[:, None], fade(xf)[None, :]
    top = corner(0, 0) * (1 - v) + corner(0, 1) * v
    bottom = corner(1, 0) * (1 - v) + corner(1, 1) * v
    return math.sqrt(2) * (top * (1 - u) + bottom * u)


def _area(rng: np.random.Generator, h: int, w: int, lo: float, hi: float) -> int:
    return max(4, int(round(rng.uniform(lo, hi) * h * w)))


def foreign_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """HxWx3 float texture that is not the product's: oriented stripes between two random colours, plus grain."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(3.0, max(4.0, min(h, w) / 4))
    phase = (xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period
    t = 0.5 + 0.5 * np.sin(phase + rng.uniform(0, 2 * math.pi))
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    tex = c1 + (c2 - c1) * t[..., None]
    return tex + rng.normal(0, 12.0, (h, w, 3))


def perlin_paste(
    image: np.ndarray, rng: np.random.Generator, area: tuple[float, float] = (0.02, 0.08)
) -> SyntheticAnomaly:
    """A Perlin-noise blob mask (2-8% of the frame by default) filled with a foreign texture, blended in."""
    h, w = _check(image)
    cells = (int(rng.integers(2, 6)), int(rng.integers(2, 6)))
    noise = perlin_noise(h, w, cells, rng)
    n = _area(rng, h, w, *area)
    thr = np.partition(noise.reshape(-1), noise.size - n)[noise.size - n]
    mask = noise >= thr
    beta = rng.uniform(0.6, 1.0)  # opacity of the foreign texture
    out = image.astype(np.float64)
    out[mask] = (1 - beta) * out[mask] + beta * foreign_texture(h, w, rng)[mask]
    return SyntheticAnomaly(np.clip(np.rint(out), 0, 255).astype(np.uint8), mask, "perlin")


def cutpaste(
    image: np.ndarray, rng: np.random.Generator, area: tuple[float, float] = (0.02, 0.08)
) -> SyntheticAnomaly:
    """A rectangle (2-8% of the frame by default, aspect 0.3-3.3) of the frame, colour-jittered, pasted elsewhere."""
    h, w = _check(image)
    n = _area(rng, h, w, *area)
    aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
    ph = int(np.clip(round(math.sqrt(n / aspect)), 2, h - 1))
    pw = int(np.clip(round(n / ph), 2, w - 1))
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    patch = image[sy : sy + ph, sx : sx + pw].astype(np.float64)
    gain = rng.uniform(0.7, 1.3, 3)  # per-channel brightness/colour jitter
    patch = (patch - patch.mean()) * rng.uniform(0.8, 1.2) + patch.mean()
    patch = patch * gain + rng.uniform(-25, 25, 3)
    for _ in range(8):  # prefer a place that does not overlap the source
        dy, dx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        if abs(dy - sy) >= ph or abs(dx - sx) >= pw:
            break
    out = image.copy()
    out[dy : dy + ph, dx : dx + pw] = np.clip(np.rint(patch), 0, 255).astype(np.uint8)
    mask = np.zeros((h, w), dtype=bool)
    mask[dy : dy + ph, dx : dx + pw] = True
    return SyntheticAnomaly(out, mask, "cutpaste")


def synthetic_anomaly(image: np.ndarray, seed: int, kind: str | None = None) -> SyntheticAnomaly:
    """One synthetic defect pasted into `image`, deterministic in `seed`; `kind` None alternates by seed."""
    k = KINDS[seed % len(KINDS)] if kind is None else kind
    rng = np.random.default_rng([int(seed) & 0x7FFFFFFF, 0x5EED])
    if k == "cutpaste":
        return cutpaste(image, rng)
    if k == "perlin":
        return perlin_paste(image, rng)
    raise ValueError(f"unknown synthetic anomaly {k!r} (known: {', '.join(KINDS)})")


def paste_positives(items: list[tuple[str, np.ndarray]], seed: int, kind: str | None = None
                    ) -> list[tuple[str, SyntheticAnomaly]]:
    """One synthetic defect pasted into each (frame id, image): the gates' shared source of known positives.
    Deterministic in (`seed`, frame id), so a replay pastes the same defect into the same frame; frames too small
    to paste into (a side under 8 px) are left out."""
    out = []
    for fid, image in items:
        if min(image.shape[:2]) < 8:
            continue
        out.append((fid, synthetic_anomaly(image, stream_seed(seed, zlib.crc32(fid.encode())), kind)))
    return out
