"""The dead-letter topic: frames that cannot be scored go there with the reason, and count as finished
once the broker acknowledges them. A failed send is retried after a backoff; a producer that turned
fatal (e.g. after a broker restart) is replaced."""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafka.errors import KafkaError

from pipeline.observability.telemetry import WorkerTelemetry
from pipeline.settings import KafkaSettings
from pipeline.streaming import envelope
from pipeline.streaming.kafka_io import make_producer
from pipeline.streaming.worker.frames import DlqFailed, Done, Frame

log = logging.getLogger("anoclip.worker")

DLQ_VALUE_MARGIN = 1 << 20
"""Headroom under `max_request_size` for headers and framing."""


@dataclass
class DeadLetters:
    """Sends to the DLQ from any thread; completions go to the poll thread's queue."""

    kafka: KafkaSettings
    telemetry: WorkerTelemetry
    completions: queue.Queue[Done | DlqFailed]
    retry_backoff_s: float
    producer: Any = None
    _retry: list[tuple[float, Frame, str, str]] = field(default_factory=list)
    """(due time, frame, reason, stage) of sends to try again."""

    def connect(self) -> None:
        """Create the producer (raises KafkaError while the broker is away). A DLQ send must not block the
        poll loop for long when the broker is away: it fails and is retried."""
        self.producer = self.producer or make_producer(self.kafka, max_block_ms=5000)

    def send(self, frame: Frame, reason: str, stage: str) -> None:
        """Send a frame to the DLQ; it counts as finished once the broker acknowledges it."""
        value = frame.value
        headers = envelope.dlq_headers(frame.headers, reason, stage, frame.tp.topic, frame.tp.partition, frame.offset)
        if value is not None and len(value) > self.kafka.max_request_size - DLQ_VALUE_MARGIN:
            headers.append(("value-dropped", f"original value of {len(value)} bytes is too large to re-send".encode()))
            value = b""
        log.info("dead letter: %s/%d offset %d stage=%s reason=%s", frame.tp.topic, frame.tp.partition, frame.offset,
                 stage, reason)
        try:
            fut = self.producer.send(self.kafka.dlq_topic, key=frame.key, value=value, headers=headers)
        except KafkaError as e:
            self.completions.put(DlqFailed(frame, reason, stage, e))
            return
        fut.add_callback(lambda _m: self._acknowledged(frame, stage))
        fut.add_errback(lambda e: self.completions.put(DlqFailed(frame, reason, stage, e)))

    def _acknowledged(self, frame: Frame, stage: str) -> None:
        self.telemetry.frames_dead_lettered.labels(frame.line_label, stage).inc()
        self.completions.put(Done(frame))

    def failed(self, item: DlqFailed) -> None:
        """Schedule a failed send again (poll thread)."""
        if isinstance(item.error, KafkaError) and not getattr(item.error, "retriable", True):
            self._renew_producer(item.error)
        log.warning("DLQ send of offset %s/%d failed (%s); retrying in %.1f s",
                    item.frame.tp, item.frame.offset, item.error, self.retry_backoff_s)
        self._retry.append((time.monotonic() + self.retry_backoff_s, item.frame, item.reason, item.stage))

    def retry_due(self, still_owned: Callable[[Frame], bool]) -> None:
        """Resend what is due, skipping frames of partitions that moved on (their new owner re-reads them)."""
        if not self._retry:
            return
        now = time.monotonic()
        due = [x for x in self._retry if x[0] <= now]
        self._retry = [x for x in self._retry if x[0] > now]
        for _, frame, reason, stage in due:
            if still_owned(frame):
                self.send(frame, reason, stage)

    def _renew_producer(self, error: Exception) -> None:
        """A producer that hit a fatal error (e.g. after a broker restart) never recovers: replace it."""
        log.warning("DLQ producer failed fatally (%s); recreating it", error)
        old, self.producer = self.producer, make_producer(self.kafka, max_block_ms=5000)
        with contextlib.suppress(Exception):
            old.close(timeout=0)

    def close(self) -> None:
        if self.producer is not None:
            try:
                self.producer.close(timeout=5)
            except Exception as e:
                log.warning("closing the DLQ producer: %s", e)
