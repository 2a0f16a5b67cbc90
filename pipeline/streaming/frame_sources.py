"""Where produced frames come from: a folder of images, a video file, or generated parts.

Folder frames are sent as the file's own bytes (no re-encoding), so what the worker scores is exactly
what is on disk. Video frames and synthetic parts are encoded once here (JPEG by default). Synthetic
frames draw defects on some parts so a demo has something to find; the drawn defect travels in an
optional header for comparison, never used for scoring.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import AnoclipError, ConfigError
from pipeline.streaming.envelope import H_SYNTHETIC_DEFECT

SUFFIX_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v"}


class SourceError(AnoclipError):
    """A frame source cannot be opened or read."""


@dataclass
class SourceFrame:
    data: bytes
    content_type: str
    name: str
    extra_headers: dict[str, str] = field(default_factory=dict)


def encode(rgb: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> tuple[bytes, str]:
    """RGB array -> (bytes, content type)."""
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
        return buf.getvalue(), "image/png"
    if fmt == "jpeg":
        Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), "image/jpeg"
    raise ConfigError(f"unknown image format {fmt!r} (jpeg or png)")


def folder_frames(path: str | Path, *, loop: bool = False) -> Iterator[SourceFrame]:
    """JPEG/PNG files under `path` (recursively, sorted), as their raw bytes."""
    root = Path(path)
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIX_TYPES)
    if not files:
        raise SourceError(f"no .jpg/.jpeg/.png files under {root}")
    for f in itertools.cycle(files) if loop else files:
        try:
            data = f.read_bytes()
        except OSError as e:
            raise SourceError(f"{f}: cannot read: {e.strerror or e}") from e
        yield SourceFrame(data, SUFFIX_TYPES[f.suffix.lower()], str(f.relative_to(root)))


def video_frames(path: str | Path, *, loop: bool = False, fmt: str = "jpeg") -> Iterator[SourceFrame]:
    """Frames of a video file, decoded with OpenCV (optional: `pip install opencv-python-headless`)."""
    try:
        import cv2  # type: ignore[import-not-found]
    except ImportError as e:
        raise SourceError("reading video needs OpenCV, which is not installed: "
                          "pip install opencv-python-headless (or send a folder of images)") from e
    while True:
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            raise SourceError(f"{path}: OpenCV cannot open this video")
        i = 0
        try:
            while True:
                ok, bgr = cap.read()
                if not ok:
                    break
                data, ctype = encode(np.ascontiguousarray(bgr[..., ::-1]), fmt)
                yield SourceFrame(data, ctype, f"{Path(path).name}#{i}")
                i += 1
        finally:
            cap.release()
        if not loop or i == 0:
            return


def synthetic_kind(line_id: str, class_name: str | None = None) -> str:
    """The synthetic part kind for a line: its id or class name if that is a kind, else an error."""
    from pipeline.evaluation import synth

    for cand in (line_id, class_name):
        if cand in synth.KINDS:
            return cand
    raise SourceError(f"no synthetic part kind for line {line_id!r} (kinds: {', '.join(synth.KINDS)}); "
                      "pass --kind")


def synthetic_frames(kind: str, *, size: int = 256, seed: int = 0, defect_rate: float = 0.3,
                     fmt: str = "jpeg") -> Iterator[SourceFrame]:
    """Endless generated parts of `kind`; about `defect_rate` of them carry a drawn defect."""
    from pipeline.evaluation import synth

    rng = np.random.default_rng(seed)
    for i in itertools.count():
        defect = str(rng.choice(synth.DEFECTS)) if rng.random() < defect_rate else None
        rgb, _mask = synth.render_part(kind, size, seed * 1_000_003 + i, defect)
        data, ctype = encode(rgb, fmt)
        yield SourceFrame(data, ctype, f"{kind}-{i}", {H_SYNTHETIC_DEFECT: defect or "none"})


def open_source(spec: str, *, kind: str | None = None, size: int = 256, seed: int = 0,
                defect_rate: float = 0.3, loop: bool = False, fmt: str = "jpeg") -> Iterator[SourceFrame]:
    """`synthetic`, a folder, or a video file."""
    if spec == "synthetic":
        if kind is None:
            raise SourceError("synthetic frames need a part kind")
        return synthetic_frames(kind, size=size, seed=seed, defect_rate=defect_rate, fmt=fmt)
    p = Path(spec)
    if p.is_dir():
        return folder_frames(p, loop=loop)
    if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
        return video_frames(p, loop=loop, fmt=fmt)
    if p.is_file():
        raise SourceError(f"{p}: not a folder or a video ({', '.join(sorted(VIDEO_SUFFIXES))})")
    raise SourceError(f"source {spec!r} is not 'synthetic', a folder or a video file")
