"""Access control for the HTTP servers (`anoclip serve`, `anoclip dashboard`), written once.

The bind rule (loopback needs no token; any other address needs one unless the operator opts out), token
parsing, and `AccessGuard`, an ASGI middleware that answers, before any route runs:

- 501 to a method the app does not serve (when `AccessPolicy.methods` is set);
- 400 to a `Host` header the server was not told it is reached by (DNS rebinding; when `allowed_hosts` is
  set): IP literals and `localhost` always pass, as no DNS name can rebind to them;
- 401 without a right token (`Authorization: Bearer`, and for browser apps `?token=` once, which becomes a
  cookie holding an HMAC of the token, never the token itself, and a redirect to the same page without it);
- 429 to a client that presented `guess_limit` wrong tokens within `guess_window_s`, unchecked until the
  window passes; one client's checks run one at a time, so parallel guessing is as slow as serial;
- 403 to a cross-site write (when `same_origin_writes`).

Probes and scrapers (`open_paths`) skip all of it. The name behind the token (`name:secret` pairs) is put
in the request's state as `identity`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, quote, urlencode

import anyio.to_thread
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.errors import ConfigError
from pipeline.operators.labels import ACTOR_RE

TOKEN_CHARS = r"A-Za-z0-9._~+/=\-"
COOKIE_CONTEXT = b"anoclip-dashboard-cookie-v1"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`: the only binds that need no token."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def require_token_off_loopback(who: str, host: str, has_token: bool, allow_no_token: bool, env: str) -> None:
    """ConfigError when `who` would listen beyond this machine without a token and no explicit opt-out."""
    if not is_loopback(host) and not has_token and not allow_no_token:
        raise ConfigError(f"{who} would listen on {host}, beyond this machine, without an access token: set "
                          f"{env} (or --token-file), or pass --allow-no-token if the network is trusted")


def token_rule(min_len: int) -> re.Pattern[str]:
    return re.compile(rf"^[{TOKEN_CHARS}]{{{min_len},512}}$")


def parse_tokens(spec: str | None, *, what: str, min_len: int, default_name: str) -> dict[str, str]:
    """`name:secret` pairs (commas or white space between them; a bare secret is named `default_name`) ->
    {secret: name}; ConfigError naming what is wrong."""
    rule = token_rule(min_len)
    out: dict[str, str] = {}
    for entry in re.split(r"[\s,]+", (spec or "").strip()):
        if not entry:
            continue
        name, sep, secret = entry.partition(":")
        if not sep:
            name, secret = default_name, entry
        if not ACTOR_RE.match(name):  # the name is who labels are recorded as
            raise ConfigError(f"{what} token name {name!r}: use 1-64 of A-Z a-z 0-9 . _ @ -")
        if not rule.match(secret):
            raise ConfigError(
                f"the {what} access token{'' if name == default_name else ' of ' + name} must be at least "
                f"{min_len} characters of A-Z a-z 0-9 . _ ~ + / = - "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')")
        if secret in out:
            raise ConfigError(f"two {what} tokens share one secret ({out[secret]} and {name})")
        if name in out.values():
            raise ConfigError(f"two {what} tokens are named {name!r}")
        out[secret] = name
    return out


def cookie_value(secret: str) -> str:
    """What the browser keeps: an HMAC keyed by the token, so a leaked cookie never reveals the token and
    every replica (and a restarted one) accepts it without shared state."""
    mac = hmac.new(secret.encode(), COOKIE_CONTEXT, hashlib.sha256).digest()
    return "v1." + base64.urlsafe_b64encode(mac).decode().rstrip("=")


def host_allowed(host_header: str | None, allowed: list[str]) -> bool:
    """IP literals and localhost always (no DNS name can rebind to them), else an `allowed` entry
    (`.example.com` also allows its sub-domains)."""
    if not host_header:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    host = host.rstrip(".")
    if host == "localhost" or is_ip(host):
        return True
    for a in (x.strip().lower().rstrip(".") for x in allowed):
        if a and (host == a or (a.startswith(".") and (host.endswith(a) or host == a[1:]))):
            return True
    return False


class GuessLimiter:
    """Wrong tokens per client: `limit` per `window_s`, then refused unchecked until the oldest expires.

    `lock(client)` is the client's own lock, so one client's token checks (and the delay after a wrong
    one) run one after the other however many connections it opens.
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


@dataclass
class AccessPolicy:
    """What `AccessGuard` checks, and its counters (exported as metrics by the dashboard)."""

    tokens: dict[str, str]
    """{secret: name}; empty: no token needed."""
    open_paths: frozenset[str] = frozenset()
    """Paths with no Host check and no token: probes and scrapers carry no user data."""
    name: str = "server"
    """What refusals call the server (`this dashboard does not answer ...`) and its settings section."""
    public_prefixes: tuple[str, ...] = ()
    """Paths that need no token but are still Host-checked (a page's own scripts and styles)."""
    allowed_hosts: list[str] | None = None
    """Host names answered besides IP literals and localhost; None: any Host."""
    cookie: str | None = None
    """Browser apps: the cookie that `?token=` turns into; None: bearer tokens only."""
    limiter: GuessLimiter | None = None
    wrong_token_delay_s: float = 0.0
    same_origin_writes: bool = False
    methods: frozenset[str] | None = None
    """Methods served (others: 501); None: let the app answer."""
    anonymous: str = "anonymous"
    """The identity of requests when no token is needed."""
    missing_message: str = "An access token is required."
    wrong_message: str = "Access token refused."
    refused: int = 0
    limited: int = 0
    bad_hosts: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, counter: str) -> None:
        with self._lock:
            setattr(self, counter, getattr(self, counter) + 1)

    def identify(self, tokens: list[str], cookies: list[str]) -> str | None:
        """The name behind every presented credential, or None if any is wrong (or they disagree)."""
        names = set()
        for t in tokens:
            names.add(next((n for s, n in self.tokens.items() if hmac.compare_digest(t.encode(), s.encode())), None))
        for c in cookies:
            names.add(next((n for s, n in self.tokens.items()
                            if hmac.compare_digest(c.encode(), cookie_value(s).encode())), None))
        return names.pop() if len(names) == 1 and None not in names else None


Refusal = Callable[[Request, int, str, dict[str, str]], Response]
"""Builds the answer to a refused request: (request, status, message, extra headers) -> response."""


class AccessGuard:
    """ASGI middleware enforcing an `AccessPolicy` before the app sees a request (see the module docstring)."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy, refuse: Refusal) -> None:
        self.app, self.policy, self.refuse = app, policy, refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope, receive)
        answer = await self._check(request)
        if answer is not None:
            return await answer(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _check(self, request: Request) -> Response | None:
        p, path, method = self.policy, request.url.path, request.method
        if p.methods is not None and method not in p.methods:
            return self.refuse(request, 501, f"method {method} is not served", {})
        if path in p.open_paths:
            return None
        host = request.headers.get("host")
        if p.allowed_hosts is not None and not host_allowed(host, p.allowed_hosts):
            p.count("bad_hosts")
            return self.refuse(request, 400, f"this {p.name} does not answer to the host name "
                               f"{(host or '(none)')[:100]!r}; add it to {p.name}.allowed_hosts", {})
        request.scope.setdefault("state", {})["identity"] = p.anonymous
        if p.tokens and not (p.public_prefixes and path.startswith(p.public_prefixes)):
            query = parse_qs(request.scope.get("query_string", b"").decode("latin-1")) if method != "POST" else {}
            tokens, cookies = self._presented(request.headers, query)
            if not tokens and not cookies:
                return self.refuse(request, 401, p.missing_message, {})
            client = request.client.host if request.client else "unknown"
            if p.limiter is not None or p.wrong_token_delay_s:  # locks and sleeps: off the event loop
                verdict = await anyio.to_thread.run_sync(self._verify, client, tokens, cookies)
            else:
                verdict = self._verify(client, tokens, cookies)
            if isinstance(verdict, tuple):
                return self.refuse(request, *verdict)
            request.scope["state"]["identity"] = verdict
            if "token" in query and method == "GET" and p.cookie:
                return self._to_cookie(request, verdict, query)
        if p.same_origin_writes and method == "POST" and not _same_origin(request.headers):
            return self.refuse(request, 403, "cross-site writes are refused", {})
        return None

    def _presented(self, headers: Headers, query: dict[str, list[str]]) -> tuple[list[str], list[str]]:
        """(tokens, cookies) the request carries."""
        tokens: list[str] = []
        auth = headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            tokens.append(auth[7:].strip())
        if not self.policy.cookie:
            return tokens, []
        if "token" in query:
            tokens.append(query["token"][0])
        cookie: SimpleCookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie") or "")
        except Exception:  # noqa: BLE001 - a malformed cookie header is just "no cookie"
            cookie = SimpleCookie()
        return tokens, [cookie[self.policy.cookie].value] if self.policy.cookie in cookie else []

    def _verify(self, client: str, tokens: list[str], cookies: list[str]) -> str | tuple[int, str, dict[str, str]]:
        """The identity, or the refusal (status, message, headers). Blocking (lock, delay): run off the loop."""
        p = self.policy
        lock = p.limiter.lock(client) if p.limiter is not None else threading.Lock()
        with lock:  # one client's checks run one at a time: parallel guessing is no faster
            wait = p.limiter.retry_after(client) if p.limiter is not None else 0.0
            if wait:
                p.count("limited")
                return (429, f"Too many wrong access tokens from {client}; try again in {wait:.0f} s.",
                        {"Retry-After": str(int(wait + 1))})
            name = p.identify(tokens, cookies)
            if name is None:
                if p.limiter is not None:
                    p.limiter.failed(client)
                p.count("refused")
                time.sleep(p.wrong_token_delay_s)
                return 401, p.wrong_message, {}
        return name

    def _to_cookie(self, request: Request, name: str, query: dict[str, list[str]]) -> Response:
        """Move a `?token=` into the cookie and send the browser back to the same page without it."""
        p = self.policy
        secret = next(s for s, n in p.tokens.items() if n == name)
        rest = {k: v for k, v in query.items() if k != "token"}
        target = quote(request.url.path) + ("?" + urlencode(rest, doseq=True) if rest else "")
        secure = "; Secure" if (request.headers.get("x-forwarded-proto") or "").lower() == "https" else ""
        return Response(status_code=303, headers={
            "Location": target, "Cache-Control": "no-store",
            "Set-Cookie": f"{p.cookie}={cookie_value(secret)}; Path=/; HttpOnly; SameSite=Strict{secure}"})


def _same_origin(headers: Headers) -> bool:
    """A write must come from the server's own pages (cross-site forms and scripts are refused)."""
    site = (headers.get("sec-fetch-site") or "same-origin").lower()
    origin = headers.get("origin")
    host = headers.get("host") or ""
    return site in ("same-origin", "none") and not (origin and origin not in (f"http://{host}", f"https://{host}"))
