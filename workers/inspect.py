"""`anoclip worker`: frames from Kafka, AnoCLIP verdicts, masks and alerts into Redis.

Threads, so the poll loop never blocks on work:
- poll (main thread): owns the consumer. Validates headers, micro-batches frames per line, hands
  batches to the scorer, commits offsets as frames finish, pauses partitions for backpressure and
  while Redis is away, and answers rebalances.
- scorer: decodes images and runs the model; frames that cannot be scored go to the DLQ.
- publisher: writes results to Redis (idempotent per frame id), retrying with backoff while Redis is
  down; a frame counts as finished only once it is in Redis.
- housekeeping: heartbeat hash, threshold state and run-time overrides, Redis readiness.

Delivery: at-least-once. An offset is committed only when every frame before it is in Redis or in the
DLQ; replays after a crash find the frame's done marker and write nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from pipeline import envelope as env
from pipeline.envelope import EnvelopeError, FrameMeta
from pipeline.errors import ConfigError, ImageError
from pipeline.kafka_io import make_consumer, make_producer
from pipeline.offsets import PartitionOffsets
from pipeline.redis_io import RETRYABLE, FrameOutput, ResultPublisher, manual_override
from pipeline.settings import Settings, load_settings
from pipeline.telemetry import Health, Metrics, TelemetryServer

log = logging.getLogger("anoclip.worker")

UNKNOWN_LINE = "unknown"
DLQ_VALUE_MARGIN = 1 << 20  # headroom under max_request_size for headers and framing


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="config file (default: $ANOCLIP_CONFIG or ./config.yaml)")
    p.add_argument("--worker-id", default=None, help="name in heartbeats and logs (default host-pid)")
    p.add_argument("--metrics-port", type=int, default=None, help="override worker.metrics_port (0 = any free)")
    p.add_argument("--log-format", choices=["text", "json"], default="text", help="log line format")


# --- data passed between threads ------------------------------------------------------------------


@dataclass
class Frame:
    tp: TopicPartition
    epoch: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    meta: FrameMeta | None = None
    polled_at: float = field(default_factory=time.monotonic)

    @property
    def line_label(self) -> str:
        return self.meta.line if self.meta else UNKNOWN_LINE


@dataclass
class Batch:
    line: str
    frames: list[Frame]


@dataclass
class Done:
    """A frame finished (published or dead-lettered): its offset may be committed."""

    frame: Frame


@dataclass
class DlqFailed:
    frame: Frame
    reason: str
    stage: str
    error: Exception


# --- the worker -----------------------------------------------------------------------------------


class InspectionWorker:
    """One consumer-group member. `run()` blocks until `stop()` (or SIGTERM) and returns an exit code."""

    def __init__(self, settings: Settings, *, worker_id: str | None = None, inspector: Any = None,
                 metrics_port: int | None = None) -> None:
        self.settings = settings
        self.ks, self.rs, self.ws = settings.kafka, settings.redis, settings.worker
        self.worker_id = worker_id or self.ws.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.lines = {line.id for line in settings.lines}
        if not self.lines:
            raise ConfigError("no lines configured: the worker would dead-letter every frame")
        self.metrics = Metrics()
        self.health = Health(stall_after_s=max(30.0, self.ks.max_poll_interval_ms / 2000))
        self.metrics_port = self.ws.metrics_port if metrics_port is None else metrics_port
        self._inspector = inspector
        self.publisher = ResultPublisher.from_settings(self.rs, self.worker_id)

        self._stop = threading.Event()
        self._abandon = threading.Event()
        self._score_q: queue.Queue[Batch | None] = queue.Queue()
        self._publish_q: queue.Queue[list[tuple[Frame, FrameOutput]] | None] = queue.Queue()
        self._done_q: queue.Queue[Done | DlqFailed] = queue.Queue()
        self._offsets: dict[TopicPartition, PartitionOffsets] = {}
        self._epoch = 0
        self._buffers: dict[str, list[Frame]] = {}
        self._buffer_since: dict[str, float] = {}
        self._dlq_retry: list[tuple[float, Frame, str, str]] = []
        self._redis_ok = True
        self._last_commit = 0.0
        self._last_lag = 0.0
        self._assigned: list[TopicPartition] = []
        self._rewind: dict[TopicPartition, int] = {}
        """Revoked partitions -> where their unfinished work starts, in case the rebalance hands them back."""
        self._threads: list[threading.Thread] = []
        self._producer: Any = None
        self._consumer: Any = None
        self._scored_total = 0
        self._in_flight_count = 0
        self._lag_total = 0
        self._threshold_synced: set[str] = set()
        self._started = time.time()
        self.adapters: Any = None

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

    def _load_model(self) -> Any:
        from pipeline.inspector import Inspector

        t0 = time.monotonic()
        insp = self._inspector or Inspector.from_settings(self.settings)
        for line in sorted(self.lines):
            insp.prepare_line(line)
        # Warm up once per line outside calibration (score_raw does not feed the thresholds).
        import numpy as np

        dummy = np.full((64, 64, 3), 128, dtype=np.uint8)
        full = min(self.ws.max_batch, self.settings.model.batch_size)
        for line in sorted(self.lines):
            insp.score_raw(line, [dummy])
            if full > 1:  # the full batch shape too, so the first busy batch does not pay for it
                insp.score_raw(line, [dummy] * full)
        log.info("model ready: arch=%s lines=%s in %.1f s", self.settings.model.arch, ",".join(sorted(self.lines)),
                 time.monotonic() - t0)
        return insp

    def run(self) -> int:
        try:
            server = TelemetryServer(self.metrics, self.health, self.ws.metrics_host, self.metrics_port).start()
        except OSError as e:
            raise ConfigError(f"cannot serve metrics on {self.ws.metrics_host}:{self.metrics_port}: {e}") from e
        self.telemetry_port = server.port
        log.info("worker %s: metrics and health on http://%s:%d (/metrics /healthz /readyz)",
                 self.worker_id, self.ws.metrics_host, server.port)
        try:
            self.inspector = self._load_model()
            self.health.model_loaded = True
            self.metrics.redis_up.set(0)
            self._housekeeping_once()
            self._start_adapters()
            if not self._connect_kafka():
                return 0
            self._start_threads()
            self._consumer.subscribe([self.ks.frames_topic], listener=_Listener(self))
            log.info("joined group %s on topic %s (bootstrap %s)", self.ks.group_id, self.ks.frames_topic,
                     self.ks.bootstrap_servers)
            self._poll_loop()
            self._drain()
            return 0
        finally:
            self._shutdown()
            server.stop()

    def _connect_kafka(self) -> bool:
        """Create the clients, waiting out an unreachable broker (no exit, so no crash loop); False if stopped."""
        backoff = self.ws.retry_backoff_s
        while not self._stop.is_set():
            self.health.tick()
            try:
                # A DLQ send must not block the poll loop for long when the broker is away: fail and retry.
                self._producer = self._producer or make_producer(self.ks, max_block_ms=5000)
                self._consumer = make_consumer(self.ks)
                return True
            except KafkaError as e:
                log.warning("Kafka at %s unreachable (%s); retrying in %.1f s", self.ks.bootstrap_servers, e, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.ws.retry_backoff_max_s)
        return False

    # --- poll thread ----------------------------------------------------------------------------
    def _poll_loop(self) -> None:
        c = self._consumer
        while not self._stop.is_set():
            self.health.tick()
            self._process_completions()
            self._retry_dead_letters()
            self._flush_due_batches()
            self._maybe_commit()
            self._apply_pause()
            in_flight = self._in_flight()
            budget = max(1, self.ws.max_in_flight - in_flight)
            records = c.poll(timeout_ms=self._poll_timeout_ms(), max_records=min(budget, self.ks.max_poll_records))
            for tp, recs in records.items():
                for rec in recs:
                    self._accept(tp, rec)
            self._flush_due_batches()
            self._update_lag()

    def _poll_timeout_ms(self) -> int:
        if not self._buffer_since:
            return 100
        now = time.monotonic()
        due = min(self._buffer_since.values()) + self.ws.max_wait_ms / 1000 - now
        return int(max(0.0, min(0.1, due)) * 1000)

    def _in_flight(self) -> int:
        n = sum(len(o.pending) for o in self._offsets.values())
        self._in_flight_count = n
        self.metrics.in_flight.set(n)
        return n

    def _accept(self, tp: TopicPartition, rec: Any) -> None:
        po = self._offsets.get(tp)
        if po is None:  # should not happen: records only come for assigned partitions
            po = self._offsets[tp] = PartitionOffsets(epoch=self._next_epoch())
        po.add(rec.offset)
        frame = Frame(tp, po.epoch, rec.offset, rec.key, rec.value, list(rec.headers or []))
        try:
            meta = env.parse_meta(frame.headers)
            frame.meta = meta
            env.check_payload(rec.value, meta.content_type, self.ws.max_frame_bytes)
            if meta.line not in self.lines:
                raise EnvelopeError(f"unknown line {meta.line!r} (configured lines: {', '.join(sorted(self.lines))})",
                                    env.STAGE_LINE)
        except EnvelopeError as e:
            if frame.meta is not None and frame.meta.line not in self.lines:
                frame.meta = None  # keep garbage out of metric labels
            self.metrics.frames_consumed.labels(frame.line_label).inc()
            self._dead_letter(frame, e.reason, e.stage)
            return
        self.metrics.frames_consumed.labels(meta.line).inc()
        buf = self._buffers.setdefault(meta.line, [])
        if not buf:
            self._buffer_since[meta.line] = time.monotonic()
        buf.append(frame)
        if len(buf) >= self.ws.max_batch:
            self._dispatch(meta.line)

    def _dispatch(self, line: str) -> None:
        frames = self._buffers.pop(line, [])
        self._buffer_since.pop(line, None)
        if frames:
            self._score_q.put(Batch(line, frames))

    def _flush_due_batches(self, force: bool = False) -> None:
        now = time.monotonic()
        for line, since in list(self._buffer_since.items()):
            if force or now - since >= self.ws.max_wait_ms / 1000:
                self._dispatch(line)

    def _process_completions(self) -> None:
        while True:
            try:
                item = self._done_q.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, DlqFailed):
                delay = self.ws.retry_backoff_s
                if isinstance(item.error, KafkaError) and not getattr(item.error, "retriable", True):
                    self._renew_producer(item.error)
                log.warning("DLQ send of offset %s/%d failed (%s); retrying in %.1f s",
                            item.frame.tp, item.frame.offset, item.error, delay)
                self._dlq_retry.append((time.monotonic() + delay, item.frame, item.reason, item.stage))
                continue
            f = item.frame
            po = self._offsets.get(f.tp)
            if po is not None and po.epoch == f.epoch:
                po.done(f.offset)

    def _maybe_commit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (now - self._last_commit) * 1000 < self.ws.commit_interval_ms:
            return
        offsets = {}
        for tp, po in self._offsets.items():
            off = po.to_commit()
            if off is not None:
                offsets[tp] = off
        if not offsets:
            return
        self._last_commit = now
        try:
            self._consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
        except KafkaError as e:  # e.g. a rebalance in progress: commit again on the next turn
            self.metrics.commits.labels("failed").inc()
            log.warning("offset commit failed, will retry: %s", e)
            return
        for tp, off in offsets.items():
            if tp in self._offsets:
                self._offsets[tp].mark_committed(off)
        self.metrics.commits.labels("ok").inc()
        log.debug("committed %s", {f"{tp.topic}/{tp.partition}": off for tp, off in offsets.items()})

    def _should_pause(self) -> bool:
        return self._stop.is_set() or not self._redis_ok or self._in_flight() >= self.ws.max_in_flight

    def _apply_pause(self) -> None:
        c = self._consumer
        assigned = c.assignment()
        paused = c.paused()
        if self._should_pause():
            todo = [tp for tp in assigned if tp not in paused]
            if todo:
                c.pause(*todo)
                if not self._redis_ok:
                    log.warning("Redis unreachable: paused %d partitions, not committing", len(todo))
        elif self._in_flight() <= self.ws.max_in_flight // 2 and paused:
            c.resume(*paused)
            log.info("resumed %d partitions", len(paused))
        self.metrics.paused.set(1 if c.paused() else 0)

    def _update_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag < 2.0:
            return
        self._last_lag = now
        total = 0
        for tp, po in self._offsets.items():
            hw = self._consumer.highwater(tp)  # from Fetch: correct on Tansu, unlike ListOffsets(latest)
            if hw is not None and po.next_offset is not None:
                lag = max(0, hw - po.next_offset)
                total += lag
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)
        self._lag_total = total

    def _next_epoch(self) -> int:
        self._epoch += 1
        return self._epoch

    # --- rebalance ------------------------------------------------------------------------------
    def on_revoked(self, revoked: list[TopicPartition], *, lost: bool = False) -> None:
        """Give up partitions in a rebalance.

        kafka-python runs this on its network thread while the poll thread waits inside `poll()`, so it
        must not block: no synchronous commit, no waiting for work in flight (heartbeats would stop).
        What is finished is committed asynchronously; frames still in flight are simply forgotten: the
        partition's next owner replays them and its writes are skipped by frame id, so nothing is lost
        or published twice. Frames not yet scored are dropped here to save the work. The next owner may
        be this member again: `on_assigned` then rewinds the partition to where its unfinished work starts.
        """
        if lost:  # another member may own these by now: no rewind on our own say-so, read what is committed
            for tp in revoked:
                self._rewind.pop(tp, None)
        revoked = [tp for tp in revoked if tp in self._offsets]
        if not revoked:
            return
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        if not lost:  # a member that was evicted can no longer commit
            for tp in revoked:
                restart = self._offsets[tp].committable()
                if restart is not None:
                    self._rewind[tp] = restart
                off = self._offsets[tp].to_commit()
                if off is not None:
                    offsets[tp] = OffsetAndMetadata(off, "", -1)
            if offsets:
                try:
                    self._consumer.commit_async(offsets)
                except KafkaError as e:
                    log.warning("rebalance: commit of finished frames failed (%s); they will be replayed", e)
        gone = set(revoked)
        for line in list(self._buffers):
            kept = [f for f in self._buffers[line] if f.tp not in gone]
            if kept:
                self._buffers[line] = kept
            else:
                self._buffers.pop(line)
                self._buffer_since.pop(line, None)
        in_flight = sum(len(self._offsets[tp].pending) for tp in revoked)
        for tp in revoked:
            self._offsets.pop(tp, None)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))
        self._assigned = [tp for tp in self._assigned if tp not in gone]
        self.metrics.partitions_assigned.set(len(self._assigned))
        self.health.partitions_assigned = bool(self._assigned)
        log.info("rebalance: %s partitions %s; committing %s; %d frames in flight go to the next owner "
                 "(deduplicated)", "lost" if lost else "revoked", ",".join(str(tp.partition) for tp in revoked),
                 {tp.partition: o.offset for tp, o in offsets.items()} or "nothing", in_flight)

    def on_assigned(self, assigned: list[TopicPartition]) -> None:
        """Take partitions in a rebalance (kafka-python's network thread, like `on_revoked`).

        A partition that `on_revoked` just gave up may come straight back to this member. kafka-python
        (3.x) then keeps its fetch position: it does not re-read the committed offset. But `on_revoked`
        already forgot the partition's frames in flight and dropped its unscored ones, so consuming on
        from that position would never re-read them: results missing for good, and the fresh
        `PartitionOffsets` would later commit past them. Such a partition is rewound to its lowest
        unfinished offset instead (what `on_revoked` committed); the frames in flight are read again
        and their writes, where the old epoch got as far as Redis, are skipped by frame id.
        """
        rewind, self._rewind = self._rewind, {}
        rewound = {}
        for tp in assigned:
            if tp not in self._offsets:
                self._offsets[tp] = PartitionOffsets(epoch=self._next_epoch())
            off = rewind.get(tp)
            if off is not None:
                try:
                    self._consumer.seek(tp, off)
                    rewound[tp.partition] = off
                except (ValueError, KafkaError) as e:  # not assigned after all: the next owner reads it
                    log.warning("rebalance: cannot rewind partition %s to offset %d: %s", tp, off, e)
        self._assigned = sorted(set(self._assigned) | set(assigned), key=lambda t: (t.topic, t.partition))
        self.metrics.partitions_assigned.set(len(self._assigned))
        self.health.partitions_assigned = bool(self._assigned)
        log.info("assigned partitions: %s", ",".join(str(tp.partition) for tp in self._assigned) or "none")
        if rewound:
            log.info("rebalance: got back partitions with frames in flight; re-reading from %s", rewound)

    # --- dead letters ---------------------------------------------------------------------------
    def _dead_letter(self, frame: Frame, reason: str, stage: str) -> None:
        """Send a frame to the DLQ; it counts as finished once the broker acknowledges it."""
        value = frame.value
        headers = env.dlq_headers(frame.headers, reason, stage, frame.tp.topic, frame.tp.partition, frame.offset)
        if value is not None and len(value) > self.ks.max_request_size - DLQ_VALUE_MARGIN:
            headers.append(("value-dropped", f"original value of {len(value)} bytes is too large to re-send".encode()))
            value = b""
        log.info("dead letter: %s/%d offset %d stage=%s reason=%s", frame.tp.topic, frame.tp.partition, frame.offset,
                 stage, reason)
        try:
            fut = self._producer.send(self.ks.dlq_topic, key=frame.key, value=value, headers=headers)
        except KafkaError as e:
            self._done_q.put(DlqFailed(frame, reason, stage, e))
            return
        fut.add_callback(lambda _m: self._dlq_ok(frame, stage))
        fut.add_errback(lambda e: self._done_q.put(DlqFailed(frame, reason, stage, e)))

    def _renew_producer(self, error: Exception) -> None:
        """A producer that hit a fatal error (e.g. after a broker restart) never recovers: replace it."""
        log.warning("DLQ producer failed fatally (%s); recreating it", error)
        old, self._producer = self._producer, make_producer(self.ks, max_block_ms=5000)
        with contextlib.suppress(Exception):
            old.close(timeout=0)

    def _dlq_ok(self, frame: Frame, stage: str) -> None:
        self.metrics.frames_dead_lettered.labels(frame.line_label, stage).inc()
        self._done_q.put(Done(frame))

    def _retry_dead_letters(self) -> None:
        if not self._dlq_retry:
            return
        now = time.monotonic()
        due = [x for x in self._dlq_retry if x[0] <= now]
        self._dlq_retry = [x for x in self._dlq_retry if x[0] > now]
        for _, frame, reason, stage in due:
            po = self._offsets.get(frame.tp)
            if po is None or po.epoch != frame.epoch:
                continue  # partition moved on: the new owner re-reads and re-dead-letters it
            self._dead_letter(frame, reason, stage)

    # --- scorer thread --------------------------------------------------------------------------
    def _score_loop(self) -> None:
        from pipeline.imaging import decode_image
        from pipeline.render import heatmap_png, mask_png

        while True:
            batch = self._score_q.get()
            if batch is None:
                self._publish_q.put(None)
                return
            try:
                self._score_batch(batch, decode_image, mask_png, heatmap_png)
            except Exception as e:  # a bug must not kill the thread and stall every partition
                log.exception("scoring a batch of %d %s frames failed", len(batch.frames), batch.line)
                for f in batch.frames:
                    self._dead_letter(f, f"internal error while scoring: {type(e).__name__}: {e}", env.STAGE_INSPECT)

    def _start_adapters(self) -> None:
        """Buffered TTA: serve each line's registry adapter and refresh it (pipeline.adapter_service)."""
        if self.settings.tta.mode != "buffered":
            return
        from pipeline.adapter_registry import AdapterRegistry
        from pipeline.adapter_service import AdapterService

        registry = AdapterRegistry(self.publisher.client, self.publisher.keys)
        self.adapters = AdapterService(self.inspector, registry, sorted(self.lines), self.worker_id, self.metrics)
        for line in sorted(self.lines):
            with contextlib.suppress(*RETRYABLE):  # Redis down: the service's own loop catches up
                self.adapters.sync(line)
        self.adapters.start()

    def adapter_for(self, line: str) -> tuple[Any, str | None]:
        """The line's current adapter and its version (None, None: the base model)."""
        return self.adapters.adapter_for(line) if self.adapters is not None else (None, None)

    def _inspect(self, line: str, frames: list[Frame], images: list[Any]) -> list[Any]:
        """Score and judge frames of one line with its adapter; feed the line's TTA buffer."""
        adapter, version = self.adapter_for(line)
        tta = "per_frame" if self.settings.tta.mode == "per_frame" else None
        t0 = time.perf_counter()
        raws = self.inspector.score_raw(line, images, adapter, tta)
        per_frame_s = (time.perf_counter() - t0) / max(1, len(images))
        out = [self.inspector.judge(line, r, "per_frame" if tta else version) for r in raws]
        if self.adapters is not None:
            for f, r in zip(frames, raws, strict=True):
                assert f.meta is not None
                self.adapters.observe(line, f.meta.frame_id, r, per_frame_s, f.meta.capture_ts_ns / 1e9)
        return out

    def _score_batch(self, batch: Batch, decode_image: Callable[..., Any], mask_png: Callable[..., bytes],
                     heatmap_png: Callable[..., bytes]) -> None:
        good: list[tuple[Frame, Any]] = []
        for f in batch.frames:
            assert f.meta is not None and f.value is not None
            try:
                img = decode_image(f.value, max_pixels=self.ws.max_pixels, content_type=f.meta.content_type)
            except ImageError as e:
                self._dead_letter(f, str(e), env.STAGE_DECODE)
                continue
            good.append((f, img))
        if not good:
            return
        t0 = time.perf_counter()
        try:
            inspections = list(zip(good, self._inspect(batch.line, [f for f, _ in good], [img for _, img in good]),
                                   strict=True))
        except Exception:  # find the frame that breaks the batch, score the others
            log.exception("batch inspection failed; scoring %d frames one by one", len(good))
            inspections = []
            for f, img in good:
                try:
                    (insp,) = self._inspect(batch.line, [f], [img])
                    inspections.append(((f, img), insp))
                except (ImageError, ValueError, RuntimeError) as e:
                    self._dead_letter(f, f"inspection failed: {type(e).__name__}: {e}", env.STAGE_INSPECT)
        model_s = time.perf_counter() - t0
        self.metrics.inference_seconds.labels(batch.line).observe(model_s)
        self.metrics.batch_size.labels(batch.line).observe(len(good))
        outputs = []
        for (f, img), insp in inspections:
            outputs.append((f, self._output(f, img, insp, mask_png, heatmap_png)))
        if outputs:
            self._publish_q.put(outputs)

    def _output(self, f: Frame, img: Any, insp: Any, mask_png: Callable[..., bytes],
                heatmap_png: Callable[..., bytes]) -> FrameOutput:
        meta = f.meta
        assert meta is not None and f.value is not None
        lo, hi = insp.heatmap_range
        result = insp.summary()
        result.update(
            frame_id=meta.frame_id, camera=meta.camera, content_type=meta.content_type,
            width=int(img.shape[1]), height=int(img.shape[0]),
            partition=f.tp.partition, offset=f.offset, worker=self.worker_id,
        )
        if meta.synthetic_defect is not None:
            result["synthetic_defect"] = meta.synthetic_defect
        return FrameOutput(
            frame_id=meta.frame_id, line=meta.line, capture_ts_ns=meta.capture_ts_ns, result=result,
            is_alert=bool(insp.verdict), mask_png=mask_png(insp.mask),
            heatmap_png=heatmap_png(img, insp.anomaly_map, lo, hi, insp.mask), image=f.value,
            alert={"content_type": meta.content_type},
        )

    # --- publisher thread -----------------------------------------------------------------------
    def _publish_loop(self) -> None:
        while True:
            item = self._publish_q.get()
            if item is None:
                return
            items = list(item)
            while len(items) < 4 * self.ws.max_batch:  # coalesce what is queued into one round trip
                try:
                    more = self._publish_q.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._publish_q.put(None)
                    break
                items.extend(more)
            if not self._publish_with_retry(items):
                # abandoned on shutdown with Redis away: drop remaining work; nothing was committed for it
                while True:
                    try:
                        if self._publish_q.get_nowait() is None:
                            return
                    except queue.Empty:
                        return

    def _publish_with_retry(self, items: list[tuple[Frame, FrameOutput]]) -> bool:
        backoff = self.ws.retry_backoff_s
        attempt = 0
        while True:
            try:
                written = self.publisher.publish([o for _, o in items])
                break
            except Exception as e:  # RETRYABLE plus anything unexpected: never lose the batch
                attempt += 1
                self._set_redis(False)
                self.metrics.redis_errors.inc()
                level = logging.WARNING if isinstance(e, RETRYABLE) else logging.ERROR
                if attempt == 1 or attempt % 10 == 0:
                    log.log(level, "publishing %d results failed (attempt %d): %s; retrying in %.1f s",
                            len(items), attempt, e, backoff)
                if self._abandon.wait(backoff):
                    log.warning("shutting down with %d results unpublished; their offsets stay uncommitted",
                                len(items))
                    return False
                backoff = min(backoff * 2, self.ws.retry_backoff_max_s)
        if attempt:
            log.info("Redis is back: published %d results after %d failed attempts", len(items), attempt)
        self._set_redis(True)
        now_ns = time.time_ns()
        for (f, out), new in zip(items, written, strict=True):
            line = out.line
            if new:
                self.metrics.frames_scored.labels(line).inc()
                self.metrics.anomaly_score.labels(line).observe(float(out.result.get("score", 0.0)))
                self.metrics.e2e_seconds.labels(line).observe(max(0.0, (now_ns - out.capture_ts_ns) / 1e9))
                if out.is_alert:
                    self.metrics.alerts.labels(line).inc()
            else:
                self.metrics.duplicates_skipped.labels(line).inc()
            self._scored_total += 1
            self._done_q.put(Done(f))
        return True

    def _set_redis(self, ok: bool) -> None:
        self._redis_ok = ok
        self.health.redis_ok = ok
        self.metrics.redis_up.set(1 if ok else 0)

    # --- housekeeping thread --------------------------------------------------------------------
    def _housekeeping_loop(self) -> None:
        while not self._stop.wait(self.ws.heartbeat_interval_s):
            self._housekeeping_once()

    def _housekeeping_once(self) -> None:
        try:
            ok = self.publisher.ping()
            self._set_redis(ok)
            if not ok:
                return
            for line in sorted(self.lines):
                self._sync_threshold(line)
            self.publisher.heartbeat(self._heartbeat_fields())
        except RETRYABLE as e:
            self._set_redis(False)
            log.debug("housekeeping: Redis unavailable: %s", e)
        except Exception:  # housekeeping must never take the worker down
            log.exception("housekeeping failed")

    def _sync_threshold(self, line: str) -> None:
        th = self.inspector.thresholds(line)
        state = self.publisher.read_threshold(line)
        first = line not in self._threshold_synced
        self._threshold_synced.add(line)
        ident = self._calibration_identity(line)
        if first and th.calibration is None and "calibrated_image" in state:
            stale = {k: state.get(k) for k, v in ident.items() if state.get(k) != v}
            if stale:  # calibrated with another model, prompt set or quantile: its numbers do not apply
                log.info("line %s: not resuming the calibration in Redis, it was made with %s", line, stale)
            else:
                try:
                    th.restore(state)
                    log.info("line %s: resumed calibrated thresholds from Redis (image %.4f)", line, th.image)
                except (ValueError, KeyError) as e:
                    log.warning("line %s: ignoring unreadable calibration in Redis: %s", line, e)
        image, pixel = manual_override(state)
        if (image, pixel) != (th.override_image, th.override_pixel):
            log.info("line %s: manual threshold override image=%s pixel=%s", line, image, pixel)
            th.set_override(image, pixel)
        d = th.to_dict()
        if th.calibration is not None:
            d.update(ident)
        self.publisher.write_threshold(line, d)
        for src in ("manual", "config", "calibrated", "default"):
            if src == d["source"]:
                self.metrics.threshold.labels(line, src).set(float(d["image"]))  # type: ignore[arg-type]
            else:
                self.metrics.threshold.labels(line, src).set(float("nan"))

    def _calibration_identity(self, line: str) -> dict[str, str]:
        m = self.settings.model
        return {"calibrated_model": f"{m.arch}/{m.pretrained}/{m.precision}",
                "calibrated_prompts": self.inspector.prompt_hash(line),
                "calibrated_quantile": str(self.settings.line(line).threshold.quantile)}

    def _heartbeat_fields(self) -> dict[str, Any]:
        up = time.time() - self._started
        return {
            "worker": self.worker_id, "host": socket.gethostname(), "pid": os.getpid(),
            "lines": ",".join(sorted(self.lines)), "group": self.ks.group_id, "topic": self.ks.frames_topic,
            "partitions": ",".join(str(tp.partition) for tp in list(self._assigned)),
            "frames": self._scored_total, "frames_per_s": round(self._scored_total / up, 3) if up > 0 else 0,
            "in_flight": self._in_flight_count, "lag": self._lag_total, "redis_ok": self._redis_ok,
            "started": int(self._started), "last_seen": int(time.time()),
            "metrics_port": getattr(self, "telemetry_port", 0),
        }

    # --- start / drain / stop -------------------------------------------------------------------
    def _start_threads(self) -> None:
        for name, target in (("scorer", self._score_loop), ("publisher", self._publish_loop),
                             ("housekeeping", self._housekeeping_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _drain(self) -> int:
        """After stop: finish the frames in hand, publish, commit. Returns frames left unfinished."""
        self.health.stopping = True
        c = self._consumer
        if c.assignment():
            c.pause(*c.assignment())
        self._flush_due_batches(force=True)
        end = time.monotonic() + self.ws.drain_timeout_s
        log.info("draining %d frames in hand", self._in_flight())
        while time.monotonic() < end:
            self._process_completions()
            self._retry_dead_letters()
            self._maybe_commit(force=True)
            if self._in_flight() == 0:
                break
            c.poll(timeout_ms=20)  # paused: returns nothing, keeps the client's network loop turning
        self._process_completions()
        self._maybe_commit(force=True)
        left = self._in_flight()
        if left:
            log.warning("drain timed out with %d frames unpublished; they stay uncommitted and will be replayed", left)
        else:
            log.info("drained: everything in hand is published and committed")
        return left

    def _shutdown(self) -> None:
        self._stop.set()
        if self.adapters is not None:
            self.adapters.stop()
        self._abandon.set()
        self._score_q.put(None)
        for t in self._threads:
            if t.name != "housekeeping":
                t.join(timeout=10)
        if self._consumer is not None:
            try:
                self._consumer.close(autocommit=False, timeout_ms=5000)  # leaves the group
                log.info("left group %s", self.ks.group_id)
            except Exception as e:
                log.warning("closing the consumer: %s", e)
        if self._producer is not None:
            try:
                self._producer.close(timeout=5)
            except Exception as e:
                log.warning("closing the DLQ producer: %s", e)
        with contextlib.suppress(*RETRYABLE):
            self.publisher.forget_worker()


class _Listener(ConsumerRebalanceListener):
    def __init__(self, worker: InspectionWorker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.worker.on_revoked(list(revoked))

    def on_partitions_lost(self, lost: Any) -> None:
        self.worker.on_revoked(list(lost), lost=True)

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.worker.on_assigned(list(assigned))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        d = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
             "msg": record.getMessage(), "thread": record.threadName}
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d)


def run(args: argparse.Namespace) -> int:
    # The scorer shares the CPU with this process's I/O threads (and, on one box, the broker and Redis):
    # OpenMP threads that spin while waiting for work then starve them, and are starved in turn; measured
    # here at up to 5x slower inference on a busy 2-core host. Must be set before torch loads; override
    # by setting the variable yourself.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.log_format == "json":
        for h in logging.getLogger().handlers:
            h.setFormatter(_JsonFormatter())
    logging.getLogger("kafka").setLevel(logging.WARNING)
    settings = load_settings(args.config)
    worker = InspectionWorker(settings, worker_id=args.worker_id, metrics_port=args.metrics_port)
    worker.install_signal_handlers()
    return worker.run()
