"""Frames/s of the full scorer for every runtime x precision x batch, as a ratio to torch fp32, same run.

    python bench/bench_runtimes.py                       # ViT-B-16-plus-240, random weights, batch 1 4
    python bench/bench_runtimes.py --arch anoclip-tiny --batch 1 8 --iters 5

Prints the CPU model and its ISA flags first: the answer depends on them (native bf16 needs AMX or
AVX512-BF16; VNNI speeds int8). Every variant scores the same synthetic parts (240 px, some with drawn
defects) through `AnoCLIP.forward` (encoder + maps + image scores), timed interleaved so host noise hits
all alike; medians. Fidelity against torch fp32 on the same frames: max |delta| of maps and image
scores, and the Spearman rank correlation of the maps (mean over frames). fp32 runtimes must match
torch fp32 within 1e-4 (maps and scores); reduced precision (bf16, int8) should keep Spearman >= 0.99.
Random weights make maps flat-ish, so the fidelity of trained weights may differ: check on your model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# As the worker and `anoclip serve` run: OpenMP threads that spin while idle starve everything else on a busy
# host (measured 20x slower torch on the shared 2-core box). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation import synth  # noqa: E402
from pipeline.inspection.imaging import preprocess  # noqa: E402
from pipeline.inspection.runtimes import attach_runtime, export_encoder, read_cpu_info  # noqa: E402
from pipeline.model import AnoCLIP, TextFeatures, build_prompt_set, create_anoclip  # noqa: E402
from pipeline.settings import ModelSettings  # noqa: E402

VARIANTS = [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"),
            ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8")]


def frames(size: int, n: int) -> torch.Tensor:
    """n normalised synthetic parts, every other one with a drawn defect."""
    out = []
    for i in range(n):
        kind = synth.KINDS[i % len(synth.KINDS)]
        rgb, _ = synth.render_part(kind, size, 1000 + i, synth.DEFECTS[i % len(synth.DEFECTS)] if i % 2 else None)
        out.append(preprocess(rgb, size, "squash"))
    return torch.stack(out)


def variant(base: AnoCLIP, runtime: str, precision: str, folder: Path) -> AnoCLIP:
    """A scorer sharing `base`'s weights, with its encoder on `runtime` at `precision`."""
    m = AnoCLIP(base.clip, base.tokenize, arch=base.arch, weights_id=base.weights_id,
                precision=precision if runtime == "torch" else "fp32")
    if runtime != "torch":
        attach_runtime(m, runtime, precision, folder)
    return m


def fidelity(ref, out) -> dict[str, float]:
    maps_ref, maps = ref.anomaly_maps.flatten(1).numpy(), out.anomaly_maps.flatten(1).numpy()
    rho = [spearmanr(a, b).statistic for a, b in zip(maps_ref, maps, strict=True)]
    return {"map": float(np.abs(maps - maps_ref).max()),
            "score": float((out.image_scores - ref.image_scores).abs().max()),
            "spearman": float(np.nanmean(rho))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B-16-plus-240")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--only", nargs="+", default=None, help="variants as runtime:precision (default: all)")
    p.add_argument("--threads", type=int, default=0, help="threads for every runtime (0 = torch default)")
    p.add_argument("--text", choices=["random", "encode"], default="random",
                   help="text features: random unit vectors (default) or encoded prompts (slow on real models)")
    p.add_argument("--export-dir", default=None, help="reuse/keep the export here (default: a temp folder)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cpu = read_cpu_info()
    print(f"CPU: {cpu.model} ({cpu.source}); native bf16: {'yes' if cpu.native_bf16 else 'no'}")
    print(f"ISA flags: {' '.join(cpu.isa)}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, arch {a.arch} (random weights)")
    variants = VARIANTS if not a.only else [tuple(v.split(":", 1)) for v in a.only]
    if ("torch", "fp32") not in variants:
        variants = [("torch", "fp32"), *variants]

    base = create_anoclip(ModelSettings(arch=a.arch, pretrained="none", device="cpu", precision="fp32"))
    if a.text == "encode":
        t0 = time.perf_counter()
        text = base.encode_prompts(build_prompt_set("bottle"))
        print(f"text features (fp32, 924 sentences): {time.perf_counter() - t0:.1f} s")
    else:  # random unit vectors of the right shape: text is encoded once per line, never per frame
        g = torch.Generator().manual_seed(0)
        c = base.embed_dim
        text = TextFeatures(*(F.normalize(torch.randn(n, c, generator=g), dim=-1) for n in (2, 462, 462)))
    tmp = tempfile.TemporaryDirectory() if a.export_dir is None else None
    folder = Path(a.export_dir or tmp.name)
    t0 = time.perf_counter()
    export_encoder(base, folder, ["onnx", "openvino"], int8=any(pr == "int8" for _, pr in variants))
    print(f"export: {time.perf_counter() - t0:.1f} s into {folder}")
    models = {v: variant(base, *v, folder) for v in variants}

    x_all = frames(base.image_size, max(a.batch))
    ref = models[("torch", "fp32")](x_all, text)
    fid = {v: fidelity(ref, m(x_all, text)) for v, m in models.items() if v != ("torch", "fp32")}

    rates: dict[tuple[str, str, int], float] = {}
    for b in a.batch:
        x = x_all[:b]
        times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
        for i in range(a.warmup + a.iters):
            for v, m in models.items():
                t = _time(lambda m=m, x=x: m(x, text))
                if i >= a.warmup:
                    times[v].append(t)
            print(f"\r  batch {b}: iter {i + 1}/{a.warmup + a.iters}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        for v, ts in times.items():
            rates[(*v, b)] = b / statistics.median(ts)

    print(f"\n{'runtime':<12} {'prec':<5} {'batch':>5} {'frames/s':>9} {'vs torch fp32':>14} "
          f"{'max|d map|':>11} {'max|d score|':>13} {'spearman':>9}")
    for b in a.batch:
        base_rate = rates[("torch", "fp32", b)]
        for v in variants:
            f = fid.get(v)
            extra = (f"{f['map']:>11.2e} {f['score']:>13.2e} {f['spearman']:>9.4f}" if f else
                     f"{'(reference)':>11}")
            print(f"{v[0]:<12} {v[1]:<5} {b:>5} {rates[(*v, b)]:>9.2f} {rates[(*v, b)] / base_rate:>13.2f}x {extra}")
    print()
    for v, f in fid.items():
        if v[1] == "fp32":
            ok = f["map"] < 1e-4 and f["score"] < 1e-4
            print(f"fp32 check {v[0]}: maps and scores within 1e-4 of torch fp32: {'PASS' if ok else 'FAIL'}")
        else:
            print(f"reduced precision {v[0]} {v[1]}: Spearman {f['spearman']:.4f} "
                  f"{'>=' if f['spearman'] >= 0.99 else '<'} 0.99")
    for b in a.batch:
        others = {v: rates[(*v, b)] for v in variants if v[0] != "torch"}
        if others:
            best = max(others, key=others.get)
            ratio = others[best] / rates[("torch", "fp32", b)]
            line = f"batch {b}: fastest runtime {best[0]} {best[1]} = {ratio:.2f}x torch fp32"
            if ("torch", "bf16") in variants:
                line += f", {others[best] / rates[('torch', 'bf16', b)]:.2f}x torch bf16"
            print(line)
    print("targets: fastest >= 2x torch fp32 on AVX2-only CPUs; >= torch bf16 on AMX CPUs")
    if tmp is not None:
        tmp.cleanup()
    return 0


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
