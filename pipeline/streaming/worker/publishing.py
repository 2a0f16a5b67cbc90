"""The publisher thread: results into Redis, idempotently, retried with backoff while Redis is away.
A frame counts as finished (its offset committable) only once it is in Redis, or, when its id was published
before with other content, once that frame is in the DLQ."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.observability.telemetry import Health, WorkerTelemetry
from pipeline.services.redis_client import RETRYABLE, describe_redis_error, redis_problem
from pipeline.settings import WorkerSettings
from pipeline.streaming import envelope
from pipeline.streaming.redis_io import CONFLICT, WRITTEN, FrameOutput, ResultPublisher
from pipeline.streaming.worker.frames import DlqFailed, Done, Frame

log = logging.getLogger("anoclip.worker")


class RedisStatus:
    """Whether Redis works; the poll thread pauses partitions while it does not.

    Two views are combined: housekeeping's probe (`set`, a PING: can Redis be reached?) and the publisher's
    last write (`set_publish`: does it take our writes?). A Redis that answers PING but refuses writes (out
    of memory, an ACL) is not ready, and the probe alone must not flap it back to ready. Errors that waiting
    will not fix are named (`problem`) in logs and in `/readyz`.
    """

    def __init__(self, health: Health, telemetry: WorkerTelemetry,
                 probe_error: Callable[[], BaseException | None] | None = None) -> None:
        self.health = health
        self.telemetry = telemetry
        self.probe_error = probe_error
        """The error of the last failed probe (the publisher's `last_error`), to name it."""
        self._probe_ok = True
        self._publish_ok = True
        self._probe_problem: str | None = None
        self._publish_problem: str | None = None

    @property
    def ok(self) -> bool:
        return self._probe_ok and self._publish_ok

    @property
    def problem(self) -> str | None:
        return self._publish_problem or self._probe_problem

    def set(self, ok: bool, error: BaseException | None = None) -> None:
        """Housekeeping's probe result."""
        if not ok and error is None and self.probe_error is not None:
            error = self.probe_error()
        self._probe_ok, self._probe_problem = ok, (None if ok else redis_problem(error))
        self._publish()

    def set_publish(self, ok: bool, error: BaseException | None = None) -> None:
        """The publisher's last write."""
        self._publish_ok, self._publish_problem = ok, (None if ok else redis_problem(error))
        self._publish()

    def describe(self) -> str:
        return self.problem or "Redis unreachable"

    def _publish(self) -> None:
        self.health.redis_ok = self.ok
        self.health.redis_problem = self.problem
        self.telemetry.redis_up.set(1 if self.ok else 0)


@dataclass
class ResultPublishing:
    """Drains the publish queue into Redis in coalesced round trips (publisher thread only)."""

    publisher: ResultPublisher
    worker: WorkerSettings
    telemetry: WorkerTelemetry
    redis: RedisStatus
    completions: queue.Queue[Done | DlqFailed]
    abandon: threading.Event
    dead_letter: Callable[[Frame, str, str], None] | None = None
    """(frame, reason, stage): sends a frame whose id was published before with other content to the DLQ."""
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
                self.redis.set_publish(False, e)
                self.telemetry.redis_errors.inc()
                problem = redis_problem(e)
                if problem:  # waiting will not fix it: say what will, and do not hammer Redis meanwhile
                    backoff = self.worker.retry_backoff_max_s
                level = logging.WARNING if isinstance(e, RETRYABLE) and not problem else logging.ERROR
                if attempt == 1 or attempt % 10 == 0:
                    log.log(level, "publishing %d results failed (attempt %d): %s; retrying in %.1f s",
                            len(items), attempt, describe_redis_error(e), backoff)
                if self.abandon.wait(backoff):
                    log.warning("shutting down with %d results unpublished; their offsets stay uncommitted",
                                len(items))
                    return False
                backoff = min(backoff * 2, self.worker.retry_backoff_max_s)
        if attempt:
            log.info("Redis is back: published %d results after %d failed attempts", len(items), attempt)
        self.redis.set_publish(True)
        now_ns = time.time_ns()
        for (f, out), outcome in zip(items, written, strict=True):
            r = out.result
            if outcome == CONFLICT:
                self.conflict(f, out)
                continue
            if outcome == WRITTEN:
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

    def conflict(self, f: Frame, out: FrameOutput) -> None:
        """A frame id published before with other content: counted, and the frame dead-lettered (it finishes
        when the DLQ acknowledges it). A true replay, same content, is a duplicate and skipped silently."""
        r = out.result
        self.telemetry.frame_id_conflicts.labels(r.line).inc()
        reason = (f"frame id {r.frame_id!r} was already published with other content (digest "
                  f"{out.content_digest()[:16]} differs): the producer reused an id; this frame was not published")
        log.warning("line %s: %s", r.line, reason)
        if self.dead_letter is None:  # no DLQ wired (tests): never lose track of the frame
            self.completions.put(Done(f))
            return
        self.dead_letter(f, reason, envelope.STAGE_CONFLICT)
