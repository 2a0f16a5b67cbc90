"""HTTP side of the dashboard: standard-library `ThreadingHTTPServer`, a JSON API and an SSE feed.

Reads the workers' outputs; the only writes are operators' labels on alerts (POST `/api/labels/<frame>`,
JSON, same origin only). Loopback is the default bind; on any other address a token is required
(`ANOCLIP_DASHBOARD_TOKEN` or a token file) unless the operator explicitly opts out.

Tokens: one or more `name:secret` pairs (commas or new lines between them; a bare secret is named
`operator`), secrets of at least 16 characters. The name is who labels are recorded as. A token is
accepted as `Authorization: Bearer`, or once as `?token=`, which sets a cookie holding an HMAC of the
token (never the token itself; HttpOnly, SameSite=Strict) and redirects to the same page without it.

Guards: only `Host` headers that are IP addresses, `localhost` or listed in `dashboard.allowed_hosts`
are answered (DNS rebinding); a client presenting `dashboard.guess_limit` wrong tokens within
`guess_window_s` is refused unchecked (429) until the window passes, and one client's token checks
run one at a time, so parallel guessing is as slow as serial guessing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import queue
import re
import socket
import threading
import time
from collections import deque
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pipeline.dashboard.live import CLOSE, Event, LiveFeed
from pipeline.dashboard.metrics import DashboardCollector
from pipeline.dashboard.store import (
    FRAME_ID_RE,
    IMAGE_KINDS,
    LABEL_FILTERS,
    LINE_ID_RE,
    MAX_THUMB,
    STREAM_ID_RE,
    VERDICTS,
    DashboardStore,
)
from pipeline.errors import ConfigError
from pipeline.labels import ACTOR_RE, LabelError
from pipeline.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8700
TOKEN_ENV = "ANOCLIP_DASHBOARD_TOKEN"
TOKEN_MIN = 16
TOKEN_RE = re.compile(rf"^[A-Za-z0-9._~+/=\-]{{{TOKEN_MIN},512}}$")
DEFAULT_IDENTITY = "operator"
"""The name of a token given without one."""
ANONYMOUS = "anonymous"
"""Who labels are recorded as when the dashboard runs without tokens (loopback)."""
COOKIE = "anoclip_dashboard"
COOKIE_CONTEXT = b"anoclip-dashboard-cookie-v1"
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"
OPEN_PATHS = (HEALTH_PATH, READY_PATH, METRICS_PATH)
"""No token and no Host check: probes and scrapers carry no user data and use whatever address they have."""
MAX_BODY = 16 << 10
WRONG_TOKEN_DELAY_S = 0.2
STATIC = {
    "app.js": "text/javascript; charset=utf-8",
    "alert.js": "text/javascript; charset=utf-8",
    "audit.js": "text/javascript; charset=utf-8",
    "common.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
PAGES = {"index": "index.html", "alert": "alert.html", "audit": "audit.html"}
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


def parse_tokens(spec: str | None) -> dict[str, str]:
    """`name:secret` pairs (or one bare secret) -> {secret: name}; ConfigError naming what is wrong."""
    out: dict[str, str] = {}
    for entry in re.split(r"[\s,]+", (spec or "").strip()):
        if not entry:
            continue
        name, sep, secret = entry.partition(":")
        if not sep:
            name, secret = DEFAULT_IDENTITY, entry
        if not ACTOR_RE.match(name):
            raise ConfigError(f"dashboard token name {name!r}: use 1-64 of A-Z a-z 0-9 . _ @ -")
        if not TOKEN_RE.match(secret):
            raise ConfigError(
                f"the dashboard access token{'' if name == DEFAULT_IDENTITY else ' of ' + name} must be at least "
                f"{TOKEN_MIN} characters of A-Z a-z 0-9 . _ ~ + / = - "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')")
        if secret in out:
            raise ConfigError(f"two dashboard tokens share one secret ({out[secret]} and {name})")
        if name in out.values():
            raise ConfigError(f"two dashboard tokens are named {name!r}")
        out[secret] = name
    return out


def cookie_value(secret: str) -> str:
    """What the browser keeps: an HMAC keyed by the token, so a leaked cookie never reveals the token and
    every dashboard replica (and a restarted one) accepts it without shared state."""
    mac = hmac.new(secret.encode(), COOKIE_CONTEXT, hashlib.sha256).digest()
    return "v1." + base64.urlsafe_b64encode(mac).decode().rstrip("=")


def host_allowed(host_header: str | None, allowed: list[str]) -> bool:
    """IP literals and localhost always (no DNS name can rebind to them), else an `allowed_hosts` entry."""
    if not host_header:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    host = host.rstrip(".")
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    for a in (x.strip().lower().rstrip(".") for x in allowed):
        if a and (host == a or (a.startswith(".") and (host.endswith(a) or host == a[1:]))):
            return True
    return False


class GuessLimiter:
    """Wrong tokens per client: `limit` per `window_s`, then refused unchecked until the oldest expires.

    `check(client)` is a context manager holding the client's own lock, so one client's token checks
    (and the delay after a wrong one) run one after the other however many connections it opens.
    """

    def __init__(self, limit: int = 5, window_s: float = 60.0, max_clients: int = 10_000) -> None:
        self.limit, self.window_s, self.max_clients = limit, window_s, max_clients
        self._failures: dict[str, deque[float]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def lock(self, client: str) -> threading.Lock:
        with self._lock:
            if len(self._locks) > self.max_clients:
                now = time.monotonic()
                for c in [c for c, d in self._failures.items() if not d or now - d[-1] > self.window_s]:
                    self._failures.pop(c, None)
                    self._locks.pop(c, None)
            return self._locks.setdefault(client, threading.Lock())

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may try again; 0 when it may now."""
        now = time.monotonic()
        with self._lock:
            d = self._failures.get(client)
            while d and now - d[0] > self.window_s:
                d.popleft()
            if d is None or len(d) < self.limit:
                return 0.0
            return max(0.1, self.window_s - (now - d[0]))

    def failed(self, client: str) -> None:
        with self._lock:
            self._failures.setdefault(client, deque()).append(time.monotonic())


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
    identity = ANONYMOUS

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

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        if self._wants_html():
            page = _error_page(status, message)
            self._send(status, page, "text/html; charset=utf-8", {"Cache-Control": "no-store", **(headers or {})})
        else:
            body = json.dumps({"error": message, "status": status}, separators=(",", ":")).encode()
            self._send(status, body, "application/json", {"Cache-Control": "no-store", **(headers or {})})

    def _wants_html(self) -> bool:
        return "text/html" in (self.headers.get("Accept") or "") and not self.path.startswith(("/api/", "/img/"))

    # --- guards ------------------------------------------------------------------------------
    def _host_ok(self, path: str) -> bool:
        """Answer 400 (and return False) to a Host this dashboard was not told it is reached by."""
        if path in OPEN_PATHS or host_allowed(self.headers.get("Host"), self.server.app.allowed_hosts):
            return True
        self.server.app.bad_hosts += 1
        self._error(HTTPStatus.BAD_REQUEST, f"this dashboard does not answer to the host name "
                    f"{(self.headers.get('Host') or '(none)')[:100]!r}; add it to dashboard.allowed_hosts")
        return False

    def _presented(self, query: dict[str, list[str]]) -> tuple[list[str], list[str]]:
        """(tokens, cookies) the request carries."""
        tokens: list[str] = []
        auth = self.headers.get("Authorization") or ""
        if auth.lower().startswith("bearer "):
            tokens.append(auth[7:].strip())
        if "token" in query:
            tokens.append(query["token"][0])
        cookie = SimpleCookie()
        try:
            cookie.load(self.headers.get("Cookie") or "")
        except Exception:  # noqa: BLE001 - a malformed cookie header is just "no cookie"
            cookie = SimpleCookie()
        return tokens, [cookie[COOKIE].value] if COOKIE in cookie else []

    def _identify(self, tokens: list[str], cookies: list[str]) -> str | None:
        """The name behind every presented credential, or None if any is wrong (or they disagree)."""
        names = set()
        for t in tokens:
            name = next((n for s, n in self.server.app.tokens.items() if hmac.compare_digest(t.encode(), s.encode())),
                        None)
            names.add(name)
        for c in cookies:
            name = next((n for s, n in self.server.app.tokens.items()
                         if hmac.compare_digest(c.encode(), cookie_value(s).encode())), None)
            names.add(name)
        return names.pop() if len(names) == 1 and None not in names else None

    def _authorize(self, path: str, query: dict[str, list[str]]) -> bool:
        """Answer 401/429 (and return False) unless the credential is right; move a `?token=` into a cookie."""
        app = self.server.app
        if not app.tokens or path in OPEN_PATHS or path.startswith("/static/"):
            return True  # probes and the page's own code/styles carry no data
        tokens, cookies = self._presented(query)
        if not tokens and not cookies:
            self._error(HTTPStatus.UNAUTHORIZED, "An access token is required for this dashboard.")
            return False
        client = self.client_address[0]
        with app.limiter.lock(client):  # one client's checks run one at a time: parallel guessing is no faster
            wait = app.limiter.retry_after(client)
            if wait:
                app.limited += 1
                self._error(HTTPStatus.TOO_MANY_REQUESTS, f"Too many wrong access tokens from {client}; "
                            f"try again in {wait:.0f} s.", {"Retry-After": str(int(wait + 1))})
                return False
            name = self._identify(tokens, cookies)
            if name is None:
                app.limiter.failed(client)
                app.refused += 1
                time.sleep(WRONG_TOKEN_DELAY_S)
                self._error(HTTPStatus.UNAUTHORIZED, "Access token refused.")
                return False
        self.identity = name
        if "token" in query and self.command == "GET":
            secret = next(s for s, n in app.tokens.items() if n == name)
            rest = {k: v for k, v in query.items() if k != "token"}
            target = quote(path) + ("?" + urlencode(rest, doseq=True) if rest else "")
            secure = "; Secure" if (self.headers.get("X-Forwarded-Proto") or "").lower() == "https" else ""
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Location", target)
            self.send_header("Set-Cookie",
                             f"{COOKIE}={cookie_value(secret)}; Path=/; HttpOnly; SameSite=Strict{secure}")
            self.send_header("Content-Length", "0")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            return False
        return True

    def _same_origin(self) -> bool:
        """A write must come from this dashboard's own pages (cross-site forms and scripts are refused)."""
        site = (self.headers.get("Sec-Fetch-Site") or "same-origin").lower()
        origin = self.headers.get("Origin")
        host = self.headers.get("Host") or ""
        if site not in ("same-origin", "none") or (origin and origin not in (f"http://{host}", f"https://{host}")):
            self._error(HTTPStatus.FORBIDDEN, "cross-site writes are refused")
            return False
        return True

    # --- routes ------------------------------------------------------------------------------
    def do_HEAD(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        if not self._host_ok(path) or not self._authorize(path, query):
            return
        app = self.server.app
        try:
            if path == HEALTH_PATH:
                return self._json(200, {"status": "ok", **app.live.status()})
            if path == READY_PATH:
                ok = app.store.ping()
                return self._json(200 if ok else 503, {"ready": ok, **app.live.status()})
            if path == METRICS_PATH:
                return self._send(200, generate_latest(app.registry), CONTENT_TYPE_LATEST,
                                  {"Cache-Control": "no-store"})
            if path in ("/", "/index.html"):
                return self._page("index")
            if path.startswith("/alert/"):
                return self._page("alert")
            if path == "/audit":
                return self._page("audit")
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

    def do_POST(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        path = unquote(urlsplit(self.path).path)
        if not self._host_ok(path) or not self._authorize(path, {}) or not self._same_origin():
            return
        seg = path.split("/")
        if len(seg) != 4 or seg[:3] != ["", "api", "labels"]:
            return self._error(404, f"no such write route: {path} (POST /api/labels/<frame id>)")
        if not FRAME_ID_RE.match(seg[3]):
            return self._error(400, "bad frame id")
        if (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
            return self._error(415, "send the label as application/json")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            return self._error(413 if length > MAX_BODY else 400, f"the body must be 1 to {MAX_BODY} bytes of JSON")
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:
            return self._error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return self._error(400, "the body must be a JSON object")
        try:
            return self._label(seg[3], body)
        except LabelError as e:
            return self._error(400, str(e))
        except (redis.RedisError, OSError) as e:
            if isinstance(e, BrokenPipeError | ConnectionResetError):
                return None
            return self._error(503, f"Redis unreachable: {type(e).__name__}: {e}")

    def _label(self, frame_id: str, body: dict[str, Any]) -> None:
        """Acknowledge, label or comment an alert as the request's identity; tell every open page."""
        app = self.server.app
        facts = app.store.alert_facts(frame_id)
        if facts is None:
            return self._error(404, f"frame {frame_id} is not an alert in Redis (only alerts can be labelled)")
        action = body.get("action")
        labels = app.store.labels
        if action == "acknowledge":
            lab = labels.acknowledge(facts, self.identity)
        elif action == "label":
            lab = labels.set_label(facts, str(body.get("label", "")), self.identity,
                                   defect_type=str(body.get("defect_type") or ""),
                                   mask_is_defect=bool(body.get("mask_is_defect")))
        elif action == "comment":
            lab = labels.add_comment(facts, str(body.get("comment", "")), self.identity)
        else:
            return self._error(400, "action must be acknowledge, label or comment")
        log.info("frame %s of line %s: %s by %s", frame_id, facts.line, action, self.identity,
                 extra={"line": facts.line, "frame_id": frame_id})
        app.live.broadcast("label", lab.to_dict())
        self._json(200, {"label": lab.to_dict(), "audit": labels.audit(frame_id=frame_id, count=50)})

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
            return self._json(200, {**store.snapshot(), "live": self.server.app.live.status(),
                                    "identity": self.identity})
        if route == "session":
            return self._json(200, {"identity": self.identity, "defect_types": store.settings.dashboard.defect_types,
                                    "tokens": bool(self.server.app.tokens)})
        if route == "alerts":
            after = _str(query, "after")
            if after is not None and not STREAM_ID_RE.match(after):
                return self._error(400, "after must be a stream id like 1700000000000-0")
            count = _int(query, "count", store.alerts_len, 1, 500)
            filters = _filters(query, ("line", "camera", "label", "before", "from", "to"))
            if isinstance(filters, str):
                return self._error(400, filters)
            if not filters:
                return self._json(200, {"alerts": store.alerts(count, after),
                                        "total": store.client.xlen(store.keys.alerts_stream)})
            return self._json(200, store.browse_alerts(count=count, **filters))
        if route == "frames":
            filters = _filters(query, ("line", "camera", "verdict", "before", "from", "to"))
            if isinstance(filters, str):
                return self._error(400, filters)
            return self._json(200, store.browse_frames(count=_int(query, "count", 50, 1, 500), **filters))
        if route == "audit":
            line, frame, before = _str(query, "line"), _str(query, "frame"), _str(query, "before")
            if (line and not LINE_ID_RE.match(line)) or (frame and not FRAME_ID_RE.match(frame)) or (
                    before and not STREAM_ID_RE.match(before)):
                return self._error(400, "bad line, frame or before")
            entries = store.labels.audit(line=line, frame_id=frame, count=_int(query, "count", 50, 1, 500),
                                         before=before)
            return self._json(200, {"audit": entries, "next": entries[-1]["id"] if entries else None})
        if len(seg) == 3 and seg[0] == "lines" and seg[2] in ("history", "labels"):
            if not LINE_ID_RE.match(seg[1]):
                return self._error(400, "bad line id")
            if seg[2] == "labels":
                return self._json(200, store.line_labels(seg[1]))
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
        if len(seg) != 3 or seg[0] not in ("frame", "latest", "label") or seg[2] not in IMAGE_KINDS:
            return self._error(404, "image paths are /img/frame/<frame id>/<kind> or /img/latest/<line>/<kind>")
        scope, ident, kind = seg
        if not (LINE_ID_RE if scope == "latest" else FRAME_ID_RE).match(ident):
            return self._error(400, f"bad {scope} id")
        width = _int(query, "w", 0, 0, MAX_THUMB) or None
        got = self.server.app.store.image(scope, ident, kind, width)
        if got is None:
            return self._error(404, f"no {kind} for {scope} {ident}")
        data, ctype = got
        cache = "private, max-age=86400, immutable" if scope != "latest" else "no-store"
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


def _str(query: dict[str, list[str]], name: str) -> str | None:
    v = (query.get(name) or [""])[0].strip()
    return v or None


def _filters(query: dict[str, list[str]], names: tuple[str, ...]) -> dict[str, Any] | str:
    """Validated filter keyword arguments for the browse views, or an error message."""
    out: dict[str, Any] = {}
    for name in names:
        v = _str(query, name)
        if v is None:
            continue
        if name == "line" and not LINE_ID_RE.match(v):
            return "bad line id"
        if name == "camera" and len(v) > 200:
            return "camera id too long"
        if name == "label" and v not in LABEL_FILTERS:
            return f"label must be one of {', '.join(LABEL_FILTERS)}"
        if name == "verdict" and v not in VERDICTS:
            return f"verdict must be one of {', '.join(VERDICTS)}"
        if name == "before" and not STREAM_ID_RE.match(v):
            return "before must be a stream id like 1700000000000-0"
        if name in ("from", "to"):
            if not v.isdigit():
                return f"{name} must be milliseconds since the epoch"
            out["since_ms" if name == "from" else "until_ms"] = int(v)
            continue
        out[name] = v
    return out


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

    @property
    def token_required(self) -> bool:
        return bool(self.tokens)

    def __init__(self, settings: Settings, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 token: str | None = None, allow_no_token: bool = False, store: DashboardStore | None = None,
                 tick_s: float = 2.0, keepalive_s: float = 15.0) -> None:
        self.tokens = parse_tokens(token)
        if not is_loopback(host) and not self.tokens and not allow_no_token:
            raise ConfigError(
                f"the dashboard would listen on {host}, beyond this machine, without an access token: set "
                f"{TOKEN_ENV} (or --token-file), or pass --allow-no-token if the network is trusted"
            )
        self.settings = settings
        ds = settings.dashboard
        self.allowed_hosts = list(ds.allowed_hosts) + ([host] if not _is_ip(host) and host != "localhost" else [])
        self.limiter = GuessLimiter(ds.guess_limit, ds.guess_window_s)
        self.refused = 0
        self.limited = 0
        self.bad_hosts = 0
        self.keepalive_s = keepalive_s
        self.store = store or DashboardStore(settings)
        self.live = LiveFeed(self.store, tick_s=tick_s)
        self.registry = CollectorRegistry()
        self.registry.register(DashboardCollector(self))
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


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False
