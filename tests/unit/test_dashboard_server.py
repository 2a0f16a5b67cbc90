"""Dashboard server without a browser or Redis: binding rules, token handling, routes, decoding, images."""

from __future__ import annotations

import io
import json
import queue
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.dashboard.entries import decode_value, stream_entry
from pipeline.dashboard.images import outline_png, thumbnail
from pipeline.dashboard.live import CLOSE, LiveFeed
from pipeline.dashboard.server import COOKIE, DashboardServer, cookie_value, host_allowed, is_loopback, parse_tokens
from pipeline.dashboard.store import DashboardStore
from pipeline.errors import ConfigError
from pipeline.inspection.render import mask_png
from pipeline.settings import Settings, load_settings

TOKEN = "unit-test-token-123"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


# Headers as the client sees them: names are case-insensitive (the server sends them in lower case).
def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Message, bytes]:
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def post(url: str, body: bytes, headers: dict[str, str] | None = None,
         ctype: str = "application/json") -> tuple[int, Message, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype, **(headers or {})}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lines: [{id: bottle, class_name: bottle}]\n")
    return load_settings(cfg, redis={"url": "redis://127.0.0.1:1/0"})  # nothing listens there


@pytest.fixture
def server(settings: Settings) -> Iterator[DashboardServer]:
    with DashboardServer(settings, port=0, token=TOKEN, tick_s=60).start() as srv:
        yield srv


def test_off_loopback_needs_a_token(settings: Settings) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    with pytest.raises(ConfigError, match="without an access token"):
        DashboardServer(settings, host="0.0.0.0", port=0)
    for short in ("short", "8charsAB", "fifteen-chars-x"):  # 8-character tokens were accepted before
        with pytest.raises(ConfigError, match="at least 16 characters"):
            DashboardServer(settings, port=0, token=short)
    with pytest.raises(ConfigError, match="at least 16 characters"):
        DashboardServer(settings, port=0, token=f"alice:{TOKEN},bob:8charsAB")
    with pytest.raises(ConfigError, match="named 'alice'"):
        DashboardServer(settings, port=0, token=f"alice:{TOKEN},alice:{TOKEN}-2")
    DashboardServer(settings, host="0.0.0.0", port=0, token=TOKEN).close()
    DashboardServer(settings, host="0.0.0.0", port=0, allow_no_token=True).close()


def test_token_in_the_url_becomes_a_cookie(server: DashboardServer) -> None:
    status, headers, _ = get(f"{server.url}/?token={TOKEN}&x=1")
    assert status == 303
    assert headers["Location"] == "/?x=1", "the token leaves the address bar"
    cookie = headers["Set-Cookie"]
    value = cookie.split(";")[0].split("=", 1)[1]
    assert TOKEN not in cookie and value == cookie_value(TOKEN), "the cookie holds an HMAC of the token, not the token"
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    status, _, body = get(f"{server.url}/", {"Cookie": f"{COOKIE}={value}"})
    assert status == 200 and b"live inspection" in body
    assert get(f"{server.url}/api/session", {"Cookie": f"{COOKIE}={TOKEN}"})[0] == 401, "the raw token is no cookie"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-xyz"},
                                     {"Cookie": f"{COOKIE}=wrong-token-xyz"}])
def test_missing_or_wrong_token_is_refused(server: DashboardServer, headers: dict[str, str]) -> None:
    paths = ("/", "/api/snapshot", "/events", "/img/latest/bottle/image", "/alert/x")
    for path in paths:
        status, _, body = get(server.url + path, headers)
        assert status == 401, path
        assert b"bottle" not in body
    assert server.refused == (len(paths) if headers else 0), "each wrong token counts; a missing one is no guess"


def test_probes_and_static_files_need_no_token(server: DashboardServer) -> None:
    assert get(server.url + "/healthz")[0] == 200
    assert get(server.url + "/readyz")[0] == 503, "Redis is unreachable, so not ready"
    status, headers, _ = get(server.url + "/static/app.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert get(server.url + "/static/../server.py")[0] == 404
    assert get(server.url + "/static/store.py")[0] == 404


def test_routes_validate_ids_and_report_redis_down(server: DashboardServer) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert get(server.url + "/img/frame/bad%20id/mask", auth)[0] == 400
    assert get(server.url + "/img/frame/f1/secret", auth)[0] == 404
    assert get(server.url + "/api/alerts?after=1;2", auth)[0] == 400
    status, _, body = get(server.url + "/api/snapshot", auth)
    assert status == 503 and b"Redis unreachable" in body
    status, headers, _ = get(server.url + "/", auth)
    assert "default-src 'self'" in headers["Content-Security-Policy"], "no external assets can load"
    req = urllib.request.Request(server.url + "/api/snapshot", data=b"x", headers=auth, method="PUT")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 501, "no method but GET, HEAD and POST"
    assert post(server.url + "/api/snapshot", b"{}", auth)[0] == 404, "labels are the only thing written"


def test_stream_entries_are_typed_and_normalised() -> None:
    e = stream_entry(b"1700000000123-4", {b"frame_id": b"0042", b"score": b"0.75", b"verdict": b"anomalous",
                                          b"regions": b'[{"area": 3, "box": [0, 0, 2, 2]}]', b"camera": b"cam-1"})
    assert e["ts_ms"] == 1700000000123 and e["id"] == "1700000000123-4"
    assert e["frame_id"] == "0042", "ids stay text even when they look like numbers"
    assert e["score"] == 0.75 and e["anomalous"] is True and e["regions"][0]["area"] == 3
    assert stream_entry(b"1-0", {b"verdict": b"normal"})["anomalous"] is False
    assert decode_value(b"{not json") == "{not json"
    assert decode_value(b"12") == 12 and decode_value(b"1e-3") == 0.001


def test_outline_follows_the_mask_edge_at_any_width() -> None:
    mask = np.zeros((100, 200), dtype=bool)
    mask[20:60, 50:150] = True
    full = np.asarray(Image.open(io.BytesIO(outline_png(mask_png(mask)))))
    assert full.shape == (100, 200, 4)
    drawn = full[..., 3] > 0
    assert drawn[20, 100] and drawn[40, 50] and not drawn[40, 100] and not drawn[5, 5]
    small = np.asarray(Image.open(io.BytesIO(outline_png(mask_png(mask), width=50))))
    assert small.shape == (25, 50, 4) and (small[..., 3] > 0).any()
    empty = np.asarray(Image.open(io.BytesIO(outline_png(mask_png(np.zeros((10, 10), bool))))))
    assert not (empty[..., 3] > 0).any()
    buf = io.BytesIO()
    Image.new("RGB", (400, 200)).save(buf, format="PNG")
    data, ctype = thumbnail(buf.getvalue(), 100)
    assert ctype == "image/png" and Image.open(io.BytesIO(data)).size == (100, 50)


def test_live_feed_fans_out_and_cuts_off_slow_browsers(settings: Settings) -> None:
    feed = LiveFeed(DashboardStore(settings), queue_size=3)
    fast, slow = feed.subscribe(), feed.subscribe()
    for i in range(3):
        feed.broadcast("result", {"i": i})
        fast.get_nowait()
    feed.broadcast("result", {"i": 3})  # slow's queue is full now: it is dropped and told to close
    assert feed.subscribers == 1
    items = []
    while True:
        try:
            items.append(slow.get_nowait())
        except queue.Empty:
            break
    assert items[-1] is CLOSE
    assert fast.get_nowait().encode() == b'event: result\ndata: {"i":3}\n\n'
    assert feed.drop_clients() == 1 and fast.get_nowait() is CLOSE


# --- issue 15, finding 5: each of these failed before the fix ------------------------------------------


def test_only_known_host_names_are_answered(server: DashboardServer) -> None:
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1 must get nothing."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for host in ("evil.example", "evil.example:8700", "127.0.0.1.evil.example"):
        status, _, body = get(server.url + "/api/session", {**auth, "Host": host})
        assert status == 400 and b"allowed_hosts" in body, host
    for host in (f"127.0.0.1:{server.address[1]}", "localhost", "[::1]:80", "10.0.0.7"):
        assert get(server.url + "/api/session", {**auth, "Host": host})[0] == 200, host
    assert get(server.url + "/healthz", {"Host": "evil.example"})[0] == 200, "probes use any address"
    assert server.bad_hosts == 3
    assert host_allowed("dash.example.com", ["dash.example.com"]) and host_allowed("a.corp.io", [".corp.io"])
    assert not host_allowed("corp.io.evil", [".corp.io"]) and not host_allowed(None, [])


def test_parallel_wrong_tokens_are_serialised_and_rate_limited(server: DashboardServer) -> None:
    """20 parallel wrong tokens all got their 401 in 0.64 s before; now one client's checks take turns and
    after `guess_limit` failures the rest are refused unchecked (429), even with the right token."""
    from concurrent.futures import ThreadPoolExecutor

    url = server.url + "/api/session"
    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(lambda i: get(url, {"Authorization": f"Bearer wrong-token-guess-{i:04d}"})[0],
                              range(20)))
    limit = server.settings.dashboard.guess_limit
    assert codes.count(401) == limit and codes.count(429) == 20 - limit, codes
    assert server.refused == limit and server.limited == 20 - limit
    status, headers, body = get(url, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 429 and int(headers["Retry-After"]) > 0 and b"Too many wrong access tokens" in body


def test_tokens_have_names_and_labels_need_json_from_the_same_origin(settings: Settings) -> None:
    assert parse_tokens(f"alice:{TOKEN}, bob:{TOKEN}-b") == {TOKEN: "alice", f"{TOKEN}-b": "bob"}
    assert parse_tokens(TOKEN) == {TOKEN: "operator"} and parse_tokens(None) == {}
    with DashboardServer(settings, port=0, token=f"alice:{TOKEN}\nbob:{TOKEN}-b", tick_s=60).start() as srv:
        status, _, body = get(srv.url + "/api/session", {"Authorization": f"Bearer {TOKEN}-b"})
        assert status == 200 and json.loads(body)["identity"] == "bob"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        url = srv.url + "/api/labels/f1"
        assert post(url, b"action=label", auth, "application/x-www-form-urlencoded")[0] == 415
        assert post(url, b'{"action": "acknowledge"}', {**auth, "Origin": "http://evil.example"})[0] == 403
        assert post(url, b'{"action": "acknowledge"}', {**auth, "Sec-Fetch-Site": "cross-site"})[0] == 403
        assert post(url, b"[1]", auth)[0] == 400
        assert post(url, b"x" * 20000, auth)[0] == 413
        assert post(url, b'{"action": "acknowledge"}', {"Authorization": "Bearer wrong-token-123456"})[0] == 401
        status, _, body = post(url, b'{"action": "acknowledge"}', auth)
        assert status == 503 and b"Redis unreachable" in body, "well-formed: it reached Redis (which is down here)"


def test_metrics_need_no_token_and_have_no_nan_or_created_series(server: DashboardServer) -> None:
    get(server.url + "/api/session", {"Authorization": "Bearer wrong-token-abcdefgh"})
    status, headers, body = get(server.url + "/metrics", {"Host": "dashboard:8700"})
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert "anoclip_dashboard_token_refusals_total 1.0" in text
    assert "anoclip_dashboard_redis_up 0.0" in text, "Redis is down here"
    assert "NaN" not in text and "_created" not in text


def test_region_descriptions_and_verdict_notes_read_like_sentences() -> None:
    from pipeline.operators.describe import describe_regions, verdict_note

    regs = [{"area": 300, "box": [10, 5, 40, 15]}, {"area": 4500, "box": [0, 0, 90, 50]}]
    assert describe_regions(regs, 400, 300) == "2 regions, largest 3.8% of frame, upper left"
    assert describe_regions([{"area": 20, "box": [350, 260, 360, 270]}], 400, 300) == \
        "1 region, largest under 0.1% of frame, lower right"
    assert describe_regions(regs) == "2 regions, largest 4500 px"
    assert describe_regions([]) == "no region above the pixel threshold"
    assert "suspicious only" in verdict_note(False, 120, 100, 100) and "1.2% of the frame" in verdict_note(False, 120,
                                                                                                          100, 100)
    assert "no location" in verdict_note(True, 0) and verdict_note(True, 5) == verdict_note(False, 0) == ""


def test_event_stream_wire_format_keepalive_close_and_disconnect(settings: Settings) -> None:
    """The SSE feed: `retry` and `hello` first, events as they are broadcast, keepalive comments when idle, the
    stream ends on CLOSE; HEAD and a browser going away leave no subscriber behind."""
    import http.client
    import time

    with DashboardServer(settings, port=0, tick_s=60, keepalive_s=0.3).start() as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.address[1], timeout=5)
        conn.request("HEAD", "/events")
        r = conn.getresponse()
        assert r.status == 200 and r.read() == b"" and srv.live.subscribers == 0

        def read_until(resp: http.client.HTTPResponse, marker: bytes) -> bytes:
            got = b""
            deadline = time.monotonic() + 5
            while marker not in got and time.monotonic() < deadline:
                got += resp.read1(4096)
            return got

        conn = http.client.HTTPConnection("127.0.0.1", srv.address[1], timeout=5)
        conn.request("GET", "/events")
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream")
        assert r.getheader("X-Frame-Options") == "DENY" and r.getheader("Cache-Control") == "no-store"
        first = read_until(r, b"event: hello\n")
        assert first.startswith(b"retry: 1500\n\nevent: hello\ndata: {")
        wait = time.monotonic() + 5
        while srv.live.subscribers != 1 and time.monotonic() < wait:
            time.sleep(0.01)
        srv.live.broadcast("result", {"i": 1})
        assert b'event: result\ndata: {"i":1}\n\n' in read_until(r, b'{"i":1}')
        assert b": keepalive\n\n" in read_until(r, b"keepalive")
        assert srv.live.drop_clients() == 1
        assert r.read() is not None and r.isclosed(), "CLOSE ends the response"

        conn = http.client.HTTPConnection("127.0.0.1", srv.address[1], timeout=5)
        conn.request("GET", "/events")
        read_until(conn.getresponse(), b"event: hello\n")
        conn.close()  # the browser goes away
        wait = time.monotonic() + 5
        while srv.live.subscribers and time.monotonic() < wait:
            time.sleep(0.05)
        assert srv.live.subscribers == 0
