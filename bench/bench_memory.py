"""Patch-memory cost: scoring with a full bank vs zero-shot, bank builds and refreshes vs scoring time.

    python bench/bench_memory.py [--precision fp32] [--batch 8] [--frames 1000] [--budget-mib 16 32]

1. Per frame, timed interleaved in one process (same batch, same weights; random: values do not
   change cost): zero-shot AnoCLIP (`model(x, text)`) against memory scoring (the same forward with
   the memory's hidden layer kept, then the bank's nearest neighbours for the batch in one matmul, z
   scales, fused maps and image scores: `BankScorer.with_bank_batch`), with a bank filled to the byte
   budget. Target <= 1.3x.
2. A bank built from 1,000 frames' patches at once (two-stage greedy coreset), and the stream's way of
   getting there (pending patches reduced block by block as frames arrive, then the refresh), each as
   a share of the time memory scoring those frames takes (per-frame time from part 1). Target < 10%.
3. Memory per line: the bank, the stream's window and pending rows.

Features are random unit vectors of the real width (ViT-B-16-plus-240: 896 per layer, 225 patches per
240 px frame): the coreset's work depends on counts, not values. Prints the CPU model and ISA flags first.
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

from pipeline.adaptation.memory.bank import BankScales, MemoryBank, PatchRows, build_bank  # noqa: E402
from pipeline.adaptation.memory.params import BankTarget, MemoryParams  # noqa: E402
from pipeline.adaptation.memory.records import FrameRecord, frame_record  # noqa: E402
from pipeline.adaptation.memory.scoring import BankScorer  # noqa: E402
from pipeline.inspection.frame_scorer import RawScore  # noqa: E402
from pipeline.inspection.runtimes import read_cpu_info  # noqa: E402
from pipeline.model import TextFeatures, create_anoclip  # noqa: E402
from pipeline.model.memory import ScoreScale  # noqa: E402
from pipeline.settings import MemorySettings, ModelSettings  # noqa: E402


def _unit_rows(n: int, width: int, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, width, generator=gen), dim=-1)


def _bank(rows: int, width: int, gen: torch.Generator) -> MemoryBank:
    scales = BankScales(ScoreScale(0.5, 0.05), ScoreScale(0.5, 0.01), ScoreScale(0.5, 0.01))
    return MemoryBank(_unit_rows(rows, width, gen).half(), torch.zeros(rows, dtype=torch.int64), ["f"], scales,
                      {"id": "bench"})


def per_frame(model, params: MemoryParams, batch: int, iters: int, warmup: int) -> dict[str, float]:
    """Seconds per frame: zero-shot and memory scoring, medians of interleaved runs."""
    gen = torch.Generator().manual_seed(0)
    c = model.embed_dim
    text = TextFeatures(F.normalize(torch.randn(2, c, generator=gen), dim=-1),
                        F.normalize(torch.randn(462, c, generator=gen), dim=-1),
                        F.normalize(torch.randn(462, c, generator=gen), dim=-1))
    width = int(model.encoder.visual.conv1.out_channels) * len(params.layers)
    bank = _bank(params.max_patches(width), width, gen)
    scorer = BankScorer(model, params)
    s = model.image_size
    x = torch.randn(batch, 3, s, s, generator=gen)
    grid = model.grid_size

    def zero_shot() -> None:
        out = model(x, text)
        out.anomaly_maps.cpu()

    def memory() -> None:
        out = model(x, text, hidden_layers=params.layers)
        raws = [RawScore(out.anomaly_maps[b], float(out.image_scores[b]), out.tokens[b], (s, s), hidden=out.hidden[b])
                for b in range(batch)]
        scorer.with_bank_batch(raws, [frame_record(r, str(b), params, grid) for b, r in enumerate(raws)], bank)

    times: dict[str, list[float]] = {"zero_shot": [], "memory": []}
    for i in range(warmup + iters):
        for name, fn in (("zero_shot", zero_shot), ("memory", memory)):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) / batch)
        print(f"\r  per-frame: iter {i + 1}/{warmup + iters}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return {k: statistics.median(v) for k, v in times.items()} | {"bank_rows": bank.patches, "width": width}


def _records(n: int, patches: int, width: int, gen: torch.Generator) -> list[FrameRecord]:
    return [FrameRecord(str(i), _unit_rows(patches, width, gen)[None], torch.rand(64, generator=gen), 0.5)
            for i in range(n)]


def builds(params: MemoryParams, frames: int, patches: int, width: int) -> dict[str, float]:
    """Seconds: a one-shot build from `frames` frames, and the stream's block reductions + refresh for them."""
    gen = torch.Generator().manual_seed(1)
    target = BankTarget("bench", "random", "line", params.layers, params.neighbourhood, width)
    n_max = params.max_patches(width)
    parent_recs = _records(max(1, n_max // patches + 1), patches, width, gen)
    parent = build_bank("line", parent_recs, params, target)  # a full serving bank
    out: dict[str, float] = {}
    # one-shot: all frames' patches at once, on top of the full serving bank
    records = _records(frames, patches, width, gen)
    t0 = time.perf_counter()
    build_bank("line", records, params, target, parent=parent)
    out["build_s"] = time.perf_counter() - t0
    # stream: the same frames arrive one by one (block reductions), then the refresh
    from pipeline.adaptation.memory.stream import StreamMemory

    st = StreamMemory.__new__(StreamMemory)  # the bookkeeping only: no FrameScorer needed to add rows
    st.params, st.target, st.line_id = params, target, "line"
    st.bank, st.pending, st.pending_frames = parent, PatchRows.empty(width), 0
    st._reduced_rows = st._block_frames = st.admitted = st.refreshes = 0
    st.next_refresh, st.versions = frames, []
    from collections import deque

    st.calibration, st.cls_history = deque(records[-params.calibration_frames:]), deque([0.5] * 64)
    t0 = time.perf_counter()
    peak = 0
    for rec in records:
        st.add_rows(rec.frame_id, rec.features[0])
        peak = max(peak, st.pending.rows)
    out["stream_blocks_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bank = st.refresh()
    out["stream_refresh_s"] = time.perf_counter() - t0
    out["pending_peak_rows"] = peak
    out["bank_rows"] = bank.patches
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B-16-plus-240")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--frames", type=int, default=1000, help="frames whose patches one build/refresh covers")
    p.add_argument("--budget-mib", type=float, nargs="+", default=None, help="bank budgets (default: config's)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="memory layers (default: config's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cpu = read_cpu_info()
    print(f"CPU: {cpu.model}; ISA flags: {' '.join(sorted(cpu.isa))}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {a.arch} {a.precision}, batch {a.batch}")
    model = create_anoclip(ModelSettings(arch=a.arch, pretrained="none", device="cpu", precision=a.precision))
    base = MemoryParams.from_settings(MemorySettings())
    budgets = [int(b * (1 << 20)) for b in a.budget_mib] if a.budget_mib else [base.budget_bytes]
    patches = model.grid_size**2
    for budget in budgets:
        layers = tuple(a.layers) if a.layers else base.layers
        params = MemoryParams(**{**base.to_dict(), "layers": layers, "budget_bytes": budget})
        r = per_frame(model, params, a.batch, a.iters, a.warmup)
        width = int(r["width"])
        b = builds(params, a.frames, patches, width)
        scoring = a.frames * r["memory"]
        mib = budget / (1 << 20)
        print(f"\nbank budget {mib:g} MiB = {int(r['bank_rows'])} patches of {width} fp16 "
              f"(layers {list(params.layers)})")
        print(f"  per frame: zero-shot {r['zero_shot'] * 1e3:.1f} ms, memory {r['memory'] * 1e3:.1f} ms -> "
              f"{r['memory'] / r['zero_shot']:.3f}x zero-shot (target <= 1.3x)")
        print(f"  {a.frames} frames' patches ({a.frames * patches} rows), scoring them takes {scoring:.1f} s:")
        print(f"    one-shot build onto a full bank: {b['build_s']:.2f} s = {100 * b['build_s'] / scoring:.2f}% "
              "(target < 10%)")
        stream = b["stream_blocks_s"] + b["stream_refresh_s"]
        print(f"    stream: block reductions {b['stream_blocks_s']:.2f} s + refresh {b['stream_refresh_s']:.2f} s = "
              f"{100 * stream / scoring:.2f}% (target < 10%)")
        window = params.window_frames * patches * width * 4
        pending = int(b["pending_peak_rows"]) * width * 2
        print(f"  memory per line: bank {budget / 2**20:.1f} MiB + row norms {r['bank_rows'] * 4 / 2**20:.2f} MiB; "
              f"stream adds window {window / 2**20:.1f} MiB ({params.window_frames} frames) and pending "
              f"<= {pending / 2**20:.1f} MiB (peak {int(b['pending_peak_rows'])} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
