"""Worker scoring throughput with buffered-TTA refreshes running vs with TTA off, in the same run.

    python bench/bench_streaming_tta.py --frames 120 --refresh-every 30 [--redis redis://127.0.0.1:6379/15]

Both arms score the same synthetic frames with the same model, exactly as the worker does
(`score_raw` + `judge` with the line's served adapter); the TTA arm also feeds the token buffer and
lets the adapter service's trainer thread refresh (train, gate, publish to the Redis registry, hot
swap) while scoring goes on. Arms alternate in rounds so host noise hits both. Target: >= 90%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.adaptation.registry import VersionRegistry  # noqa: E402
from pipeline.adaptation.tta.service import AdapterService  # noqa: E402
from pipeline.evaluation import synth  # noqa: E402
from pipeline.inspection.frame_scorer import FrameScorer  # noqa: E402
from pipeline.model import create_anoclip  # noqa: E402
from pipeline.redis_keys import RedisKeys  # noqa: E402
from pipeline.settings import load_settings  # noqa: E402


def run_arm(insp: FrameScorer, frames: list, batch: int, service: AdapterService | None) -> tuple[float, int]:
    """Frames/s of scoring `frames`, and how many refreshes were promoted meanwhile."""
    t0 = time.perf_counter()
    for i in range(0, len(frames), batch):
        chunk = frames[i : i + batch]
        adapter, version = service.adapter_for("bottle") if service else (None, None)
        t1 = time.perf_counter()
        raws = insp.score_raw("bottle", chunk, adapter)
        per = (time.perf_counter() - t1) / len(chunk)
        for j, raw in enumerate(raws):
            insp.judge("bottle", raw, version)
            if service:
                service.observe("bottle", f"f{i + j}-{uuid.uuid4().hex[:6]}", raw, per, time.time())
        print(f"\r  {'tta' if service else 'off'}: {min(i + batch, len(frames))}/{len(frames)}", end="",
              file=sys.stderr, flush=True)
    print(file=sys.stderr)
    fps = len(frames) / (time.perf_counter() - t0)
    promoted = len(service.registry.versions("bottle")) if service else 0
    return fps, promoted


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B-16-plus-240")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--refresh-every", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    a = p.parse_args()
    settings = load_settings(
        None,
        model={"arch": a.arch, "pretrained": "none", "precision": a.precision, "batch_size": a.batch,
               "text_cache_dir": "~/.cache/anoclip/text"},
        lines=[{"id": "bottle", "class_name": "bottle", "threshold": {"image": 1.01}}],
        tta={"mode": "buffered", "refresh_every": a.refresh_every, "min_frames": min(20, a.refresh_every),
             "trainer_poll_s": 0.2, "admit_image_z": None, "admit_max_abnormal_share": 1.0},
    )
    model = create_anoclip(settings.model)
    size = model.image_size
    frames = [synth.render_part("bottle", size, i, None)[0] for i in range(a.frames)]
    client = redis.Redis.from_url(a.redis)
    results: dict[str, list[float]] = {"off": [], "tta": []}
    promoted = []
    for r in range(a.rounds):
        for arm in ("off", "tta"):
            insp = FrameScorer(settings, model)
            insp.prepare_line("bottle")
            service = None
            if arm == "tta":
                reg = VersionRegistry(client, RedisKeys(f"bench-{uuid.uuid4().hex[:8]}"))
                service = AdapterService(insp, reg, ["bottle"], "bench").start()
            fps, n = run_arm(insp, frames, a.batch, service)
            if service:
                service.stop()
                promoted.append(n)
            results[arm].append(fps)
            print(f"round {r + 1} {arm}: {fps:.2f} frames/s" + (f", {n} versions promoted" if service else ""))
    off, tta = statistics.median(results["off"]), statistics.median(results["tta"])
    print(f"{a.arch} {a.precision} batch {a.batch}: TTA off {off:.2f} f/s, refreshes running {tta:.2f} f/s, "
          f"ratio {tta / off:.3f} (target >= 0.90); promoted per round {promoted}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
