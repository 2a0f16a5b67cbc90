"""Eval throughput against model-only scoring, in the same process on the same images.

    python bench/bench_eval.py                       # ViT-B-16-plus-240 (random weights), 2 classes
    python bench/bench_eval.py --arch anoclip-tiny   # quick smoke run

Model-only = `FrameScorer.score_raw` on images already decoded and resized to the protocol resolution,
in the same batches as eval. Eval = `run_eval` end to end: reading and resizing images and masks,
scoring, streaming the metrics, finalising them, and writing the Markdown/JSON/CSV report (and, unless
--no-figures, the PNG curves and overlays). The two are alternated `--repeats` times and the fastest
of each is compared; overhead % = (eval time / model-only time - 1) x 100. Text features are encoded
(and cached) before anything is timed. Random weights cost the same as trained ones, so the figures
hold for real weights; the metric values themselves mean nothing here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.evaluation.datasets import load_pair, read_mvtec, read_visa
from pipeline.evaluation.loop import eval_settings, run_eval
from pipeline.evaluation.options import EvalOptions
from pipeline.evaluation.synth import write_mvtec_tree, write_visa_tree
from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.settings import load_settings


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B-16-plus-240", help="model architecture (default ViT-B-16-plus-240)")
    p.add_argument("--pretrained", default="none", help="weights: none (random, same cost), a tag or a path")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dataset", default="mvtec", choices=("mvtec", "visa"), help="synthetic layout (default mvtec)")
    p.add_argument("--classes", nargs="+", default=["bottle", "wood"], help="synthetic kinds (default bottle wood)")
    p.add_argument("--n-good", type=int, default=10, help="good images per class (default 10)")
    p.add_argument("--n-defect", type=int, default=5, help="defective images per defect type / class (default 5)")
    p.add_argument("--size", type=int, default=256, help="synthetic image height (default 256)")
    p.add_argument(
        "--image-score",
        default="cls",
        choices=("protocol", "cls", "multiview"),
        help="cls (default) keeps the model cheapest, the hardest case for the overhead target",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="alternating model-only / eval passes (default 2)")
    p.add_argument("--no-figures", action="store_true", help="leave the PNGs out of the eval pass")
    p.add_argument("--text-cache", default="~/.cache/anoclip/text", help="text feature cache (reused between runs)")
    p.add_argument("--out", default="out/bench-eval", help="where the eval reports and bench.json go")
    return p.parse_args()


def main() -> int:
    a = _args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="anoclip-bench-"))
    per_class = a.n_good + (a.n_defect * 4 if a.dataset == "mvtec" else a.n_defect)
    with tqdm(total=per_class * len(a.classes), desc="synthesising", unit="img", file=sys.stderr) as bar:
        if a.dataset == "mvtec":
            write_mvtec_tree(work, a.classes, a.n_good, a.n_defect, a.size, seed=0, progress=bar.update)
            index = read_mvtec(work)
        else:
            write_visa_tree(work, a.classes, a.n_good, a.n_defect, a.size, seed=0, progress=bar.update)
            index = read_visa(work)
    n_images = len(index.samples)

    lines = [{"id": c, "class_name": c, "domain": index.domain(c)} for c in index.classes]
    empty_config = work / "bench-config.yaml"  # hermetic: neither ./config.yaml nor $ANOCLIP_CONFIG
    empty_config.write_text("{}\n")
    base = load_settings(
        empty_config,
        model={
            "arch": a.arch,
            "pretrained": a.pretrained,
            "device": a.device,
            "batch_size": a.batch_size,
            "text_cache_dir": a.text_cache,
        },
        lines=lines,
    )
    opts = EvalOptions(out=out / "report", image_score=a.image_score, figures=not a.no_figures)
    settings, line_of = eval_settings(base, index, opts)
    t0 = time.perf_counter()
    inspector = FrameScorer.from_settings(settings)
    for cls in tqdm(index.classes, desc="text features (cached)", file=sys.stderr):
        inspector.prepare_line(line_of[cls])
    setup_s = time.perf_counter() - t0

    # images for the model-only pass, decoded and resized up front (not timed)
    preloaded = {
        cls: [load_pair(s, index.keep_aspect).image for s in index.of_class(cls)]
        for cls in tqdm(index.classes, desc="preloading", file=sys.stderr)
    }
    inspector.score_raw(line_of[index.classes[0]], preloaded[index.classes[0]][:2])  # warm-up

    def model_only() -> float:
        t = time.perf_counter()
        with tqdm(total=n_images, desc="model only", unit="img", file=sys.stderr) as bar:
            for cls, images in preloaded.items():
                for i in range(0, len(images), a.batch_size):
                    chunk = images[i : i + a.batch_size]
                    inspector.score_raw(line_of[cls], chunk)
                    bar.update(len(chunk))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def full_eval() -> tuple[float, dict]:
        t = time.perf_counter()
        report, _ = run_eval(base, index, opts, inspector=inspector)
        return time.perf_counter() - t, report.timing

    model_times, eval_times, inner = [], [], []
    for _ in range(a.repeats):
        model_times.append(model_only())
        e, timing = full_eval()
        eval_times.append(e)
        inner.append(timing)
    tm, te = min(model_times), min(eval_times)
    best_inner = inner[eval_times.index(te)]
    result = {
        "arch": a.arch,
        "device": str(inspector.model.device),
        "torch_threads": torch.get_num_threads(),
        "dataset": a.dataset,
        "images": n_images,
        "image_size": a.size,
        "image_score": settings.model.image_score,
        "batch_size": a.batch_size,
        "figures": not a.no_figures,
        "setup_s": setup_s,
        "model_only_s": model_times,
        "eval_s": eval_times,
        "model_only_images_per_s": n_images / tm,
        "eval_images_per_s": n_images / te,
        "eval_over_model_ratio": (n_images / te) / (n_images / tm),
        "overhead_pct": 100.0 * (te / tm - 1.0),
        "model_only_median_s": statistics.median(model_times),
        "eval_median_s": statistics.median(eval_times),
        "overhead_median_pct": 100.0 * (statistics.median(eval_times) / statistics.median(model_times) - 1.0),
        "overhead_in_pass_pct": 100.0 * (te / best_inner["model_seconds"] - 1.0),
        "non_model_ms_per_image": 1e3 * (te - best_inner["model_seconds"]) / n_images,
        "eval_loop_s": best_inner["seconds"],
        "eval_model_s": best_inner["model_seconds"],
        "report_writing_s": te - best_inner["seconds"],
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n{a.arch} on {result['device']} ({result['torch_threads']} threads), {n_images} images "
        f"{a.size}px -> protocol {'240x240' if not index.keep_aspect else '240xW'}, image score {result['image_score']}"
    )
    print(f"{'':28}{'seconds':>10}{'images/s':>11}")
    print(f"{'model only (score_raw)':28}{tm:10.2f}{n_images / tm:11.2f}")
    print(f"{'eval end to end':28}{te:10.2f}{n_images / te:11.2f}")
    print(f"{'  of which: loop':28}{best_inner['seconds']:10.2f}   (model inside: {best_inner['model_seconds']:.2f} s)")
    print(f"{'  of which: report + figures':28}{te - best_inner['seconds']:10.2f}")
    print(
        f"eval / model-only throughput: {result['eval_over_model_ratio']:.3f}; "
        f"overhead {result['overhead_pct']:.1f}% (target < 20%)"
    )
    print(
        f"same eval pass: {result['non_model_ms_per_image']:.1f} ms/image outside the model -> "
        f"overhead {result['overhead_in_pass_pct']:.1f}% of the model time in that pass; "
        f"medians: overhead {result['overhead_median_pct']:.1f}%"
    )
    print(
        f"all passes: model-only {', '.join(f'{x:.2f}' for x in model_times)} s; "
        f"eval {', '.join(f'{x:.2f}' for x in eval_times)} s -> {out / 'bench.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
