"""Frame sources for the producer: folders as raw bytes, synthetic parts with defects, video via OpenCV."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from pipeline.streaming.envelope import H_SYNTHETIC_DEFECT
from pipeline.streaming.frame_sources import SourceError, encode, folder_frames, open_source, synthetic_kind


def test_folder_sends_file_bytes_unchanged(tmp_path: Path) -> None:
    rgb = np.zeros((20, 30, 3), np.uint8)
    (tmp_path / "sub").mkdir()
    jpg, _ = encode(rgb, "jpeg")
    png, _ = encode(rgb, "png")
    (tmp_path / "b.jpg").write_bytes(jpg)
    (tmp_path / "sub" / "a.PNG").write_bytes(png)
    (tmp_path / "notes.txt").write_text("ignored")
    frames = list(folder_frames(tmp_path))
    assert [(f.name, f.content_type) for f in frames] == [("b.jpg", "image/jpeg"), ("sub/a.PNG", "image/png")]
    assert frames[0].data == jpg and frames[1].data == png
    looped = list(itertools.islice(open_source(str(tmp_path), loop=True), 5))
    assert len(looped) == 5


def test_empty_or_missing_sources_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no .jpg"):
        list(folder_frames(tmp_path))
    with pytest.raises(SourceError, match="not 'synthetic', a folder or a video"):
        open_source(str(tmp_path / "missing"))
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(SourceError, match="not a folder or a video"):
        open_source(str(tmp_path / "x.bin"))


def test_synthetic_frames_carry_some_defects() -> None:
    frames = list(itertools.islice(open_source("synthetic", kind="bottle", size=32, defect_rate=0.5, seed=1), 20))
    defects = [f.extra_headers[H_SYNTHETIC_DEFECT] for f in frames]
    assert 3 <= sum(d != "none" for d in defects) <= 17
    assert all(f.content_type == "image/jpeg" and f.data[:2] == b"\xff\xd8" for f in frames)
    assert synthetic_kind("line-7", "wood") == "wood"
    with pytest.raises(SourceError, match="no synthetic part kind"):
        synthetic_kind("toaster", "toaster")


def test_video_needs_opencv_or_reads_frames(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    try:
        import cv2  # type: ignore[import-not-found]
    except ImportError:
        video.write_bytes(b"not really a video")
        with pytest.raises(SourceError, match="pip install opencv-python-headless"):
            list(open_source(str(video)))
        return
    out = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (32, 24))
    for i in range(3):
        out.write(np.full((24, 32, 3), 40 * i, np.uint8))
    out.release()
    frames = list(open_source(str(video)))
    assert len(frames) == 3 and frames[0].content_type == "image/jpeg"
