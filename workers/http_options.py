"""Options shared by the commands that serve HTTP (`anoclip serve`, `anoclip dashboard`); not a command itself.

The access token comes from the environment or a file (e.g. a mounted Kubernetes Secret), never from the
command line, where `ps` would show it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline.errors import ConfigError


def add_server_arguments(p: argparse.ArgumentParser, *, host: str, port: int, token_env: str,
                         token_help: str | None = None, port_help: str = "") -> None:
    """--config, --host, --port, --token-file, --allow-no-token."""
    p.add_argument("--config", default=None, help="config file (default: $ANOCLIP_CONFIG or ./config.yaml)")
    p.add_argument("--host", default=host, help=f"address to listen on (default {host})")
    p.add_argument("--port", type=int, default=port, help=f"port (default {port}{port_help})")
    p.add_argument("--token-file", default=None,
                   help=token_help or f"file holding the access token (else ${token_env})")
    p.add_argument("--allow-no-token", action="store_true",
                   help="listen off loopback without a token (only on a network you trust)")


def read_token(token_file: str | None, token_env: str, what: str) -> str | None:
    """The access token from --token-file, else the environment; None when neither is set."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the {what} token file {token_file}: {e}") from e
        if not token:
            raise ConfigError(f"the {what} token file {token_file} is empty")
        return token
    return os.environ.get(token_env, "").strip() or None
