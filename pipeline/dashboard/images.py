"""Images the dashboard renders from stored per-frame blobs: mask outlines, thumbnails, and their cache."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

import numpy as np
from PIL import Image
from scipy import ndimage

from pipeline.operators.labels import sniff_content_type


def outline_png(mask_png: bytes, width: int | None = None) -> bytes:
    """Transparent PNG with the mask's outline in red, at `width` (aspect kept) or the mask's size.

    Done here rather than in the browser so a 1-bit mask of any size becomes a crisp, thin outline
    at the size it is shown.
    """
    with Image.open(io.BytesIO(mask_png)) as im:
        m = im.convert("L")
        if width is not None and width < m.width:
            h = max(1, round(m.height * width / m.width))
            m = m.resize((width, h), Image.Resampling.NEAREST)
        mask = np.asarray(m) > 127
    rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
    if mask.any():
        thick = max(1, min(mask.shape) // 160)
        edge = mask & ~ndimage.binary_erosion(mask, iterations=thick, border_value=0)
        rgba[edge] = (255, 32, 32, 255)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def thumbnail(data: bytes, width: int) -> tuple[bytes, str]:
    """Scaled-down copy (aspect kept) for lists: alerts pages carry dozens of them."""
    with Image.open(io.BytesIO(data)) as im:
        if im.width <= width:
            return data, sniff_content_type(data)
        h = max(1, round(im.height * width / im.width))
        small = im.convert("RGB" if im.mode not in ("1", "L", "RGBA") else im.mode).resize(
            (width, h), Image.Resampling.BILINEAR if im.mode != "1" else Image.Resampling.NEAREST
        )
        buf = io.BytesIO()
        small.save(buf, format="PNG", compress_level=1)
        return buf.getvalue(), "image/png"


class ImageCache:
    """Bounded cache of rendered images of immutable per-frame blobs (thumbnails, outlines)."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._d: OrderedDict[tuple[str, ...], tuple[bytes, str]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, ...]) -> tuple[bytes, str] | None:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: tuple[str, ...], value: tuple[bytes, str]) -> None:
        with self._lock:
            if key in self._d:
                return
            self._d[key] = value
            self._size += len(value[0])
            while self._size > self.max_bytes and self._d:
                _, old = self._d.popitem(last=False)
                self._size -= len(old[0])
