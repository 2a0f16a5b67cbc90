"""The inspection worker: one consumer-group member that runs the parts of this package together.

Threads, so the poll loop never blocks on work:
- poll (the caller's thread, here): owns the consumer. Validates headers, micro-batches frames per line
  (`batching`), hands batches to the scorer, commits offsets as frames finish (`pipeline.streaming.
  offsets`), pauses partitions for backpressure and while Redis is away, and answers rebalances
  (`rebalance`).
- scorer (`scoring`): decodes images and runs the model; frames that cannot be scored go to the DLQ
  (`dead_letters`).
- publisher (`publishing`): writes results to Redis (idempotent per frame id), retrying with backoff
  while Redis is down; a frame counts as finished only once it is in Redis.
- housekeeping (`housekeeping`): heartbeat hash, threshold state and run-time overrides, Redis readiness.
- memory-builder (`pipeline.adaptation.memory.service`, `memory: stream` lines only): builds and publishes
  patch-memory banks and follows the registry's current bank; the scorer swaps banks in between batches.
- lag (`lag`): consumer lag from the broker's end and committed offsets, on a client of its own (the
  poll thread's fetcher sees nothing while partitions are paused), and the broker's readiness.

Delivery: at-least-once. An offset is committed only when every frame before it is in Redis or in the
DLQ; replays after a crash find the frame's done marker and write nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from pipeline.adaptation.memory.service import MemoryService
from pipeline.adaptation.registry import VersionRegistry
from pipeline.adaptation.tta.service import AdapterService
from pipeline.errors import ConfigError
from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.observability.telemetry import Health, TelemetryServer, WorkerTelemetry
from pipeline.services.redis_client import RETRYABLE
from pipeline.settings import Settings
from pipeline.streaming import envelope
from pipeline.streaming.envelope import EnvelopeError
from pipeline.streaming.kafka_io import make_consumer
from pipeline.streaming.offsets import OffsetBook
from pipeline.streaming.redis_io import FrameOutput, ResultPublisher
from pipeline.streaming.worker.batching import LineBatcher
from pipeline.streaming.worker.dead_letters import DeadLetters
from pipeline.streaming.worker.frames import Batch, DlqFailed, Done, Frame
from pipeline.streaming.worker.housekeeping import Housekeeping
from pipeline.streaming.worker.lag import LagMonitor
from pipeline.streaming.worker.publishing import RedisStatus, ResultPublishing
from pipeline.streaming.worker.rebalance import Rebalancer
from pipeline.streaming.worker.scoring import BatchScorer

log = logging.getLogger("anoclip.worker")


class InspectionWorker:
    """One consumer-group member. `run()` blocks until `stop()` (or SIGTERM) and returns an exit code."""

    def __init__(self, settings: Settings, *, worker_id: str | None = None, inspector: FrameScorer | None = None,
                 metrics_port: int | None = None) -> None:
        self.settings = settings
        self.kafka, self.worker_settings = settings.kafka, settings.worker
        ws = self.worker_settings
        self.worker_id = worker_id or ws.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.lines = {line.id for line in settings.lines}
        if not self.lines:
            raise ConfigError("no lines configured: the worker would dead-letter every frame")
        self.telemetry = WorkerTelemetry()
        self.health = Health(stall_after_s=max(30.0, self.kafka.max_poll_interval_ms / 2000))
        self.metrics_port = ws.metrics_port if metrics_port is None else metrics_port
        self.telemetry_port = 0
        self.publisher = ResultPublisher.from_settings(settings.redis, self.worker_id)
        self.redis = RedisStatus(self.health, self.telemetry, lambda: self.publisher.last_error)

        self._stop = threading.Event()
        self._abandon = threading.Event()
        self.completions: queue.Queue[Done | DlqFailed] = queue.Queue()
        self._score_q: queue.Queue[Batch | None] = queue.Queue()
        self._publish_q: queue.Queue[list[tuple[Frame, FrameOutput]] | None] = queue.Queue()
        self.offsets = OffsetBook()
        self.batcher = LineBatcher(ws.max_batch, ws.max_wait_ms)
        self.dead_letters = DeadLetters(self.kafka, self.telemetry, self.completions, ws.retry_backoff_s)
        self.rebalancer = Rebalancer(self.offsets, self.batcher, self.telemetry, self.health)
        self.publishing = ResultPublishing(self.publisher, ws, self.telemetry, self.redis, self.completions,
                                           self._abandon, self.dead_letters.send)
        self.lag = LagMonitor(self.kafka, self.telemetry, self.health, lambda: list(self.rebalancer.assigned))
        self._inspector = inspector
        self.inspector: FrameScorer | None = None
        self.adapters: AdapterService | None = None
        self.memory: MemoryService | None = None
        self.housekeeping: Housekeeping | None = None
        self._consumer: Any = None
        self._threads: list[threading.Thread] = []
        self._last_commit = 0.0
        self._in_flight_count = 0
        self._started = time.time()

    @property
    def consumer(self) -> Any:
        return self._consumer

    @consumer.setter
    def consumer(self, consumer: Any) -> None:
        self._consumer = self.rebalancer.consumer = consumer

    # --- lifecycle ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the worker to drain and leave (safe from signal handlers and other threads)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: object) -> None:
            log.info("signal %s: draining", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _load_model(self) -> FrameScorer:
        t0 = time.monotonic()
        insp = self._inspector or FrameScorer.from_settings(self.settings)
        for line in sorted(self.lines):
            insp.prepare_line(line)
        # Warm up once per line outside calibration (score_raw does not feed the thresholds).
        dummy = np.full((64, 64, 3), 128, dtype=np.uint8)
        full = min(self.worker_settings.max_batch, self.settings.model.batch_size)
        for line in sorted(self.lines):
            insp.score_raw(line, [dummy])
            if full > 1:  # the full batch shape too, so the first busy batch does not pay for it
                insp.score_raw(line, [dummy] * full)
        log.info("model ready: arch=%s lines=%s in %.1f s", self.settings.model.arch, ",".join(sorted(self.lines)),
                 time.monotonic() - t0)
        return insp

    def run(self) -> int:
        ws = self.worker_settings
        try:
            server = TelemetryServer(self.telemetry, self.health, ws.metrics_host, self.metrics_port).start()
        except OSError as e:
            raise ConfigError(f"cannot serve metrics on {ws.metrics_host}:{self.metrics_port}: {e}") from e
        self.telemetry_port = server.port
        log.info("worker %s: metrics and health on http://%s:%d (/metrics /healthz /readyz)",
                 self.worker_id, ws.metrics_host, server.port)
        try:
            self.publisher.check_access()  # a wrong password or ACL fails here, naming the keys, not forever later
            self.inspector = self._load_model()
            self.health.model_loaded = True
            self.telemetry.redis_up.set(0)
            self.housekeeping = Housekeeping(self.settings, self.inspector, self.publisher, self.telemetry,
                                             self.redis, self._heartbeat_fields)
            self.housekeeping.once()
            self._start_adapters(self.inspector)
            self._start_memory(self.inspector)
            if not self._connect_kafka():
                return 0
            self._start_threads(self.inspector)
            self.consumer.subscribe([self.kafka.frames_topic], listener=self.rebalancer)
            log.info("joined group %s on topic %s (bootstrap %s)", self.kafka.group_id, self.kafka.frames_topic,
                     self.kafka.bootstrap_servers)
            self._poll_loop()
            self._drain()
            return 0
        finally:
            self._shutdown()
            server.stop()

    def _connect_kafka(self) -> bool:
        """Create the clients, waiting out an unreachable broker (no exit, so no crash loop); False if stopped."""
        backoff = self.worker_settings.retry_backoff_s
        while not self._stop.is_set():
            self.health.tick()
            try:
                self.dead_letters.connect()
                self.consumer = make_consumer(self.kafka)
                return True
            except KafkaError as e:
                log.warning("Kafka at %s unreachable (%s); retrying in %.1f s", self.kafka.bootstrap_servers, e,
                            backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.worker_settings.retry_backoff_max_s)
        return False

    def _start_adapters(self, inspector: FrameScorer) -> None:
        """Buffered TTA: serve each line's registry adapter and refresh it (`pipeline.adaptation.tta.service`)."""
        if self.settings.tta.mode != "buffered":
            return
        registry = VersionRegistry(self.publisher.client, self.publisher.keys)
        self.adapters = AdapterService(inspector, registry, sorted(self.lines), self.worker_id, self.telemetry)
        for line in sorted(self.lines):
            with contextlib.suppress(*RETRYABLE):  # Redis down: the service's own loop catches up
                self.adapters.sync(line)
        self.adapters.start()

    def _start_memory(self, inspector: FrameScorer) -> None:
        """`memory: stream` lines: score with the line's patch memory, build banks off the scoring thread and
        serve the registry's current bank (`pipeline.adaptation.memory.service`, docs/memory.md)."""
        lines = sorted(x.id for x in self.settings.lines if x.memory == "stream")
        if not lines:
            return
        registry = VersionRegistry(self.publisher.client, self.publisher.keys, kind="banks")
        self.memory = MemoryService(inspector, registry, lines, self.worker_id, self.telemetry,
                                    poll_s=self.settings.tta.trainer_poll_s)
        for line in lines:
            with contextlib.suppress(*RETRYABLE):  # Redis down: the builder thread's loop catches up
                self.memory.sync(line)
        self.memory.start()

    def _start_threads(self, inspector: FrameScorer) -> None:
        scorer = BatchScorer(self.settings, self.worker_id, inspector, self.adapters, self.telemetry,
                             self.dead_letters.send, self._publish_q, self.memory)
        assert self.housekeeping is not None
        targets: tuple[tuple[str, Callable[[], None]], ...] = (
            ("scorer", lambda: scorer.run(self._score_q)),
            ("publisher", lambda: self.publishing.run(self._publish_q)),
            ("housekeeping", lambda: self.housekeeping.run(self._stop)),  # type: ignore[union-attr]
            ("lag", lambda: self.lag.run(self._stop)),
        )
        for name, target in targets:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    # --- poll thread ----------------------------------------------------------------------------
    def _poll_loop(self) -> None:
        ws = self.worker_settings
        while not self._stop.is_set():
            self.health.tick()
            self.process_completions()
            self.dead_letters.retry_due(self._still_owned)
            self._dispatch(self.batcher.due())
            self._maybe_commit()
            self._apply_pause()
            budget = max(1, ws.max_in_flight - self.in_flight())
            records = self.consumer.poll(timeout_ms=self.batcher.poll_timeout_ms(),
                                         max_records=min(budget, self.kafka.max_poll_records))
            for tp, recs in records.items():
                for rec in recs:
                    self._accept(tp, rec)
            self._dispatch(self.batcher.due())

    def in_flight(self) -> int:
        n = self.offsets.in_flight()
        self._in_flight_count = n
        self.telemetry.in_flight.set(n)
        return n

    def _still_owned(self, frame: Frame) -> bool:
        return self.offsets.is_current(frame.tp, frame.epoch)

    def _accept(self, tp: TopicPartition, rec: Any) -> None:
        po = self.offsets.track(tp)  # records only come for assigned partitions, tracked on assignment
        po.add(rec.offset)
        frame = Frame(tp, po.epoch, rec.offset, rec.key, rec.value, list(rec.headers or []))
        try:
            meta = envelope.parse_meta(frame.headers)
            frame.meta = meta
            envelope.check_payload(rec.value, meta.content_type, self.worker_settings.max_frame_bytes)
            if meta.line not in self.lines:
                raise EnvelopeError(f"unknown line {meta.line!r} (configured lines: {', '.join(sorted(self.lines))})",
                                    envelope.STAGE_LINE)
        except EnvelopeError as e:
            if frame.meta is not None and frame.meta.line not in self.lines:
                frame.meta = None  # keep garbage out of metric labels
            self.telemetry.frames_consumed.labels(frame.line_label).inc()
            self.dead_letters.send(frame, e.reason, e.stage)
            return
        self.telemetry.frames_consumed.labels(meta.line).inc()
        self._dispatch([self.batcher.add(meta.line, frame)])

    def _dispatch(self, batches: list[Batch | None]) -> None:
        for b in batches:
            if b is not None:
                self._score_q.put(b)

    def process_completions(self) -> None:
        while True:
            try:
                item = self.completions.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, DlqFailed):
                self.dead_letters.failed(item)
            else:
                f = item.frame
                self.offsets.done(f.tp, f.epoch, f.offset)

    def _maybe_commit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (now - self._last_commit) * 1000 < self.worker_settings.commit_interval_ms:
            return
        offsets = self.offsets.to_commit()
        if not offsets:
            return
        self._last_commit = now
        try:
            self.consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
        except KafkaError as e:  # e.g. a rebalance in progress: commit again on the next turn
            self.telemetry.commits.labels("failed").inc()
            log.warning("offset commit failed, will retry: %s", e)
            return
        self.offsets.mark_committed(offsets)
        self.telemetry.commits.labels("ok").inc()
        log.debug("committed %s", {f"{tp.topic}/{tp.partition}": off for tp, off in offsets.items()})

    def _should_pause(self) -> bool:
        return self._stop.is_set() or not self.redis.ok or self.in_flight() >= self.worker_settings.max_in_flight

    def _apply_pause(self) -> None:
        c = self.consumer
        assigned = c.assignment()
        paused = c.paused()
        if self._should_pause():
            todo = [tp for tp in assigned if tp not in paused]
            if todo:
                c.pause(*todo)
                if not self.redis.ok:
                    log.warning("%s: paused %d partitions, not committing", self.redis.describe(), len(todo))
        elif self.in_flight() <= self.worker_settings.max_in_flight // 2 and paused:
            c.resume(*paused)
            log.info("resumed %d partitions", len(paused))
        self.telemetry.paused.set(1 if c.paused() else 0)

    def _heartbeat_fields(self) -> dict[str, Any]:
        up = time.time() - self._started
        published = self.publishing.published_total
        return {
            "worker": self.worker_id, "host": socket.gethostname(), "pid": os.getpid(),
            "lines": ",".join(sorted(self.lines)), "group": self.kafka.group_id, "topic": self.kafka.frames_topic,
            "partitions": ",".join(str(tp.partition) for tp in list(self.rebalancer.assigned)),
            "frames": published, "frames_per_s": round(published / up, 3) if up > 0 else 0,
            "in_flight": self._in_flight_count, "lag": self.lag.total, "redis_ok": self.redis.ok,
            "started": int(self._started), "last_seen": int(time.time()), "metrics_port": self.telemetry_port,
        }

    # --- drain / stop ---------------------------------------------------------------------------
    def _drain(self) -> int:
        """After stop: finish the frames in hand, publish, commit. Returns frames left unfinished."""
        self.health.stopping = True
        c = self.consumer
        if c.assignment():
            c.pause(*c.assignment())
        self._dispatch(self.batcher.due(force=True))
        end = time.monotonic() + self.worker_settings.drain_timeout_s
        log.info("draining %d frames in hand", self.in_flight())
        while time.monotonic() < end:
            self.process_completions()
            self.dead_letters.retry_due(self._still_owned)
            self._maybe_commit(force=True)
            if self.in_flight() == 0:
                break
            c.poll(timeout_ms=20)  # paused: returns nothing, keeps the client's network loop turning
        self.process_completions()
        self._maybe_commit(force=True)
        left = self.in_flight()
        if left:
            log.warning("drain timed out with %d frames unpublished; they stay uncommitted and will be replayed", left)
        else:
            log.info("drained: everything in hand is published and committed")
        return left

    def _shutdown(self) -> None:
        self._stop.set()
        if self.adapters is not None:
            self.adapters.stop()
        if self.memory is not None:
            self.memory.stop()
        self._abandon.set()
        self._score_q.put(None)
        for t in self._threads:
            if t.name not in ("housekeeping", "lag"):  # both stop on their own when `_stop` is set
                t.join(timeout=10)
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False, timeout_ms=5000)  # leaves the group
                log.info("left group %s", self.kafka.group_id)
            except Exception as e:
                log.warning("closing the consumer: %s", e)
        self.dead_letters.close()
        with contextlib.suppress(*RETRYABLE):
            self.publisher.forget_worker()
