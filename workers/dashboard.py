"""`anoclip dashboard`: serve the live inspection dashboard and its alert workflow (labels, audit).

Loopback by default. To listen beyond this machine, give an access token through the environment
(`ANOCLIP_DASHBOARD_TOKEN`) or a file (`--token-file`, e.g. a mounted Kubernetes Secret); a token on
the command line would show in `ps`, so there is no such option.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import threading

from pipeline.dashboard.server import DEFAULT_HOST, DEFAULT_PORT, TOKEN_ENV, DashboardServer
from pipeline.observability.redaction import install_log_redaction, redact_url, register_secrets
from pipeline.settings import load_settings
from workers.http_options import add_server_arguments, read_token

log = logging.getLogger("anoclip.dashboard")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `anoclip dashboard`."""
    add_server_arguments(p, host=DEFAULT_HOST, port=DEFAULT_PORT, token_env=TOKEN_ENV, port_help="; 0 = any free",
                         token_help=f"file holding the access token(s) (else ${TOKEN_ENV}): a secret of 16+ "
                                    "characters, or name:secret pairs, one per line, so labels record who set them; "
                                    "required off loopback")
    p.add_argument("--history", type=int, default=200, help="scores per line in the chart (default 200)")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM."""
    from pipeline.dashboard.store import DashboardStore

    settings = load_settings(args.config)
    store = DashboardStore(settings, history=max(10, args.history))
    token = read_token(args.token_file, TOKEN_ENV, "dashboard")
    # the token secrets (`name:secret` pairs or one bare secret) never reach a log line, e.g. a `/?token=` URL
    register_secrets(*(entry.partition(":")[2] or entry for entry in re.split(r"[\s,]+", token or "")))
    install_log_redaction()
    server = DashboardServer(settings, host=args.host, port=args.port, token=token,
                             allow_no_token=args.allow_no_token, store=store)
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping the dashboard", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server.start()
    auth = f"token required; tokens for {', '.join(sorted(server.tokens.values()))}" if server.tokens else "no token"
    print(f"anoclip dashboard: {server.url}/ ({auth}; Redis {redact_url(settings.redis.url)}, "
          f"prefix {settings.redis.prefix})",
          flush=True)
    try:
        stop.wait()
    finally:
        server.close()
    return 0
