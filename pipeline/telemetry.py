"""Worker telemetry: Prometheus series (prefix `anoclip_`) and the liveness/readiness endpoints of a worker.

One HTTP server serves `/metrics`, `/healthz` (liveness: the poll loop is turning) and `/readyz`
(readiness: model loaded, partitions assigned, Redis and the broker reachable; a Redis error waiting will not
fix, such as a wrong password or Redis out of memory, is named in the body). Orchestrators restart a worker that
is not live and route nothing to one that is not ready; a worker waiting out a Redis outage stays live
but not ready, so it is not restarted into a crash loop.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # `_created` series double every counter and histogram and no alert or panel uses them

DLQ_STAGES = ("headers", "size", "line", "decode", "inspect", "conflict")
"""Where a frame can be refused (docs/streaming.md); known up front, so their counters start at 0."""
TTA_OUTCOMES = ("promoted", "refused", "abandoned")

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
    """`/metrics`, `/healthz`, `/readyz` on a background thread; port 0 picks a free port."""

    def __init__(self, telemetry: WorkerTelemetry, health: Health, host: str = "127.0.0.1", port: int = 9400) -> None:
        handler = _make_handler(telemetry.render, health)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="telemetry", daemon=True)

    def start(self) -> TelemetryServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _make_handler(render: Callable[[], bytes], health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/metrics":
                self._send(200, render(), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/livez"):
                ok, d = health.live()
                self._send(200 if ok else 503, json.dumps({"live": ok, **d}).encode(), "application/json")
            elif path == "/readyz":
                ok, d = health.ready()
                self._send(200 if ok else 503, json.dumps({"ready": ok, **d}).encode(), "application/json")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # silence access logs
            return

    return Handler
