"""Decoding and pre-processing of frames: bytes -> RGB arrays -> normalised model tensors.

Decoding is where bad input is caught, so every failure is an `ImageError` whose message a person
can act on (it ends up as the dead-letter reason).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.errors import ImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CONTENT_TYPES = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/png": "PNG"}
DEFAULT_MAX_PIXELS = 50_000_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, content_type: str | None = None) -> np.ndarray:
    """Encoded bytes -> HxWx3 uint8 RGB. Checks the declared type, the pixel budget and truncation."""
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
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"image too large: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
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
