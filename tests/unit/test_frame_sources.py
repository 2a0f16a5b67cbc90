"""Frame sources for the producer: folders, synthetic parts, video files, and live cameras (reconnect, drop oldest)."""

from __future__ import annotations

import itertools
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.inspection.imaging import decode_image
from pipeline.streaming import frame_sources
from pipeline.streaming.envelope import H_SYNTHETIC_DEFECT
from pipeline.streaming.frame_sources import (
    GST_LAUNCH_BACKEND,
    LiveSource,
    LiveSpec,
    SourceError,
    camera_id,
    encode,
    folder_frames,
    is_live,
    open_source,
    synthetic_kind,
)


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
    with pytest.raises(SourceError, match="no image files"):
        list(folder_frames(tmp_path))
    with pytest.raises(SourceError, match="not 'synthetic', a camera or stream URL"):
        open_source(str(tmp_path / "missing"))
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(SourceError, match="not an image, a folder or a video"):
        open_source(str(tmp_path / "x.bin"))


def test_synthetic_frames_carry_some_defects() -> None:
    frames = list(itertools.islice(open_source("synthetic", kind="bottle", size=32, defect_rate=0.5, seed=1), 20))
    defects = [f.extra_headers[H_SYNTHETIC_DEFECT] for f in frames]
    assert 3 <= sum(d != "none" for d in defects) <= 17
    assert all(f.content_type == "image/jpeg" and f.data[:2] == b"\xff\xd8" for f in frames)
    assert synthetic_kind("line-7", "wood") == "wood"
    with pytest.raises(SourceError, match="no synthetic part kind"):
        synthetic_kind("toaster", "toaster")


def test_video_file_frames(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    out = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (32, 24))
    for i in range(3):
        out.write(np.full((24, 32, 3), 40 * i, np.uint8))
    out.release()
    frames = list(open_source(str(video)))
    assert len(frames) == 3 and frames[0].content_type == "image/jpeg"
    assert [f.name for f in frames] == ["clip.avi#0", "clip.avi#1", "clip.avi#2"]
    assert decode_image(frames[2].data).mean() == pytest.approx(80, abs=3)
    assert len(list(itertools.islice(open_source(str(video), loop=True), 7))) == 7


def test_other_image_formats_are_sent_as_png(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.bmp")
    Image.fromarray(rgb).save(tmp_path / "b.tiff")
    frames = list(open_source(str(tmp_path)))
    assert [(f.name, f.content_type) for f in frames] == [("a.bmp", "image/png"), ("b.tiff", "image/png")]
    assert all(np.array_equal(decode_image(f.data, content_type="image/png"), rgb) for f in frames)  # lossless
    single = list(open_source(str(tmp_path / "a.bmp")))
    assert len(single) == 1 and single[0].name == "a.bmp"


def test_live_specs_and_camera_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert LiveSpec.parse("rtsp://cam.local:8554/line1").backend == cv2.CAP_FFMPEG
    assert LiveSpec.parse("HTTP://10.0.0.5/video.mjpg").kind == "http"
    assert LiveSpec.parse("2") == LiveSpec(2, cv2.CAP_V4L2, "device")
    assert LiveSpec.parse(str(tmp_path)) is None
    with pytest.raises(SourceError, match="no such video device"):
        LiveSpec.parse("/dev/video97")
    if "GStreamer:                   YES" not in cv2.getBuildInformation():
        assert LiveSpec.parse("videotestsrc ! videoconvert ! appsink").backend == GST_LAUNCH_BACKEND
        monkeypatch.setattr(frame_sources.shutil, "which", lambda _name: None)
        with pytest.raises(SourceError, match="needs gst-launch-1.0 .* or an OpenCV built with GStreamer"):
            open_source("videotestsrc ! videoconvert ! appsink")
        monkeypatch.undo()
    assert is_live("rtsp://x/y") and is_live("/dev/video97") and not is_live("synthetic")
    assert camera_id("rtsp://admin:secret@10.1.2.3:554/Streaming/Channels/101?tcp") == \
        "10.1.2.3:554/Streaming/Channels/101"
    assert camera_id("/dev/video3") == "video3" and camera_id("0") == "video0"
    assert camera_id("videotestsrc ! appsink") == "gstreamer"
    (tmp_path / "line 1.mp4").write_bytes(b"x")
    assert camera_id(str(tmp_path / "line 1.mp4")) == "line-1"


class FakeCapture:
    """Plays `n` frames, then fails like a dropped stream."""

    def __init__(self, n: int, start: int, delay_s: float = 0.0) -> None:
        self.left, self.value, self.delay_s = n, start, delay_s

    def read(self) -> tuple[bool, np.ndarray | None]:
        time.sleep(self.delay_s)
        if self.left == 0:
            return False, None
        self.left -= 1
        self.value += 1
        return True, np.full((8, 8, 3), self.value % 256, np.uint8)

    def release(self) -> None:
        pass


def test_live_source_reconnects_and_drops_the_oldest(monkeypatch: pytest.MonkeyPatch) -> None:
    opens: list[int] = []

    def fake_open(self: LiveSource) -> FakeCapture | None:
        opens.append(1)
        if len(opens) == 2 or len(opens) > 4:
            # the camera is rebooting: one failed open, then back; after its fourth session it stays away,
            # so the pixel values (frame numbers) stay below 256 however far the capture thread runs ahead
            return None
        return FakeCapture(20, 20 * len(opens))

    monkeypatch.setattr(LiveSource, "_open", fake_open)
    src = LiveSource("rtsp://127.0.0.1:1/cam", buffer=3, backoff_s=0.01, backoff_max_s=0.02, fmt="png")
    it = iter(src)
    first = next(it)
    # The consumer stalls (a slow broker) while the camera goes on: past its reconnect, into the third open.
    end = time.monotonic() + 30
    while src.stats.captured < 45 and time.monotonic() < end:
        time.sleep(0.05)
    rest = [next(it) for _ in range(3)]
    src.close()
    s = src.stats
    assert s.reconnects >= 1 and s.failures >= 2  # a lost stream and a failed open
    assert s.dropped >= 30 and s.captured >= 40
    assert s.captured >= s.sent + s.dropped  # every frame is sent, dropped, or still queued
    values = [int(decode_image(f.data)[0, 0, 0]) for f in [first, *rest]]
    assert values[1:] == sorted(values[1:]) and values[-1] >= 60  # the newest frames survived, in order
    assert all(f.capture_ts_ns and f.content_type == "image/png" for f in rest)


def test_live_source_gives_up_after_max_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LiveSource, "_open", lambda self: None)
    src = LiveSource("http://127.0.0.1:1/cam.mjpg", backoff_s=0.01, backoff_max_s=0.02, max_outage_s=0.2)
    with pytest.raises(SourceError, match="no frames for"):
        next(iter(src))
    assert src.stats.failures >= 2 and "cannot open http://127.0.0.1:1/cam.mjpg" in src.stats.last_error


GST_TEST = "videotestsrc num-buffers=12 pattern=ball ! video/x-raw,width=64,height=48,framerate=60/1"


def _need_gst_launch() -> None:
    if shutil.which("gst-launch-1.0") is None:
        pytest.fail("gst-launch-1.0 is missing: deploy/local/setup.sh --dev installs gstreamer1.0-tools")


def test_a_gstreamer_pipeline_is_read_and_restarted_when_it_ends() -> None:
    """OpenCV's appsink ending is replaced; the pipeline's end of stream reads as a lost stream: reopened."""
    _need_gst_launch()
    src = LiveSource(GST_TEST + " ! videoconvert ! appsink", buffer=64, backoff_s=0.05, read_timeout_s=5)
    frames = []
    for f in src:
        frames.append(f)
        if len(frames) >= 20:  # more than one run of the 12-buffer pipeline
            break
    assert src.stats.reconnects >= 1
    img = cv2.imdecode(np.frombuffer(frames[0].data, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (48, 64, 3) and frames[0].content_type == "image/jpeg"
    assert frames[0].capture_ts_ns is not None and frames[0].name.startswith("gstreamer#")
    assert len({f.data for f in frames[:12]}) > 1, "the ball moves: frames differ"


def test_a_gstreamer_pipeline_that_does_not_start_says_why() -> None:
    _need_gst_launch()
    src = LiveSource("nosuchelement ! videoconvert ! appsink", backoff_s=0.05, max_outage_s=0.5)
    with pytest.raises(SourceError, match="no frames for"):
        next(iter(src))
    assert src.stats.failures >= 1 and src.stats.last_error.startswith("cannot open")
