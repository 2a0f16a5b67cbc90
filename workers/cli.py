"""`anoclip` — one command, many sub-commands; each lives in its own module under `workers/`.

A sub-command module exposes `add_arguments(parser)` and `run(args) -> int`. Only the chosen module
is imported, so `anoclip --help` stays instant and a broken optional part cannot break the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from pipeline.errors import AnoclipError
from pipeline.observability.log_format import FORMATS, configure_logging

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "score": ("workers.score", "score image files or folders and write masks, heatmaps and results.jsonl"),
    "adapt": ("workers.adapt", "train a buffered TTA adapter from images and write it with its report"),
    "synth": ("workers.synth", "generate a synthetic inspection dataset in the MVTec AD layout"),
    "eval": ("workers.evaluate", "evaluate on MVTec AD, VisA or a folder; write tables, curves and overlays"),
    "stack": ("workers.stack", "bring the local broker + Redis stack up, down, or show its status"),
    "produce": ("workers.produce", "send frames (camera, stream, video, folder or synthetic) to the frames topic"),
    "worker": ("workers.worker", "run the inspection worker: Kafka frames in, results and alerts to Redis"),
    "versions": ("workers.versions", "list, show, roll back, pause, resume or refresh the versions a line learned "
                                     "(adapters, or memory banks with --kind bank)"),
    "adapters": ("workers.versions", "old name of `versions` (kept for one release)"),
    "dashboard": ("workers.dashboard", "serve the live inspection dashboard"),
    "demo": ("workers.demo", "the main job on one machine: stack up, worker, producer, alerts shown"),
    "export": ("workers.export", "export the image encoder for CPU runtimes (ONNX Runtime, OpenVINO)"),
    "serve": ("workers.serve", "serve the HTTP inspection API: POST an image, get a verdict"),
    "labels": ("workers.labels", "list or export the operators' alert labels (a folder dataset for anoclip eval)"),
}


GLOBAL_HELP = {
    "--log-level": "logging level: DEBUG, INFO, WARNING, ERROR (default INFO; also $ANOCLIP_LOG_LEVEL)",
    "--log-format": "log lines as text or json, with line and frame ids as fields "
                    "(default text; also $ANOCLIP_LOG_FORMAT)",
}


def version() -> str:
    """The installed package's version (the source tree's when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("anoclip")
    except PackageNotFoundError:
        return "unknown"


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anoclip", description="Streaming zero-shot anomaly localisation (AnoCLIP).")
    p.add_argument("--version", action="version", version=f"anoclip {version()}")
    p.add_argument("--log-level", default=None, help=GLOBAL_HELP["--log-level"])
    p.add_argument("--log-format", default=None, choices=FORMATS, help=GLOBAL_HELP["--log-format"])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return p


def _split_globals(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Global options given before the sub-command, and the rest of the command line."""
    found: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i].split("=", 1)[0] in GLOBAL_HELP:
        opt, eq, val = argv[i].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                break
            val, i = argv[i + 1], i + 1
        found[opt] = val
        i += 1
    return found, argv[i:]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `anoclip` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    found, argv = _split_globals(argv)
    if not argv or argv[0] not in COMMANDS:
        top.parse_args([*[x for kv in found.items() for x in kv], *argv])  # --version, help, unknown commands
        top.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"anoclip {name}", description=help_text)
    module.add_arguments(parser)
    for opt, help_line in GLOBAL_HELP.items():  # also after the sub-command, unless it has its own
        if opt not in parser._option_string_actions:  # noqa: SLF001 - argparse has no public lookup
            parser.add_argument(opt, default=None, help=help_line,
                                **({"choices": FORMATS} if opt == "--log-format" else {}))
    args = parser.parse_args(rest)
    env = {"--log-level": os.environ.get("ANOCLIP_LOG_LEVEL"), "--log-format": os.environ.get("ANOCLIP_LOG_FORMAT")}
    for opt in GLOBAL_HELP:  # after the sub-command > before it > environment > default
        dest = opt.lstrip("-").replace("-", "_")
        given = found.get(opt) or env[opt]
        if given and getattr(args, dest, None) in (None, parser.get_default(dest)):
            setattr(args, dest, given)  # a sub-command with its own option (worker --log-format) sees it too
    level = args.log_level or "INFO"
    fmt = args.log_format if args.log_format in FORMATS else "text"
    if not isinstance(getattr(logging, str(level).upper(), None), int):
        print(f"anoclip: error: unknown log level {level!r} (use DEBUG, INFO, WARNING or ERROR)", file=sys.stderr)
        return 2
    configure_logging(str(level), fmt)
    try:
        return int(module.run(args) or 0)
    except AnoclipError as e:
        print(f"anoclip {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
