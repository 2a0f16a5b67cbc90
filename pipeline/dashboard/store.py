"""Views of the Redis outputs, shaped for the dashboard, and the operators' labels.

Every key comes from `RedisKeys`. The workers' outputs are only read; the one thing written is what
operators say about alerts, through `pipeline.operators.labels.LabelStore`. Stream entries are decoded generically
(JSON values parsed, numbers typed: `pipeline.dashboard.entries`) and then given a few normalised fields the page
relies on (`ts_ms`, `frame_id`, `anomalous`, `region_text`), so the page keeps working if the publisher adds fields.
Outlines and thumbnails are rendered by `pipeline.dashboard.images`.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from typing import Any

import redis

from pipeline.dashboard.entries import as_text, decode_fields, stream_entry
from pipeline.dashboard.images import ImageCache, outline_png, thumbnail
from pipeline.operators.describe import describe_regions, verdict_note
from pipeline.operators.labels import AlertFacts, LabelStore, sniff_content_type, suggest_threshold
from pipeline.redis_keys import FRAME_ID_RE, RedisKeys  # noqa: F401  (FRAME_ID_RE: the shared frame-id rule)
from pipeline.services.redis_client import make_redis
from pipeline.settings import Settings
from pipeline.streaming.records import FrameResult, is_anomalous_verdict

BLOB_KINDS = ("image", "mask", "heatmap")
"""Per-frame and latest blobs the publisher writes (the result JSON is read separately)."""
IMAGE_KINDS = (*BLOB_KINDS, "outline")
"""What the page can ask for; `outline` is derived here from the mask."""
LINE_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
STREAM_ID_RE = re.compile(r"^\d{1,20}-\d{1,20}$")
MAX_THUMB = 2048
SCAN_BUDGET = 5000
"""Most stream entries one filtered page reads before answering with what it found (and a cursor)."""
LABEL_FILTERS = ("unlabelled", "unacknowledged", "confirmed", "false_alarm", "unsure")
VERDICTS = ("anomalous", "normal")
HOUR_MS = 3_600_000


class YieldCounter:
    """Pass/fail per hour of one line, counted from its results stream as entries arrive.

    Counts what the dashboard has read: on first use the newest `backfill` entries (the stream is trimmed
    anyway), then every new entry. `since_ms` says from when the counts are complete.
    """

    def __init__(self, backfill: int = 5000, hours: int = 24) -> None:
        self.backfill = backfill
        self.hours = hours
        self.cursor: str | None = None
        self.since_ms: int | None = None
        self.buckets: dict[int, list[int]] = {}
        self._lock = threading.Lock()

    def update(self, client: redis.Redis, stream: str, budget: int = 20_000) -> None:
        with self._lock:
            if self.cursor is None:
                entries = list(reversed(client.xrevrange(stream, count=self.backfill)))
                self.since_ms = int(as_text(entries[0][0]).split("-")[0]) if entries else int(time.time() * 1000)
                self._count(entries)
                self.cursor = as_text(entries[-1][0]) if entries else "0-0"
                return
            while budget > 0:
                entries = client.xrange(stream, min=f"({self.cursor}", count=min(1000, budget))
                if not entries:
                    break
                self._count(entries)
                self.cursor = as_text(entries[-1][0])
                budget -= len(entries)

    def _count(self, entries: list[Any]) -> None:
        for entry_id, fields in entries:
            hour = int(as_text(entry_id).split("-")[0]) // HOUR_MS * HOUR_MS
            verdict = fields.get(b"verdict", fields.get("verdict", b""))
            self.buckets.setdefault(hour, [0, 0])[1 if is_anomalous_verdict(as_text(verdict)) else 0] += 1
        if len(self.buckets) > self.hours + 1:
            for old in sorted(self.buckets)[: len(self.buckets) - self.hours - 1]:
                del self.buckets[old]

    def view(self, now_ms: int, hours: int | None = None) -> dict[str, Any]:
        """The last `hours` hours, oldest first: pass, fail and yield (None for an hour without frames)."""
        n = hours or self.hours
        top = now_ms // HOUR_MS * HOUR_MS
        with self._lock:
            rows = []
            for h in range(top - (n - 1) * HOUR_MS, top + 1, HOUR_MS):
                ok, bad = self.buckets.get(h, (0, 0))
                rows.append({"hour_ms": h, "pass": ok, "fail": bad,
                             "yield": round(ok / (ok + bad), 4) if ok + bad else None})
            return {"since_ms": self.since_ms, "hours": rows}


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
        self._cache = ImageCache()
        self._worker_ids: set[str] = set()
        self._worker_scan_at = -1e9
        self._announced_lines: set[str] = set()
        self._added: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()  # HTTP threads and the ticker share the bookkeeping above
        self.labels = LabelStore(self.client, self.keys)
        self._yield: dict[str, YieldCounter] = {}

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
            ids = [int(as_text(i).split("-")[0]) for i, _ in self.client.xrevrange(stream, min=start, count=50)]
            frames = len(ids)
            span_s = (now_ms - ids[-1]) / 1000.0 if len(ids) == 50 else window_s
            fps = frames / max(span_s, 1e-3)
        return {"window_s": window_s, "frames": frames, "fps": round(fps, 3), "stream_length": length}

    def adapter(self, line: str) -> dict[str, Any]:
        """Version in use (the `current` pointer), its metadata, the pause flag and the last refresh."""
        current = self.client.get(self.keys.registry_current(line))
        out: dict[str, Any] = {"current": as_text(current) if current is not None else None,
                               "paused": self.client.exists(self.keys.registry_paused(line)) > 0,
                               "meta": None, "last_event": None, "last_refresh": None}
        if out["current"]:
            out["meta"] = _json(self.client.hget(self.keys.registry_version(line, out["current"]), "meta"))
        events = [stream_entry(i, f) for i, f in self.client.xrevrange(self.keys.registry_audit(line), count=20)]
        if events:
            out["last_event"] = events[0]
            out["last_refresh"] = next((e for e in events if _is_refresh(e)), None)
        return out

    def line_state(self, line: str, workers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        cfg = next((x for x in self.settings.lines if x.id == line), None)
        latest = self.latest(line)
        workers = self.workers() if workers is None else workers
        return {
            "id": line,
            "class_name": cfg.class_name if cfg else None,
            "domain": cfg.domain if cfg else None,
            "configured": cfg is not None,
            "latest": latest,
            "status": self.line_status(line, latest, workers),
            "threshold": self.threshold(line),
            "history": self.history(line),
            "throughput": self.throughput(line),
            "adapter": self.adapter(line),
            "labels": self.labels.counts(line).to_dict(),
            "yield": self.yield_per_hour(line),
        }

    def line_status(self, line: str, latest: dict[str, Any] | None, workers: list[dict[str, Any]],
                    now_s: float | None = None) -> dict[str, Any]:
        """`live`, `stale` (a worker holds the line but no frame came for `dashboard.stale_after_s`),
        `no_worker` (no live heartbeat names the line) or `waiting` (a worker, no frame yet)."""
        now_s = time.time() if now_s is None else now_s
        served = [w["worker_id"] for w in workers if w.get("health") == "ok"
                  and line in {x.strip() for x in str(w.get("lines", "")).split(",")}]
        seen_ns = (latest or {}).get("published_ts") or (latest or {}).get("capture_ts")
        age = round(now_s - int(seen_ns) / 1e9, 1) if seen_ns else None
        stale_after = self.settings.dashboard.stale_after_s
        if not served:
            state, text = "no_worker", "no worker: no live heartbeat names this line"
        elif age is None:
            state, text = "waiting", "a worker holds this line; no frame yet"
        elif age > stale_after:
            state, text = "stale", f"stale: no frame for {_duration(age)} (limit {_duration(stale_after)})"
        else:
            state, text = "live", "live"
        return {"state": state, "text": text, "last_frame_age_s": age, "workers": served,
                "stale_after_s": stale_after}

    def yield_per_hour(self, line: str, hours: int = 24) -> dict[str, Any]:
        """Pass/fail and yield per hour for the last `hours` hours (see `YieldCounter`)."""
        with self._lock:
            counter = self._yield.setdefault(line, YieldCounter())
        counter.update(self.client, self.keys.results_stream(line))
        return counter.view(int(time.time() * 1000), hours)

    def line_labels(self, line: str) -> dict[str, Any]:
        """The line's label counts and the threshold that would have avoided its labelled false alarms."""
        current = self.threshold(line).get("image")
        try:
            current_f = float(current) if current is not None else None
        except (TypeError, ValueError):
            current_f = None
        return {"line": line, "counts": self.labels.counts(line).to_dict(),
                "suggestion": suggest_threshold(self.labels.labelled(line), current_f)}

    # --- alerts and workers ------------------------------------------------------------------
    def alerts(self, count: int | None = None, after: str | None = None) -> list[dict[str, Any]]:
        """Newest first; with `after` (a stream id), only entries newer than it (catch-up after a live event)."""
        n = count or self.alerts_len
        if after:
            entries = self.client.xrange(self.keys.alerts_stream, min=f"({after}", count=n)
            return self._decorate([stream_entry(i, f) for i, f in reversed(entries)])
        return self._decorate([stream_entry(i, f) for i, f in self.client.xrevrange(self.keys.alerts_stream, count=n)])

    def _decorate(self, alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each alert with its operator label (or None) and a readable description of its regions."""
        labels = self.labels.get_many(str(a.get("frame_id", "")) for a in alerts)
        for a in alerts:
            lab = labels.get(str(a.get("frame_id", "")))
            a["label"] = lab.to_dict() if lab else None
            a["region_text"] = describe_regions(a.get("regions") if isinstance(a.get("regions"), list) else [],
                                                int(a.get("width") or 0), int(a.get("height") or 0))
        return alerts

    def browse_alerts(self, *, count: int = 30, before: str | None = None, line: str | None = None,
                      camera: str | None = None, label: str | None = None, since_ms: int | None = None,
                      until_ms: int | None = None) -> dict[str, Any]:
        """One page of alerts, newest first, filtered; `next` continues after the page (None at the end)."""
        def keep(e: dict[str, Any]) -> bool:
            return (not line or e.get("line") == line) and (not camera or str(e.get("camera", "")) == camera)

        label_of: dict[str, Any] = {}

        def keep_labelled(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
            if not label:
                return batch
            label_of.update(self.labels.get_many(str(e.get("frame_id", "")) for e in batch))
            return [e for e in batch if _label_matches(label_of.get(str(e.get("frame_id", ""))), label)]

        page, nxt = _scan_desc(self.client, self.keys.alerts_stream, count, before, since_ms, until_ms, keep,
                               keep_labelled)
        return {"alerts": self._decorate(page), "next": nxt, "total": self.client.xlen(self.keys.alerts_stream)}

    def browse_frames(self, *, count: int = 50, before: str | None = None, line: str | None = None,
                      camera: str | None = None, verdict: str | None = None, since_ms: int | None = None,
                      until_ms: int | None = None) -> dict[str, Any]:
        """One page of scored frames from the lines' results streams, newest first, merged and filtered."""
        def keep(e: dict[str, Any]) -> bool:
            if camera and str(e.get("camera", "")) != camera:
                return False
            return not verdict or (verdict == "anomalous") == bool(e.get("anomalous"))

        lines = [line] if line else self.line_ids()
        merged: list[dict[str, Any]] = []
        more = False
        for ln in lines:
            page, nxt = _scan_desc(self.client, self.keys.results_stream(ln), count, before, since_ms, until_ms, keep)
            merged += page
            more = more or nxt is not None
        merged.sort(key=lambda e: _id_key(e["id"]), reverse=True)
        more = more or len(merged) > count
        merged = merged[:count]
        labels = self.labels.get_many(str(e.get("frame_id", "")) for e in merged if e.get("anomalous"))
        for e in merged:
            lab = labels.get(str(e.get("frame_id", "")))
            e["label"] = lab.to_dict() if lab else None
        return {"frames": merged, "next": merged[-1]["id"] if more and merged else None}

    def alert_facts(self, frame_id: str) -> AlertFacts | None:
        """What a label records about an alert: from the alerts stream, else from an anomalous stored result."""
        a = self.find_alert(frame_id, scan=SCAN_BUDGET)
        if a is not None:
            return AlertFacts(frame_id=frame_id, line=str(a.get("line", "")), score=float(a.get("score") or 0),
                              threshold=float(a.get("threshold") or 0), ts_ms=int(a["ts_ms"]),
                              camera=str(a.get("camera", "")), width=int(a.get("width") or 0),
                              height=int(a.get("height") or 0))
        r = _result(self.client.get(self.keys.frame(frame_id, "result")))
        if r is None or not is_anomalous_verdict(r.get("verdict")):
            return None
        ts = int(r.get("published_ts") or r.get("capture_ts") or time.time_ns()) // 1_000_000
        return AlertFacts(frame_id=frame_id, line=str(r.get("line", "")), score=float(r.get("score") or 0),
                          threshold=float(r.get("threshold") or 0), ts_ms=ts, camera=str(r.get("camera", "")),
                          width=int(r.get("width") or 0), height=int(r.get("height") or 0))

    def workers(self) -> list[dict[str, Any]]:
        """Every live heartbeat hash (they expire), with its age and a health word.

        Workers are found from the results they publish (cheap, immediate) and from a keyspace scan
        at most every `worker_scan_s` (finds idle workers; a scan walks every key, so it is rare).
        """
        now = float(self.client.time()[0])
        if time.monotonic() - self._worker_scan_at >= self.worker_scan_s:
            self._worker_scan_at = time.monotonic()
            head = self.keys.worker("")
            found = {as_text(k)[len(head):] for k in self.client.scan_iter(match=self.keys.workers_pattern, count=5000,
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
            "lines": [self.line_state(x, workers) for x in self.line_ids()],
            "alerts": self.alerts(),
            "alerts_total": self.client.xlen(self.keys.alerts_stream),
            "workers": workers,
            "defect_types": list(self.settings.dashboard.defect_types),
        }

    def tick(self) -> dict[str, Any]:
        """What changes without a frame arriving: worker health, line state, throughput, adapters, labels, yield."""
        workers = self.workers()
        ids = self.line_ids()
        return {
            "server_time_ms": int(time.time() * 1000),
            "workers": workers,
            "alerts_total": self.client.xlen(self.keys.alerts_stream),
            "order": ids,  # JSON objects do not keep key order for numeric-looking keys in browsers
            "lines": {x: {"throughput": self.throughput(x), "adapter": self.adapter(x),
                          "threshold": self.threshold(x), "status": self.line_status(x, self.latest(x), workers),
                          "labels": self.labels.counts(x).to_dict(), "yield": self.yield_per_hour(x)}
                      for x in ids},
        }

    # --- frames ------------------------------------------------------------------------------
    def frame(self, frame_id: str, with_alert: bool = True) -> dict[str, Any] | None:
        """A frame's result JSON, which blobs still exist and how long they live."""
        result = _result(self.client.get(self.keys.frame(frame_id, "result")))
        blobs = {k: self.client.exists(self.keys.frame(frame_id, k)) > 0 for k in BLOB_KINDS}
        label = self.labels.get(frame_id)
        if result is None and not any(blobs.values()) and label is None:
            return None
        alert = self.find_alert(frame_id) if with_alert else None
        src = result or alert or {}
        regions = src.get("regions") if isinstance(src.get("regions"), list) else []
        w, h = int(src.get("width") or 0), int(src.get("height") or 0)
        out = {"frame_id": frame_id, "result": result, "blobs": blobs,
               "ttl_s": self.client.ttl(self.keys.frame(frame_id, "result")), "alert": alert,
               "region_text": describe_regions(regions, w, h),
               "verdict_note": verdict_note(is_anomalous_verdict(src.get("verdict", False)),
                                            int(src.get("defect_area") or 0), w, h) if src else "",
               "label": label.to_dict() if label else None}
        if with_alert:
            out["audit"] = self.labels.audit(frame_id=frame_id, count=50)
        return out

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
        if scope == "label":  # kept with the label, after the frame's own keys expired
            key = self.keys.label_blob(ident, source_kind)
        else:
            key = self.keys.frame(ident, source_kind) if scope == "frame" else self.keys.latest(ident, source_kind)
        cache_key = (key, kind, str(width or 0))
        if scope in ("frame", "label") and (kind == "outline" or width):
            hit = self._cache.get(cache_key)
            if hit is not None:
                return hit
        data = self.client.get(key)
        if data is None:
            if scope == "frame" and source_kind in ("image", "mask"):  # expired: the copy kept with a label
                kept = self.client.get(self.keys.label_blob(ident, source_kind))
                if kept is not None:
                    return self.image("label", ident, kind, width)
            if kind == "image" and scope != "label":  # publishers that skip the raw frame: the overlay is next best
                return self.image(scope, ident, "heatmap", width)
            return None
        if kind == "outline":
            out = (outline_png(data, width), "image/png")
        elif width:
            out = thumbnail(data, width)
        else:
            return data, sniff_content_type(data)
        if scope in ("frame", "label"):
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
        return json.loads(as_text(raw))
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


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _id_key(sid: str) -> tuple[int, int]:
    ms, _, seq = sid.partition("-")
    return int(ms), int(seq or 0)


def _label_matches(lab: Any, wanted: str) -> bool:
    if wanted == "unlabelled":
        return lab is None or not lab.label
    if wanted == "unacknowledged":
        return lab is None or not lab.acknowledged
    return lab is not None and lab.label == wanted


def _scan_desc(client: redis.Redis, stream: str, count: int, before: str | None, since_ms: int | None,
               until_ms: int | None, keep: Any, keep_batch: Any = None,
               budget: int = SCAN_BUDGET) -> tuple[list[dict[str, Any]], str | None]:
    """Up to `count` entries of `stream` newest first, older than `before`, within [since_ms, until_ms],
    passing `keep` (per entry) and `keep_batch` (per read, e.g. a label lookup). Reads at most `budget`
    entries; the cursor returned continues where this page stopped (None: nothing older is left)."""
    hi = f"({before}" if before else (str(until_ms) if until_ms is not None else "+")
    if before and until_ms is not None and _id_key(before)[0] > until_ms:
        hi = str(until_ms)
    lo = str(since_ms) if since_ms is not None else "-"
    out: list[dict[str, Any]] = []
    while budget > 0:
        asked = min(500, budget)
        raw = client.xrevrange(stream, max=hi, min=lo, count=asked)
        if not raw:
            return out, None
        budget -= len(raw)
        batch = [e for e in (stream_entry(i, f) for i, f in raw) if keep(e)]
        if keep_batch is not None:
            batch = keep_batch(batch)
        for e in batch:
            out.append(e)
            if len(out) >= count:
                return out, e["id"]
        hi = f"({as_text(raw[-1][0])}"
        if len(raw) < asked:
            return out, None
    return out, hi[1:]
