"""Consumer lag and broker readiness, measured by a client of its own on its own thread.

Lag is end offset minus committed offset, per assigned partition, both asked of the broker by a probe
consumer that never joins the group. The worker's own fetcher cannot say: while partitions are paused
(backpressure, a Redis outage) it fetches nothing, so its high watermarks stand still and the lag it saw
read 0 while hundreds of frames waited. A failed probe marks the broker down in `/readyz`.

End offsets: ListOffsets(latest) is right on Apache Kafka, but Tansu answers the base offset of the last
record batch plus one. So the probe also fetches from there (at most the last batch; nothing on Kafka,
where that offset is the end) and takes the fetch's high watermark, which both brokers report correctly.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafka import TopicPartition

from pipeline.observability.telemetry import Health, WorkerTelemetry
from pipeline.settings import KafkaSettings
from pipeline.streaming.kafka_io import make_consumer

log = logging.getLogger("anoclip.worker")

PROBE_TIMEOUT_MS = 5000
"""How long one broker request of the probe may take before the broker counts as down."""


@dataclass
class LagMonitor:
    """Sets `anoclip_consumer_lag`, `anoclip_broker_up` and the broker's readiness every `interval_s`."""

    kafka: KafkaSettings
    telemetry: WorkerTelemetry
    health: Health
    assigned: Callable[[], list[TopicPartition]]
    """The partitions this worker owns now (read from another thread: must return a fresh list)."""
    interval_s: float = 2.0
    total: int = 0
    """Sum of the lag over the assigned partitions at the last probe."""
    client: Any = None
    _high: dict[TopicPartition, int] = field(default_factory=dict)
    _shown: set[TopicPartition] = field(default_factory=set)

    def run(self, stop: threading.Event) -> None:
        """Probe until `stop` is set; never raises."""
        try:
            while True:
                self.once()
                if stop.wait(self.interval_s):
                    return
        finally:
            self.close()

    def once(self) -> None:
        tps = sorted(self.assigned(), key=lambda tp: (tp.topic, tp.partition))
        try:
            lags = self.measure(tps)
        except Exception as e:  # any client failure means the broker cannot be used right now
            self._broker(False, f"Kafka broker at {self.kafka.bootstrap_servers} unreachable "
                                f"({type(e).__name__}: {str(e)[:200]})")
            self.close()  # a fresh client next time: kafka-python clients do not always recover
            return
        self._broker(True, None)
        now = set(self.assigned())
        for tp in self._shown - now:
            with contextlib.suppress(KeyError):
                self.telemetry.consumer_lag.remove(tp.topic, str(tp.partition))
        self._shown = {tp for tp in lags if tp in now}
        for tp in self._shown:
            self.telemetry.consumer_lag.labels(tp.topic, str(tp.partition)).set(lags[tp])
        self.total = sum(lags[tp] for tp in self._shown)

    def measure(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Partition -> end offset minus committed offset (raises on any broker failure)."""
        c = self.client = self.client or make_consumer(self.kafka, enable_auto_commit=False,
                                                       request_timeout_ms=max(PROBE_TIMEOUT_MS,
                                                                              self.kafka.fetch_max_wait_ms + 1000))
        if not tps:  # nothing assigned: still tell whether the broker answers
            c.topics()
            return {}
        ends = self.end_offsets(tps)
        start: dict[TopicPartition, int] | None = None
        out = {}
        for tp in tps:
            committed = c.committed(tp, timeout_ms=PROBE_TIMEOUT_MS)
            if committed is None:  # nothing committed yet: everything from the beginning is waiting
                start = start or c.beginning_offsets(tps, timeout_ms=PROBE_TIMEOUT_MS)
                committed = start.get(tp, 0)
            out[tp] = max(0, ends[tp] - committed)
        return out

    def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """True end offsets: ListOffsets, then a fetch from there for the high watermark (see the module doc)."""
        c = self.client
        listed = c.end_offsets(tps, timeout_ms=PROBE_TIMEOUT_MS)
        c.unsubscribe()  # fresh partition states: no high watermark left over from the last probe
        c.assign(tps)
        for tp in tps:
            c.seek(tp, max(listed.get(tp, 0), self._high.get(tp, 0)))
        deadline = time.monotonic() + PROBE_TIMEOUT_MS / 1000
        while time.monotonic() < deadline:
            c.poll(timeout_ms=self.kafka.fetch_max_wait_ms + 200, max_records=1 << 16)
            if all(c.highwater(tp) is not None for tp in tps):
                break
        ends = {}
        for tp in tps:
            hw = c.highwater(tp)
            ends[tp] = max(listed.get(tp, 0), hw if hw is not None else 0)
        self._high = dict(ends)
        return ends

    def _broker(self, ok: bool, problem: str | None) -> None:
        if ok != self.health.broker_ok:
            (log.info if ok else log.warning)("broker %s", "reachable again" if ok else problem)
        self.health.broker_ok, self.health.broker_problem = ok, problem
        self.telemetry.broker_up.set(1 if ok else 0)

    def close(self) -> None:
        c, self.client = self.client, None
        if c is not None:
            with contextlib.suppress(Exception):
                c.close(autocommit=False, timeout_ms=1000)
