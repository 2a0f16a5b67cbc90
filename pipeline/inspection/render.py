"""Pictures people look at: mask PNGs and heatmap overlays, scaled by the line's own statistics."""

from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from scipy import ndimage

if TYPE_CHECKING:
    from pipeline.inspection.frame_scorer import Inspection


HEATMAP_COLORMAP = "jet"


@functools.cache
def colormap_lut(name: str = HEATMAP_COLORMAP) -> np.ndarray:
    """256 x 3 uint8 RGB table of a matplotlib colormap, built on first use.

    Only `matplotlib.colormaps` is imported (no pyplot, no backend, no font cache), and only when the first
    heatmap is drawn, so importing this module stays cheap.
    """
    from matplotlib import colormaps

    lut = colormaps[name].resampled(256)(np.arange(256), bytes=True)[:, :3]
    lut = np.ascontiguousarray(lut, dtype=np.uint8)
    lut.flags.writeable = False  # shared by every caller
    return lut


def bounded_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) scaled down, aspect kept, so the long side is at most `max_side`; unchanged if it already fits.

    Masks and heatmaps are drawn at this size: a 50 Mpx frame would otherwise cost seconds and hundreds of MB
    to render, for a map the model computed on a grid of a few hundred pixels.
    """
    long = max(height, width)
    if long <= max_side:
        return height, width
    f = max_side / long
    return max(1, round(height * f)), max(1, round(width * f))


def fit_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """An RGB frame resized to (h, w) (antialiased; a no-op at its own size), for overlays at render size."""
    if image.shape[:2] == hw:
        return image
    im = Image.fromarray(image).resize((hw[1], hw[0]), Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(im)


def encode_png(image: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 HxW or HxWx3 -> PNG bytes; a low compression level keeps the hot path cheap."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def mask_png(mask: np.ndarray) -> bytes:
    """Binary defect mask as a 1-bit PNG (white = defect)."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype(bool)).convert("1").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def colorize(anomaly_map: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map scores to jet colours (matplotlib's) over a fixed range (not min-max per image, which makes normal
    frames hot)."""
    span = max(hi - lo, 1e-12)
    idx = np.clip((anomaly_map - lo) / span * 255.0, 0, 255).astype(np.uint8)
    return colormap_lut()[idx]


def overlay(image: np.ndarray, anomaly_map: np.ndarray, lo: float, hi: float, mask: np.ndarray | None = None,
            alpha: float = 0.45) -> np.ndarray:
    """Blend the coloured heatmap onto the frame and draw the mask outline in white."""
    heat = colorize(anomaly_map, lo, hi).astype(np.float32)
    out = (1 - alpha) * image.astype(np.float32) + alpha * heat
    out = np.clip(out, 0, 255).astype(np.uint8)
    if mask is not None and mask.any():
        edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, min(mask.shape) // 200))
        out[edge] = 255
    return out


def heatmap_png(image: np.ndarray, anomaly_map: np.ndarray, lo: float, hi: float,
                mask: np.ndarray | None = None) -> bytes:
    """Heatmap overlay of a frame as PNG bytes, at the map's size (the frame is scaled to it if needed)."""
    return encode_png(overlay(fit_image(image, anomaly_map.shape[:2]), anomaly_map, lo, hi, mask))


def save_overlay(path: str | Path, image: np.ndarray, inspection: Inspection) -> Path:
    """Write an inspection's heatmap overlay (mask outlined) of `image` as a PNG file."""
    lo, hi = inspection.heatmap_range
    out = Path(path)
    out.write_bytes(heatmap_png(image, inspection.anomaly_map, lo, hi, inspection.mask))
    return out
