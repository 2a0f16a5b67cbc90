"""`anoclip produce`: a camera simulator and bridge that sends frames to the frames topic
(`pipeline.streaming.producer`)."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.settings import load_settings
from pipeline.streaming.frame_sources import open_source, synthetic_kind
from pipeline.streaming.producer import produce


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--line", required=True, help="product line id (the record key)")
    p.add_argument("--source", required=True, help="a folder of JPEG/PNG files, a video file, or 'synthetic'")
    p.add_argument("--fps", type=float, default=10.0, help="frames per second; 0 = as fast as possible (default 10)")
    p.add_argument("--count", type=int, default=None,
                   help="frames to send (default: every file once; synthetic: until Ctrl-C)")
    p.add_argument("--camera", default="cam-1", help="camera id header (default cam-1)")
    p.add_argument("--loop", action="store_true", help="repeat a folder or video until --count")
    p.add_argument("--kind", default=None, help="synthetic part kind (default: the line id or class name)")
    p.add_argument("--size", type=int, default=256, help="synthetic image size in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="synthetic seed (default 0)")
    p.add_argument("--defect-rate", type=float, default=0.3, help="share of synthetic parts with a defect")
    p.add_argument("--format", choices=["jpeg", "png"], default="jpeg", help="encoding of generated frames")
    p.add_argument("--config", default=None, help="config file (default: $ANOCLIP_CONFIG or ./config.yaml)")


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    line = settings.line(args.line)  # unknown lines are refused here, not only in the worker's DLQ
    kind = args.kind
    if args.source == "synthetic" and kind is None:
        kind = synthetic_kind(line.id, line.class_name)
    frames = open_source(args.source, kind=kind, size=args.size, seed=args.seed, defect_rate=args.defect_rate,
                         loop=args.loop, fmt=args.format)
    logging.getLogger("kafka").setLevel(logging.WARNING)

    def progress(n: int, fid: str) -> None:
        if n == 1 or n % 50 == 0:
            print(f"sent {n} frames (last {fid})", file=sys.stderr, flush=True)

    try:
        stats = produce(settings, line.id, frames, fps=args.fps, count=args.count, camera=args.camera,
                        on_sent=progress)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    rate = stats.sent / stats.elapsed_s if stats.elapsed_s > 0 else 0.0
    print(f"sent {stats.sent} frames to {settings.kafka.frames_topic} for line {line.id} "
          f"({stats.acked} acknowledged, {stats.failed} failed) in {stats.elapsed_s:.1f} s = {rate:.1f} frames/s")
    return 0 if stats.failed == 0 and stats.acked == stats.sent else 1
