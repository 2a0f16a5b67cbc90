"""Dashboard server without a browser or Redis: binding rules, token handling, routes, decoding, images."""

from __future__ import annotations

import io
import queue
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.dashboard.live import CLOSE, LiveFeed
from pipeline.dashboard.server import COOKIE, DashboardServer, is_loopback
from pipeline.dashboard.store import DashboardStore, decode_value, outline_png, stream_entry, thumbnail
from pipeline.errors import ConfigError
from pipeline.inspection.render import mask_png
from pipeline.settings import Settings, load_settings

TOKEN = "unit-test-token-123"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


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
    with pytest.raises(ConfigError, match="at least 8 characters"):
        DashboardServer(settings, port=0, token="short")
    DashboardServer(settings, host="0.0.0.0", port=0, token=TOKEN).close()
    DashboardServer(settings, host="0.0.0.0", port=0, allow_no_token=True).close()


def test_token_in_the_url_becomes_a_cookie(server: DashboardServer) -> None:
    status, headers, _ = get(f"{server.url}/?token={TOKEN}&x=1")
    assert status == 303
    assert headers["Location"] == "/?x=1", "the token leaves the address bar"
    assert headers["Set-Cookie"].startswith(f"{COOKIE}={TOKEN};") and "HttpOnly" in headers["Set-Cookie"]
    status, _, body = get(f"{server.url}/", {"Cookie": f"{COOKIE}={TOKEN}"})
    assert status == 200 and b"live inspection" in body


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-xyz"},
                                     {"Cookie": f"{COOKIE}=wrong-token-xyz"}])
def test_missing_or_wrong_token_is_refused(server: DashboardServer, headers: dict[str, str]) -> None:
    for path in ("/", "/api/snapshot", "/events", "/img/latest/bottle/image", "/alert/x"):
        status, _, body = get(server.url + path, headers)
        assert status == 401, path
        assert b"bottle" not in body
    assert server.refused >= (1 if headers else 0)


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
    req = urllib.request.Request(server.url + "/api/snapshot", data=b"x", headers=auth, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 501, "read-only: no method but GET and HEAD"


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
