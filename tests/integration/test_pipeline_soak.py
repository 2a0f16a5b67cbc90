"""Issue 15, finding 3: Redis memory stays flat at a fixed frame rate (bounded soak, loopback only).

Redis runs as `anoclip stack` runs it (maxmemory, `volatile-lru`); the worker stores a heatmap for every
frame (`store_heatmaps: all`, the most memory-hungry policy) and streams are capped at 100 entries. After
warm-up (Redis has reached maxmemory) the used memory must stay flat while frames keep arriving, with
nothing refused: per-frame blobs are evicted, done markers, thresholds and streams are not.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest

from pipeline.streaming import local_stack as stack
from pipeline.streaming.kafka_io import ensure_topics
from pipeline.streaming.producer import FrameProducer
from tests.integration.conftest import Broker, Pipeline, RedisServer, make_pipeline_config, synthetic_frame, wait_for

pytestmark = pytest.mark.integration

MAXMEMORY = 8 << 20
FPS, SECONDS = 20, 14


def test_redis_memory_is_flat_after_warm_up(broker: Broker, text_cache_dir: Path, tmp_path: Path) -> None:
    srv = RedisServer(tmp_path / "redis", stack.free_port())
    stack.start_redis(srv.run_dir, "127.0.0.1", srv.port, persist=False, maxmemory=f"{MAXMEMORY >> 20}mb")
    cfg = make_pipeline_config(broker, srv.url, text_cache_dir)
    cfg["redis"].update(prefix=f"t{uuid.uuid4().hex[:8]}", store_heatmaps="all", results_maxlen=100,
                        alerts_maxlen=100)
    p = Pipeline(cfg, tmp_path, srv)
    ensure_topics(p.settings.kafka)
    w = p.start_worker("w")
    r = srv.client()
    try:
        w.wait_ready()
        n = FPS * SECONDS
        frames = [synthetic_frame(("wood", "pcb1")[i % 2], i, size=256) for i in range(40)]
        samples: list[tuple[int, int]] = []  # (frames sent, used_memory)
        sent = [0]

        def produce() -> None:
            producer = FrameProducer(p.settings)
            t0 = time.monotonic()
            for i in range(n):
                time.sleep(max(0.0, t0 + i / FPS - time.monotonic()))
                producer.send(("wood", "pcb1")[i % 2], frames[i % len(frames)])
                sent[0] = i + 1
            producer.close()

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        while thread.is_alive():
            samples.append((sent[0], int(r.info("memory")["used_memory"])))
            time.sleep(0.25)
        thread.join()
        wait_for(lambda: w.metric("anoclip_frames_scored_total") == n, 60, f"{n} frames scored")

        heatmap_bytes = sum(len(r.get(k) or b"") for k in r.scan_iter(f"{p.keys.prefix}:frame:*:heatmap", count=1000))
        heatmaps_kept = sum(1 for _ in r.scan_iter(f"{p.keys.prefix}:frame:*:heatmap", count=1000))
        per_frame = heatmap_bytes / max(1, heatmaps_kept)
        assert per_frame * n > 2.5 * MAXMEMORY, f"the soak writes {per_frame * n / 2**20:.0f} MB: too little to test"
        warm = next(i for i, (_, used) in enumerate(samples) if used >= 0.9 * MAXMEMORY)
        after = [used for _, used in samples[warm:]]
        frames_after = samples[-1][0] - samples[warm][0]
        assert frames_after >= n // 3, "a long enough stretch after warm-up"
        assert max(after) <= 1.05 * MAXMEMORY, f"used_memory peaked at {max(after) / 2**20:.1f} MB"
        assert max(after) - min(after) <= 0.15 * MAXMEMORY, \
            f"used_memory moved {(max(after) - min(after)) / 2**20:.1f} MB over {frames_after} frames after warm-up"
        info = r.info()
        assert info["evicted_keys"] > 0
        assert w.metric("anoclip_redis_errors_total") == 0, "nothing refused: eviction made room every time"
        done = sum(1 for _ in r.scan_iter(f"{p.keys.prefix}:done:*", count=1000))
        assert done == n, "every done marker kept (never evicted)"
        assert r.hget(p.keys.threshold("pcb1"), "source") is not None
        print(f"soak: {n} frames at {FPS} fps, heatmap {per_frame / 1024:.0f} KB/frame, used_memory after warm-up "
              f"{min(after) / 2**20:.2f}..{max(after) / 2**20:.2f} MB (maxmemory {MAXMEMORY >> 20} MB), "
              f"{info['evicted_keys']} keys evicted")
    finally:
        p.stop_all()
        stack.stop_redis(srv.run_dir, srv.port)
