"""HTTP side of the dashboard: a Starlette app under uvicorn, a JSON API and an SSE feed (sse-starlette).

Reads the workers' outputs; the only writes are operators' labels on alerts (POST `/api/labels/<frame>`,
JSON, same origin only). Loopback is the default bind; on any other address a token is required
(`ANOCLIP_DASHBOARD_TOKEN` or a token file) unless the operator explicitly opts out.

Tokens: one or more `name:secret` pairs (commas or new lines between them; a bare secret is named
`operator`), secrets of at least 16 characters. The name is who labels are recorded as. A token is
accepted as `Authorization: Bearer`, or once as `?token=`, which sets a cookie holding an HMAC of the
token (never the token itself; HttpOnly, SameSite=Strict) and redirects to the same page without it.

Guards (`pipeline.web.auth.AccessGuard`, before any route): only `Host` headers that are IP addresses,
`localhost` or listed in `dashboard.allowed_hosts` are answered (DNS rebinding); a client presenting
`dashboard.guess_limit` wrong tokens within `guess_window_s` is refused unchecked (429) until the window
passes, and one client's token checks run one at a time, so parallel guessing is as slow as serial guessing.

Routes that read Redis are plain functions, run on Starlette's thread pool; the event stream is async and
is woken by the live feed's queue (`LiveFeed.subscribe(wake=...)`), so an open page holds no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import queue
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
from pipeline.operators.labels import LabelError
from pipeline.settings import Settings
from pipeline.web import auth as http_auth
from pipeline.web.asgi import ThreadedServer, bind
from pipeline.web.auth import (  # noqa: F401 - part of this module's API (tests, callers)
    AccessGuard,
    AccessPolicy,
    GuessLimiter,
    cookie_value,
    host_allowed,
    is_ip,
    is_loopback,
)

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8700
TOKEN_ENV = "ANOCLIP_DASHBOARD_TOKEN"
TOKEN_MIN = 16
TOKEN_RE = http_auth.token_rule(TOKEN_MIN)
DEFAULT_IDENTITY = "operator"
"""The name of a token given without one."""
ANONYMOUS = "anonymous"
"""Who labels are recorded as when the dashboard runs without tokens (loopback)."""
COOKIE = "anoclip_dashboard"
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


def parse_tokens(spec: str | None) -> dict[str, str]:
    """`name:secret` pairs (or one bare secret) -> {secret: name}; ConfigError naming what is wrong."""
    return http_auth.parse_tokens(spec, what="dashboard", min_len=TOKEN_MIN, default_name=DEFAULT_IDENTITY)


def _static_bytes(name: str) -> bytes:
    return resources.files("pipeline.dashboard").joinpath("static", name).read_bytes()


# --- responses -------------------------------------------------------------------------------------


def _json(status: int, obj: Any, cache: str = "no-store") -> Response:
    body = json.dumps(obj, separators=(",", ":"), default=str).encode()
    return Response(body, status, headers={"Cache-Control": cache}, media_type="application/json")


def _error(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """An HTML page for a browser opening a page, JSON for everything else."""
    headers = {"Cache-Control": "no-store", **(headers or {})}
    path = request.url.path
    if "text/html" in (request.headers.get("accept") or "") and not path.startswith(("/api/", "/img/")):
        return Response(_error_page(status, message), status, headers, media_type="text/html; charset=utf-8")
    body = json.dumps({"error": message, "status": status}, separators=(",", ":")).encode()
    return Response(body, status, headers, media_type="application/json")


def _error_page(status: int, message: str) -> bytes:
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>anoclip dashboard: "
        f"{status}</title><link rel='stylesheet' href='/static/app.css'></head><body class='error-page'>"
        f"<main><h1 id='error-status'>{status}</h1><p id='error-message'>{html.escape(message)}</p>"
        "<p class='hint'>Open the dashboard with <code>?token=&lt;token&gt;</code> once; the browser then "
        "keeps it in a cookie.</p></main></body></html>"
    ).encode()


class _SecurityHeaders:
    """Adds `SECURITY_HEADERS` to every response (pages, API, refusals, the event stream)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    headers.setdefault(k, v)
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


# --- query parameters ------------------------------------------------------------------------------


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


def _query(request: Request) -> dict[str, list[str]]:
    return parse_qs(request.url.query)


# --- the app ---------------------------------------------------------------------------------------


def create_app(dash: DashboardServer) -> Starlette:
    """The dashboard's ASGI app over `dash` (its store, live feed, access policy and metrics)."""
    store, live = dash.store, dash.live

    def healthz(_request: Request) -> Response:
        return _json(200, {"status": "ok", **live.status()})

    def readyz(_request: Request) -> Response:
        ok = store.ping()
        return _json(200 if ok else 503, {"ready": ok, **live.status()})

    def metrics(_request: Request) -> Response:  # a thread: the collector reads Redis
        return Response(generate_latest(dash.registry), headers={"Cache-Control": "no-store"},
                        media_type=CONTENT_TYPE_LATEST)

    def page(name: str) -> Callable[[Request], Response]:
        def endpoint(_request: Request) -> Response:
            return Response(_static_bytes(PAGES[name]), headers={"Cache-Control": "no-store"},
                            media_type="text/html; charset=utf-8")

        return endpoint

    def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return _error(request, 404, f"no such file: {name}")
        return Response(_static_bytes(name), headers={"Cache-Control": "no-cache"}, media_type=STATIC[name])

    async def events(_request: Request) -> Response:
        """Server-sent events until the browser goes away or the feed drops the stream (`CLOSE`)."""
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()

        def wake() -> None:  # called by the feed's threads
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting any more
                loop.call_soon_threadsafe(arrived.set)

        async def stream() -> AsyncIterator[bytes]:
            q = live.subscribe(wake)  # here, not before: a HEAD request never starts the stream
            try:
                yield b"retry: 1500\n\n"
                yield Event("hello", {**live.status(), "server_time_ms": int(time.time() * 1000)}).encode()
                while True:
                    try:
                        item = q.get_nowait()
                    except queue.Empty:
                        arrived.clear()
                        if q.empty():
                            await arrived.wait()
                        continue
                    if item is CLOSE:
                        return
                    yield item.encode()
            finally:
                live.unsubscribe(q)

        return EventSourceResponse(stream(), headers={"Cache-Control": "no-store"}, ping=dash.keepalive_s,
                                   sep="\n", ping_message_factory=lambda: ServerSentEvent(comment="keepalive",
                                                                                         sep="\n"))

    # --- API ---------------------------------------------------------------------------------------
    def snapshot(request: Request) -> Response:
        return _json(200, {**store.snapshot(), "live": live.status(), "identity": request.state.identity})

    def session(request: Request) -> Response:
        return _json(200, {"identity": request.state.identity, "defect_types": store.settings.dashboard.defect_types,
                           "tokens": bool(dash.tokens)})

    def alerts(request: Request) -> Response:
        query = _query(request)
        after = _str(query, "after")
        if after is not None and not STREAM_ID_RE.match(after):
            return _error(request, 400, "after must be a stream id like 1700000000000-0")
        count = _int(query, "count", store.alerts_len, 1, 500)
        filters = _filters(query, ("line", "camera", "label", "before", "from", "to"))
        if isinstance(filters, str):
            return _error(request, 400, filters)
        if not filters:
            return _json(200, {"alerts": store.alerts(count, after),
                               "total": store.client.xlen(store.keys.alerts_stream)})
        return _json(200, store.browse_alerts(count=count, **filters))

    def frames(request: Request) -> Response:
        query = _query(request)
        filters = _filters(query, ("line", "camera", "verdict", "before", "from", "to"))
        if isinstance(filters, str):
            return _error(request, 400, filters)
        return _json(200, store.browse_frames(count=_int(query, "count", 50, 1, 500), **filters))

    def audit(request: Request) -> Response:
        query = _query(request)
        line, frame, before = _str(query, "line"), _str(query, "frame"), _str(query, "before")
        if (line and not LINE_ID_RE.match(line)) or (frame and not FRAME_ID_RE.match(frame)) or (
                before and not STREAM_ID_RE.match(before)):
            return _error(request, 400, "bad line, frame or before")
        entries = store.labels.audit(line=line, frame_id=frame, count=_int(query, "count", 50, 1, 500),
                                     before=before)
        return _json(200, {"audit": entries, "next": entries[-1]["id"] if entries else None})

    def line_view(request: Request) -> Response:
        line, view = request.path_params["line"], request.path_params.get("view")
        if view not in (None, "history", "labels"):
            return fallback(request)
        if not LINE_ID_RE.match(line):
            return _error(request, 400, "bad line id")
        if view is None:
            return _json(200, store.line_state(line))
        if view == "labels":
            return _json(200, store.line_labels(line))
        count = _int(_query(request), "count", store.history_len, 1, 5000)
        return _json(200, {"line": line, "history": store.history(line, count)})

    def frame(request: Request) -> Response:
        fid = request.path_params["frame"]
        if not FRAME_ID_RE.match(fid):
            return _error(request, 400, "bad frame id")
        found = store.frame(fid, with_alert=(_query(request).get("alert") or ["1"])[0] != "0")
        if found is None:
            return _error(request, 404, f"frame {fid} is not in Redis (never published, or its TTL ran out)")
        return _json(200, found)

    def image(request: Request) -> Response:
        scope, ident, kind = (request.path_params[k] for k in ("scope", "ident", "kind"))
        if scope not in ("frame", "latest", "label") or kind not in IMAGE_KINDS:
            return fallback(request)
        if not (LINE_ID_RE if scope == "latest" else FRAME_ID_RE).match(ident):
            return _error(request, 400, f"bad {scope} id")
        width = _int(_query(request), "w", 0, 0, MAX_THUMB) or None
        got = store.image(scope, ident, kind, width)
        if got is None:
            return _error(request, 404, f"no {kind} for {scope} {ident}")
        data, ctype = got
        cache = "private, max-age=86400, immutable" if scope != "latest" else "no-store"
        return Response(data, headers={"Cache-Control": cache}, media_type=ctype)

    async def label(request: Request) -> Response:
        """Acknowledge, label or comment an alert as the request's identity; tell every open page."""
        frame_id = request.path_params["frame"]
        if not FRAME_ID_RE.match(frame_id):
            return _error(request, 400, "bad frame id")
        if (request.headers.get("content-type") or "").split(";")[0].strip().lower() != "application/json":
            return _error(request, 415, "send the label as application/json")
        try:
            length = int(request.headers.get("content-length") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            return _error(request, 413 if length > MAX_BODY else 400, f"the body must be 1 to {MAX_BODY} bytes of JSON")
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(request, 400, "the body is not JSON")
        if not isinstance(body, dict):
            return _error(request, 400, "the body must be a JSON object")
        try:
            return await run_in_threadpool(_label, request, frame_id, body)
        except LabelError as e:
            return _error(request, 400, str(e))

    def _label(request: Request, frame_id: str, body: dict[str, Any]) -> Response:
        identity = request.state.identity
        facts = store.alert_facts(frame_id)
        if facts is None:
            return _error(request, 404, f"frame {frame_id} is not an alert in Redis (only alerts can be labelled)")
        action = body.get("action")
        labels = store.labels
        if action == "acknowledge":
            lab = labels.acknowledge(facts, identity)
        elif action == "label":
            lab = labels.set_label(facts, str(body.get("label", "")), identity,
                                   defect_type=str(body.get("defect_type") or ""),
                                   mask_is_defect=bool(body.get("mask_is_defect")))
        elif action == "comment":
            lab = labels.add_comment(facts, str(body.get("comment", "")), identity)
        else:
            return _error(request, 400, "action must be acknowledge, label or comment")
        log.info("frame %s of line %s: %s by %s", frame_id, facts.line, action, identity,
                 extra={"line": facts.line, "frame_id": frame_id})
        live.broadcast("label", lab.to_dict())
        return _json(200, {"label": lab.to_dict(), "audit": labels.audit(frame_id=frame_id, count=50)})

    def fallback(request: Request) -> Response:
        path = request.url.path
        if request.method == "POST":
            return _error(request, 404, f"no such write route: {path} (POST /api/labels/<frame id>)")
        if path.startswith("/api/"):
            return _error(request, 404, f"no such API route: {path[len('/api/'):]}")
        if path.startswith("/img/"):
            return _error(request, 404,
                          "image paths are /img/frame/<frame id>/<kind> or /img/latest/<line>/<kind>")
        return _error(request, 404, f"no such page: {path}")

    def redis_down(request: Request, e: Exception) -> Response:
        return _error(request, 503, f"Redis unreachable: {type(e).__name__}: {e}")

    routes = [
        Route(HEALTH_PATH, healthz), Route(READY_PATH, readyz), Route(METRICS_PATH, metrics),
        Route("/", page("index")), Route("/index.html", page("index")), Route("/audit", page("audit")),
        Route("/alert/{rest:path}", page("alert")), Route("/static/{name:path}", static),
        Route("/events", events),
        Route("/api/snapshot", snapshot), Route("/api/session", session), Route("/api/alerts", alerts),
        Route("/api/frames", frames), Route("/api/audit", audit),
        Route("/api/lines/{line}", line_view), Route("/api/lines/{line}/{view:str}", line_view),
        Route("/api/frames/{frame}", frame),
        Route("/img/{scope}/{ident}/{kind}", image),
        Route("/api/labels/{frame}", label, methods=["POST"]),
        Route("/{path:path}", fallback, methods=["GET", "HEAD", "POST"]),  # every other path: 404 with a hint
    ]
    middleware = [
        Middleware(_SecurityHeaders),
        Middleware(AccessGuard, policy=dash.access, refuse=_error),
    ]
    handlers: dict[Any, Any] = {redis.RedisError: redis_down, OSError: redis_down}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)


class DashboardServer:
    """The dashboard as an object: `start()` in a thread (tests, `anoclip demo`) or `serve_forever()`."""

    @property
    def token_required(self) -> bool:
        return bool(self.tokens)

    def __init__(self, settings: Settings, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 token: str | None = None, allow_no_token: bool = False, store: DashboardStore | None = None,
                 tick_s: float = 2.0, keepalive_s: float = 15.0) -> None:
        self.tokens = parse_tokens(token)
        http_auth.require_token_off_loopback("the dashboard", host, bool(self.tokens), allow_no_token, TOKEN_ENV)
        self.settings = settings
        ds = settings.dashboard
        self.allowed_hosts = list(ds.allowed_hosts) + ([host] if not is_ip(host) and host != "localhost" else [])
        self.limiter = GuessLimiter(ds.guess_limit, ds.guess_window_s)
        self.access = AccessPolicy(
            tokens=self.tokens, open_paths=frozenset(OPEN_PATHS), name="dashboard", public_prefixes=("/static/",),
            allowed_hosts=self.allowed_hosts, cookie=COOKIE, limiter=self.limiter,
            wrong_token_delay_s=WRONG_TOKEN_DELAY_S, same_origin_writes=True,
            methods=frozenset({"GET", "HEAD", "POST"}), anonymous=ANONYMOUS,
            missing_message="An access token is required for this dashboard.", wrong_message="Access token refused.")
        self.keepalive_s = keepalive_s
        self.store = store or DashboardStore(settings)
        self.live = LiveFeed(self.store, tick_s=tick_s)
        self.registry = CollectorRegistry()
        self.registry.register(DashboardCollector(self))
        self.app = create_app(self)
        try:
            sock = bind(host, port)
        except OSError as e:
            raise ConfigError(f"the dashboard cannot listen on {host}:{port}: {e}") from e
        self._server = ThreadedServer(self.app, sock, name="dashboard-http")

    @property
    def refused(self) -> int:
        """Requests refused for a wrong token (`anoclip_dashboard_token_refusals_total`)."""
        return self.access.refused

    @property
    def limited(self) -> int:
        return self.access.limited

    @property
    def bad_hosts(self) -> int:
        return self.access.bad_hosts

    @property
    def address(self) -> tuple[str, int]:
        return self._server.host, self._server.port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> DashboardServer:
        """Serve in a background thread; returns self so `with DashboardServer(...).start()` reads well."""
        self.live.start()
        self._server.start()
        return self

    def serve_forever(self) -> None:
        self.start()
        try:
            while self._server.running:
                time.sleep(0.5)
        finally:
            self.close()

    def close(self) -> None:
        """End every event stream, then stop serving (answers in flight finish) and close the socket."""
        self.live.stop()
        self._server.stop()

    def __enter__(self) -> DashboardServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
