"""Scale-out within one line: two workers on one line against one worker, measured in the same run.

    python bench/bench_scale.py                 # the configured architecture, random weights
    python bench/bench_scale.py --tiny          # the tiny test model (the pipeline's own costs dominate)

Frames are keyed by frame id (`kafka.partition_key: frame`), so one line spreads over every partition of
the topic and every worker of the group scores it. For each round, on a private broker and Redis started
for the run: N frames of ONE line are produced as fast as possible to a fresh topic, first with one
worker, then with two (each worker one torch thread, `OMP_NUM_THREADS=1`), and frames/s = frames /
(last published - first captured). Rounds alternate the two cases; medians are compared. Target: two
workers >= 1.8x one worker. Worker CPU seconds per frame are printed too: on a shared host wall-clock
rates swing with other tenants, CPU per frame does not. The broker, Redis and this producer share the
host with the workers, so on a 2-core host two workers compete with them for the second core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.bench_pipeline import cpu_seconds, log, render_frames, results_for  # noqa: E402
from pipeline.redis_keys import RedisKeys  # noqa: E402
from pipeline.services.redis_client import make_redis  # noqa: E402
from pipeline.settings import Settings, load_settings  # noqa: E402
from pipeline.streaming import local_stack as stack  # noqa: E402
from pipeline.streaming.kafka_io import ensure_topics  # noqa: E402

ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_info() -> str:
    """CPU model and the ISA flags that matter for torch on CPU, from /proc/cpuinfo."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("unknown", "x86_64", ""):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return f"{model}; {os.cpu_count()} CPUs; ISA: {' '.join(f for f in ISA_FLAGS if f in flags) or 'n/a'}"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "config.yaml"))
    p.add_argument("--tiny", action="store_true", help="anoclip-tiny instead of the configured architecture")
    p.add_argument("--pretrained", default="none", help="weights (default none: random, same timings)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--frames", type=int, default=None, help="frames per case (default 24, tiny 400)")
    p.add_argument("--size", type=int, default=256, help="frame size in pixels (default 256)")
    p.add_argument("--batch", type=int, default=4, help="worker micro-batch (default 4)")
    p.add_argument("--line", default="bottle", help="the one line all frames belong to")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="alternating one-worker / two-worker rounds")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    return p.parse_args()


def make_config(args: argparse.Namespace, bootstrap: str, redis_url: str) -> dict[str, Any]:
    base = yaml.safe_load(Path(args.config).read_text()) or {}
    tag = uuid.uuid4().hex[:8]
    model = dict(base.get("model", {}))
    model.update(pretrained=args.pretrained, batch_size=args.batch, precision=args.precision, device="cpu")
    if args.tiny:
        model["arch"] = "anoclip-tiny"
    line = next(dict(ln) for ln in base.get("lines", []) if ln["id"] == args.line)
    line["threshold"] = {"image": 0.5, "pixel": 0.5}  # no calibration: both cases judge alike
    kafka = dict(base.get("kafka", {}))
    kafka.update(bootstrap_servers=bootstrap, frames_topic=f"scale-{tag}", dlq_topic=f"scale-{tag}.dlq",
                 group_id=f"scale-{tag}", partitions=args.partitions, partition_key="frame",
                 enable_idempotence=False, fetch_max_wait_ms=50, session_timeout_ms=6000,
                 heartbeat_interval_ms=1000)
    return {"model": model, "lines": [line], "kafka": kafka,
            "redis": {**base.get("redis", {}), "url": redis_url, "prefix": f"scale{tag}"},
            "worker": {**base.get("worker", {}), "max_batch": args.batch, "max_in_flight": 8 * args.batch},
            "tta": {"mode": "off"}}


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith(name) and not ln.startswith("#") and ln.split("{")[0].split(" ")[0] == name)


def start_workers(n: int, cfg_path: Path, tmp: Path) -> list[tuple[subprocess.Popen[bytes], int, Path]]:
    out = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("ANOCLIP_CONFIG", None)
    for i in range(n):
        port, log_path = stack.free_port(), tmp / f"worker-{n}-{i}-{uuid.uuid4().hex[:4]}.log"
        with open(log_path, "wb") as lf:
            proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "worker", "--config", str(cfg_path),
                                     "--worker-id", f"w{i}", "--metrics-port", str(port)],
                                    cwd=REPO, env=env, stdout=lf, stderr=subprocess.STDOUT)
        out.append((proc, port, log_path))
    return out


def wait_spread(workers: list[tuple[subprocess.Popen[bytes], int, Path]], partitions: int, timeout: float) -> None:
    """Until every worker is ready and the group has handed out every partition."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for proc, _, log_path in workers:
            if proc.poll() is not None:
                raise SystemExit(f"worker exited:\n{log_path.read_text()[-3000:]}")
        try:
            owned = [metric(port, "anoclip_partitions_assigned") for _, port, _ in workers]
            if all(o > 0 for o in owned) and sum(owned) == partitions:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("workers not ready in time")


def run_case(n_workers: int, settings: Settings, cfg: dict[str, Any], args: argparse.Namespace, tmp: Path,
             frames: list[Any]) -> tuple[float, float, dict[str, int]]:
    """frames/s, worker CPU ms per frame, frames per worker, on a fresh topic and group."""
    from pipeline.streaming.producer import FrameProducer

    tag = uuid.uuid4().hex[:8]
    cfg = json.loads(json.dumps(cfg))
    cfg["kafka"].update(frames_topic=f"scale-{tag}", dlq_topic=f"scale-{tag}.dlq", group_id=f"scale-{tag}")
    cfg["redis"]["prefix"] = f"scale{tag}"
    cfg_path = tmp / f"scale-{tag}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    settings = load_settings(cfg_path)
    ensure_topics(settings.kafka)
    workers = start_workers(n_workers, cfg_path, tmp)
    r, keys = make_redis(settings.redis), RedisKeys(settings.redis.prefix)
    try:
        wait_spread(workers, args.partitions, 900)
        warm_n = 2 * args.batch * n_workers  # every worker has scored a full batch before timing
        producer = FrameProducer(settings)
        warm_ids = {producer.send(args.line, f) for _, f in frames[:warm_n]}
        producer.flush()
        while len(results_for(r, keys, [args.line], warm_ids)) < warm_n:
            time.sleep(0.2)
        pids = [p.pid for p, _, _ in workers]
        c0 = cpu_seconds(pids)
        timed = frames[warm_n:warm_n + args.frames_per_case]
        ids = {producer.send(args.line, f) for _, f in timed}
        producer.close()
        last = time.monotonic()
        while (got := len(results_for(r, keys, [args.line], ids))) < len(ids):
            if time.monotonic() - last > 10:
                last = time.monotonic()
                log(f"{n_workers} worker(s): {got}/{len(ids)} results")
            time.sleep(0.2)
        cpu_ms = 1000 * (cpu_seconds(pids) - c0) / len(ids)
        res = results_for(r, keys, [args.line], ids)
        fps = len(res) / ((max(int(x["published_ts"]) for x in res) - min(int(x["capture_ts"]) for x in res)) / 1e9)
        per_worker: dict[str, int] = {}
        for x in res:
            per_worker[x["worker"]] = per_worker.get(x["worker"], 0) + 1
        return fps, cpu_ms, per_worker
    finally:
        for proc, _, _ in workers:
            proc.send_signal(signal.SIGTERM)
        for proc, _, _ in workers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> int:
    args = parse_args()
    # A `kill` must still stop the broker, Redis and workers this run started (the `finally`s below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    n = args.frames or (400 if args.tiny else 24)
    tmp = Path(tempfile.mkdtemp(prefix="anoclip-scale-"))
    kport, rport = stack.free_port(), stack.free_port()
    log(f"CPU: {cpu_info()}")
    log(f"starting a private broker on :{kport} and Redis on :{rport} (in {tmp})")
    stack.start_broker(stack.fetch_tansu(REPO / ".kafka"), tmp, "127.0.0.1", kport)
    stack.start_redis(tmp, "127.0.0.1", rport, persist=False)
    try:
        cfg = make_config(args, f"127.0.0.1:{kport}", f"redis://127.0.0.1:{rport}/0")
        settings = Settings(**cfg)
        args.frames_per_case = n
        frames = render_frames([args.line], n + 4 * args.batch, args.size)  # warm-up: 2 batches per worker
        log(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs before the run")
        log(f"model {settings.model.arch} ({settings.model.precision}, pretrained={settings.model.pretrained}), "
            f"{n} frames of {args.size}px of line {args.line} per case, {args.partitions} partitions, "
            f"batch {args.batch}, one torch thread per worker")
        runs: dict[int, list[tuple[float, float, dict[str, int]]]] = {1: [], 2: []}
        for rnd in range(1, args.rounds + 1):
            for k in (1, 2):
                log(f"round {rnd}/{args.rounds}: {k} worker(s)")
                runs[k].append(run_case(k, settings, cfg, args, tmp, frames))
                fps, cpu_ms, per = runs[k][-1]
                log(f"round {rnd}: {k} worker(s) {fps:.2f} frames/s, {cpu_ms:.0f} ms worker CPU/frame, "
                    f"frames per worker {per}")
        one = float(np.median([x[0] for x in runs[1]]))
        two = float(np.median([x[0] for x in runs[2]]))
        ratio = two / one
        cpu1 = float(np.median([x[1] for x in runs[1]]))
        cpu2 = float(np.median([x[1] for x in runs[2]]))
        print()
        print(f"CPU             {cpu_info()}")
        print(f"model           {settings.model.arch} ({settings.model.precision}), {args.size}px, batch {args.batch}")
        print(f"one worker      {one:8.2f} frames/s  runs {', '.join(f'{x[0]:.2f}' for x in runs[1])}")
        print(f"two workers     {two:8.2f} frames/s  runs {', '.join(f'{x[0]:.2f}' for x in runs[2])}; "
              f"frames per worker {runs[2][-1][2]}")
        print(f"ratio           {ratio:8.2f}   (target >= 1.8: {'met' if ratio >= 1.8 else 'NOT met'})")
        print(f"worker CPU      {cpu1:.0f} ms/frame with one worker, {cpu2:.0f} ms/frame with two "
              f"(equal means the work split without overhead)")
        print(f"CPU ratio       {2 * cpu1 / cpu2:8.2f}   (2 x one worker's CPU/frame / two workers': what two free "
              f"cores would deliver; the wall-clock ratio needs them free of other load)")
        if args.out:
            Path(args.out).write_text(json.dumps({
                "cpu": cpu_info(), "model": settings.model.arch, "precision": settings.model.precision,
                "frames": n, "one_worker_fps": [x[0] for x in runs[1]], "two_workers_fps": [x[0] for x in runs[2]],
                "ratio": ratio, "cpu_ratio": 2 * cpu1 / cpu2, "worker_cpu_ms_per_frame": {"one": cpu1, "two": cpu2},
                "load_average": os.getloadavg()}, indent=2))
        return 0
    finally:
        stack.stop_broker(tmp, kport)
        stack.stop_redis(tmp, rport)


if __name__ == "__main__":
    sys.exit(main())
