"""`anoclip score`: score image files or folders for one line.

Writes, per image, a binary defect mask PNG and a heatmap overlay PNG, and one JSON line to
`results.jsonl`. Unreadable images are reported by name and skipped; the exit code is 1 when any
image was skipped, so scripts notice. `--adapter FILE` scores through a trained TTA adapter (checked
against the model and line), `--tta per_frame` adapts a fresh adapter on every image (docs/tta.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from pipeline.adaptation.adapter_files import load_adapter, target_for
from pipeline.errors import ConfigError, ImageError
from pipeline.inspection.imaging import list_images, load_image
from pipeline.inspection.inspector import Inspector
from pipeline.inspection.render import heatmap_png, mask_png
from pipeline.model.self_training import TTAParams
from pipeline.settings import load_settings

log = logging.getLogger("anoclip.score")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--line", required=True, help="product line id from the config")
    p.add_argument("--config", default=None, help="config file (default: $ANOCLIP_CONFIG or ./config.yaml)")
    p.add_argument("--out", default="out/score", help="output folder (default out/score)")
    p.add_argument("--threshold", type=float, default=None, help="image-score threshold (overrides config)")
    p.add_argument("--pixel-threshold", type=float, default=None, help="pixel threshold for masks")
    p.add_argument("--adapter", default=None, metavar="FILE",
                   help="TTA adapter file (from `anoclip adapt`); refused unless it fits this model and line")
    p.add_argument("--tta", choices=["off", "per_frame"], default=None,
                   help="per_frame: adapt a fresh adapter on every image (the paper's TTA); "
                        "default: per_frame if tta.mode is per_frame in the config, else off")


def output_names(paths: list[Path], roots: list[str]) -> list[str]:
    """Unique, readable output stems: the path below the folder it was found in, '/' -> '__'."""
    dirs = [Path(r).resolve() for r in roots if Path(r).is_dir()]
    names, seen = [], set()
    for p in paths:
        rp = p.resolve()
        rel = next((rp.relative_to(d) for d in dirs if rp.is_relative_to(d)), Path(p.name))
        stem = "__".join(rel.with_suffix("").parts)
        name, k = stem, 1
        while name in seen:
            k += 1
            name = f"{stem}_{k}"
        seen.add(name)
        names.append(name)
    return names


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    # No warm-up calibration in batch scoring: the verdict of image 1 must not depend on image 150.
    th_cfg = settings.line(args.line).threshold
    th_cfg.warmup_frames = 0
    inspector = Inspector.from_settings(settings)
    inspector.thresholds(args.line).set_override(args.threshold, args.pixel_threshold)
    text = inspector.prepare_line(args.line)
    tta = args.tta or ("per_frame" if settings.tta.mode == "per_frame" else "off")
    adapter, adapter_version = None, None
    if args.adapter is not None:
        if tta == "per_frame":
            raise ConfigError("--adapter and --tta per_frame exclude each other: per-frame TTA trains its own adapters")
        dtype = TTAParams.from_settings(settings.tta).compute_dtype
        adapter, meta = load_adapter(args.adapter, target_for(inspector, args.line), text, dtype)
        adapter_version = f"file-{meta['id']}"
        log.info("using %s adapter %s from %s", meta["kind"], adapter_version, args.adapter)
    elif tta == "per_frame":
        adapter_version = "per_frame"

    files = list_images(args.paths)
    names = output_names(files, args.paths)
    out = Path(args.out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    batch = settings.model.batch_size
    skipped = scored = anomalous = 0
    with (out / "results.jsonl").open("a") as results, tqdm(
        total=len(files), desc=f"scoring {args.line}", unit="img", disable=len(files) < 2, file=sys.stderr
    ) as bar:
        for start in range(0, len(files), batch):
            chunk, chunk_names, images = [], [], []
            for f, name in zip(files[start : start + batch], names[start : start + batch], strict=True):
                try:
                    images.append(load_image(f, max_pixels=settings.worker.max_pixels))
                    chunk.append(f)
                    chunk_names.append(name)
                except ImageError as e:
                    skipped += 1
                    print(f"skipped {e}", file=sys.stderr)
                    bar.update(1)
            if not images:
                continue
            t0 = time.perf_counter()
            inspections = inspector.inspect(args.line, images, adapter, adapter_version, tta=tta)
            total_ms = (time.perf_counter() - t0) * 1e3 / len(images)
            for f, name, img, ins in zip(chunk, chunk_names, images, inspections, strict=True):
                mask_path = out / "masks" / f"{name}.png"
                heat_path = out / "heatmaps" / f"{name}.png"
                mask_path.write_bytes(mask_png(ins.mask))
                lo, hi = ins.heatmap_range
                heat_path.write_bytes(heatmap_png(img, ins.anomaly_map, lo, hi, ins.mask))
                rec = {"image": str(f), **ins.summary(), "mask": str(mask_path), "heatmap": str(heat_path)}
                rec["timings_ms"]["total"] = round(total_ms, 3)
                results.write(json.dumps(rec) + "\n")
                scored += 1
                anomalous += int(ins.verdict)
                bar.update(1)
    print(f"scored {scored} image(s) of line {args.line}: {anomalous} anomalous, {skipped} skipped; "
          f"results in {out / 'results.jsonl'}", file=sys.stderr)
    return 1 if skipped else 0
