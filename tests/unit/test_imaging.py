"""Decoding catches every kind of bad image with a readable reason; preprocessing sizes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ImageError
from pipeline.inspection.imaging import decode_image, model_input_size, preprocess


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


RGB = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)


@pytest.mark.parametrize(("fmt", "ctype"), [("PNG", "image/png"), ("JPEG", "image/jpeg")])
def test_round_trip(fmt: str, ctype: str) -> None:
    out = decode_image(_encode(RGB, fmt), content_type=ctype)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    if fmt == "PNG":
        assert np.array_equal(out, RGB)


@pytest.mark.parametrize(
    ("data", "kwargs", "reason"),
    [
        (b"", {}, "empty"),
        (b"definitely not an image", {}, "undecodable"),
        (_encode(RGB, "PNG")[:120], {}, "truncated"),
        (_encode(RGB, "JPEG")[: len(_encode(RGB, "JPEG")) // 2], {}, "truncated"),
        (_encode(RGB, "PNG"), {"content_type": "image/gif"}, "unsupported content type"),
        (_encode(RGB, "PNG"), {"content_type": "image/jpeg"}, "does not match"),
        (_encode(RGB, "PNG"), {"max_pixels": 1000}, "too large"),
    ],
)
def test_bad_images(data: bytes, kwargs: dict, reason: str) -> None:
    with pytest.raises(ImageError, match=reason):
        decode_image(data, **kwargs)


def test_decompression_bomb_refused_before_decoding() -> None:
    big = np.zeros((3000, 3000), dtype=np.uint8)  # compresses to a few KB, 9 Mpx when decoded
    data = _encode(big, "PNG")
    assert len(data) < 100_000
    with pytest.raises(ImageError, match="too large"):
        decode_image(data, max_pixels=1_000_000)


def test_grey_and_16_bit_become_rgb() -> None:
    grey = decode_image(_encode(RGB[..., 0], "PNG"))
    assert grey.shape == (40, 60, 3)
    deep = Image.fromarray(RGB[..., 0].astype(np.uint16) * 257)
    buf = io.BytesIO()
    deep.save(buf, format="PNG")
    out = decode_image(buf.getvalue())
    assert out.shape == (40, 60, 3) and abs(int(out[0, 0, 0]) - int(RGB[0, 0, 0])) <= 1


def test_model_input_sizes() -> None:
    assert model_input_size(480, 640, 240, "tile") == (240, 320)
    assert model_input_size(640, 480, 240, "tile") == (320, 240)
    assert model_input_size(480, 640, 240, "squash") == (240, 240)
    x = preprocess(RGB, 64, "tile")
    assert x.shape == (3, 64, 96)
    assert abs(float(x.mean())) < 3
