"""Redis over TLS with an ACL user, and the Redis errors waiting will not fix (issue 15, findings 4 and 7).

Certificates are made here with openssl; the redis-server is the system one (Debian builds it with TLS).
The ACL is the one `deploy/compose.yaml` gives the `anoclip` user: its own key prefix and channels only,
no dangerous commands, and the default user kept on behind its own password.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from pipeline.streaming import local_stack as stack
from pipeline.streaming.kafka_io import ensure_topics
from pipeline.streaming.producer import FrameProducer
from tests.integration.conftest import (
    TANSU_CACHE,
    Broker,
    Pipeline,
    RedisServer,
    make_pipeline_config,
    synthetic_frame,
    wait_for,
)

pytestmark = pytest.mark.integration

ADMIN_PW = "admin-pw-4f1d9a"
APP_PW = "app-pw-93be27c1"


def make_certs(d: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1, signed by it (openssl, 2 days)."""
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=anoclip-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "san.cnf")
    return {"ca": d / "ca.crt", "cert": d / "server.crt", "key": d / "server.key"}


@dataclass
class TlsRedis(RedisServer):
    """A redis-server with only a TLS port and two ACL users; `client()` is the admin over TLS."""

    ca: Path = Path()

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, password=ADMIN_PW, ssl_ca_certs=str(self.ca), socket_timeout=5)

    def stop(self) -> None:
        stack.stop_redis(self.run_dir, self.port)


@pytest.fixture
def tls_redis(tmp_path: Path) -> TlsRedis:
    certs = make_certs(tmp_path / "certs")
    srv = TlsRedis(tmp_path / "tls-redis", stack.free_port(), ca=certs["ca"])
    acl = ["--user", "default", "on", f">{ADMIN_PW}", "~*", "&*", "+@all",
           "--user", "anoclip", "on", f">{APP_PW}", "~anoclip:*", "&anoclip:*", "+@all", "-@dangerous"]
    stack.start_redis(srv.run_dir, "127.0.0.1", srv.port, persist=False, extra_args=[
        "--port", "0", "--tls-port", str(srv.port), "--tls-cert-file", str(certs["cert"]),
        "--tls-key-file", str(certs["key"]), "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "no",
        *acl])
    yield srv
    srv.stop()


def _pipeline(broker: Broker, srv: RedisServer, text_cache: Path, tmp_path: Path, **redis_cfg: object) -> Pipeline:
    cfg = make_pipeline_config(broker, srv.url, text_cache)
    cfg["redis"].update(redis_cfg)
    p = Pipeline(cfg, tmp_path, srv)
    ensure_topics(p.settings.kafka)
    return p


def test_worker_over_tls_as_an_acl_user(broker: Broker, tls_redis: TlsRedis, text_cache_dir: Path,
                                        tmp_path: Path) -> None:
    p = _pipeline(broker, tls_redis, text_cache_dir, tmp_path, prefix="anoclip", username="anoclip",
                  password=APP_PW, ssl_ca_certs=str(tls_redis.ca))
    admin = tls_redis.client()
    assert admin.ping()
    with pytest.raises(redis.ConnectionError):  # the port speaks TLS only
        redis.Redis(port=tls_redis.port, socket_timeout=2, password=ADMIN_PW).ping()
    app = redis.Redis.from_url(tls_redis.url, username="anoclip", password=APP_PW, ssl_ca_certs=str(tls_redis.ca))
    with pytest.raises(redis.exceptions.NoPermissionError):
        app.set("other:key", "x")  # the ACL is in force: only anoclip:* keys
    w = p.start_worker("w")
    try:
        w.wait_ready()
        producer = FrameProducer(p.settings)
        ids = [producer.send(line, synthetic_frame(line, i)) for i, line in enumerate(["bottle", "wood", "pcb1"] * 2)]
        producer.close()
        wait_for(lambda: len(p.results()) >= len(ids), 60, f"{len(ids)} results over TLS")
        assert sorted(x["frame_id"] for x in p.results()) == sorted(ids)
        assert all(admin.exists(p.keys.done_marker(f)) for f in ids)
        assert APP_PW not in w.log() and ADMIN_PW not in w.log()
    finally:
        p.stop_all()


def test_wrong_password_fails_fast_naming_the_keys(broker: Broker, tls_redis: TlsRedis, text_cache_dir: Path,
                                                  tmp_path: Path) -> None:
    p = _pipeline(broker, tls_redis, text_cache_dir, tmp_path, prefix="anoclip", username="anoclip",
                  password="not-the-password-77", ssl_ca_certs=str(tls_redis.ca))
    w = p.start_worker("w")
    assert w.wait_exit(60) == 2, "a configuration error: exits once, not retried forever"
    log = w.log()
    assert "Redis refused the credentials" in log and "redis.username and redis.password" in log
    assert "rediss://127.0.0.1" in log and "not-the-password-77" not in log
    assert "unreachable" not in log


def test_out_of_memory_fails_readiness_naming_it_then_recovers(broker: Broker, text_cache_dir: Path,
                                                              tmp_path: Path) -> None:
    srv = RedisServer(tmp_path / "small-redis", stack.free_port())
    stack.start_redis(srv.run_dir, "127.0.0.1", srv.port, persist=False,
                      extra_args=["--maxmemory-policy", "noeviction"])
    p = _pipeline(broker, srv, text_cache_dir, tmp_path, prefix=f"t{uuid.uuid4().hex[:8]}")
    w = p.start_worker("w", heartbeat_interval_s=0.5)
    try:
        w.wait_ready()
        r = srv.client()
        r.set("ballast", b"x" * (4 << 20))
        r.config_set("maxmemory", "2mb")  # Redis now above maxmemory with nothing it may evict: writes fail OOM
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            r.set("probe", "x")
        producer = FrameProducer(p.settings)
        ids = [producer.send("wood", synthetic_frame("wood", i)) for i in range(4)]
        producer.close()

        def oom_named() -> bool:
            code, body = w.health()
            return code == 503 and any("out of memory" in x for x in body.get("problems", []))

        wait_for(oom_named, 30, "readiness to name Redis out of memory")
        time.sleep(2 * 0.5 + 0.5)  # a few housekeeping PINGs (which OOM allows) must not flip it back to ready
        assert oom_named(), f"a PING that works must not make a Redis that refuses writes ready: {w.health()}"
        assert w.alive() and w.health("/healthz")[0] == 200
        log = w.log()
        assert "out of memory" in log and "Redis unreachable" not in log
        r.delete("ballast")
        wait_for(lambda: len(p.results()) >= len(ids), 60, "the frames published once memory is free")
        wait_for(lambda: w.health()[0] == 200, 20, "ready again")
    finally:
        p.stop_all()
        stack.stop_redis(srv.run_dir, srv.port)


# --- Kafka over TLS -----------------------------------------------------------------------------------
class TlsTerminator:
    """A TLS front for a plaintext broker. The pinned Tansu build serves neither TLS (its `--cert` and `--key`
    options refuse to be given together; `--cert` alone still serves plaintext) nor SASL that kafka-python
    can use (docs/operations.md), so TLS ends here and the broker advertises this address: what is tested
    is our clients' TLS path end to end (CA verification included), not a broker's TLS."""

    def __init__(self, certs: dict[str, Path], backend_port: int) -> None:
        self.port = stack.free_port()
        self.backend_port = backend_port
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(str(certs["cert"]), str(certs["key"]))
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "TLS terminator did not start"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            br, bw = await asyncio.open_connection("127.0.0.1", self.backend_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, bw), self._pipe(br, writer))

    async def _main(self) -> None:
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, ssl=self.ctx)
        self.ready.set()
        await server.serve_forever()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(self._main())

    def close(self) -> None:
        def cancel() -> None:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()

        self.loop.call_soon_threadsafe(cancel)
        self.thread.join(timeout=5)


def test_worker_and_producer_reach_kafka_over_tls(redis_server: RedisServer, text_cache_dir: Path,
                                                  tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    backend = stack.free_port()
    front = TlsTerminator(certs, backend)
    run = tmp_path / "tansu"
    run.mkdir()
    advertised = f"tcp://127.0.0.1:{front.port}"  # clients come back through the TLS front
    with open(run / "tansu.log", "wb") as log:
        proc = subprocess.Popen([str(stack.fetch_tansu(TANSU_CACHE)), "broker", "--listener-url",
                                 f"tcp://127.0.0.1:{backend}", "--advertised-listener-url", advertised,
                                 "--storage-engine", "memory://tansu/"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: stack.port_open("127.0.0.1", backend), 20, "the broker")
        cfg = make_pipeline_config(Broker(f"127.0.0.1:{front.port}", run, front.port), redis_server.url,
                                   text_cache_dir)
        cfg["kafka"].update(security_protocol="SSL", ssl_cafile=str(certs["ca"]))
        p = Pipeline(cfg, tmp_path, redis_server)
        ensure_topics(p.settings.kafka)
        w = p.start_worker("w")
        try:
            w.wait_ready()
            producer = FrameProducer(p.settings)
            ids = [producer.send("wood", synthetic_frame("wood", i)) for i in range(4)]
            producer.close()
            wait_for(lambda: len(p.results()) >= 4, 60, "4 results through Kafka over TLS (the front speaks only TLS)")
            assert sorted(x["frame_id"] for x in p.results()) == sorted(ids)
        finally:
            p.stop_all()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        front.close()
