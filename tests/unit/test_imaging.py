"""Decoding catches every kind of bad image with a readable reason; preprocessing sizes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ImageError
from pipeline.inspection.imaging import GeometryLimits, decode_image, model_input_size, preprocess, tile_count


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


def _png_of(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


WORKER_LIMITS = GeometryLimits(max_pixels=50_000_000, max_side=4096, max_aspect_ratio=8.0, max_tiles=8,
                               tile_size=240, resize="tile")


@pytest.mark.parametrize(
    ("width", "height", "words"),
    [
        (6000, 1, "aspect ratio of 6000.0, above worker.max_aspect_ratio (8)"),  # the 18 KB strip of issue 15
        (1, 6000, "aspect ratio of 6000.0"),
        (7000, 7000, "long side of 7000 px exceeds worker.max_side (4096)"),  # 49 Mpx: under max_pixels
    ],
)
def test_geometry_limits_refuse_before_decoding(width: int, height: int, words: str, monkeypatch) -> None:
    data = _png_of(width, height)
    assert len(data) < 100_000
    decoded: list[int] = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1))  # any pixel decode would call it
    with pytest.raises(ImageError, match="too (elongated|large)") as e:
        decode_image(data, content_type="image/png", limits=WORKER_LIMITS)
    assert words in str(e.value)
    assert not decoded, "refused from the header, before decoding"


def test_tile_limit_and_what_passes() -> None:
    # squash mode cuts no tiles, so only the aspect ratio limit applies
    assert tile_count(100, 900, 240, "tile") == 9 and tile_count(100, 900, 240, "squash") == 1
    tiles_only = GeometryLimits(max_tiles=4, tile_size=240, resize="tile")
    with pytest.raises(ImageError, match=r"needs 5 model tiles, above worker.max_tiles \(4\)"):
        tiles_only.check(1200, 240)
    tiles_only.check(960, 240)
    WORKER_LIMITS.check(4096, 512)  # exactly at the limits
    out = decode_image(_png_of(800, 100), limits=WORKER_LIMITS)
    assert out.shape == (100, 800, 3)


def test_worker_limits_come_from_settings(tiny_settings) -> None:
    lim = GeometryLimits.from_settings(tiny_settings.worker, 64, "tile")
    w = tiny_settings.worker
    assert (lim.max_pixels, lim.max_side, lim.max_aspect_ratio, lim.max_tiles) == (
        w.max_pixels, w.max_side, w.max_aspect_ratio, w.max_tiles)
    with pytest.raises(ImageError, match="worker.max_aspect_ratio"):
        decode_image(_png_of(1, 6000), limits=lim)
