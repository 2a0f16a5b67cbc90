"""Worker telemetry: Prometheus series (prefix `anoclip_`) and the liveness/readiness endpoints of a worker.

One HTTP server (a Starlette app under uvicorn, `TelemetryServer`) serves `/metrics`, `/healthz` (liveness:
the poll loop is turning) and `/readyz` (readiness: model loaded, partitions assigned, Redis and the broker
reachable; a Redis error waiting will not fix, such as a wrong password or Redis out of memory, is named in
the body). Orchestrators restart a worker that is not live and route nothing to one that is not ready; a
worker waiting out a Redis outage stays live but not ready, so it is not restarted into a crash loop.
"""

from __future__ import annotations

import json
import re
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    make_asgi_app,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from pipeline.web.asgi import ThreadedServer, bind

disable_created_metrics()  # `_created` series double every counter and histogram and no alert or panel uses them

DLQ_STAGES = ("headers", "size", "line", "decode", "inspect", "conflict")
"""Where a frame can be refused (docs/streaming.md); known up front, so their counters start at 0."""
TTA_OUTCOMES = ("promoted", "refused", "abandoned")
BANK_OUTCOMES = ("promoted", "refused", "skipped", "failed")
"""A memory bank build's outcome: promoted; refused (line paused, or its bank moved meanwhile); skipped (another
worker holds the line's bank lock); failed (an error, logged)."""

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class WorkerTelemetry:
    """The worker's Prometheus series, in their own registry so several workers can live in one test process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.frames_consumed = Counter("anoclip_frames_consumed_total", "Frames polled from Kafka", ["line"],
                                       registry=r)
        self.frames_scored = Counter("anoclip_frames_scored_total", "Frames scored and published", ["line"],
                                     registry=r)
        self.frames_dead_lettered = Counter("anoclip_frames_dead_lettered_total", "Frames sent to the DLQ",
                                            ["line", "stage"], registry=r)
        self.duplicates_skipped = Counter("anoclip_duplicates_skipped_total",
                                          "Replayed frames whose results were already in Redis", ["line"],
                                          registry=r)
        self.alerts = Counter("anoclip_alerts_total", "Anomalous frames", ["line"], registry=r)
        self.inference_seconds = Histogram("anoclip_inference_seconds", "Model time per batch", ["line"],
                                           buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e_seconds = Histogram("anoclip_e2e_latency_seconds", "Capture to published in Redis", ["line"],
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("anoclip_batch_size", "Frames per scored batch", ["line"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.anomaly_score = Histogram("anoclip_anomaly_score", "Image-level p(abnormal)", ["line"],
                                       buckets=tuple(i / 20 for i in range(1, 21)), registry=r)
        self.consumer_lag = Gauge("anoclip_consumer_lag", "High watermark minus next offset to consume",
                                  ["topic", "partition"], registry=r)
        self.in_flight = Gauge("anoclip_frames_in_flight", "Frames polled but not yet committed", registry=r)
        self.partitions_assigned = Gauge("anoclip_partitions_assigned", "Partitions this worker owns", registry=r)
        self.paused = Gauge("anoclip_consumer_paused", "1 while partitions are paused (backpressure or outage)",
                            registry=r)
        self.redis_up = Gauge("anoclip_redis_up", "1 if the last Redis call succeeded", registry=r)
        self.redis_errors = Counter("anoclip_redis_errors_total", "Failed Redis publish attempts", registry=r)
        self.broker_up = Gauge("anoclip_broker_up", "1 if the last broker probe (lag) succeeded", registry=r)
        self.frame_id_conflicts = Counter("anoclip_frame_id_conflicts_total",
                                          "Frame ids published before with other content (dead-lettered)", ["line"],
                                          registry=r)
        self.commits = Counter("anoclip_commits_total", "Offset commits by outcome", ["outcome"], registry=r)
        self.threshold = Gauge("anoclip_line_threshold", "Image threshold in use", ["line", "source"], registry=r)
        self.tta_runs = Counter("anoclip_tta_runs_total", "TTA refreshes by outcome", ["line", "outcome"],
                                registry=r)
        self.tta_buffer_frames = Gauge("anoclip_tta_buffer_frames", "Admitted frames in the line's TTA buffer",
                                       ["line"], registry=r)
        self.adapter_version = Gauge("anoclip_adapter_version", "1 for the adapter version in use",
                                     ["line", "version"], registry=r)
        # the per-line patch memory (`lines[].memory: stream`, docs/memory.md)
        self.bank_version = Gauge("anoclip_bank_version", "1 for the memory bank version in use (none: cold start)",
                                  ["line", "version"], registry=r)
        self.bank_patches = Gauge("anoclip_bank_patches", "Patches in the memory bank in use", ["line"], registry=r)
        self.bank_bytes = Gauge("anoclip_bank_bytes", "Bytes of features in the memory bank in use", ["line"],
                                registry=r)
        self.bank_refreshes = Counter("anoclip_bank_refreshes_total", "Memory bank builds by outcome",
                                      ["line", "outcome"], registry=r)
        self.memory_cold_start_frames = Counter("anoclip_memory_cold_start_frames_total",
                                                "Frames scored by mutual scoring, before the line had a bank",
                                                ["line"], registry=r)

    def init_lines(self, lines: list[str]) -> None:
        """Start every per-line counter of the known lines at 0, so `rate()` and alerts see the first event."""
        for line in lines:
            for c in (self.frames_consumed, self.frames_scored, self.duplicates_skipped, self.alerts):
                c.labels(line)
            for stage in DLQ_STAGES:
                self.frames_dead_lettered.labels(line, stage)
            for outcome in TTA_OUTCOMES:
                self.tta_runs.labels(line, outcome)
            self.tta_buffer_frames.labels(line).set(0)  # an empty buffer (or TTA off) until frames are admitted
        for outcome in ("ok", "failed"):
            self.commits.labels(outcome)

    def init_memory_line(self, line: str) -> None:
        """A `memory: stream` line's memory series at their start: no bank, counters at 0."""
        for outcome in BANK_OUTCOMES:
            self.bank_refreshes.labels(line, outcome)
        self.memory_cold_start_frames.labels(line)
        self.set_bank(line, None, None, 0, 0)

    def set_bank(self, line: str, previous: str | None, version: str | None, patches: int, nbytes: int) -> None:
        """The memory bank a line serves now (None: none, mutual scoring)."""
        if previous != version:
            self.bank_version.labels(line, previous or "none").set(0)
        self.bank_version.labels(line, version or "none").set(1)
        self.bank_patches.labels(line).set(patches)
        self.bank_bytes.labels(line).set(nbytes)

    def set_threshold(self, line: str, source: str, value: float) -> None:
        """The line's image threshold under its one current source; other sources' series are removed, not NaN."""
        for child in list(self.threshold._metrics):  # noqa: SLF001 - the only way to list a family's children
            if child[0] == line and child[1] != source:
                self.threshold.remove(*child)
        self.threshold.labels(line, source).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Health:
    """Liveness and readiness state, updated by the worker's threads."""

    def __init__(self, stall_after_s: float = 30.0) -> None:
        self.stall_after_s = stall_after_s
        self.model_loaded = False
        self.partitions_assigned = False
        self.redis_ok = False
        self.redis_problem: str | None = None
        """A Redis error waiting will not fix (credentials, ACL, out of memory), in words; None otherwise."""
        self.broker_ok = False
        self.broker_problem: str | None = None
        self.stopping = False
        self._last_tick = time.monotonic()

    def tick(self) -> None:
        """Called by the poll loop every turn."""
        self._last_tick = time.monotonic()

    def live(self) -> tuple[bool, dict[str, object]]:
        if not self.model_loaded:  # loading (text features of a big model can take minutes): not stalled
            return True, {"starting": True}
        age = time.monotonic() - self._last_tick
        return age < self.stall_after_s, {"poll_loop_age_s": round(age, 3)}

    def ready(self) -> tuple[bool, dict[str, object]]:
        d: dict[str, object] = {"model_loaded": self.model_loaded, "partitions_assigned": self.partitions_assigned,
                                "redis": self.redis_ok, "broker": self.broker_ok, "stopping": self.stopping}
        problems = [p for p in (self.redis_problem, self.broker_problem) if p]
        if problems:
            d["problems"] = problems
        ok = all((self.model_loaded, self.partitions_assigned, self.redis_ok, self.broker_ok, not self.stopping))
        return ok, d


class TelemetryServer:
    """`/metrics`, `/healthz` (or `/livez`), `/readyz` on a background thread (`pipeline.web.asgi`).

    The socket is bound here: a port in use raises `OSError` from the constructor, and `port` is the bound
    port (the one picked for port 0) before `start()`. uvicorn runs off the main thread, so the worker keeps
    its own SIGTERM handling.
    """

    def __init__(self, telemetry: WorkerTelemetry, health: Health, host: str = "127.0.0.1", port: int = 9400) -> None:
        self.app = telemetry_app(telemetry, health)
        self._server = ThreadedServer(self.app, bind(host, port), name="telemetry")
        self.port = self._server.port

    def start(self) -> TelemetryServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()


def telemetry_app(telemetry: WorkerTelemetry, health: Health) -> Starlette:
    """The ASGI app: prometheus_client's own app at `/metrics`, the health states as JSON, 404 for the rest."""

    async def live(_request: Request) -> Response:
        return _state(health.live(), "live")

    async def ready(_request: Request) -> Response:
        return _state(health.ready(), "ready")

    async def not_found(_request: Request, _exc: Exception) -> Response:
        return Response(b"not found\n", 404, headers={"Content-Type": "text/plain"})

    metrics = Mount("/metrics", make_asgi_app(telemetry.registry))
    metrics.path_regex = re.compile(r"^/metrics(?P<path>)$")  # exactly /metrics, without Mount's redirect to /metrics/
    routes = [metrics, Route("/healthz", live), Route("/livez", live), Route("/readyz", ready)]
    return Starlette(routes=routes, exception_handlers={404: not_found})


def _state(result: tuple[bool, dict[str, object]], key: str) -> Response:
    ok, d = result
    return Response(json.dumps({key: ok, **d}), 200 if ok else 503, media_type="application/json")
