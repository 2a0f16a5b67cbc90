"""Synthetic inspection images with exact defect masks, deterministic by seed.

Real MVTec AD / VisA data cannot ship with the project (licence, size), yet tests, demos and the
frame producer need images that look like an inspection line: textured surfaces (wood, carpet,
tile) and simple parts on a background (bottle top, metal nut, PCB), with drawn scratches, holes,
stains and missing pieces. The mask is exactly the set of pixels the defect was drawn on: the defect
is composited onto the defect-free image with a hard-edged mask, so every pixel outside it is
bit-identical to `render_part(kind, size, seed, None)`.

`render_part` is the seam the frame producer imports; `write_mvtec_tree` / `write_visa_tree` lay the
images out as the real datasets are distributed, so the readers and `anoclip eval` see the same tree.
"""

from __future__ import annotations

import csv
import os
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion, gaussian_filter

KINDS: tuple[str, ...] = ("wood", "carpet", "tile", "bottle", "metal_nut", "pcb1")
"""Surfaces first (the whole image is material), then parts on a background."""
TEXTURE_KINDS = frozenset({"wood", "carpet", "tile"})
DEFECTS: tuple[str, ...] = ("scratch", "hole", "stain", "missing")

_MIN_AREA_FRACTION = 0.002
_Array = np.ndarray


def _crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _rng(*parts: int | str) -> np.random.Generator:
    """A generator keyed by a tuple; strings go through CRC32 (Python's hash() is salted per process),
    negative ints wrap to 64 bits (SeedSequence takes non-negative entropy only)."""
    return np.random.default_rng([p % (1 << 64) if isinstance(p, int) else _crc(p) for p in parts])


def derive_seed(*parts: int | str) -> int:
    """A stable 31-bit seed from any tuple of ints and strings (used for per-file seeds)."""
    return int(_rng(*parts).integers(0, 2**31 - 1))


# --------------------------------------------------------------------------------------------------
# drawing helpers (all vectorised over a pixel grid)


class _Canvas:
    def __init__(self, height: int, width: int) -> None:
        self.h, self.w = height, width
        self.s = float(min(height, width))
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
        self.y, self.x = yy + 0.5, xx + 0.5

    def noise(self, rng: np.random.Generator, sigma: float) -> _Array:
        """Smooth noise with unit standard deviation at a length scale of `sigma` pixels."""
        n = gaussian_filter(rng.standard_normal((self.h, self.w)), sigma, mode="wrap")
        return n / (n.std() + 1e-12)

    def disk(self, cx: float, cy: float, r: float) -> _Array:
        return (self.x - cx) ** 2 + (self.y - cy) ** 2 <= r * r

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, angle: float) -> _Array:
        c, s = np.cos(angle), np.sin(angle)
        u = (self.x - cx) * c + (self.y - cy) * s
        v = -(self.x - cx) * s + (self.y - cy) * c
        return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0

    def blob(self, rng: np.random.Generator, cx: float, cy: float, r: float, wobble: float) -> _Array:
        """A star-shaped irregular blob: radius r·(1 + wobble·Σ sinusoids of the angle)."""
        theta = np.arctan2(self.y - cy, self.x - cx)
        rad = np.ones_like(theta)
        for k in (2, 3, 5):
            rad += wobble / k * rng.uniform(0.5, 1.0) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
        return np.hypot(self.x - cx, self.y - cy) <= r * rad

    def polyline(self, points: _Array, width: float) -> _Array:
        """Pixels within width/2 of a polyline (points: Kx2 of x, y)."""
        out = np.zeros((self.h, self.w), dtype=bool)
        half = max(width / 2.0, 0.5)
        for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
            dx, dy = x1 - x0, y1 - y0
            length2 = dx * dx + dy * dy
            t = np.zeros_like(self.x) if length2 == 0 else ((self.x - x0) * dx + (self.y - y0) * dy) / length2
            t = np.clip(t, 0.0, 1.0)
            out |= np.hypot(self.x - (x0 + t * dx), self.y - (y0 + t * dy)) <= half
        return out


def _mix(a: _Array, b: _Array, t: _Array) -> _Array:
    """Per-pixel blend of colour layers a → b by t in [0, 1] (t is HxW or HxWx1)."""
    t = t[..., None] if t.ndim == 2 else t
    return a * (1.0 - t) + b * t


def _fill(c: _Canvas, rgb: Iterable[float]) -> _Array:
    return np.broadcast_to(np.asarray(list(rgb), dtype=np.float64), (c.h, c.w, 3)).copy()


def _jitter_colour(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float) -> _Array:
    return np.clip(np.asarray(rgb) + rng.uniform(-amount, amount, 3), 0, 255)


# --------------------------------------------------------------------------------------------------
# defect-free renders: (image float HxWx3, region where defects may go, background layer or None)


def _wood(c: _Canvas, rng: np.random.Generator) -> tuple[_Array, _Array, _Array | None]:
    light = _jitter_colour(rng, (205, 160, 110), 15)
    dark = _jitter_colour(rng, (140, 92, 52), 12)
    freq = rng.uniform(5, 9) / c.s
    warp = c.noise(rng, c.s / 6) * rng.uniform(2.0, 4.0)
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * (c.x * freq + warp) + rng.uniform(0, 2 * np.pi))
    grain = c.noise(rng, 0.8) * 0.12 + gaussian_filter(rng.standard_normal((c.h, c.w)), (c.s / 12, 0.6)) * 0.8
    t = np.clip(rings**2.2 + grain, 0, 1)
    return _mix(light[None, None], dark[None, None], t), np.ones((c.h, c.w), bool), None


def _carpet(c: _Canvas, rng: np.random.Generator) -> tuple[_Array, _Array, _Array | None]:
    palettes = [(120, 130, 150), (170, 150, 120), (110, 120, 95), (150, 110, 110)]
    base = _jitter_colour(rng, palettes[int(rng.integers(len(palettes)))], 12)
    period = c.s / rng.uniform(12, 20)
    weave = np.sin(2 * np.pi * c.x / period) * np.sin(2 * np.pi * c.y / period)
    fibres = c.noise(rng, 0.7)
    tufts = c.noise(rng, c.s / 25)
    shade = 1.0 + 0.10 * weave + 0.09 * fibres + 0.06 * tufts
    return base[None, None] * shade[..., None], np.ones((c.h, c.w), bool), None


def _tile(c: _Canvas, rng: np.random.Generator) -> tuple[_Array, _Array, _Array | None]:
    base = _jitter_colour(rng, (200, 200, 195), 20)
    grout = _jitter_colour(rng, (95, 95, 90), 10)
    n_tiles = int(rng.integers(2, 5))
    pitch = c.s / n_tiles
    off_x, off_y = rng.uniform(0, pitch, 2)
    gx, gy = (c.x + off_x) % pitch, (c.y + off_y) % pitch
    line = max(1.0, c.s / 70)
    is_grout = (gx < line) | (gy < line)
    ix, iy = ((c.x + off_x) // pitch).astype(int), ((c.y + off_y) // pitch).astype(int)
    tile_shift = _rng(int(rng.integers(2**31)), "tiles").uniform(-12, 12, (64, 64))[iy % 64, ix % 64]
    speckle = (c.noise(rng, 0.6) > 2.2) * -40.0
    img = base[None, None] + (tile_shift + speckle + 4 * c.noise(rng, c.s / 10))[..., None]
    img[is_grout] = grout
    return img, np.ones((c.h, c.w), bool), None


def _background(c: _Canvas, rng: np.random.Generator, rgb: tuple[float, float, float]) -> _Array:
    return _jitter_colour(rng, rgb, 6)[None, None] + 4.0 * c.noise(rng, c.s / 8)[..., None]


def _bottle(c: _Canvas, rng: np.random.Generator) -> tuple[_Array, _Array, _Array | None]:
    bg = _background(c, rng, (18, 18, 20))
    cx, cy = c.w / 2 + rng.uniform(-0.03, 0.03) * c.s, c.h / 2 + rng.uniform(-0.03, 0.03) * c.s
    r_out = c.s * rng.uniform(0.40, 0.44)
    r = np.hypot(c.x - cx, c.y - cy)
    glass = _jitter_colour(rng, (70, 98, 55), 10)
    shade = 0.65 + 0.55 * np.clip(r / r_out, 0, 1) ** 1.5 + 0.05 * c.noise(rng, c.s / 20)
    img = bg.copy()
    body = r <= r_out
    img[body] = (glass[None, None] * shade[..., None])[body]
    lip = (r >= 0.55 * r_out) & (r <= 0.68 * r_out)
    img[lip] = (glass[None, None] * 1.45 * shade[..., None])[lip]
    opening = r < 0.55 * r_out
    img[opening] = _fill(c, (12, 14, 12))[opening]
    region = body & ~opening
    return img, region, bg


def _metal_nut(c: _Canvas, rng: np.random.Generator) -> tuple[_Array, _Array, _Array | None]:
    bg = _background(c, rng, (38, 42, 48))
    cx, cy = c.w / 2 + rng.uniform(-0.04, 0.04) * c.s, c.h / 2 + rng.uniform(-0.04, 0.04) * c.s
    phase = rng.uniform(0, 2 * np.pi)
    theta = np.arctan2(c.y - cy, c.x - cx)
    r = np.hypot(c.x - cx, c.y - cy)
    outline = c.s * (0.33 + 0.05 * np.clip(np.cos(4 * (theta - phase)) * 3, -1, 1))
    hole = c.s * 0.13
    body = (r <= outline) & (r >= hole)
    metal = _jitter_colour(rng, (165, 165, 170), 12)
    sheen = 0.75 + 0.25 * np.cos(2 * (theta - phase * 0.5)) + 0.04 * c.noise(rng, 1.0)
    img = bg.copy()
    img[body] = (metal[None, None] * sheen[..., None])[body]
    return img, body, bg


def _pcb1(c: _Canvas, rng: np.random.Generator) -> tuple[_Array, _Array, _Array | None]:
    bg = _background(c, rng, (190, 190, 185))
    m = c.s * rng.uniform(0.06, 0.10)
    board = (c.x > m) & (c.x < c.w - m) & (c.y > m) & (c.y < c.h - m)
    green = _jitter_colour(rng, (30, 110, 60), 10)
    img = bg.copy()
    img[board] = (green[None, None] * (1 + 0.05 * c.noise(rng, c.s / 15))[..., None])[board]
    trace_w = max(1.0, c.s / 80)
    traces = np.zeros((c.h, c.w), bool)
    for _ in range(int(rng.integers(4, 8))):
        x0, y0 = rng.uniform(m, c.w - m), rng.uniform(m, c.h - m)
        x1 = rng.uniform(m, c.w - m)
        y1 = rng.uniform(m, c.h - m)
        traces |= c.polyline(np.array([[x0, y0], [x1, y0], [x1, y1]]), trace_w)
    img[traces & board] = (120, 170, 90)
    pads = np.zeros((c.h, c.w), bool)
    for _ in range(int(rng.integers(4, 9))):
        pads |= c.disk(rng.uniform(m * 2, c.w - m * 2), rng.uniform(m * 2, c.h - m * 2), c.s * 0.025)
    img[pads & board] = (205, 170, 80)
    chip_w, chip_h = c.s * rng.uniform(0.18, 0.28), c.s * rng.uniform(0.12, 0.2)
    chip_x, chip_y = rng.uniform(m * 2, c.w - m * 2 - chip_w), rng.uniform(m * 2, c.h - m * 2 - chip_h)
    chip = (c.x > chip_x) & (c.x < chip_x + chip_w) & (c.y > chip_y) & (c.y < chip_y + chip_h)
    img[chip] = (28, 28, 30)
    return img, board, bg


_RENDERERS: dict[str, Callable[[_Canvas, np.random.Generator], tuple[_Array, _Array, _Array | None]]] = {
    "wood": _wood,
    "carpet": _carpet,
    "tile": _tile,
    "bottle": _bottle,
    "metal_nut": _metal_nut,
    "pcb1": _pcb1,
}


# --------------------------------------------------------------------------------------------------
# defects: (new colour layer, shape mask), composited with a hard edge


def _pick(rng: np.random.Generator, where: _Array) -> tuple[float, float]:
    ys, xs = np.nonzero(where)
    i = int(rng.integers(ys.size))
    return xs[i] + 0.5, ys[i] + 0.5


def _inner(region: _Array, margin: int) -> _Array:
    inner = binary_erosion(region, iterations=max(margin, 1), border_value=0)
    return inner if inner.any() else region


def _draw_defect(
    c: _Canvas, rng: np.random.Generator, defect: str, img: _Array, region: _Array, bg: _Array | None
) -> tuple[_Array, _Array]:
    s = c.s
    if defect == "scratch":
        x, y = _pick(rng, _inner(region, int(s * 0.08)))
        angle = rng.uniform(0, 2 * np.pi)
        step = s * rng.uniform(0.06, 0.09)
        pts = [(x, y)]
        for _ in range(4):
            angle += rng.uniform(-0.35, 0.35)
            x, y = x + step * np.cos(angle), y + step * np.sin(angle)
            pts.append((x, y))
        shape = c.polyline(np.array(pts), max(1.0, s / 90))
        bright = rng.uniform(0.65, 0.85)
        layer = _mix(img, _fill(c, (240, 238, 228)), np.full((c.h, c.w), bright))
        return layer, shape
    if defect == "hole":
        x, y = _pick(rng, _inner(region, int(s * 0.1)))
        shape = c.blob(rng, x, y, s * rng.uniform(0.045, 0.075), wobble=0.25)
        depth = np.clip(np.hypot(c.x - x, c.y - y) / (s * 0.075), 0, 1)
        layer = _mix(_fill(c, (10, 8, 8)), _fill(c, (45, 38, 34)), depth)
        return layer, shape
    if defect == "stain":
        x, y = _pick(rng, _inner(region, int(s * 0.08)))
        shape = c.blob(rng, x, y, s * rng.uniform(0.07, 0.12), wobble=0.6)
        colours = [(95, 60, 25), (60, 40, 80), (30, 30, 30), (150, 40, 30)]
        tint = _fill(c, colours[int(rng.integers(len(colours)))])
        layer = _mix(img, tint, np.full((c.h, c.w), rng.uniform(0.55, 0.7)))
        return layer, shape
    if defect == "missing":
        if bg is not None:
            edge = region & ~binary_erosion(region, iterations=2)
            x, y = _pick(rng, edge)
            shape = c.blob(rng, x, y, s * rng.uniform(0.1, 0.15), wobble=0.3)
            return bg, shape
        x, y = _pick(rng, _inner(region, int(s * 0.1)))
        shape = c.ellipse(x, y, s * rng.uniform(0.08, 0.13), s * rng.uniform(0.05, 0.09), rng.uniform(0, np.pi))
        backing = _fill(c, (32, 32, 38)) + 5.0 * c.noise(rng, 1.0)[..., None]
        return backing, shape
    raise ValueError(f"unknown defect {defect!r} (known: {', '.join(DEFECTS)})")


def _render_base(
    kind: str, size: int, seed: int, width: int | None
) -> tuple[_Canvas, _Array, _Array, _Array | None, np.ndarray]:
    """(canvas, float image with sensor noise, defect region, background layer, uint8 image) of a defect-free part."""
    if kind not in _RENDERERS:
        raise ValueError(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
    w = size if width is None else int(width)
    if size < 16 or w < 16:
        raise ValueError(f"image must be at least 16x16 pixels, got {w}x{size}")
    c = _Canvas(int(size), w)
    img, region, bg = _RENDERERS[kind](c, _rng(seed, kind, "base"))
    img = img + 3.0 * _rng(seed, kind, "sensor").standard_normal(img.shape)
    return c, img, region, bg, np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_part(
    kind: str, size: int, seed: int, defect: str | None, *, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Render one inspection image: (HxWx3 uint8 RGB, HxW bool defect mask), deterministic in the arguments.

    `size` is the height (and the width unless `width` is given). The same (kind, size, seed) gives the
    same part with or without a defect, so the mask is exactly where the two images differ.
    """
    if defect is not None and defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r} (known: {', '.join(DEFECTS)})")
    c, img, region, bg, base = _render_base(kind, size, seed, width)
    mask = np.zeros((c.h, c.w), dtype=bool)
    if defect is None:
        return base, mask
    rng = _rng(seed, kind, "defect", defect)
    min_area = max(6, int(_MIN_AREA_FRACTION * c.h * c.w))
    for _ in range(32):
        layer, shape = _draw_defect(c, rng, defect, img, region, bg)
        mask = shape & region
        if mask.sum() >= min_area:
            break
    else:  # pragma: no cover - geometry makes this unreachable for sizes >= 16
        raise RuntimeError(f"could not place a {defect} on {kind} at {c.w}x{c.h}")
    drawn = np.clip(np.rint(layer), 0, 255).astype(np.uint8)
    out = np.where(mask[..., None], drawn, base)
    return out, mask


def render_recurring(
    kind: str, size: int, seed: int, defect: str, place_seed: int, *, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A part (from `seed`) carrying a recurring defect: the same type, shape, place and tint on every image
    rendered with the same `place_seed`, as a worn tool or a dirty fixture leaves it on a line.

    The shape is drawn once on the reference part of `place_seed`; each image clips it to its own part
    and takes the defect's colour layer from its own pixels, so only the part underneath differs.
    """
    if defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r} (known: {', '.join(DEFECTS)})")
    c, img, region, bg, base = _render_base(kind, size, seed, width)
    _, _, ref_region, _, _ = _render_base(kind, size, place_seed, width)
    rng = _rng(place_seed, kind, "recurring", defect)
    min_area = max(6, int(_MIN_AREA_FRACTION * c.h * c.w))
    for _ in range(32):  # retries decided on the reference alone, so every image gets the same shape
        layer, shape = _draw_defect(c, rng, defect, img, ref_region, bg)
        if (shape & ref_region).sum() >= min_area:
            break
    else:  # pragma: no cover - geometry makes this unreachable for sizes >= 16
        raise RuntimeError(f"could not place a recurring {defect} on {kind}")
    mask = shape & region
    drawn = np.clip(np.rint(layer), 0, 255).astype(np.uint8)
    return np.where(mask[..., None], drawn, base), mask


def recurring_count(rate: float, n_other: int) -> int:
    """Recurring-defect images added to `n_other` test images so that they are `rate` of the test set."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"recurring defect rate must be in [0, 1), got {rate}")
    return int(round(rate / (1.0 - rate) * n_other))


# --------------------------------------------------------------------------------------------------
# dataset trees


def _check_classes(classes: Iterable[str] | None) -> list[str]:
    names = list(KINDS if classes is None else classes)
    unknown = [k for k in names if k not in _RENDERERS]
    if unknown:
        raise ValueError(f"unknown kind(s) {', '.join(unknown)} (known: {', '.join(KINDS)})")
    return names


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", optimize=False, compress_level=1)


def write_mvtec_tree(
    out: str | os.PathLike[str],
    classes: Iterable[str] | None = None,
    n_good: int = 4,
    n_defect: int = 2,
    size: int = 128,
    seed: int = 0,
    *,
    defects: Iterable[str] | None = None,
    n_train: int = 0,
    recurring: float = 0.0,
    recurring_defect: str = "stain",
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Write `<class>/{train/good,test/<defect>,ground_truth/<defect>}` as MVTec AD does.

    `n_defect` images per defect type, masks `<stem>_mask.png` (0/255). Returns images written per class.
    `recurring` > 0 adds `test/recurring_<defect>/`: parts carrying one `recurring_defect` at the same
    place (`render_recurring`), as many as make them that share of the class's test images.
    `progress(n)` is called after each image.
    """
    root = Path(out)
    kinds = _check_classes(classes)
    kinds_defects = list(DEFECTS if defects is None else defects)
    counts: dict[str, int] = {}
    for cls in kinds:
        n = 0
        for split, folder, count in (("train", "good", n_train), ("test", "good", n_good)):
            for i in range(count):
                img, _ = render_part(cls, size, derive_seed(seed, cls, split, folder, i), None)
                _save_png(root / cls / split / folder / f"{i:03d}.png", img)
                n += 1
                if progress:
                    progress(1)
        for defect in kinds_defects:
            for i in range(n_defect):
                img, mask = render_part(cls, size, derive_seed(seed, cls, "test", defect, i), defect)
                _save_png(root / cls / "test" / defect / f"{i:03d}.png", img)
                _save_png(root / cls / "ground_truth" / defect / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
                n += 1
                if progress:
                    progress(1)
        n_rec = recurring_count(recurring, n_good + n_defect * len(kinds_defects))
        place = derive_seed(seed, cls, "recurring-place")
        folder = f"recurring_{recurring_defect}"
        for i in range(n_rec):
            img, mask = render_recurring(cls, size, derive_seed(seed, cls, "test", folder, i), recurring_defect, place)
            _save_png(root / cls / "test" / folder / f"{i:03d}.png", img)
            _save_png(root / cls / "ground_truth" / folder / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
            n += 1
            if progress:
                progress(1)
        counts[cls] = n
    return counts


def write_visa_tree(
    out: str | os.PathLike[str],
    classes: Iterable[str] | None = None,
    n_good: int = 4,
    n_defect: int = 4,
    size: int = 96,
    seed: int = 0,
    *,
    width: int | None = None,
    n_train: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Write VisA's layout: `<class>/Data/Images/{Normal,Anomaly}/*.JPG`, `Data/Masks/Anomaly/*.png`, and
    `split_csv/1cls.csv`. Images are landscape (`width` defaults to 1.4 x `size`, like VisA's aspect).

    Anomalous images cycle through the defect types. Returns images written per class.
    """
    root = Path(out)
    kinds = _check_classes(classes)
    w = int(round(size * 1.4)) if width is None else int(width)
    rows: list[tuple[str, str, str, str, str]] = []
    counts: dict[str, int] = {}
    for cls in kinds:
        images = root / cls / "Data" / "Images"
        n = 0
        normals = [("train", i) for i in range(n_train)] + [("test", n_train + i) for i in range(n_good)]
        for split, i in normals:
            img, _ = render_part(cls, size, derive_seed(seed, cls, "normal", i), None, width=w)
            rel = Path(cls) / "Data" / "Images" / "Normal" / f"{i:04d}.JPG"
            (images / "Normal").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / rel, format="JPEG", quality=95)
            rows.append((cls, split, "normal", rel.as_posix(), ""))
            n += 1
            if progress:
                progress(1)
        for i in range(n_defect):
            defect = DEFECTS[i % len(DEFECTS)]
            img, mask = render_part(cls, size, derive_seed(seed, cls, "anomaly", i), defect, width=w)
            rel = Path(cls) / "Data" / "Images" / "Anomaly" / f"{i:04d}.JPG"
            rel_mask = Path(cls) / "Data" / "Masks" / "Anomaly" / f"{i:04d}.png"
            (images / "Anomaly").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / rel, format="JPEG", quality=95)
            _save_png(root / rel_mask, mask.astype(np.uint8) * 255)
            rows.append((cls, "test", "anomaly", rel.as_posix(), rel_mask.as_posix()))
            n += 1
            if progress:
                progress(1)
        counts[cls] = n
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return counts
