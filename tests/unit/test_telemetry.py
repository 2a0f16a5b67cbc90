"""Worker telemetry (Prometheus) and the health endpoints, over real HTTP."""

from __future__ import annotations

import json
import signal
import socket
import urllib.error
import urllib.request

import pytest

from pipeline.observability.telemetry import Health, TelemetryServer, WorkerTelemetry


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_metrics_names_and_health_states() -> None:
    m, h = WorkerTelemetry(), Health(stall_after_s=60)
    m.frames_scored.labels("bottle").inc(3)
    m.e2e_seconds.labels("bottle").observe(0.2)
    m.consumer_lag.labels("frames", "0").set(7)
    srv = TelemetryServer(m, h, "127.0.0.1", 0).start()
    try:
        code, body = _get(srv.port, "/metrics")
        text = body.decode()
        assert code == 200
        assert 'anoclip_frames_scored_total{line="bottle"} 3.0' in text
        assert 'anoclip_consumer_lag{partition="0",topic="frames"} 7.0' in text
        assert "anoclip_e2e_latency_seconds_bucket" in text
        names = {ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE")}
        assert all(n.startswith("anoclip_") for n in names), names

        code, body = _get(srv.port, "/readyz")
        assert code == 503 and json.loads(body)["ready"] is False
        h.stall_after_s = 0.0
        assert _get(srv.port, "/healthz")[0] == 200, "still loading the model counts as live"
        h.stall_after_s = 60.0
        h.model_loaded = h.partitions_assigned = h.redis_ok = True
        code, body = _get(srv.port, "/readyz")
        assert code == 503 and json.loads(body)["broker"] is False, "the broker is part of readiness"
        h.broker_problem = "Kafka broker at 127.0.0.1:1 unreachable (KafkaTimeoutError)"
        assert json.loads(_get(srv.port, "/readyz")[1])["problems"] == [h.broker_problem]
        h.broker_ok, h.broker_problem = True, None
        code, body = _get(srv.port, "/readyz")
        assert code == 200 and json.loads(body) == {"ready": True, "model_loaded": True, "partitions_assigned": True,
                                                    "redis": True, "broker": True, "stopping": False}
        h.redis_ok = False  # Redis away: not ready, but still live (no restart into a crash loop)
        assert _get(srv.port, "/readyz")[0] == 503
        assert _get(srv.port, "/healthz")[0] == 200
        h.stall_after_s = 0.0  # the poll loop has not ticked "recently": not live
        assert _get(srv.port, "/healthz")[0] == 503
        assert _get(srv.port, "/nope")[0] == 404
    finally:
        srv.stop()


def test_two_workers_in_one_process_do_not_clash() -> None:
    a, b = WorkerTelemetry(), WorkerTelemetry()
    a.alerts.labels("x").inc()
    assert b'anoclip_alerts_total{line="x"}' not in b.render()


def test_server_binds_at_construction_and_leaves_signals_alone() -> None:
    """Port 0's pick is known before start(); a port in use fails fast; uvicorn (off the main thread) takes
    no signal from the worker, whose SIGTERM handler drains it."""
    sentinel = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, sentinel)
    srv = TelemetryServer(WorkerTelemetry(), Health(), "127.0.0.1", 0)
    try:
        assert srv.port > 0
        with pytest.raises(OSError):
            TelemetryServer(WorkerTelemetry(), Health(), "127.0.0.1", srv.port)
        srv.start()
        assert signal.getsignal(signal.SIGTERM) is sentinel
        code, body = _get(srv.port, "/nope")
        assert (code, body) == (404, b"not found\n")
        code, body = _get(srv.port, "/livez")
        assert code == 200 and json.loads(body) == {"live": True, "starting": True}
    finally:
        srv.stop()
        signal.signal(signal.SIGTERM, previous)
    with pytest.raises(OSError):  # stop() closed the socket
        socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()
