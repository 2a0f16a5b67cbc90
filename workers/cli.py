"""`anoclip` — one command, many sub-commands; each lives in its own module under `workers/`.

A sub-command module exposes `add_arguments(parser)` and `run(args) -> int`. Only the chosen module
is imported, so `anoclip --help` stays instant and a broken optional part cannot break the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline.errors import AnoclipError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "score": ("workers.score", "score image files or folders and write masks, heatmaps and results.jsonl"),
    "adapt": ("workers.adapt", "train a buffered TTA adapter from images and write it with its report"),
    "synth": ("workers.synth", "generate a synthetic inspection dataset in the MVTec AD layout"),
    "eval": ("workers.evaluate", "evaluate on MVTec AD, VisA or a folder; write tables, curves and overlays"),
    "stack": ("workers.stack", "bring the local broker + Redis stack up, down, or show its status"),
    "produce": ("workers.produce", "send frames (folder, video or synthetic) to the frames topic"),
    "worker": ("workers.worker", "run the inspection worker: Kafka frames in, results and alerts to Redis"),
    "adapters": ("workers.adapters", "list, show, roll back, pause, resume or refresh a line's adapter"),
    "dashboard": ("workers.dashboard", "serve the live inspection dashboard"),
    "demo": ("workers.demo", "the main job on one machine: stack up, worker, producer, alerts shown"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anoclip", description="Streaming zero-shot anomaly localisation (AnoCLIP).")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `anoclip` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    log_level = "INFO"
    if len(argv) >= 2 and argv[0] == "--log-level":
        log_level, argv = argv[1], argv[2:]
    if not argv or argv[0] not in COMMANDS:
        top.parse_args(argv)  # prints help / errors for unknown commands
        top.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"anoclip {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    logging.basicConfig(
        level=getattr(logging, str(log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        return int(module.run(args) or 0)
    except AnoclipError as e:
        print(f"anoclip {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
