"""Where produced frames come from: cameras and streams, video files, folders of images, generated parts.

- **Live sources** (`rtsp://`, `rtsps://`, `http(s)://` MJPEG, `/dev/videoN` or a device index, a
  GStreamer pipeline string): read by OpenCV on a capture thread that never waits for the broker. A
  GStreamer pipeline runs in OpenCV when it was built with GStreamer (PyPI's wheels are not), else in a
  `gst-launch-1.0` process that ends it with `jpegenc` and writes the frames to a pipe.
  Frames wait in a small queue; when the broker is slower than the camera the *oldest* are dropped (a
  live line wants the newest view), counted in `LiveStats.dropped`. A lost stream is reopened with
  exponential backoff (`reconnects`, `failures`), forever unless `max_outage_s` is set.
- **Video files** and **folders** play through once (or loop); the producer paces them at `--fps`.
  Folder JPEG/PNG files are sent as their own bytes (what the worker scores is exactly what is on
  disk); other formats `anoclip score` reads (BMP, TIFF) are re-encoded as lossless PNG, the wire
  carrying only JPEG and PNG.
- **Synthetic** parts draw defects on some parts so a demo has something to find; the drawn defect
  travels in an optional header for comparison, never used for scoring.

Frames are encoded with OpenCV: 1.2x to 1.6x faster than PIL for JPEG and PNG (bench/bench_codecs.py).
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import re
import select
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.errors import AnoclipError, ConfigError
from pipeline.streaming.envelope import H_SYNTHETIC_DEFECT

log = logging.getLogger("anoclip.sources")

SUFFIX_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
REENCODED_SUFFIXES = {".bmp", ".tif", ".tiff"}
"""Image formats `anoclip score` reads that the wire does not carry: sent as PNG."""
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mjpeg", ".mjpg", ".ts"}
LIVE_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")
_DEVICE_RE = re.compile(r"^(?:/dev/video(\d+)|(\d+))$")


class SourceError(AnoclipError):
    """A frame source cannot be opened or read."""


@dataclass
class SourceFrame:
    data: bytes
    content_type: str
    name: str
    extra_headers: dict[str, str] = field(default_factory=dict)
    capture_ts_ns: int | None = None
    """When a live source grabbed the frame (None: the producer stamps the send time)."""


def encode(rgb: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> tuple[bytes, str]:
    """RGB array -> (bytes, content type)."""
    return encode_bgr(np.ascontiguousarray(rgb[..., ::-1]), fmt, quality)


def encode_bgr(bgr: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> tuple[bytes, str]:
    """BGR array (OpenCV's order, as cameras deliver) -> (bytes, content type)."""
    if fmt == "png":
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        ctype = "image/png"
    elif fmt == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        ctype = "image/jpeg"
    else:
        raise ConfigError(f"unknown image format {fmt!r} (jpeg or png)")
    if not ok:
        raise SourceError(f"OpenCV could not encode a {bgr.shape} frame as {fmt}")
    return buf.tobytes(), ctype


# --- files ------------------------------------------------------------------------------------------


def folder_frames(path: str | Path, *, loop: bool = False) -> Iterator[SourceFrame]:
    """Image files under `path` (recursively, sorted): JPEG/PNG as their raw bytes, BMP/TIFF as PNG."""
    root = Path(path)
    suffixes = set(SUFFIX_TYPES) | REENCODED_SUFFIXES
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
    if not files:
        raise SourceError(f"no image files ({', '.join(sorted(suffixes))}) under {root}")
    return _file_frames(files, root, loop)


def _file_frames(files: list[Path], root: Path, loop: bool) -> Iterator[SourceFrame]:
    for f in itertools.cycle(files) if loop else files:
        name = str(f.relative_to(root)) if f != root else f.name
        suffix = f.suffix.lower()
        if suffix in SUFFIX_TYPES:
            try:
                data = f.read_bytes()
            except OSError as e:
                raise SourceError(f"{f}: cannot read: {e.strerror or e}") from e
            yield SourceFrame(data, SUFFIX_TYPES[suffix], name)
        else:
            from pipeline.inspection.imaging import load_image

            data, ctype = encode(load_image(f), "png")
            yield SourceFrame(data, ctype, name)


def video_frames(path: str | Path, *, loop: bool = False, fmt: str = "jpeg") -> Iterator[SourceFrame]:
    """Frames of a video file, decoded with OpenCV (FFmpeg)."""
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
                data, ctype = encode_bgr(bgr, fmt)
                yield SourceFrame(data, ctype, f"{Path(path).name}#{i}")
                i += 1
        finally:
            cap.release()
        if not loop or i == 0:
            return


# --- live sources -----------------------------------------------------------------------------------


@dataclass
class LiveStats:
    """What a live source went through; `dropped` counts frames discarded because the sender lagged."""

    captured: int = 0
    sent: int = 0
    dropped: int = 0
    reconnects: int = 0
    failures: int = 0
    last_error: str = ""

    def summary(self) -> str:
        return (f"captured {self.captured}, sent {self.sent}, dropped {self.dropped} (oldest first, the broker "
                f"was slower than the camera), reconnects {self.reconnects}, failed opens/reads {self.failures}")


@dataclass(frozen=True)
class LiveSpec:
    """How OpenCV opens a live source: its target, backend and a printable kind."""

    target: str | int
    backend: int
    kind: str

    @classmethod
    def parse(cls, spec: str) -> LiveSpec | None:
        """A LiveSpec for URLs, devices and GStreamer pipelines; None for anything else."""
        if spec.lower().startswith(LIVE_SCHEMES):
            return cls(spec, cv2.CAP_FFMPEG, spec.split("://", 1)[0].lower())
        m = _DEVICE_RE.match(spec.strip())
        if m:
            index = int(m.group(1) or m.group(2))
            if m.group(1) and not Path(spec).exists():
                raise SourceError(f"{spec}: no such video device (is the camera plugged in and passed to "
                                  "the container?)")
            return cls(index, cv2.CAP_V4L2, "device")
        if "!" in spec and not Path(spec).exists():
            if "GStreamer:                   YES" in cv2.getBuildInformation().replace("\t", " "):
                return cls(spec, cv2.CAP_GSTREAMER, "gstreamer")
            if shutil.which(GST_LAUNCH) is None:
                raise SourceError(f"a GStreamer pipeline needs {GST_LAUNCH} (Debian: gstreamer1.0-tools) or an "
                                  f"OpenCV built with GStreamer; the installed opencv-python-headless "
                                  f"{cv2.__version__} has none")
            return cls(spec, GST_LAUNCH_BACKEND, "gstreamer")
        return None


GST_LAUNCH = "gst-launch-1.0"
GST_LAUNCH_BACKEND = -1
"""`LiveSpec.backend` of a GStreamer pipeline run by `gst-launch-1.0` (`GstLaunchCapture`), not by OpenCV."""
_SINK_RE = re.compile(r"!\s*(?:appsink|fakesink|autovideosink|fdsink)\b[^!]*$")


class GstLaunchCapture:
    """A GStreamer pipeline in a `gst-launch-1.0` process, read like an OpenCV capture (`read`, `release`).

    The pipeline is ended with `videoconvert ! jpegenc ! fdsink` (a sink it ends with, e.g. OpenCV's
    `appsink`, is replaced), so the process writes one JPEG after another to a pipe; each is cut at its
    end-of-image marker (`jpegenc` writes no thumbnails, so the marker only ends images) and decoded.
    The process ending (end of stream, lost camera) reads as a lost stream: `LiveSource` reconnects.
    """

    def __init__(self, pipeline: str, read_timeout_s: float) -> None:
        body = _SINK_RE.sub("", pipeline.strip()).rstrip("! ")
        argv = [GST_LAUNCH, "-q", *shlex.split(body), "!", "videoconvert", "!", "jpegenc", "!", "fdsink", "fd=1"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.read_timeout_s = read_timeout_s
        self._buf = bytearray()
        self._stderr: collections.deque[str] = collections.deque(maxlen=20)
        threading.Thread(target=self._drain_stderr, name="anoclip-gst-stderr", daemon=True).start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line.decode(errors="replace").strip())

    def opened(self, timeout_s: float) -> bool:
        """False when the process ends before writing anything (a pipeline that does not parse or link)."""
        assert self.proc.stdout is not None
        if select.select([self.proc.stdout.fileno()], [], [], timeout_s)[0]:
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            self._buf += chunk
            return bool(chunk)
        return self.proc.poll() is None  # nothing yet: a slow camera, reads time out if it stays silent

    @property
    def error(self) -> str:
        """What gst-launch said last (e.g. why the pipeline did not start)."""
        return "; ".join(x for x in self._stderr if x)[-300:]

    def read(self) -> tuple[bool, np.ndarray | None]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + self.read_timeout_s
        while True:
            end = self._buf.find(b"\xff\xd9")
            if end >= 0:
                start = self._buf.find(b"\xff\xd8")
                jpeg = bytes(self._buf[max(start, 0):end + 2])
                del self._buf[:end + 2]
                bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
                return (bgr is not None), bgr
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return False, None
            chunk = os.read(fd, 1 << 16)
            if not chunk:  # the pipeline ended
                return False, None
            self._buf += chunk

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def camera_id(spec: str) -> str:
    """A default camera id for a source: host and path of a URL (no credentials), videoN, a file stem."""
    live = spec.lower().startswith(LIVE_SCHEMES)
    if live:
        rest = spec.split("://", 1)[1]
        rest = rest.split("@", 1)[1] if "@" in rest.split("/", 1)[0] else rest
        text = rest.split("?", 1)[0].rstrip("/")
    else:
        m = _DEVICE_RE.match(spec.strip())
        if m:
            return f"video{m.group(1) or m.group(2)}"
        if "!" in spec and not Path(spec).exists():
            return "gstreamer"
        text = Path(spec).stem if Path(spec).is_file() else (Path(spec).name or spec)
    cleaned = re.sub(r"[^A-Za-z0-9._:/-]+", "-", text).strip("-")
    return cleaned[:120] or "cam"


class LiveSource:
    """Iterate to get a camera's newest frames; a capture thread reads, reconnects and drops the oldest.

    `buffer` frames wait at most (raw, encoded only when taken, so a dropped frame costs no encoding).
    A stream that cannot be read is reopened after `backoff_s`, doubling up to `backoff_max_s`; with
    `max_outage_s` set, an outage that long ends the iteration with a SourceError.
    """

    def __init__(self, spec: str, *, fmt: str = "jpeg", quality: int = 90, buffer: int = 4,
                 backoff_s: float = 0.5, backoff_max_s: float = 10.0, max_outage_s: float | None = None,
                 open_timeout_s: float = 10.0, read_timeout_s: float = 5.0, transport: str = "tcp") -> None:
        parsed = LiveSpec.parse(spec)
        if parsed is None:
            raise SourceError(f"{spec!r} is not a live source (rtsp://, http(s)://, /dev/videoN, an index "
                              "or a GStreamer pipeline)")
        if fmt not in ("jpeg", "png"):
            raise ConfigError(f"unknown image format {fmt!r} (jpeg or png)")
        self.spec = parsed
        self.label = _redact(spec)
        self.fmt, self.quality = fmt, quality
        self.backoff_s, self.backoff_max_s, self.max_outage_s = backoff_s, backoff_max_s, max_outage_s
        self.open_timeout_ms, self.read_timeout_ms = int(open_timeout_s * 1000), int(read_timeout_s * 1000)
        self.transport = transport
        self.stats = LiveStats()
        self._queue: collections.deque[tuple[np.ndarray, int, int]] = collections.deque(maxlen=max(1, buffer))
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fatal: str | None = None

    # --- capture thread ---------------------------------------------------------------------------
    def _open(self) -> Any:
        if self.spec.backend == GST_LAUNCH_BACKEND:
            gst = GstLaunchCapture(str(self.spec.target), self.read_timeout_ms / 1000)
            if gst.opened(self.open_timeout_ms / 1000):
                return gst
            gst.release()
            log.warning("%s: %s", GST_LAUNCH, gst.error or "ended before the first frame")
            return None
        if self.spec.backend == cv2.CAP_FFMPEG and self.spec.kind.startswith("rtsp"):
            # OpenCV reads FFmpeg options from the environment; TCP survives loss and NAT better than UDP
            os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", f"rtsp_transport;{self.transport}")
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, self.open_timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                  self.read_timeout_ms]
        cap = cv2.VideoCapture(self.spec.target, self.spec.backend, params)
        if not cap.isOpened():
            cap.release()
            return None
        return cap

    def _capture(self) -> None:
        backoff = self.backoff_s
        outage_since: float | None = None
        connected_before = False
        index = 0
        while not self._stop.is_set():
            cap = self._open()
            if cap is None:
                self.stats.failures += 1
                self.stats.last_error = f"cannot open {self.label}"
                now = time.monotonic()
                outage_since = outage_since or now
                if self.max_outage_s is not None and now - outage_since >= self.max_outage_s:
                    self._fatal = f"{self.label}: no frames for {now - outage_since:.0f} s ({self.stats.last_error})"
                    break
                log.warning("%s; retrying in %.1f s", self.stats.last_error, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)
                continue
            if connected_before:
                self.stats.reconnects += 1
                log.info("%s: reconnected (reconnect %d)", self.label, self.stats.reconnects)
            connected_before = True
            got_frame = False
            try:
                while not self._stop.is_set():
                    ok, bgr = cap.read()
                    if not ok or bgr is None:
                        self.stats.failures += 1
                        self.stats.last_error = f"{self.label}: stream lost"
                        log.warning("%s; reconnecting", self.stats.last_error)
                        break
                    if not got_frame:
                        got_frame, backoff, outage_since = True, self.backoff_s, None
                    self.stats.captured += 1
                    with self._cond:
                        if len(self._queue) == self._queue.maxlen:
                            self.stats.dropped += 1  # deque(maxlen) drops the oldest on append
                        self._queue.append((bgr, time.time_ns(), index))
                        self._cond.notify()
                    index += 1
            finally:
                cap.release()
            if not got_frame:
                outage_since = outage_since or time.monotonic()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)
        with self._cond:
            self._cond.notify_all()

    # --- consumer ----------------------------------------------------------------------------------
    def start(self) -> LiveSource:
        if self._thread is None:
            self._thread = threading.Thread(target=self._capture, name="anoclip-capture", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.read_timeout_ms / 1000 + 2))

    def __iter__(self) -> Iterator[SourceFrame]:
        self.start()
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stop.is_set() and self._fatal is None:
                        self._cond.wait(0.5)
                    if self._fatal is not None and not self._queue:
                        raise SourceError(self._fatal)
                    if self._stop.is_set():
                        return
                    bgr, ts, i = self._queue.popleft()
                data, ctype = encode_bgr(bgr, self.fmt, self.quality)
                self.stats.sent += 1
                yield SourceFrame(data, ctype, f"{self.spec.kind}#{i}", capture_ts_ns=ts)
        finally:
            self.close()


def _redact(spec: str) -> str:
    """The source as logs may show it: a URL's password replaced."""
    return re.sub(r"(://[^:/@]+:)[^@/]+@", r"\1***@", spec)


# --- synthetic --------------------------------------------------------------------------------------


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


def is_live(spec: str) -> bool:
    """True for cameras and streams (URLs, devices, GStreamer pipelines), which never end by themselves."""
    try:
        return LiveSpec.parse(spec) is not None
    except SourceError:
        return True


def open_source(spec: str, *, kind: str | None = None, size: int = 256, seed: int = 0,
                defect_rate: float = 0.3, loop: bool = False, fmt: str = "jpeg",
                live: dict[str, Any] | None = None) -> Iterator[SourceFrame] | LiveSource:
    """`synthetic`, a live source (URL, device, GStreamer pipeline), a folder, a video or an image file.

    `live` holds `LiveSource` options (buffer, backoff_s, max_outage_s, ...). A live source is returned
    as the `LiveSource` itself (iterable, with `stats`).
    """
    if spec == "synthetic":
        if kind is None:
            raise SourceError("synthetic frames need a part kind")
        return synthetic_frames(kind, size=size, seed=seed, defect_rate=defect_rate, fmt=fmt)
    if LiveSpec.parse(spec) is not None:
        return LiveSource(spec, fmt=fmt, **(live or {}))
    p = Path(spec)
    if p.is_dir():
        return folder_frames(p, loop=loop)
    if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
        return video_frames(p, loop=loop, fmt=fmt)
    if p.is_file() and p.suffix.lower() in set(SUFFIX_TYPES) | REENCODED_SUFFIXES:
        return _file_frames([p], p, loop)
    if p.is_file():
        raise SourceError(f"{p}: not an image, a folder or a video ({', '.join(sorted(VIDEO_SUFFIXES))})")
    raise SourceError(f"source {spec!r} is not 'synthetic', a camera or stream URL (rtsp://, http://), a device "
                      "(/dev/videoN or an index), a GStreamer pipeline, a folder, a video or an image file")
