"""`anoclip produce`: a camera bridge and simulator that sends frames to the frames topic
(`pipeline.streaming.producer`). Sources: `pipeline.streaming.frame_sources.open_source`."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.errors import AnoclipError
from pipeline.settings import load_settings
from pipeline.streaming import local_stack as stack
from pipeline.streaming.frame_sources import camera_id, is_live, open_source, synthetic_kind
from pipeline.streaming.producer import produce


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--line", required=True, help="product line id (the record key)")
    p.add_argument("--source", required=True,
                   help="rtsp:// or http(s):// (MJPEG) stream, /dev/videoN or a device index, a GStreamer pipeline, "
                        "a video file, a folder or file of images (JPEG, PNG, BMP, TIFF), or 'synthetic'")
    p.add_argument("--fps", type=float, default=None,
                   help="frames per second sent; 0 = as fast as possible (default: 10 for files and synthetic, "
                        "0 = the camera's own rate for live sources)")
    p.add_argument("--count", type=int, default=None,
                   help="frames to send (default: every file once; synthetic and live: until Ctrl-C)")
    p.add_argument("--camera", default=None, help="camera id header (default: derived from the source)")
    p.add_argument("--loop", action="store_true", help="repeat a folder or video until --count")
    p.add_argument("--buffer", type=int, default=4,
                   help="live: frames kept while the broker is slow; beyond it the oldest are dropped (default 4)")
    p.add_argument("--max-outage", type=float, default=None,
                   help="live: give up after this many seconds without frames (default: keep reconnecting)")
    p.add_argument("--kind", default=None, help="synthetic part kind (default: the line id or class name)")
    p.add_argument("--size", type=int, default=256, help="synthetic image size in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="synthetic seed (default 0)")
    p.add_argument("--defect-rate", type=float, default=0.3, help="share of synthetic parts with a defect")
    p.add_argument("--format", choices=["jpeg", "png"], default="jpeg", help="encoding of generated/captured frames")
    p.add_argument("--config", default=None, help="config file (default: $ANOCLIP_CONFIG or ./config.yaml)")


def require_broker(bootstrap: str, timeout_s: float = 3.0) -> None:
    """AnoclipError unless some bootstrap server accepts a TCP connection within `timeout_s`."""
    for server in (x.strip() for x in bootstrap.split(",") if x.strip()):
        host, _, port = server.rpartition(":")
        if port.isdigit() and stack.port_open(host.strip("[]"), int(port), timeout_s):
            return
    raise AnoclipError(f"no Kafka broker answers at {bootstrap} (kafka.bootstrap_servers); start the local one "
                       "with `anoclip stack up`, or point ANOCLIP_KAFKA__BOOTSTRAP_SERVERS at yours")


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    line = settings.line(args.line)  # unknown lines are refused here, not only in the worker's DLQ
    require_broker(settings.kafka.bootstrap_servers)  # one clear line now, not 30 s of client retries
    kind = args.kind
    if args.source == "synthetic" and kind is None:
        kind = synthetic_kind(line.id, line.class_name)
    live = is_live(args.source)
    frames = open_source(args.source, kind=kind, size=args.size, seed=args.seed, defect_rate=args.defect_rate,
                         loop=args.loop, fmt=args.format,
                         live={"buffer": args.buffer, "max_outage_s": args.max_outage})
    camera = args.camera or camera_id(args.source)
    fps = args.fps if args.fps is not None else (0.0 if live else 10.0)
    stats_of = getattr(frames, "stats", None)
    logging.getLogger("kafka").setLevel(logging.WARNING)

    def progress(n: int, fid: str) -> None:
        if n == 1 or n % 50 == 0:
            extra = f"; camera {stats_of.summary()}" if stats_of is not None else ""
            print(f"sent {n} frames (last {fid}){extra}", file=sys.stderr, flush=True)

    try:
        stats = produce(settings, line.id, frames, fps=fps, count=args.count, camera=camera, on_sent=progress)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        if stats_of is not None:
            print(f"camera {camera}: {stats_of.summary()}", file=sys.stderr)
        return 130
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()
    rate = stats.sent / stats.elapsed_s if stats.elapsed_s > 0 else 0.0
    print(f"sent {stats.sent} frames from camera {camera} to {settings.kafka.frames_topic} for line {line.id} "
          f"({stats.acked} acknowledged, {stats.failed} failed) in {stats.elapsed_s:.1f} s = {rate:.1f} frames/s")
    if stats_of is not None:
        print(f"camera {camera}: {stats_of.summary()}")
    return 0 if stats.failed == 0 and stats.acked == stats.sent else 1
