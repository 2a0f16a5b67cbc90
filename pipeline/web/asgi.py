"""Serve an ASGI app (Starlette) with uvicorn on a daemon thread: the worker's telemetry and the dashboard.

The listening socket is bound in the constructor, so a port in use fails there (`OSError`, before any
thread starts) and the port picked for port 0 is known at once (`port`). uvicorn runs on its own event
loop in a daemon thread; off the main thread it installs no signal handlers, so SIGTERM and SIGINT stay
with whoever owns the process (the worker's drain, the dashboard's stop).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host:port` (IPv6 when the host has a colon, `[::1]` or `::1`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host.strip("[]"), port), family=family, backlog=64)


class ThreadedServer:
    """uvicorn serving `app` on `sock` from a daemon thread; `start()` returns once it accepts connections."""

    def __init__(self, app: Any, sock: socket.socket, *, name: str, graceful_s: float = 2.0) -> None:
        self.sock = sock
        host, port = sock.getsockname()[:2]
        self.host, self.port = str(host), int(port)
        # log_config=None: uvicorn's few warnings go through the process's own logging set-up (text or JSON)
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                server_header=False, timeout_graceful_shutdown=graceful_s)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as e:  # noqa: BLE001 - reported by start(); a daemon thread has nobody else to tell
            self._error = e

    def start(self, timeout_s: float = 10.0) -> ThreadedServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise OSError(f"the HTTP server on {self.host}:{self.port} did not start: {self._error!r}")
            time.sleep(0.01)
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, let answers in flight finish (up to `graceful_s`), close the socket."""
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.sock.close()
