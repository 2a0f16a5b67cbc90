"""Sending frames to the frames topic: the producer used by `anoclip produce`, the demo and the tests.

Each frame is one record: the encoded image as value, the envelope as headers, and as key the frame id
(`kafka.partition_key`, see `record_key`), so one line's frames spread over every partition and as many
workers as partitions share a line. Sends are asynchronous; a failed send is retried and
a producer that turns fatal (e.g. after a broker restart) is recreated, so the count at the end is what
the broker acknowledged.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kafka.errors import KafkaError

from pipeline.settings import Settings
from pipeline.streaming.envelope import build_headers
from pipeline.streaming.frame_sources import SourceFrame
from pipeline.streaming.kafka_io import make_producer

log = logging.getLogger("anoclip.produce")


@dataclass
class ProduceStats:
    sent: int = 0
    acked: int = 0
    failed: int = 0
    frame_ids: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


def new_frame_id(line: str) -> str:
    return f"{line}.{uuid.uuid4().hex}"


def record_key(partition_key: str, frame_id: str, line: str, camera: str) -> bytes:
    """The Kafka key of a frame, which picks its partition (`kafka.partition_key`).

    `frame` (default): the frame id. A line spreads over all partitions, so its frames are scored by every
    worker in parallel; nothing per line needs them in order: thresholds calibrate on a quantile of the
    warm-up scores (any sample of the line's frames will do), TTA buffers admit frames by robust statistics
    of a window, adapters are versioned in Redis and served to every worker alike, and the line's `latest`
    keys move by capture time, never by arrival. A resend of the same frame id lands on the same partition,
    after the original, where it is skipped as a replay. `camera`: one camera's frames in order on one
    partition. `line`: the old keying, one partition (one worker) per line.
    """
    return {"frame": frame_id, "camera": camera, "line": line}[partition_key].encode()


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
        """Queue one frame. Its envelope's capture time: `capture_ts_ns` if given, else when a live source grabbed
        it (`frame.capture_ts_ns`: a frame that waited for the broker keeps its age), else the send time."""
        fid = frame_id or new_frame_id(line)
        ts = (capture_ts_ns if capture_ts_ns is not None else frame.capture_ts_ns) or time.time_ns()
        headers = build_headers(fid, line, camera, ts, frame.content_type, extra=frame.extra_headers)
        self._send(record_key(self.settings.kafka.partition_key, fid, line, camera), frame.data, headers, 1)
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
