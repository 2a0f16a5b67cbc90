"""Read-only views of the Redis outputs, shaped for the dashboard.

Every key comes from `RedisKeys`; nothing here writes. Stream entries are decoded generically (JSON
values parsed, numbers typed) and then given a few normalised fields the page relies on (`ts_ms`,
`frame_id`, `anomalous`), so the page keeps working if the publisher adds fields.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import threading
import time
from collections import OrderedDict, deque
from typing import Any

import numpy as np
import redis
from PIL import Image
from scipy import ndimage

from pipeline.redis_client import make_redis
from pipeline.redis_keys import RedisKeys
from pipeline.settings import Settings
from pipeline.streaming.records import FrameResult, is_anomalous_verdict

BLOB_KINDS = ("image", "mask", "heatmap")
"""Per-frame and latest blobs the publisher writes (the result JSON is read separately)."""
IMAGE_KINDS = (*BLOB_KINDS, "outline")
"""What the page can ask for; `outline` is derived here from the mask."""
FRAME_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,256}$")
LINE_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
STREAM_ID_RE = re.compile(r"^\d{1,20}-\d{1,20}$")
MAX_THUMB = 2048
_NUMBER = re.compile(r"^-?\d+(\.\d+)?([eE][-+]?\d+)?$")
def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes | bytearray) else str(v)


def decode_value(raw: Any) -> Any:
    """A stream or hash value as the page wants it: JSON parsed, numbers typed, the rest as text."""
    s = _text(raw)
    t = s.strip()
    if t[:1] in "[{":
        with contextlib.suppress(ValueError):
            return json.loads(t)
    if _NUMBER.match(t):
        return int(t) if re.fullmatch(r"-?\d+", t) else float(t)
    return s


TEXT_FIELDS = frozenset({"frame_id", "line", "line_id", "camera", "worker", "worker_id", "host", "lines",
                         "partitions", "version", "from_version", "adapter_version", "request_id", "actor"})
"""Names and ids: kept as text even when they look like numbers (frame "0042" is not frame 42)."""


def decode_fields(fields: dict[Any, Any]) -> dict[str, Any]:
    """Decode every field of a hash or stream entry; dashes in names become underscores."""
    out = {}
    for k, v in fields.items():
        name = _text(k).replace("-", "_")
        out[name] = _text(v) if name in TEXT_FIELDS else decode_value(v)
    return out


def stream_entry(entry_id: Any, fields: dict[Any, Any]) -> dict[str, Any]:
    """One stream entry with `id`, `ts_ms` (from the entry id) and `anomalous` added."""
    sid = _text(entry_id)
    out = decode_fields(fields)
    out["id"] = sid
    out["ts_ms"] = int(sid.split("-")[0])
    if "frame_id" in out:
        out["frame_id"] = str(out["frame_id"])
    if "line" not in out and "line_id" in out:
        out["line"] = out["line_id"]
    out["anomalous"] = is_anomalous_verdict(out.get("verdict", False))
    return out


def sniff_content_type(data: bytes) -> str:
    """Blobs carry no type in Redis; the magic bytes tell PNG from JPEG."""
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def outline_png(mask_png: bytes, width: int | None = None) -> bytes:
    """Transparent PNG with the mask's outline in red, at `width` (aspect kept) or the mask's size.

    Done here rather than in the browser so a 1-bit mask of any size becomes a crisp, thin outline
    at the size it is shown.
    """
    with Image.open(io.BytesIO(mask_png)) as im:
        m = im.convert("L")
        if width is not None and width < m.width:
            h = max(1, round(m.height * width / m.width))
            m = m.resize((width, h), Image.Resampling.NEAREST)
        mask = np.asarray(m) > 127
    rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
    if mask.any():
        thick = max(1, min(mask.shape) // 160)
        edge = mask & ~ndimage.binary_erosion(mask, iterations=thick, border_value=0)
        rgba[edge] = (255, 32, 32, 255)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def thumbnail(data: bytes, width: int) -> tuple[bytes, str]:
    """Scaled-down copy (aspect kept) for lists: alerts pages carry dozens of them."""
    with Image.open(io.BytesIO(data)) as im:
        if im.width <= width:
            return data, sniff_content_type(data)
        h = max(1, round(im.height * width / im.width))
        small = im.convert("RGB" if im.mode not in ("1", "L", "RGBA") else im.mode).resize(
            (width, h), Image.Resampling.BILINEAR if im.mode != "1" else Image.Resampling.NEAREST
        )
        buf = io.BytesIO()
        small.save(buf, format="PNG", compress_level=1)
        return buf.getvalue(), "image/png"


class _LRU:
    """Bounded cache of rendered images of immutable per-frame blobs (thumbnails, outlines)."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._d: OrderedDict[tuple[str, ...], tuple[bytes, str]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, ...]) -> tuple[bytes, str] | None:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: tuple[str, ...], value: tuple[bytes, str]) -> None:
        with self._lock:
            if key in self._d:
                return
            self._d[key] = value
            self._size += len(value[0])
            while self._size > self.max_bytes and self._d:
                _, old = self._d.popitem(last=False)
                self._size -= len(old[0])


class DashboardStore:
    """Everything the page shows, read from Redis on demand (cheap, bounded reads only)."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None, *, history: int = 200,
                 alerts: int = 30, worker_scan_s: float = 30.0) -> None:
        self.settings = settings
        self.keys = RedisKeys(settings.redis.prefix)
        self.client = client if client is not None else make_redis(settings.redis)
        self.history_len = history
        self.alerts_len = alerts
        self.worker_scan_s = worker_scan_s
        self._cache = _LRU()
        self._worker_ids: set[str] = set()
        self._worker_scan_at = -1e9
        self._announced_lines: set[str] = set()
        self._added: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()  # HTTP threads and the ticker share the bookkeeping above

    # --- lines -------------------------------------------------------------------------------
    def line_ids(self) -> list[str]:
        """Configured lines first, then lines that workers announce in their heartbeats.

        No keyspace scan: per-frame keys run into millions, and this runs on every tick.
        """
        ids = [line.id for line in self.settings.lines]
        extra = sorted(x for x in self._announced_lines if x not in ids and LINE_ID_RE.match(x))
        return ids + extra

    def latest(self, line: str) -> dict[str, Any] | None:
        return _result(self.client.get(self.keys.latest(line, "result")))

    def threshold(self, line: str) -> dict[str, Any]:
        return decode_fields(self.client.hgetall(self.keys.threshold(line)))

    def history(self, line: str, count: int | None = None) -> list[dict[str, Any]]:
        """The line's most recent results, oldest first (for the score chart)."""
        n = count or self.history_len
        entries = self.client.xrevrange(self.keys.results_stream(line), count=n)
        points = []
        for i, f in reversed(entries):
            e = stream_entry(i, f)
            if e.get("worker"):
                with self._lock:
                    self._worker_ids.add(str(e["worker"]))
            points.append(_history_point(e))
        return points

    def throughput(self, line: str, window_s: float = 60.0) -> dict[str, Any]:
        """Frames per second over about the last `window_s` seconds, without reading the stream.

        XINFO STREAM's `entries-added` counter (Redis 7) is sampled on every call; the rate is the
        counter's growth over the samples in the window. The first call of a line reads the ids of
        its last 50 entries instead.
        """
        stream = self.keys.results_stream(line)
        try:
            info = self.client.xinfo_stream(stream)
        except redis.ResponseError:  # no such stream yet
            return {"window_s": window_s, "frames": 0, "fps": 0.0, "stream_length": 0}
        length = int(info.get("length", 0))
        added = info.get("entries-added")
        now = time.monotonic()
        with self._lock:
            samples = self._added.setdefault(line, deque())
            if added is not None:
                samples.append((now, int(added)))
                while len(samples) > 2 and now - samples[1][0] >= window_s:
                    samples.popleft()
            oldest = samples[0] if samples else None
        if added is not None and oldest is not None and now - oldest[0] >= 1.0:
            frames = int(added) - oldest[1]
            fps = frames / (now - oldest[0])
        else:
            now_ms = int(self.client.time()[0] * 1000)
            start = f"{now_ms - int(window_s * 1000)}-0"
            ids = [int(_text(i).split("-")[0]) for i, _ in self.client.xrevrange(stream, min=start, count=50)]
            frames = len(ids)
            span_s = (now_ms - ids[-1]) / 1000.0 if len(ids) == 50 else window_s
            fps = frames / max(span_s, 1e-3)
        return {"window_s": window_s, "frames": frames, "fps": round(fps, 3), "stream_length": length}

    def adapter(self, line: str) -> dict[str, Any]:
        """Version in use (the `current` pointer), its metadata, the pause flag and the last refresh."""
        current = self.client.get(self.keys.adapter_current(line))
        out: dict[str, Any] = {"current": _text(current) if current is not None else None,
                               "paused": self.client.exists(self.keys.adapter_paused(line)) > 0,
                               "meta": None, "last_event": None, "last_refresh": None}
        if out["current"]:
            out["meta"] = _json(self.client.hget(self.keys.adapter_version(line, out["current"]), "meta"))
        events = [stream_entry(i, f) for i, f in self.client.xrevrange(self.keys.adapter_audit(line), count=20)]
        if events:
            out["last_event"] = events[0]
            out["last_refresh"] = next((e for e in events if _is_refresh(e)), None)
        return out

    def line_state(self, line: str) -> dict[str, Any]:
        cfg = next((x for x in self.settings.lines if x.id == line), None)
        return {
            "id": line,
            "class_name": cfg.class_name if cfg else None,
            "domain": cfg.domain if cfg else None,
            "configured": cfg is not None,
            "latest": self.latest(line),
            "threshold": self.threshold(line),
            "history": self.history(line),
            "throughput": self.throughput(line),
            "adapter": self.adapter(line),
        }

    # --- alerts and workers ------------------------------------------------------------------
    def alerts(self, count: int | None = None, after: str | None = None) -> list[dict[str, Any]]:
        """Newest first; with `after` (a stream id), only entries newer than it (catch-up after a live event)."""
        n = count or self.alerts_len
        if after:
            entries = self.client.xrange(self.keys.alerts_stream, min=f"({after}", count=n)
            return [stream_entry(i, f) for i, f in reversed(entries)]
        return [stream_entry(i, f) for i, f in self.client.xrevrange(self.keys.alerts_stream, count=n)]

    def workers(self) -> list[dict[str, Any]]:
        """Every live heartbeat hash (they expire), with its age and a health word.

        Workers are found from the results they publish (cheap, immediate) and from a keyspace scan
        at most every `worker_scan_s` (finds idle workers; a scan walks every key, so it is rare).
        """
        now = float(self.client.time()[0])
        if time.monotonic() - self._worker_scan_at >= self.worker_scan_s:
            self._worker_scan_at = time.monotonic()
            head = self.keys.worker("")
            found = {_text(k)[len(head):] for k in self.client.scan_iter(match=self.keys.workers_pattern, count=5000,
                                                                   _type="hash")}
            with self._lock:
                self._worker_ids |= found
        stale_after = 3 * self.settings.worker.heartbeat_interval_s
        out, gone, lines = [], set(), set()
        with self._lock:
            known = sorted(self._worker_ids)
        for wid in known:
            h = decode_fields(self.client.hgetall(self.keys.worker(wid)))
            if not h:
                gone.add(wid)  # heartbeat expired: the worker stopped or died
                continue
            h.setdefault("worker_id", wid)
            h["worker_id"] = wid
            seen = _timestamp_s(next((h[f] for f in ("last_seen", "ts", "updated", "time") if f in h), None))
            h["age_s"] = round(now - seen, 3) if seen is not None else None
            h["health"] = "unknown" if seen is None else ("ok" if now - seen <= stale_after else "stale")
            lines.update(x.strip() for x in str(h.get("lines", "")).split(",") if x.strip())
            out.append(h)
        with self._lock:
            self._worker_ids -= gone
            self._announced_lines = lines
        return out

    def snapshot(self) -> dict[str, Any]:
        """The whole page's state in one read (initial load and every resync)."""
        workers = self.workers()  # first: heartbeats announce lines this config may not know
        return {
            "prefix": self.keys.prefix,
            "server_time_ms": int(time.time() * 1000),
            "lines": [self.line_state(x) for x in self.line_ids()],
            "alerts": self.alerts(),
            "workers": workers,
        }

    def tick(self) -> dict[str, Any]:
        """What changes without a frame arriving: worker health, throughput, adapters."""
        workers = self.workers()
        ids = self.line_ids()
        return {
            "server_time_ms": int(time.time() * 1000),
            "workers": workers,
            "lines": {x: {"throughput": self.throughput(x), "adapter": self.adapter(x),
                          "threshold": self.threshold(x)} for x in ids},
        }

    # --- frames ------------------------------------------------------------------------------
    def frame(self, frame_id: str, with_alert: bool = True) -> dict[str, Any] | None:
        """A frame's result JSON, which blobs still exist and how long they live."""
        result = _result(self.client.get(self.keys.frame(frame_id, "result")))
        blobs = {k: self.client.exists(self.keys.frame(frame_id, k)) > 0 for k in BLOB_KINDS}
        if result is None and not any(blobs.values()):
            return None
        return {"frame_id": frame_id, "result": result, "blobs": blobs,
                "ttl_s": self.client.ttl(self.keys.frame(frame_id, "result")),
                "alert": self.find_alert(frame_id) if with_alert else None}

    def find_alert(self, frame_id: str, scan: int = 2000) -> dict[str, Any] | None:
        """The frame's alert entry among the most recent `scan` alerts, if there is one."""
        for i, f in self.client.xrevrange(self.keys.alerts_stream, count=scan):
            e = stream_entry(i, f)
            if e.get("frame_id") == frame_id:
                return e
        return None

    def image(self, scope: str, ident: str, kind: str, width: int | None = None) -> tuple[bytes, str] | None:
        """A frame's (scope `frame`) or a line's latest (scope `latest`) image, optionally scaled.

        `outline` is rendered from the mask. Renders of per-frame blobs are cached: they never change.
        """
        source_kind = "mask" if kind == "outline" else kind
        key = self.keys.frame(ident, source_kind) if scope == "frame" else self.keys.latest(ident, source_kind)
        cache_key = (key, kind, str(width or 0))
        if scope == "frame" and (kind == "outline" or width):
            hit = self._cache.get(cache_key)
            if hit is not None:
                return hit
        data = self.client.get(key)
        if data is None:
            if kind == "image":  # publishers that skip the raw frame: the overlay is the next best thing
                return self.image(scope, ident, "heatmap", width)
            return None
        if kind == "outline":
            out = (outline_png(data, width), "image/png")
        elif width:
            out = thumbnail(data, width)
        else:
            return data, sniff_content_type(data)
        if scope == "frame":
            self._cache.put(cache_key, out)
        return out

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False


def _json(raw: Any) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(_text(raw))
    except ValueError:
        return None


def _result(raw: Any) -> dict[str, Any] | None:
    """A stored result read back through its record (`FrameResult`): the page sees one schema."""
    d = _json(raw)
    return FrameResult.from_json_dict(d).to_json_dict() if isinstance(d, dict) else None


def _history_point(e: dict[str, Any]) -> dict[str, Any]:
    keep = ("id", "ts_ms", "frame_id", "score", "threshold", "anomalous", "adapter_version")
    return {k: e.get(k) for k in keep}


def _is_refresh(e: dict[str, Any]) -> bool:
    words = " ".join(str(e.get(k, "")) for k in ("action", "event", "kind", "type", "outcome")).lower()
    return any(w in words for w in ("refresh", "promot", "refus", "reject", "train", "skip"))


def _timestamp_s(v: Any) -> float | None:
    """Seconds since the epoch from a heartbeat field in s, ms or ns, or an ISO-8601 string."""
    if v is None:
        return None
    if isinstance(v, int | float):
        x = float(v)
        if x > 1e17:
            return x / 1e9
        if x > 1e11:
            return x / 1e3
        return x
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(v)).timestamp()
    except ValueError:
        return None
