"""The publisher thread: results into Redis, idempotently, retried with backoff while Redis is away.
A frame counts as finished (its offset committable) only once it is in Redis."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from pipeline.redis_client import RETRYABLE
from pipeline.settings import WorkerSettings
from pipeline.streaming.redis_io import FrameOutput, ResultPublisher
from pipeline.streaming.worker.frames import DlqFailed, Done, Frame
from pipeline.telemetry import Health, WorkerTelemetry

log = logging.getLogger("anoclip.worker")


class RedisStatus:
    """Whether Redis answered last time; the poll thread pauses partitions while it does not."""

    def __init__(self, health: Health, telemetry: WorkerTelemetry) -> None:
        self.health = health
        self.telemetry = telemetry
        self.ok = True

    def set(self, ok: bool) -> None:
        self.ok = ok
        self.health.redis_ok = ok
        self.telemetry.redis_up.set(1 if ok else 0)


@dataclass
class ResultPublishing:
    """Drains the publish queue into Redis in coalesced round trips (publisher thread only)."""

    publisher: ResultPublisher
    worker: WorkerSettings
    telemetry: WorkerTelemetry
    redis: RedisStatus
    completions: queue.Queue[Done | DlqFailed]
    abandon: threading.Event
    published_total: int = 0
    """Frames handled (written now, or found already written by a replay)."""

    def run(self, items_q: queue.Queue[list[tuple[Frame, FrameOutput]] | None]) -> None:
        while True:
            item = items_q.get()
            if item is None:
                return
            items = list(item)
            while len(items) < 4 * self.worker.max_batch:  # coalesce what is queued into one round trip
                try:
                    more = items_q.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    items_q.put(None)
                    break
                items.extend(more)
            if not self.publish_with_retry(items):
                # abandoned on shutdown with Redis away: drop remaining work; nothing was committed for it
                while True:
                    try:
                        if items_q.get_nowait() is None:
                            return
                    except queue.Empty:
                        return

    def publish_with_retry(self, items: list[tuple[Frame, FrameOutput]]) -> bool:
        """Publish until it works (True) or shutdown abandons the batch (False)."""
        backoff = self.worker.retry_backoff_s
        attempt = 0
        while True:
            try:
                written = self.publisher.publish([o for _, o in items])
                break
            except Exception as e:  # RETRYABLE plus anything unexpected: never lose the batch
                attempt += 1
                self.redis.set(False)
                self.telemetry.redis_errors.inc()
                level = logging.WARNING if isinstance(e, RETRYABLE) else logging.ERROR
                if attempt == 1 or attempt % 10 == 0:
                    log.log(level, "publishing %d results failed (attempt %d): %s; retrying in %.1f s",
                            len(items), attempt, e, backoff)
                if self.abandon.wait(backoff):
                    log.warning("shutting down with %d results unpublished; their offsets stay uncommitted",
                                len(items))
                    return False
                backoff = min(backoff * 2, self.worker.retry_backoff_max_s)
        if attempt:
            log.info("Redis is back: published %d results after %d failed attempts", len(items), attempt)
        self.redis.set(True)
        now_ns = time.time_ns()
        for (f, out), new in zip(items, written, strict=True):
            r = out.result
            if new:
                self.telemetry.frames_scored.labels(r.line).inc()
                self.telemetry.anomaly_score.labels(r.line).observe(r.score)
                self.telemetry.e2e_seconds.labels(r.line).observe(max(0.0, (now_ns - r.capture_ts_ns) / 1e9))
                if r.anomalous:
                    self.telemetry.alerts.labels(r.line).inc()
            else:
                self.telemetry.duplicates_skipped.labels(r.line).inc()
            self.published_total += 1
            self.completions.put(Done(f))
        return True
