"""`anoclip score`: score image files or folders for one line.

Writes, per image, a binary defect mask PNG and a heatmap overlay PNG (under `masks/` and `heatmaps/`),
and one JSON line to `results.jsonl`, replacing what the previous run in the same `--out` wrote. The
exit code is 1 when any image was skipped. The line, the thresholds (`--threshold`, `--pixel-threshold`,
`--calibrate`), `--adapter` and `--tta`: the job, pipeline/jobs/score_files.py.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--line", default=None, help="product line id from the config (or give --class-name)")
    p.add_argument("--class-name", default=None,
                   help="what the parts are, as used in the prompts (e.g. 'bottle'): scores without a configured "
                        "line, or replaces the line's class name")
    p.add_argument("--domain", choices=["object", "texture"], default=None,
                   help="with --class-name and no --line: object (default) or texture")
    p.add_argument("--config", default=None, help="config file (default: $ANOCLIP_CONFIG or ./config.yaml)")
    p.add_argument("--out", default="out/score", help="output folder (default out/score)")
    p.add_argument("--threshold", type=float, default=None, help="image-score threshold (overrides config)")
    p.add_argument("--pixel-threshold", type=float, default=None, help="pixel threshold for masks")
    p.add_argument("--calibrate", action="append", default=None, metavar="GOOD",
                   help="a known-good image or folder (repeat for more): thresholds = quantiles of their scores "
                        "(--threshold and --pixel-threshold still win)")
    p.add_argument("--quantile", type=float, default=None,
                   help="with --calibrate: image-score quantile (default: the line's threshold.quantile)")
    p.add_argument("--adapter", default=None, metavar="FILE",
                   help="TTA adapter file (from `anoclip adapt`); refused unless it fits this model and line; its own "
                        "thresholds apply unless --threshold/--pixel-threshold/--calibrate or the config fix them")
    p.add_argument("--tta", choices=["off", "per_frame"], default=None,
                   help="per_frame: adapt a fresh adapter on every image (the paper's TTA); "
                        "default: per_frame if tta.mode is per_frame in the config, else off")


def run(args: argparse.Namespace) -> int:
    from pipeline.jobs.score_files import score_files  # imports torch: not before argparse ran

    s = score_files(args.paths, line=args.line, class_name=args.class_name, domain=args.domain, config=args.config,
                    out=args.out, threshold=args.threshold, pixel_threshold=args.pixel_threshold,
                    calibrate=args.calibrate, quantile=args.quantile, adapter=args.adapter, tta=args.tta)
    note = (f"; {s.disagree} where the mask disagrees with the verdict (the image score decides; see verdict_note)"
            if s.disagree else "")
    print(f"scored {s.scored} image(s) of line {s.line}: {s.anomalous} anomalous, {s.skipped} skipped{note}; "
          f"results in {s.results}", file=sys.stderr)
    return s.exit_code
