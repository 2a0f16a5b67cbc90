"""The job of `anoclip demo`: the main job on one machine, end to end.

Brings the local stack up, starts an inspection worker, sends synthetic parts (some with drawn
defects) for each line, and prints alerts as they arrive on the Redis alerts stream, with the defect
that was actually drawn beside the verdict. Stops after `count` frames per line or on Ctrl-C: the
worker is drained with SIGTERM, and whatever the demo started is stopped again (unless `keep_stack`).
The demo is a live show: it prints as it goes, its closing lines included, and returns the figures.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.dashboard.server import DEFAULT_PORT
from pipeline.errors import AnoclipError
from pipeline.operators.describe import describe_regions
from pipeline.redis_keys import RedisKeys
from pipeline.services.redis_client import make_redis
from pipeline.settings import Settings, load_settings, resolve_config_path
from pipeline.streaming import local_stack as stack
from pipeline.streaming.frame_sources import SourceError, synthetic_frames, synthetic_kind
from pipeline.streaming.producer import produce

log = logging.getLogger("anoclip.demo")


@dataclass(frozen=True)
class DemoSummary:
    """What one demo run did: its exit code (0 = every frame scored, 1 = a failure or timeout, 130 = Ctrl-C)
    and the figures of the frames scored."""

    exit_code: int
    frames: int = 0  # frames scored (results seen on the line's results streams)
    alerts: int = 0
    p50_ms: float = float("nan")  # capture-to-publish latency
    p99_ms: float = float("nan")


def worker_env(settings: Settings, *, tiny: bool = False, warmup: int | None = None,
               quantile: float | None = None) -> dict[str, str]:
    """The worker's environment: tiny model and demo calibration as `ANOCLIP_...` overrides of the config."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if tiny:
        env.update(ANOCLIP_MODEL__ARCH="anoclip-tiny", ANOCLIP_MODEL__PRETRAINED="none")
    warmup = warmup if warmup is not None else (8 if tiny else None)
    quantile = quantile if quantile is not None else (0.8 if tiny else None)
    if warmup is not None or quantile is not None:
        lines = []
        for line in settings.lines:
            d = line.model_dump()
            if warmup is not None:
                d["threshold"]["warmup_frames"] = warmup
            if quantile is not None:
                d["threshold"]["quantile"] = quantile
            lines.append(d)
        env["ANOCLIP_LINES"] = json.dumps(lines)
    return env


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def format_alert(fields: dict[str, str]) -> str:
    """One alert of the alerts stream as the demo prints it: regions in words, the drawn defect beside."""
    regions = json.loads(fields.get("regions", "[]"))
    where = describe_regions(regions, int(fields.get("width") or 0), int(fields.get("height") or 0))
    truth = fields.get("synthetic_defect")
    truth_s = f"  [drawn: {truth}]" if truth else ""
    return (f"ALERT {fields['line']:<8} {fields.get('camera', '')}  score {float(fields['score']):.3f} "
            f"(threshold {float(fields['threshold']):.3f})  {where}{truth_s}  frame {fields['frame_id']}")


def run_demo(
    *,
    config: str | None = None,
    count: int = 40,
    fps: float = 4.0,
    lines: list[str] | None = None,
    defect_rate: float = 0.3,
    size: int = 256,
    tiny: bool = False,
    warmup: int | None = None,
    quantile: float | None = None,
    keep_stack: bool = False,
    timeout: float = 600.0,
) -> DemoSummary:
    """Run the demo (`lines`: default every configured line); see the module docstring."""
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    settings = load_settings(config)
    if tiny:
        print("tiny random-weight model: the pipeline runs for real, but its verdicts are random", flush=True)
    lines = lines or [ln.id for ln in settings.lines]
    kinds = {}
    for line_id in lines:
        line = settings.line(line_id)
        try:
            kinds[line_id] = synthetic_kind(line.id, line.class_name)
        except SourceError as e:
            raise AnoclipError(f"{e}; choose lines with --line") from e

    before = {s.name: s.up for s in stack.stack_status(settings)}
    print("bringing the local stack up ...", flush=True)
    for svc in stack.stack_up(settings):
        print("  " + svc.describe(), flush=True)
    started_here = [name for name, was_up in before.items() if not was_up]

    run_dir = Path(settings.redis.local_dir).expanduser().parent
    run_dir.mkdir(parents=True, exist_ok=True)
    worker_log = run_dir / "demo-worker.log"
    port = settings.worker.metrics_port or stack.free_port()
    cmd = [sys.executable, "-m", "workers.cli", "worker", "--metrics-port", str(port)]
    cfg_path = resolve_config_path(config)
    if cfg_path is not None:
        cmd += ["--config", str(cfg_path)]
    print(f"starting a worker (log {worker_log}) ...", flush=True)
    env = worker_env(settings, tiny=tiny, warmup=warmup, quantile=quantile)
    with open(worker_log, "ab") as logf:
        worker = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
    summary = DemoSummary(exit_code=1)
    try:
        summary = feed_and_watch(settings, lines, kinds, worker, port, worker_log, count=count, fps=fps,
                                 defect_rate=defect_rate, size=size, timeout=timeout, keep_stack=keep_stack)
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
        summary = DemoSummary(exit_code=130)
    finally:
        if worker.poll() is None:
            print("draining the worker (SIGTERM) ...", flush=True)
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
        if started_here and not keep_stack:
            stopped = stack.stack_down(settings)
            print(f"stopped what the demo started: {', '.join(stopped) or 'nothing'}", flush=True)
        elif started_here:
            print("the stack keeps running (anoclip stack down stops it)", flush=True)
    return summary


def feed_and_watch(settings: Settings, lines: list[str], kinds: dict[str, str], worker: subprocess.Popen[bytes],
                   port: int, worker_log: Path, *, count: int, fps: float, defect_rate: float, size: int,
                   timeout: float, keep_stack: bool) -> DemoSummary:
    """Wait for the started worker, send `count` synthetic frames per line and print the alerts until every
    frame is scored (or the worker dies, or `timeout` seconds pass)."""
    end = time.monotonic() + timeout
    while not _ready(port):
        if worker.poll() is not None:
            tail = worker_log.read_text(errors="replace")[-2000:]
            print(f"the worker exited with {worker.returncode}:\n{tail}", file=sys.stderr)
            return DemoSummary(exit_code=1)
        if time.monotonic() > end:
            print("the worker did not become ready in time", file=sys.stderr)
            return DemoSummary(exit_code=1)
        time.sleep(0.3)
    print(f"worker ready: metrics at http://127.0.0.1:{port}/metrics", flush=True)
    print(f"watch it live: run `anoclip dashboard` in another terminal and open http://127.0.0.1:{DEFAULT_PORT}/ "
          "(add --keep-stack here to browse and label the alerts after the demo)", flush=True)

    keys = RedisKeys(settings.redis.prefix)
    r = make_redis(settings.redis)
    streams = {keys.alerts_stream: _last_id(r, keys.alerts_stream)}
    for line in lines:
        streams[keys.results_stream(line)] = _last_id(r, keys.results_stream(line))

    sent: set[str] = set()
    lock = threading.Lock()

    def send(line: str) -> None:
        frames = synthetic_frames(kinds[line], size=size, seed=zlib.crc32(line.encode()) % 1000,
                                  defect_rate=defect_rate)

        def on_sent(_n: int, fid: str) -> None:
            with lock:
                sent.add(fid)

        produce(settings, line, frames, fps=fps, count=count, camera="demo-cam", on_sent=on_sent)

    producers = [threading.Thread(target=send, args=(line,), daemon=True) for line in lines]
    for t in producers:
        t.start()
    print(f"sending {count} synthetic frames per line for {', '.join(lines)} at {fps} fps ...",
          flush=True)

    total = count * len(lines)
    done: dict[str, float] = {}
    alerts = 0
    last_progress = 0.0
    waiting: list[tuple[str, dict[str, str]]] = []
    while len(done) < total:
        if time.monotonic() > end:
            print(f"timed out with {len(done)}/{total} results", file=sys.stderr)
            return DemoSummary(exit_code=1, frames=len(done), alerts=alerts)
        if worker.poll() is not None:
            print(f"the worker exited with {worker.returncode}; see {worker_log}", file=sys.stderr)
            return DemoSummary(exit_code=1, frames=len(done), alerts=alerts)
        reply = r.xread(streams, block=500, count=100)
        arrived = []
        for stream, entries in reply or []:
            name = stream.decode()
            for entry_id, raw in entries:
                streams[name] = entry_id.decode()
                arrived.append((name, {k.decode(): v.decode() for k, v in raw.items()}))
        # A frame's outputs can arrive before the producer has recorded its id (the worker is faster than the
        # broker's acknowledgement): such entries wait for the next round instead of being dropped.
        waiting, arrived = [], waiting + arrived
        for name, fields in arrived:
            with lock:  # only this demo's frames: others (another producer, a replay) are not counted
                mine = fields.get("frame_id") in sent
            if not mine:
                waiting.append((name, fields))
                continue
            if name == keys.alerts_stream:
                if fields.get("line") in lines:
                    alerts += 1
                    result = r.get(keys.frame(fields["frame_id"], "result"))
                    if result:
                        fields["synthetic_defect"] = json.loads(result).get("synthetic_defect", "")
                    print(format_alert(fields), flush=True)
            else:
                done[fields["frame_id"]] = float(fields.get("latency_ms", "nan"))
        del waiting[:-10_000]  # bounded: another producer's frames never become ours
        if time.monotonic() - last_progress > 5:
            last_progress = time.monotonic()
            print(f"... {len(done)}/{total} frames scored, {alerts} alerts", flush=True)
    lat = sorted(v for v in done.values() if v == v)
    p50 = lat[len(lat) // 2] if lat else float("nan")
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
    print(f"done: {total} frames scored, {alerts} alerts; capture-to-publish latency p50 {p50:.0f} ms, "
          f"p99 {p99:.0f} ms", flush=True)
    print(f"results: XRANGE {keys.results_stream(lines[0])} - +   alerts: XRANGE {keys.alerts_stream} - +   "
          f"masks: GET {keys.frame('<frame-id>', 'mask')}", flush=True)
    print(f"dashboard: `anoclip dashboard`, then http://127.0.0.1:{DEFAULT_PORT}/ (alerts, masks, labels; "
          f"needs the stack: {'it keeps running' if keep_stack else 'rerun with --keep-stack'})", flush=True)
    return DemoSummary(exit_code=0, frames=total, alerts=alerts, p50_ms=p50, p99_ms=p99)


def _last_id(r: Any, stream: str) -> str:
    last = r.xrevrange(stream, count=1)
    return last[0][0].decode() if last else "0-0"
