"""`anoclip produce`: a camera simulator and bridge that sends frames to the frames topic.

Each frame is one record: the encoded image as value, the envelope as headers, the line id as key (so
a line's frames stay ordered in one partition). Sends are asynchronous; a failed send is retried and
a producer that turns fatal (e.g. after a broker restart) is recreated, so the count at the end is what
the broker acknowledged.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kafka.errors import KafkaError

from pipeline.envelope import build_headers
from pipeline.frame_sources import SourceFrame, open_source, synthetic_kind
from pipeline.kafka_io import make_producer
from pipeline.settings import Settings, load_settings

log = logging.getLogger("anoclip.produce")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--line", required=True, help="product line id (the record key)")
    p.add_argument("--source", required=True, help="a folder of JPEG/PNG files, a video file, or 'synthetic'")
    p.add_argument("--fps", type=float, default=10.0, help="frames per second; 0 = as fast as possible (default 10)")
    p.add_argument("--count", type=int, default=None,
                   help="frames to send (default: every file once; synthetic: until Ctrl-C)")
    p.add_argument("--camera", default="cam-1", help="camera id header (default cam-1)")
    p.add_argument("--loop", action="store_true", help="repeat a folder or video until --count")
    p.add_argument("--kind", default=None, help="synthetic part kind (default: the line id or class name)")
    p.add_argument("--size", type=int, default=256, help="synthetic image size in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="synthetic seed (default 0)")
    p.add_argument("--defect-rate", type=float, default=0.3, help="share of synthetic parts with a defect")
    p.add_argument("--format", choices=["jpeg", "png"], default="jpeg", help="encoding of generated frames")
    p.add_argument("--config", default=None, help="config file (default: $ANOCLIP_CONFIG or ./config.yaml)")


@dataclass
class ProduceStats:
    sent: int = 0
    acked: int = 0
    failed: int = 0
    frame_ids: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


def new_frame_id(line: str) -> str:
    return f"{line}.{uuid.uuid4().hex}"


class FrameProducer:
    """Sends frames; retries failed sends and recreates the client after a fatal error."""

    def __init__(self, settings: Settings, *, max_attempts: int = 5) -> None:
        self.settings = settings
        self.topic = settings.kafka.frames_topic
        self.max_attempts = max_attempts
        self._producer = make_producer(settings.kafka)
        self._retry: deque[tuple[bytes, bytes, list[tuple[str, bytes]], int]] = deque()
        self._fatal = False
        self._lock = threading.Lock()  # callbacks run on the client's network thread
        self.stats = ProduceStats()

    def send(self, line: str, frame: SourceFrame, *, camera: str = "cam-1", frame_id: str | None = None,
             capture_ts_ns: int | None = None) -> str:
        fid = frame_id or new_frame_id(line)
        headers = build_headers(fid, line, camera, capture_ts_ns or time.time_ns(), frame.content_type,
                                extra=frame.extra_headers)
        self._send(line.encode(), frame.data, headers, 1)
        self.stats.sent += 1
        self.stats.frame_ids.append(fid)
        return fid

    def send_raw(self, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        """Any record, as is (tests use it to send malformed frames)."""
        self._send(key, value, headers, self.max_attempts)
        self.stats.sent += 1

    def _send(self, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]], attempt: int) -> None:
        self._service()
        fut = self._producer.send(self.topic, key=key, value=value, headers=headers)
        fut.add_callback(self._on_ok)
        fut.add_errback(self._on_error, key, value, headers, attempt)

    def _on_ok(self, _meta: object) -> None:
        with self._lock:
            self.stats.acked += 1

    def _on_error(self, key: bytes, value: bytes, headers: list[tuple[str, bytes]], attempt: int,
                  exc: Exception) -> None:
        retriable = isinstance(exc, KafkaError) and getattr(exc, "retriable", False)
        if not retriable:
            self._fatal = True
        if attempt < self.max_attempts:
            log.warning("send failed (attempt %d): %s; retrying", attempt, exc)
            self._retry.append((key, value, headers, attempt + 1))
        else:
            log.error("send failed after %d attempts, frame not delivered: %s", attempt, exc)
            with self._lock:
                self.stats.failed += 1

    def _service(self) -> None:
        if self._fatal:
            log.warning("recreating the Kafka producer after a fatal error")
            with contextlib.suppress(Exception):  # a broken client may fail to close; it is replaced anyway
                self._producer.close(timeout=1)
            self._producer = make_producer(self.settings.kafka)
            self._fatal = False
        while self._retry:
            key, value, headers, attempt = self._retry.popleft()
            fut = self._producer.send(self.topic, key=key, value=value, headers=headers)
            fut.add_callback(self._on_ok)
            fut.add_errback(self._on_error, key, value, headers, attempt)

    def flush(self, timeout_s: float = 60.0) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            self._service()
            self._producer.flush(timeout=max(0.1, end - time.monotonic()))
            if not self._retry and self.stats.acked + self.stats.failed >= self.stats.sent:
                return
            time.sleep(0.1)

    def close(self) -> None:
        self.flush()
        self._producer.close(timeout=5)


def produce(settings: Settings, line: str, frames: Iterable[SourceFrame], *, fps: float = 10.0,
            count: int | None = None, camera: str = "cam-1",
            on_sent: Callable[[int, str], None] | None = None) -> ProduceStats:
    """Send `frames` (at most `count`) at `fps`; returns what was sent and acknowledged."""
    producer = FrameProducer(settings)
    interval = 1.0 / fps if fps > 0 else 0.0
    t0 = time.monotonic()
    try:
        for i, frame in enumerate(itertools.islice(frames, count)):
            if interval:
                delay = t0 + i * interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            fid = producer.send(line, frame, camera=camera)
            if on_sent:
                on_sent(i + 1, fid)
    finally:
        producer.close()
        producer.stats.elapsed_s = time.monotonic() - t0
    return producer.stats


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    line = settings.line(args.line)  # unknown lines are refused here, not only in the worker's DLQ
    kind = args.kind
    if args.source == "synthetic" and kind is None:
        kind = synthetic_kind(line.id, line.class_name)
    frames = open_source(args.source, kind=kind, size=args.size, seed=args.seed, defect_rate=args.defect_rate,
                         loop=args.loop, fmt=args.format)
    logging.getLogger("kafka").setLevel(logging.WARNING)

    def progress(n: int, fid: str) -> None:
        if n == 1 or n % 50 == 0:
            print(f"sent {n} frames (last {fid})", file=sys.stderr, flush=True)

    try:
        stats = produce(settings, line.id, frames, fps=args.fps, count=args.count, camera=args.camera,
                        on_sent=progress)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    rate = stats.sent / stats.elapsed_s if stats.elapsed_s > 0 else 0.0
    print(f"sent {stats.sent} frames to {settings.kafka.frames_topic} for line {line.id} "
          f"({stats.acked} acknowledged, {stats.failed} failed) in {stats.elapsed_s:.1f} s = {rate:.1f} frames/s")
    return 0 if stats.failed == 0 and stats.acked == stats.sent else 1
