"""`anoclip eval`: evaluate on MVTec AD, VisA or a folder of your own line's images.

Writes report.md / report.json (per-class and mean image and pixel metrics as docs/algorithm.md §6.3
defines them), per_image.csv, ROC and PRO curves and an overlay grid to --out.
Missing or mismatched masks and unreadable images are listed in the report, not fatal.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.evaluation.datasets import DATASETS, PROTOCOL_SIDE, read_dataset
from pipeline.evaluation.loop import check_tta, run_eval
from pipeline.evaluation.memory_eval import MEMORY_MODES
from pipeline.evaluation.metrics import AUPRO_VARIANTS, DEFAULT_MEMORY_BUDGET, as_percent
from pipeline.evaluation.options import IMAGE_SCORE_CHOICES, ORDERS, TTA_MODES, EvalOptions
from pipeline.settings import load_settings

log = logging.getLogger("anoclip.eval")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, choices=DATASETS, help="layout of --root")
    p.add_argument("--root", required=True, help="dataset root folder")
    p.add_argument("--out", required=True, help="report folder (created)")
    p.add_argument("--classes", nargs="+", default=None, metavar="CLASS", help="classes to evaluate (default all)")
    p.add_argument(
        "--class-name",
        default=None,
        help="folder layout with ROOT/good: the class (prompt) name (default: the folder's name)",
    )
    p.add_argument(
        "--tta",
        choices=TTA_MODES,
        default="off",
        help="test-time adaptation: off, per_frame (paper), buffered (streaming) (default off)",
    )
    p.add_argument(
        "--memory",
        choices=MEMORY_MODES,
        default="off",
        help="patch memory (docs/memory.md): off = zero-shot; train = bank from the class's train/good images; "
        "mutual = test images scored against each other; stream = causal, as a worker (default off)",
    )
    p.add_argument(
        "--shots",
        type=int,
        default=None,
        metavar="K",
        help="--memory train: normal training images per class in the bank (default all)",
    )
    p.add_argument("--config", default=None, help="config file (default: $ANOCLIP_CONFIG or ./config.yaml)")
    p.add_argument(
        "--image-score",
        choices=IMAGE_SCORE_CHOICES,
        default="protocol",
        help="protocol = MVTec 22-view multiview, VisA/folder CLS over tiles (default protocol)",
    )
    p.add_argument(
        "--aupro",
        choices=AUPRO_VARIANTS,
        default="rescaled",
        help="AUPRO in the table: rescaled (cflow-ad/APRIL-GAN, the official code) or unrescaled",
    )
    p.add_argument(
        "--order",
        choices=ORDERS,
        default="dataset",
        help="stream order within a class: dataset order or a seeded shuffle (default dataset)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --order shuffled (default 0)")
    p.add_argument(
        "--resolution",
        type=int,
        default=PROTOCOL_SIDE,
        help=f"protocol side in pixels (default {PROTOCOL_SIDE}, as the papers)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="images per model call (default: config)")
    p.add_argument("--examples", type=int, default=4, help="overlay examples per class (default 4)")
    p.add_argument(
        "--memory-budget",
        type=int,
        default=DEFAULT_MEMORY_BUDGET,
        help="pixel scores per class held in RAM before spilling to disk (default %(default)s)",
    )
    p.add_argument("--no-figures", action="store_true", help="skip the PNG curves and overlay grid")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    check_tta(args.tta)  # before the model loads: an unavailable mode fails in a second, not minutes
    settings = load_settings(args.config)
    if args.batch_size is not None:
        if args.batch_size < 1:
            print("anoclip eval: --batch-size must be >= 1", file=sys.stderr)
            return 2
        settings = settings.model_copy(
            update={"model": settings.model.model_copy(update={"batch_size": args.batch_size})}
        )
    index = read_dataset(args.dataset, args.root, args.classes, args.class_name)
    if not index.samples:
        print(f"anoclip eval: no test images under {args.root}", file=sys.stderr)
        return 2
    for issue in index.issues[:20]:
        log.warning("%s", issue)
    if len(index.issues) > 20:
        log.warning("... and %d more issues (all listed in report.md)", len(index.issues) - 20)
    opts = EvalOptions(
        out=Path(args.out),
        classes=args.classes,
        tta=args.tta,
        image_score=args.image_score,
        aupro=args.aupro,
        order=args.order,
        seed=args.seed,
        resolution=args.resolution,
        examples=args.examples,
        memory_budget=args.memory_budget,
        memory=args.memory,
        shots=args.shots,
        progress=not args.no_progress,
        figures=not args.no_figures,
    )
    report, paths = run_eval(settings, index, opts)
    m = report.mean
    summary = ", ".join(
        f"{k} {as_percent(m[k]) if as_percent(m[k]) is not None else 'n/a'}"
        for k in ("image_auroc", "pixel_auroc", "aupro")
        if k in m
    )
    memory = f"; memory {args.memory}" if args.memory != "off" else ""
    print(f"{report.dataset}: {len(report.classes)} classes, {len(report.records)} images; mean {summary}{memory}")
    if report.issues:
        print(f"{len(report.issues)} issue(s) listed in {paths[0]}", file=sys.stderr)
    print(f"report: {paths[0]}")
    return 0
