"""Full AnoCLIP scoring (maps + image score) against a bare image forward of the same backbone.

    python bench/bench_scorer.py --precision fp32 bf16 --batch 1 4 8

Both are timed interleaved in one process, same batch, same weights (random: values do not change
cost), so host noise hits them alike. Two baselines are printed: open_clip's own `encode_image` and
our plain-CLIP path (numerically equal to it; the fair one under CPU bf16, where open_clip's
`nn.MultiheadAttention` is pathologically slow at batch > 1). Target: full <= 1.15 x bare.
Text features are random unit vectors of the right shape: they are computed once per line, never
per frame, so they are not part of the per-frame cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.inspection.runtimes import read_cpu_info  # noqa: E402
from pipeline.model import TextFeatures, create_anoclip  # noqa: E402
from pipeline.settings import ModelSettings  # noqa: E402


def _time(fn, sync) -> float:
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def bench(arch: str, precision: str, batch: int, iters: int, warmup: int, device: str) -> dict[str, float]:
    model = create_anoclip(ModelSettings(arch=arch, pretrained="none", device=device, precision=precision))
    dev = model.device
    c = model.embed_dim
    g = torch.Generator().manual_seed(0)
    text = TextFeatures(
        F.normalize(torch.randn(2, c, generator=g), dim=-1).to(dev),
        F.normalize(torch.randn(462, c, generator=g), dim=-1).to(dev),
        F.normalize(torch.randn(462, c, generator=g), dim=-1).to(dev),
    )
    x = torch.randn(batch, 3, model.image_size, model.image_size, generator=g).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    @torch.no_grad()
    def open_clip_bare() -> None:
        with model._autocast():
            model.clip.encode_image(x)

    @torch.no_grad()
    def plain_bare() -> None:
        with model._autocast():
            model.encoder(x, with_patches=False)

    @torch.no_grad()
    def full() -> None:
        model(x, text)

    runs = {"open_clip": open_clip_bare, "plain": plain_bare, "anoclip": full}
    skip_oc = dev.type == "cpu" and precision != "fp32" and batch > 1
    if skip_oc:
        runs.pop("open_clip")  # minutes per call on CPU bf16 at batch > 1 (see cpu-notes)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(warmup + iters):
        for k, fn in runs.items():
            t = _time(fn, sync)
            if i >= warmup:
                times[k].append(t)
        print(f"\r  {arch} {precision} b{batch}: iter {i + 1}/{warmup + iters}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return {k: batch / statistics.median(v) for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B-16-plus-240")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cpu = read_cpu_info()
    print(f"CPU: {cpu.model}; ISA flags: {' '.join(cpu.isa)}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {a.device}")
    header = f"{'arch':<20} {'prec':<5} {'batch':>5} {'open_clip f/s':>14} {'plain f/s':>10} {'anoclip f/s':>12} " \
             f"{'cost vs plain':>14} {'cost vs open_clip':>18}"
    rows = []
    for prec in a.precision:
        for b in a.batch:
            r = bench(a.arch, prec, b, a.iters, a.warmup, a.device)
            oc = r.get("open_clip")
            rows.append(
                f"{a.arch:<20} {prec:<5} {b:>5} {oc if oc else float('nan'):>14.2f} {r['plain']:>10.2f} "
                f"{r['anoclip']:>12.2f} {r['plain'] / r['anoclip']:>13.3f}x "
                f"{(oc / r['anoclip']) if oc else float('nan'):>17.3f}x"
            )
    print(header)
    print("\n".join(rows))
    print("cost = bare frames/s / anoclip frames/s (1.15x = 15% extra); target <= 1.15x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
