"""`anoclip adapt --line LINE --out FILE PATH...`: train a buffered TTA adapter from images.

The images are scored zero-shot, offered to the line's token buffer, and one adapter is trained on it
and checked by the validation gate (pipeline/jobs/adapt_files.py). Writes FILE (only when the gate
accepts it), FILE.report.json and FILE.loss.png.

Exit code 0 = adapter written, 1 = the gate refused it (reasons printed and in the report) or too few
frames were admitted. Use the adapter with `anoclip score --adapter FILE`.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--line", required=True, help="product line id from the config")
    p.add_argument("--out", required=True, metavar="FILE", help="adapter file to write (.safetensors)")
    p.add_argument("--config", default=None, help="config file (default: $ANOCLIP_CONFIG or ./config.yaml)")
    p.add_argument("--steps", type=int, default=None, help="step budget (default tta.train_steps)")
    p.add_argument("--seconds", type=float, default=None, help="time budget (default tta.train_seconds)")
    p.add_argument("--seed", type=int, default=None, help="seed of split, init, minibatches, noise (default tta.seed)")
    p.add_argument("--min-frames", type=int, default=None, help="admitted frames needed (default tta.min_frames)")


def run(args: argparse.Namespace) -> int:
    from pipeline.jobs.adapt_files import adapt_files  # imports torch: not before argparse ran

    s = adapt_files(args.paths, line=args.line, out=args.out, config=args.config, steps=args.steps,
                    seconds=args.seconds, seed=args.seed, min_frames=args.min_frames)
    report = s.report
    if report.losses:
        print(report.summary(), file=sys.stderr)
    else:  # nothing was trained: no step count, no "loss - -> -"
        print(f"{report.kind} adapter not trained: {'; '.join(report.reasons) or 'no frames'}", file=sys.stderr)
    if not s.accepted:
        print(f"no adapter written to {s.out}; report in {s.report_path}", file=sys.stderr)
        return s.exit_code
    print(f"adapter written to {s.out} (id {s.adapter_id}); report in {s.report_path}; training took "
          f"{report.seconds:.1f} s for {report.steps} steps, scoring the {s.images_scored} image(s) "
          f"{s.score_seconds:.1f} s", file=sys.stderr)
    return s.exit_code
