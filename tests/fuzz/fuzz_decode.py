"""Fuzz target (atheris / libFuzzer) for what a frame goes through before the model: the envelope headers
(`pipeline.streaming.envelope.parse_meta`, `check_payload`) and the image bytes
(`pipeline.inspection.imaging.decode_image`).

The contract fuzzed: any input ends in a valid result or in the named error of that step
(`EnvelopeError`, `ImageError`); anything else is a crash, because the worker turns only those into
dead letters (an unexpected exception in the poll loop stops the worker, in the scorer it dead-letters
a whole batch of good frames).

Run by hand for as long as you like (crashes are written as crash-* files, replay one by passing it):

    .venv/bin/python tests/fuzz/fuzz_decode.py --seconds 600 [-jobs=2] [crash-file]

`tests/fuzz/test_fuzz.py` runs it for a few seconds in the suite.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import warnings
from pathlib import Path

import atheris
import numpy as np
import torch  # noqa: F401  (imported uninstrumented: instrumenting torch takes minutes and finds nothing here)

with atheris.instrument_imports(include=["PIL", "pipeline"]):
    from PIL import Image

    from pipeline.errors import ImageError
    from pipeline.inspection.imaging import decode_image
    from pipeline.streaming import envelope
    from pipeline.streaming.envelope import EnvelopeError

    Image.init()  # import (and so instrument) every PIL format plugin now, not lazily on first open

CONTENT_TYPES = [None, "image/jpeg", "image/png", "image/png; q=1", "IMAGE/JPEG", "image/gif", "text/plain", ""]
HEADER_NAMES = [*envelope.REQUIRED_HEADERS, envelope.H_SYNTHETIC_DEFECT, "error", "x-other"]
MAX_PIXELS = 1 << 20
warnings.filterwarnings("ignore", category=UserWarning)  # PIL's "Corrupt EXIF data" on every other input


def _check_image(data: bytes, content_type: str | None) -> None:
    try:
        rgb = decode_image(data, max_pixels=MAX_PIXELS, content_type=content_type)
    except ImageError:
        return
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8, (rgb.shape, rgb.dtype)
    assert 0 < rgb.shape[0] * rgb.shape[1] <= MAX_PIXELS


def _check_envelope(fdp: atheris.FuzzedDataProvider) -> None:
    headers: list[tuple[str, bytes | None]] = []
    for _ in range(fdp.ConsumeIntInRange(0, 9)):
        pick = fdp.ConsumeIntInRange(0, len(HEADER_NAMES))
        name = HEADER_NAMES[pick] if pick < len(HEADER_NAMES) else fdp.ConsumeUnicodeNoSurrogates(8)
        value = None if fdp.ConsumeIntInRange(0, 15) == 0 else fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
        headers.append((name, value))
    try:
        meta = envelope.parse_meta(headers)
    except EnvelopeError as e:
        assert e.stage == envelope.STAGE_HEADERS, e.stage
        return
    assert meta.frame_id and 10**18 <= meta.capture_ts_ns <= 10**19
    assert meta.schema in envelope.SUPPORTED_SCHEMAS
    payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    try:
        envelope.check_payload(payload, meta.content_type, 32)
    except EnvelopeError as e:
        assert e.stage in (envelope.STAGE_SIZE, envelope.STAGE_DECODE), e.stage


def test_one_input(data: bytes) -> None:
    """Byte 0 chooses: a multiple of 4 fuzzes the envelope, else an image with content type
    CONTENT_TYPES[(byte0 >> 2) % 8]; the rest is the input."""
    if not data:
        return
    if data[0] % 4 == 0:
        _check_envelope(atheris.FuzzedDataProvider(data[1:]))
    else:
        _check_image(data[1:], CONTENT_TYPES[(data[0] >> 2) % len(CONTENT_TYPES)])


def write_seeds(folder: Path) -> None:
    """Small valid images of every format PIL writes here, as starting points (prefixed for the provider)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (9, 13, 3), dtype=np.uint8))
    images = {"png": rgb, "jpeg": rgb, "gif": rgb.convert("P"), "bmp": rgb, "tiff": rgb,
              "png16": Image.fromarray(rng.integers(0, 65535, (5, 7), dtype=np.uint16)),
              "pngla": rgb.convert("LA"), "pngrgba": rgb.convert("RGBA"), "webp": rgb}
    for name, im in images.items():
        buf = io.BytesIO()
        try:
            im.save(buf, format={"png16": "PNG", "pngla": "PNG", "pngrgba": "PNG"}.get(name, name.upper()))
        except (KeyError, OSError, ValueError):
            continue
        declared = {"jpeg": 1, "png": 2, "png16": 2, "pngla": 2, "pngrgba": 2}.get(name, 5)
        for ctype in (0, declared):  # no content type, and the declared one (or a wrong one: gif)
            (folder / f"{name}-{ctype}").write_bytes(bytes([1 + 4 * ctype]) + buf.getvalue()[:4096])
    (folder / "headers").write_bytes(b"\x00\x06" + bytes(range(256)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="stop after this long (libFuzzer -max_total_time)")
    args, rest = parser.parse_known_args()
    replay = [a for a in rest if not a.startswith("-")]
    flags = [a for a in rest if a.startswith("-")]
    corpus = [] if replay else [tempfile.mkdtemp(prefix="fuzz-decode-")]
    if corpus:
        write_seeds(Path(corpus[0]))
    argv = [sys.argv[0], f"-max_total_time={args.seconds}", "-timeout=20", "-rss_limit_mb=4096",
            "-max_len=65536", *flags, *corpus, *replay]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
