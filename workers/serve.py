"""`anoclip serve`: the HTTP inspection API (`pipeline.serving.app`). POST an image, get a verdict.

Loopback by default. To listen beyond this machine, give an access token through the environment
(`ANOCLIP_SERVE_TOKEN`) or a file (`--token-file`); a token on the command line would show in `ps`.
"""

from __future__ import annotations

import argparse
import os

from pipeline.settings import load_settings
from workers.http_options import add_server_arguments, read_token

DEFAULT_HOST, DEFAULT_PORT, TOKEN_ENV = "127.0.0.1", 8800, "ANOCLIP_SERVE_TOKEN"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `anoclip serve`."""
    add_server_arguments(p, host=DEFAULT_HOST, port=DEFAULT_PORT, token_env=TOKEN_ENV)
    p.add_argument("--publish", action="store_true",
                   help="also store each result in Redis like a streamed frame (results, alerts, masks)")
    p.add_argument("--max-batch", type=int, default=None, help="frames per model batch (default worker.max_batch)")
    p.add_argument("--max-wait-ms", type=float, default=None,
                   help="how long a batch waits for requests still arriving (default worker.max_wait_ms)")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve the event loop
    from pipeline.serving.app import serve

    token = read_token(args.token_file, TOKEN_ENV, "serve")
    return serve(load_settings(args.config), host=args.host, port=args.port, token=token,
                 allow_no_token=args.allow_no_token, publish=args.publish, max_batch=args.max_batch,
                 max_wait_ms=args.max_wait_ms)
