"""`anoclip demo`: the main job on one machine, end to end.

Brings the local stack up, starts an inspection worker, sends synthetic parts (some with drawn
defects) for each line, and prints alerts as they arrive on the Redis alerts stream, with the defect
that was actually drawn beside the verdict. Stops after --count frames per line or on Ctrl-C: the
worker is drained with SIGTERM, and whatever the demo started is stopped again (unless --keep-stack).
The job, which prints as it goes (its closing figures included): pipeline/jobs/demo.py.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="config file (default: $ANOCLIP_CONFIG or ./config.yaml)")
    p.add_argument("--count", type=int, default=40, help="frames per line (default 40)")
    p.add_argument("--fps", type=float, default=4.0, help="frames per second per line (default 4)")
    p.add_argument("--line", action="append", default=None, help="line(s) to run (default: every configured line)")
    p.add_argument("--defect-rate", type=float, default=0.3, help="share of parts with a drawn defect")
    p.add_argument("--size", type=int, default=256, help="synthetic frame size in pixels")
    p.add_argument("--tiny", action="store_true",
                   help="use the tiny random-weight model (quick, no weights needed; verdicts are meaningless)")
    p.add_argument("--warmup", type=int, default=None,
                   help="calibrate each line's threshold on its first N frames (default: config; --tiny: 8)")
    p.add_argument("--quantile", type=float, default=None,
                   help="calibration quantile (default: config; --tiny: 0.8, so a short demo shows alerts)")
    p.add_argument("--keep-stack", action="store_true", help="leave the broker and Redis running afterwards")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")


def run(args: argparse.Namespace) -> int:
    from pipeline.jobs.demo import run_demo  # imports the broker and Redis clients: not before argparse ran

    summary = run_demo(config=args.config, count=args.count, fps=args.fps, lines=args.line,
                       defect_rate=args.defect_rate, size=args.size, tiny=args.tiny, warmup=args.warmup,
                       quantile=args.quantile, keep_stack=args.keep_stack, timeout=args.timeout)
    return summary.exit_code
