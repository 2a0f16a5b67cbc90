"""Decoding and pre-processing of frames: bytes -> RGB arrays -> normalised model tensors.

Decoding is where bad input is caught, so every failure is an `ImageError` whose message a person
can act on (it ends up as the dead-letter reason).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.errors import ImageError
from pipeline.settings import WorkerSettings

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CONTENT_TYPES = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/png": "PNG"}
DEFAULT_MAX_PIXELS = 50_000_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class GeometryLimits:
    """What a frame's size may be, checked from the image header before any pixel is decoded.

    A frame's cost grows with its tile count (about long side / short side squares under `resize: tile`),
    not only with its pixel count: an 18 KB 1 x 6000 PNG is 6000 tiles. Each limit names its config key.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int | None = None
    max_aspect_ratio: float | None = None
    max_tiles: int | None = None
    tile_size: int = 0
    """The model's input side (tiles are not counted when 0)."""
    resize: str = "tile"

    @classmethod
    def from_settings(cls, worker: WorkerSettings, tile_size: int, resize: str) -> GeometryLimits:
        """The worker's limits for a model of input side `tile_size`."""
        return cls(max_pixels=worker.max_pixels, max_side=worker.max_side, max_aspect_ratio=worker.max_aspect_ratio,
                   max_tiles=worker.max_tiles, tile_size=tile_size, resize=resize)

    def check(self, width: int, height: int) -> None:
        """Raise ImageError naming the first limit a `width` x `height` frame breaks."""
        size = f"{width}x{height}"
        if width < 1 or height < 1:
            raise ImageError(f"image has no pixels: {size}")
        if width * height > self.max_pixels:
            raise ImageError(f"image too large: {size} = {width * height} pixels exceeds the limit of "
                             f"{self.max_pixels} (worker.max_pixels)")
        long, short = max(width, height), min(width, height)
        if self.max_aspect_ratio is not None and long > self.max_aspect_ratio * short:
            raise ImageError(f"image too elongated: {size} has an aspect ratio of {long / short:.1f}, above "
                             f"worker.max_aspect_ratio ({self.max_aspect_ratio:g})")
        if self.max_tiles is not None and self.tile_size > 0:
            n = tile_count(height, width, self.tile_size, self.resize)
            if n > self.max_tiles:
                raise ImageError(f"image too elongated: {size} needs {n} model tiles, above worker.max_tiles "
                                 f"({self.max_tiles})")
        if self.max_side is not None and long > self.max_side:
            raise ImageError(f"image too large: {size}, its long side of {long} px exceeds worker.max_side "
                             f"({self.max_side})")


def tile_count(height: int, width: int, image_size: int, resize: str) -> int:
    """Square model tiles a frame is cut into (as `pipeline.model.anoclip.TileLayout`): ceil(long / size)."""
    h, w = model_input_size(height, width, image_size, resize)
    return max(1, math.ceil(max(h, w) / image_size))


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, content_type: str | None = None,
                 limits: GeometryLimits | None = None) -> np.ndarray:
    """Encoded bytes -> HxWx3 uint8 RGB. Checks the declared type, the geometry (`limits`, else only
    `max_pixels`) from the header before decoding, and truncation."""
    limits = limits or GeometryLimits(max_pixels=max_pixels)
    if not data:
        raise ImageError("empty image payload")
    expected = None
    if content_type is not None:
        expected = CONTENT_TYPES.get(content_type.split(";")[0].strip().lower())
        if expected is None:
            raise ImageError(f"unsupported content type {content_type!r} (supported: {', '.join(CONTENT_TYPES)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            limits.check(*im.size)  # PIL has read only the header so far
            if expected is not None and im.format != expected:
                raise ImageError(f"content type {content_type!r} does not match the data, which is {im.format}")
            im.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image too large (decompression bomb): {e}") from e
    except UnidentifiedImageError as e:
        raise ImageError("undecodable image: not a recognised image format") from e
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e)
        if "truncated" in msg or "broken data stream" in msg:
            raise ImageError(f"truncated image: {msg}") from e
        raise ImageError(f"undecodable image: {msg}") from e
    except Exception as e:  # corrupt files make PIL raise other types too (found by tests/fuzz: TypeError)
        raise ImageError(f"undecodable image: {type(e).__name__}: {e}") from e
    return to_rgb(im)


def to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8 (16-bit greyscale is scaled, alpha dropped)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float32)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8).copy()


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode an image file; failures name the file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ImageError(f"{p}: cannot read: {e.strerror or e}") from e
    try:
        return decode_image(data, max_pixels=max_pixels)
    except ImageError as e:
        raise ImageError(f"{p}: {e}") from e


def list_images(paths: list[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into image files, sorted within each folder."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out


def model_input_size(height: int, width: int, image_size: int, resize: str) -> tuple[int, int]:
    """Size fed to the model: `squash` -> S x S; `tile` -> short side S, aspect kept."""
    if resize == "squash" or height == width:
        return image_size, image_size
    if height < width:
        return image_size, max(image_size, round(width * image_size / height))
    return max(image_size, round(height * image_size / width)), image_size


def preprocess(image: np.ndarray, image_size: int, resize: str = "tile") -> torch.Tensor:
    """HxWx3 uint8 -> (3, h, w) float32 normalised with CLIP's statistics (PIL bilinear, antialiased)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ImageError(f"expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}")
    h, w = model_input_size(image.shape[0], image.shape[1], image_size, resize)
    im = Image.fromarray(image)
    if (im.height, im.width) != (h, w):
        im = im.resize((w, h), Image.BILINEAR)
    t = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (t - mean) / std
