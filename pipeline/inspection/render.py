"""Pictures people look at: mask PNGs and heatmap overlays, scaled by the line's own statistics."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from scipy import ndimage

if TYPE_CHECKING:
    from pipeline.inspection.inspector import Inspection


def _jet_lut() -> np.ndarray:
    x = np.linspace(0.0, 1.0, 256)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], axis=1) * 255).astype(np.uint8)


JET = _jet_lut()


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
    """Map scores to jet colours over a fixed range (not min-max per image, which makes normal frames hot)."""
    span = max(hi - lo, 1e-12)
    idx = np.clip((anomaly_map - lo) / span * 255.0, 0, 255).astype(np.uint8)
    return JET[idx]


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
    """Heatmap overlay of a frame as PNG bytes."""
    return encode_png(overlay(image, anomaly_map, lo, hi, mask))


def save_overlay(path: str | Path, image: np.ndarray, inspection: Inspection) -> Path:
    """Write an inspection's heatmap overlay (mask outlined) of `image` as a PNG file."""
    lo, hi = inspection.heatmap_range
    out = Path(path)
    out.write_bytes(heatmap_png(image, inspection.anomaly_map, lo, hi, inspection.mask))
    return out
