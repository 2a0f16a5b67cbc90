"""`anoclip serve`: the HTTP inspection API (`pipeline.serving.app`). POST an image, get a verdict.

Loopback by default. To listen beyond this machine, give an access token through the environment
(`ANOCLIP_SERVE_TOKEN`) or a file (`--token-file`); a token on the command line would show in `ps`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.settings import load_settings

DEFAULT_HOST, DEFAULT_PORT, TOKEN_ENV = "127.0.0.1", 8800, "ANOCLIP_SERVE_TOKEN"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `anoclip serve`."""
    p.add_argument("--config", default=None, help="config file (default: $ANOCLIP_CONFIG or ./config.yaml)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--token-file", default=None, help=f"file holding the access token (else ${TOKEN_ENV})")
    p.add_argument("--allow-no-token", action="store_true",
                   help="listen off loopback without a token (only on a network you trust)")
    p.add_argument("--publish", action="store_true",
                   help="also store each result in Redis like a streamed frame (results, alerts, masks)")
    p.add_argument("--max-batch", type=int, default=None, help="frames per model batch (default worker.max_batch)")
    p.add_argument("--max-wait-ms", type=float, default=None,
                   help="how long a batch waits for requests still arriving (default worker.max_wait_ms)")


def read_token(token_file: str | None) -> str | None:
    """The access token from --token-file, else the environment; None when neither is set."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the serve token file {token_file}: {e}") from e
        if not token:
            raise ConfigError(f"the serve token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve the event loop
    from pipeline.serving.app import serve

    return serve(load_settings(args.config), host=args.host, port=args.port, token=read_token(args.token_file),
                 allow_no_token=args.allow_no_token, publish=args.publish, max_batch=args.max_batch,
                 max_wait_ms=args.max_wait_ms)
