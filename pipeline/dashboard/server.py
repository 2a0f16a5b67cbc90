"""HTTP side of the dashboard: standard-library `ThreadingHTTPServer`, a JSON API and an SSE feed.

Read-only by construction: only GET and HEAD are served and nothing writes to Redis. Loopback is the
default bind; on any other address a token is required (`ANOCLIP_DASHBOARD_TOKEN` or a token file)
unless the operator explicitly opts out. The token is accepted as `Authorization: Bearer`, as a
cookie, or once as `?token=` (which sets the cookie and redirects to the same page without it), so a
link can be shared without the token staying in the address bar or the browser history.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import queue
import re
import socket
import threading
import time
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import redis

from pipeline.dashboard.live import CLOSE, Event, LiveFeed
from pipeline.dashboard.store import (
    FRAME_ID_RE,
    IMAGE_KINDS,
    LINE_ID_RE,
    MAX_THUMB,
    STREAM_ID_RE,
    DashboardStore,
)
from pipeline.errors import ConfigError
from pipeline.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8700
TOKEN_ENV = "ANOCLIP_DASHBOARD_TOKEN"
TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/=\-]{8,512}$")
COOKIE = "anoclip_dashboard"
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
STATIC = {
    "app.js": "text/javascript; charset=utf-8",
    "alert.js": "text/javascript; charset=utf-8",
    "common.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
PAGES = {"index": "index.html", "alert": "alert.html"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`: the only binds that need no token."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _static_bytes(name: str) -> bytes:
    return resources.files("pipeline.dashboard").joinpath("static", name).read_bytes()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64
    app: DashboardServer

    def handle_error(self, request: Any, client_address: Any) -> None:  # a browser closing a tab is no error
        log.debug("request from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "anoclip-dashboard"
    sys_version = ""

    # --- plumbing ----------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, cache: str = "no-store") -> None:
        body = json.dumps(obj, separators=(",", ":"), default=str).encode()
        self._send(status, body, "application/json", {"Cache-Control": cache})

    def _error(self, status: int, message: str) -> None:
        if self._wants_html():
            page = _error_page(status, message)
            self._send(status, page, "text/html; charset=utf-8", {"Cache-Control": "no-store"})
        else:
            self._json(status, {"error": message, "status": status})

    def _wants_html(self) -> bool:
        return "text/html" in (self.headers.get("Accept") or "") and not self.path.startswith(("/api/", "/img/"))

    # --- auth --------------------------------------------------------------------------------
    def _token_ok(self, query: dict[str, list[str]]) -> bool | None:
        """True/False for a valid/invalid presented token; None when no token was presented."""
        expected = self.server.app.token
        presented: list[str] = []
        auth = self.headers.get("Authorization") or ""
        if auth.lower().startswith("bearer "):
            presented.append(auth[7:].strip())
        if "token" in query:
            presented.append(query["token"][0])
        cookie = SimpleCookie()
        try:
            cookie.load(self.headers.get("Cookie") or "")
        except Exception:  # noqa: BLE001 - a malformed cookie header is just "no cookie"
            cookie = SimpleCookie()
        if COOKIE in cookie:
            presented.append(cookie[COOKIE].value)
        if not presented:
            return None
        assert expected is not None
        return all(hmac.compare_digest(p.encode(), expected.encode()) for p in presented)

    def _authorize(self, path: str, query: dict[str, list[str]]) -> bool:
        """Answer 401 (and return False) unless the token is right; move a `?token=` into a cookie."""
        if self.server.app.token is None or path in (HEALTH_PATH, READY_PATH) or path.startswith("/static/"):
            return True  # probes and the page's own code/styles carry no data
        ok = self._token_ok(query)
        if ok is None:
            self._error(HTTPStatus.UNAUTHORIZED, "An access token is required for this dashboard.")
            return False
        if not ok:
            time.sleep(0.2)  # make guessing slow without holding a lock
            self.server.app.refused += 1
            self._error(HTTPStatus.UNAUTHORIZED, "Access token refused.")
            return False
        if "token" in query:
            rest = {k: v for k, v in query.items() if k != "token"}
            target = quote(path) + ("?" + urlencode(rest, doseq=True) if rest else "")
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Location", target)
            self.send_header("Set-Cookie", f"{COOKIE}={self.server.app.token}; Path=/; HttpOnly; SameSite=Strict")
            self.send_header("Content-Length", "0")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            return False
        return True

    # --- routes ------------------------------------------------------------------------------
    def do_HEAD(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        if not self._authorize(path, query):
            return
        app = self.server.app
        try:
            if path == HEALTH_PATH:
                return self._json(200, {"status": "ok", **app.live.status()})
            if path == READY_PATH:
                ok = app.store.ping()
                return self._json(200 if ok else 503, {"ready": ok, **app.live.status()})
            if path in ("/", "/index.html"):
                return self._page("index")
            if path.startswith("/alert/"):
                return self._page("alert")
            if path.startswith("/static/"):
                return self._static(path[len("/static/"):])
            if path == "/events":
                return self._events()
            if path.startswith("/api/"):
                return self._api(path[len("/api/"):], query)
            if path.startswith("/img/"):
                return self._img(path[len("/img/"):], query)
            return self._error(404, f"no such page: {path}")
        except (redis.RedisError, OSError) as e:
            if isinstance(e, BrokenPipeError | ConnectionResetError):
                return None
            return self._error(503, f"Redis unreachable: {type(e).__name__}: {e}")

    def _page(self, name: str) -> None:
        self._send(200, _static_bytes(PAGES[name]), "text/html; charset=utf-8", {"Cache-Control": "no-store"})

    def _static(self, name: str) -> None:
        if name not in STATIC:
            return self._error(404, f"no such file: {name}")
        self._send(200, _static_bytes(name), STATIC[name], {"Cache-Control": "no-cache"})

    def _api(self, route: str, query: dict[str, list[str]]) -> None:
        store = self.server.app.store
        seg = route.split("/")
        if route == "snapshot":
            return self._json(200, {**store.snapshot(), "live": self.server.app.live.status()})
        if route == "alerts":
            after = (query.get("after") or [None])[0]
            if after is not None and not STREAM_ID_RE.match(after):
                return self._error(400, "after must be a stream id like 1700000000000-0")
            count = _int(query, "count", store.alerts_len, 1, 500)
            return self._json(200, {"alerts": store.alerts(count, after)})
        if len(seg) == 3 and seg[0] == "lines" and seg[2] == "history":
            if not LINE_ID_RE.match(seg[1]):
                return self._error(400, "bad line id")
            count = _int(query, "count", store.history_len, 1, 5000)
            return self._json(200, {"line": seg[1], "history": store.history(seg[1], count)})
        if len(seg) == 2 and seg[0] == "lines":
            if not LINE_ID_RE.match(seg[1]):
                return self._error(400, "bad line id")
            return self._json(200, store.line_state(seg[1]))
        if len(seg) == 2 and seg[0] == "frames":
            if not FRAME_ID_RE.match(seg[1]):
                return self._error(400, "bad frame id")
            frame = store.frame(seg[1], with_alert=(query.get("alert") or ["1"])[0] != "0")
            if frame is None:
                return self._error(404, f"frame {seg[1]} is not in Redis (never published, or its TTL ran out)")
            return self._json(200, frame)
        return self._error(404, f"no such API route: {route}")

    def _img(self, route: str, query: dict[str, list[str]]) -> None:
        seg = route.split("/")
        if len(seg) != 3 or seg[0] not in ("frame", "latest") or seg[2] not in IMAGE_KINDS:
            return self._error(404, "image paths are /img/frame/<frame id>/<kind> or /img/latest/<line>/<kind>")
        scope, ident, kind = seg
        if not (FRAME_ID_RE if scope == "frame" else LINE_ID_RE).match(ident):
            return self._error(400, f"bad {scope} id")
        width = _int(query, "w", 0, 0, MAX_THUMB) or None
        got = self.server.app.store.image(scope, ident, kind, width)
        if got is None:
            return self._error(404, f"no {kind} for {scope} {ident}")
        data, ctype = got
        cache = "private, max-age=86400, immutable" if scope == "frame" else "no-store"
        self._send(200, data, ctype, {"Cache-Control": cache})

    def _events(self) -> None:
        """Server-sent events until the browser goes away or the server drops the stream."""
        live = self.server.app.live
        q = live.subscribe()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")
            for k, v in SECURITY_HEADERS.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(b"retry: 1500\n\n")
            self.wfile.write(Event("hello", {**live.status(), "server_time_ms": int(time.time() * 1000)}).encode())
            self.wfile.flush()
            while True:
                try:
                    item = q.get(timeout=self.server.app.keepalive_s)
                except queue.Empty:
                    self.wfile.write(b": keepalive\n\n")
                    self.wfile.flush()
                    continue
                if item is CLOSE:
                    return
                self.wfile.write(item.encode())
                self.wfile.flush()
        except OSError:  # the browser went away (broken pipe, reset, timeout)
            return
        finally:
            live.unsubscribe(q)


def _int(query: dict[str, list[str]], name: str, default: int, lo: int, hi: int) -> int:
    try:
        return max(lo, min(hi, int(query[name][0]))) if name in query else default
    except ValueError:
        return default


def _error_page(status: int, message: str) -> bytes:
    import html

    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>anoclip dashboard: "
        f"{status}</title><link rel='stylesheet' href='/static/app.css'></head><body class='error-page'>"
        f"<main><h1 id='error-status'>{status}</h1><p id='error-message'>{html.escape(message)}</p>"
        "<p class='hint'>Open the dashboard with <code>?token=&lt;token&gt;</code> once; the browser then "
        "keeps it in a cookie.</p></main></body></html>"
    ).encode()


class DashboardServer:
    """The dashboard as an object: `start()` in a thread (tests, `anoclip demo`) or `serve_forever()`."""

    def __init__(self, settings: Settings, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 token: str | None = None, allow_no_token: bool = False, store: DashboardStore | None = None,
                 tick_s: float = 2.0, keepalive_s: float = 15.0) -> None:
        token = token.strip() if token else None
        if not is_loopback(host) and token is None and not allow_no_token:
            raise ConfigError(
                f"the dashboard would listen on {host}, beyond this machine, without an access token: set "
                f"{TOKEN_ENV} (or --token-file), or pass --allow-no-token if the network is trusted"
            )
        if token is not None and not TOKEN_RE.match(token):
            raise ConfigError("the dashboard access token must be at least 8 characters of A-Z a-z 0-9 . _ ~ + / = -"
                              " (e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')")
        self.settings = settings
        self.token = token
        self.refused = 0
        self.keepalive_s = keepalive_s
        self.store = store or DashboardStore(settings)
        self.live = LiveFeed(self.store, tick_s=tick_s)
        server_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6}) if ":" in host else _Server
        try:
            self.httpd = server_cls((host.strip("[]"), port), _Handler)
        except OSError as e:
            raise ConfigError(f"the dashboard cannot listen on {host}:{port}: {e}") from e
        self.httpd.app = self
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> DashboardServer:
        """Serve in a background thread; returns self so `with DashboardServer(...).start()` reads well."""
        self.live.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="dashboard-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.live.start()
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def close(self) -> None:
        self.live.stop()
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> DashboardServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
