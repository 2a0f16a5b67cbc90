"""`anoclip serve` requests/s at concurrency 1 and 8 against model-only frames/s, in the same run.

    python bench/bench_serve.py --tiny                    # the tiny test model (pipeline overhead shows)
    python bench/bench_serve.py --precision fp32          # ViT-B-16-plus-240, random weights

Model-only: `Inspector.inspect` on decoded frames in this process, at batch 1 and at `--max-batch` (the
best a server could do). Served: a real `anoclip serve` subprocess on loopback, clients with keep-alive
connections POSTing JPEG frames (256 px synthetic parts), `--requests` per concurrency level. Model-only
is measured before and after the served rounds (median of both), so drift on a shared host shows.
Prints the CPU model and ISA flags, requests/s, latency p50/p99, and each ratio to model-only.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

# As the worker and `anoclip serve` run: OpenMP threads that spin while idle starve everything else on a busy
# host (measured 20x slower torch on the shared 2-core box). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation import synth  # noqa: E402
from pipeline.inspection.imaging import decode_image  # noqa: E402
from pipeline.inspection.runtimes import read_cpu_info  # noqa: E402
from pipeline.settings import load_settings  # noqa: E402
from pipeline.streaming import local_stack as stack  # noqa: E402
from pipeline.streaming.frame_sources import encode  # noqa: E402
from pipeline.verdicts.inspector import Inspector  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def model_only(inspector: Inspector, images: list, batch: int, seconds: float) -> float:
    """Frames/s of `Inspector.inspect` at `batch` for about `seconds`."""
    inspector.inspect("bottle", images[:batch])  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n == 0:
        inspector.inspect("bottle", images[:batch])
        n += batch
    return n / (time.perf_counter() - t0)


def load(port: int, bodies: list[bytes], concurrency: int, total: int) -> tuple[float, list[float]]:
    """(requests/s, latencies in s) of `total` requests from `concurrency` keep-alive clients."""
    lat: list[float] = []
    lock = threading.Lock()
    per = [total // concurrency + (1 if i < total % concurrency else 0) for i in range(concurrency)]

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        for i in range(per[k]):
            t0 = time.perf_counter()
            conn.request("POST", "/v1/lines/bottle/inspect", body=bodies[(k + i) % len(bodies)],
                         headers={"Content-Type": "image/jpeg"})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}")
            with lock:
                lat.append(time.perf_counter() - t0)
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total / (time.perf_counter() - t0), sorted(lat)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny random test model instead of ViT-B-16-plus-240")
    p.add_argument("--precision", default="fp32", help="model.precision (default fp32)")
    p.add_argument("--runtime", default="torch", help="model.runtime (default torch)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--requests", type=int, default=0, help="requests per concurrency level (default by model)")
    p.add_argument("--seconds", type=float, default=0, help="model-only time per measurement (default by model)")
    a = p.parse_args()
    cpu = read_cpu_info()
    print(f"CPU: {cpu.model}; ISA flags: {' '.join(cpu.isa)}")
    requests = a.requests or (400 if a.tiny else 24)
    seconds = a.seconds or (3.0 if a.tiny else 20.0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    cfg = {"model": {"arch": "anoclip-tiny" if a.tiny else "ViT-B-16-plus-240", "pretrained": "none",
                     "precision": a.precision, "runtime": a.runtime, "batch_size": a.max_batch},
           "lines": [{"id": "bottle", "class_name": "bottle", "threshold": {"image": 0.5, "pixel": 0.5}}],
           "worker": {"max_batch": a.max_batch}}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    settings = load_settings(tmp / "cfg.yaml")
    bodies = [encode(synth.render_part("bottle", 256, i, "scratch" if i % 3 == 0 else None)[0], "jpeg")[0]
              for i in range(16)]
    images = [decode_image(b) for b in bodies]
    images = (images * ((a.max_batch // len(images)) + 1))[: max(a.max_batch, 1)]
    inspector = Inspector.from_settings(settings, follow="never")
    print(f"model {settings.model.arch} (precision {inspector.model.precision}, runtime {settings.model.runtime}), "
          f"256 px JPEG frames, max batch {a.max_batch}")
    m1_before, mb_before = model_only(inspector, images, 1, seconds), model_only(inspector, images, a.max_batch,
                                                                                   seconds)

    port = stack.free_port()
    env = {k: v for k, v in os.environ.items() if k != "ANOCLIP_CONFIG"}
    server = subprocess.Popen([sys.executable, "-m", "workers.cli", "--log-level", "WARNING", "serve", "--config",
                               str(tmp / "cfg.yaml"), "--port", str(port), "--max-batch", str(a.max_batch)],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"anoclip serve did not become ready: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
        load(port, bodies, 1, 4)  # warm-up
        served = {c: load(port, bodies, c, requests) for c in (1, 8)}
    finally:
        server.terminate()
        server.wait(timeout=60)
    m1_after, mb_after = model_only(inspector, images, 1, seconds), model_only(inspector, images, a.max_batch,
                                                                                 seconds)
    m1, mb = statistics.median([m1_before, m1_after]), statistics.median([mb_before, mb_after])
    print(f"model-only batch 1: {m1:.2f} frames/s (before {m1_before:.2f}, after {m1_after:.2f})")
    print(f"model-only batch {a.max_batch}: {mb:.2f} frames/s (before {mb_before:.2f}, after {mb_after:.2f})")
    print(f"{'concurrency':>11} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'vs model b1':>12} "
          f"{'vs model b' + str(a.max_batch):>12}")
    for c, (rps, lat) in served.items():
        p50, p99 = lat[len(lat) // 2] * 1e3, lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3
        print(f"{c:>11} {rps:>11.2f} {p50:>8.1f} {p99:>8.1f} {rps / m1:>11.2f}x {rps / mb:>11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
