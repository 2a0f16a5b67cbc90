"""`anoclip synth`: write a synthetic inspection dataset in the MVTec AD (or VisA) layout.

Textured surfaces and simple parts with drawn scratches, holes, stains and missing pieces and their
exact masks, deterministic by seed: the data behind tests, demos and `anoclip eval` smoke runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from pipeline.evaluation.synth import DEFECTS, KINDS, recurring_count, write_mvtec_tree, write_visa_tree


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (created; existing files are overwritten)")
    p.add_argument("--layout", choices=("mvtec", "visa"), default="mvtec", help="dataset layout (default mvtec)")
    p.add_argument(
        "--classes",
        nargs="+",
        choices=KINDS,
        default=list(KINDS),
        metavar="KIND",
        help=f"kinds to generate (default all: {' '.join(KINDS)})",
    )
    p.add_argument("--n-good", type=int, default=8, help="good test images per class (default 8)")
    p.add_argument(
        "--n-defect",
        type=int,
        default=3,
        help="defective test images per defect type (mvtec) or per class (visa) (default 3)",
    )
    p.add_argument("--n-train", type=int, default=0, help="good training images per class (default 0)")
    p.add_argument(
        "--defects",
        nargs="+",
        choices=DEFECTS,
        default=list(DEFECTS),
        metavar="DEFECT",
        help=f"defect types, mvtec layout (default all: {' '.join(DEFECTS)})",
    )
    p.add_argument(
        "--recurring-defect",
        type=float,
        default=0.0,
        metavar="RATE",
        help="mvtec layout: add parts carrying one defect at the same place (test/recurring_<type>/), "
        "RATE of each class's test images (e.g. 0.3; default 0 = none)",
    )
    p.add_argument(
        "--recurring-type",
        choices=DEFECTS,
        default="stain",
        help="the recurring defect's type (default stain)",
    )
    p.add_argument("--size", type=int, default=256, help="image height in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same arguments give identical files (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    for name in ("n_good", "n_defect", "n_train"):
        if getattr(args, name) < 0:
            print(f"anoclip synth: --{name.replace('_', '-')} must be >= 0", file=sys.stderr)
            return 2
    if args.size < 16:
        print("anoclip synth: --size must be at least 16", file=sys.stderr)
        return 2
    if not 0.0 <= args.recurring_defect < 1.0:
        print("anoclip synth: --recurring-defect must be in [0, 1)", file=sys.stderr)
        return 2
    if args.recurring_defect and args.layout != "mvtec":
        print("anoclip synth: --recurring-defect is for the mvtec layout", file=sys.stderr)
        return 2
    out = Path(args.out)
    classes = list(dict.fromkeys(args.classes))
    if args.layout == "mvtec":
        n_test = args.n_good + args.n_defect * len(args.defects)
        per_class = args.n_train + n_test + recurring_count(args.recurring_defect, n_test)
    else:
        per_class = args.n_train + args.n_good + args.n_defect
    with tqdm(
        total=per_class * len(classes),
        unit="img",
        desc=f"synth {args.layout}",
        disable=args.no_progress,
        file=sys.stderr,
    ) as bar:
        if args.layout == "mvtec":
            counts = write_mvtec_tree(
                out,
                classes,
                args.n_good,
                args.n_defect,
                args.size,
                args.seed,
                defects=args.defects,
                n_train=args.n_train,
                recurring=args.recurring_defect,
                recurring_defect=args.recurring_type,
                progress=bar.update,
            )
        else:
            counts = write_visa_tree(
                out,
                classes,
                args.n_good,
                args.n_defect,
                args.size,
                args.seed,
                n_train=args.n_train,
                progress=bar.update,
            )
    print(f"wrote {sum(counts.values())} images ({', '.join(f'{k}: {v}' for k, v in counts.items())}) to {out}")
    return 0
