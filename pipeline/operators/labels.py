"""Operator labels on alerts: acknowledged, confirmed defect (with a type), false alarm or unsure; comments.

Labels live in Redis under `RedisKeys.label*`, without TTL, so they outlive the frame's own keys: when an
alert is labelled its image and mask are copied next to the label. Every change is one Lua script that
updates the label hash, the line's counts, the line's index and appends to the audit stream, so counts,
index and audit never disagree. Who = the identity of the dashboard token (or the CLI user); when =
milliseconds since the epoch.

This module is the read API for the rest of the pipeline (rank 0, so the adaptation gate can use it):
`LabelStore.labelled(line, label=...)` lists a line's labelled alerts with their scores,
`LabelStore.newest(line, label, limit=...)` the newest few (what the adaptation gate reads at each refresh), and
`LabelStore.blob(frame_id, "image" | "mask")` gives the kept image and mask. `export_folder` writes a
line's labels as a folder dataset that `anoclip eval --dataset folder` reads.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from pipeline.errors import AnoclipError
from pipeline.redis_keys import RedisKeys

CONFIRMED, FALSE_ALARM, UNSURE = "confirmed", "false_alarm", "unsure"
LABELS = (CONFIRMED, FALSE_ALARM, UNSURE)
ACTIONS = ("acknowledge", "label", "comment")
DEFECT_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,47}$")
ACTOR_RE = re.compile(r"^[A-Za-z0-9._@\-]{1,64}$")
COMMENT_MAX = 1000
AUDIT_MAXLEN = 100_000


class LabelError(AnoclipError):
    """A label request that cannot be stored as asked (unknown label, missing defect type, ...)."""


@dataclass
class AlertFacts:
    """What is known about the alert being labelled (from the alerts stream or the frame's result)."""

    frame_id: str
    line: str
    score: float
    threshold: float
    ts_ms: int
    camera: str = ""
    width: int = 0
    height: int = 0


@dataclass
class AlertLabel:
    """An alert as operators left it."""

    frame_id: str
    line: str
    score: float = 0.0
    threshold: float = 0.0
    alert_ts_ms: int = 0
    camera: str = ""
    width: int = 0
    height: int = 0
    label: str = ""
    """'' (not labelled), `confirmed`, `false_alarm` or `unsure`."""
    defect_type: str = ""
    mask_is_defect: bool = False
    """The operator said the model's mask outlines the defect: exports use it as the ground-truth mask."""
    comment: str = ""
    comments: int = 0
    acknowledged_by: str = ""
    acknowledged_ms: int = 0
    labelled_by: str = ""
    labelled_ms: int = 0
    commented_by: str = ""
    commented_ms: int = 0
    has_image: bool = False
    has_mask: bool = False

    @property
    def acknowledged(self) -> bool:
        return bool(self.acknowledged_by)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "acknowledged": self.acknowledged}

    @classmethod
    def from_hash(cls, fields: dict[Any, Any]) -> AlertLabel:
        d = {_text(k): _text(v) for k, v in fields.items()}
        ints = ("alert_ts_ms", "width", "height", "comments", "acknowledged_ms", "labelled_ms", "commented_ms")
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ints:
            if k in kw:
                kw[k] = int(float(kw[k] or 0))
        for k in ("score", "threshold"):
            if k in kw:
                kw[k] = float(kw[k] or 0.0)
        for k in ("mask_is_defect", "has_image", "has_mask"):
            if k in kw:
                kw[k] = kw[k] in ("1", "true", "True")
        kw.setdefault("frame_id", "")
        kw.setdefault("line", "")
        return cls(**kw)


@dataclass
class LabelCounts:
    """A line's current labels (a relabelled alert moves from one count to the other)."""

    confirmed: int = 0
    false_alarm: int = 0
    unsure: int = 0
    acknowledged: int = 0
    defect_types: dict[str, int] = field(default_factory=dict)

    @property
    def false_alarm_rate(self) -> float | None:
        """False alarms among alerts labelled confirmed or false alarm; None before any such label."""
        n = self.confirmed + self.false_alarm
        return self.false_alarm / n if n else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "false_alarm_rate": self.false_alarm_rate}


_UPDATE = """
local label_key, counts_key, index_key, audit_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local action, actor, now_ms, line, fid = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local fields = cjson.decode(ARGV[6])
local maxlen, alert_ms, comment = ARGV[7], ARGV[8], ARGV[9]
local old = redis.call('HGET', label_key, 'label') or ''
local old_type = redis.call('HGET', label_key, 'defect_type') or ''
local was_ack = redis.call('HEXISTS', label_key, 'acknowledged_by') == 1
for k, v in pairs(fields) do redis.call('HSET', label_key, k, v) end
if action ~= 'comment' and not was_ack then
  redis.call('HSET', label_key, 'acknowledged_by', actor, 'acknowledged_ms', now_ms)
  redis.call('HINCRBY', counts_key, 'acknowledged', 1)
end
if action == 'comment' then
  redis.call('HINCRBY', label_key, 'comments', 1)
end
local new = redis.call('HGET', label_key, 'label') or ''
local new_type = redis.call('HGET', label_key, 'defect_type') or ''
if action == 'label' then
  if old ~= new or old_type ~= new_type then
    if old ~= '' then redis.call('HINCRBY', counts_key, old, -1) end
    if old == 'confirmed' and old_type ~= '' then redis.call('HINCRBY', counts_key, 'type:' .. old_type, -1) end
    redis.call('HINCRBY', counts_key, new, 1)
    if new == 'confirmed' and new_type ~= '' then redis.call('HINCRBY', counts_key, 'type:' .. new_type, 1) end
  end
  for i = 1, 2 do
    local src, dst = KEYS[4 + i], KEYS[6 + i]
    if redis.call('EXISTS', dst) == 0 then
      local v = redis.call('GET', src)
      if v then redis.call('SET', dst, v) end
    end
  end
  redis.call('HSET', label_key, 'has_image', redis.call('EXISTS', KEYS[7]), 'has_mask', redis.call('EXISTS', KEYS[8]))
end
redis.call('ZADD', index_key, alert_ms, fid)
return redis.call('XADD', audit_key, 'MAXLEN', '~', maxlen, '*', 'action', action, 'frame_id', fid, 'line', line,
  'actor', actor, 'label', new, 'defect_type', new_type, 'previous_label', old, 'previous_defect_type', old_type,
  'comment', comment, 'ts_ms', now_ms)
"""


class LabelStore:
    """Reads and writes operator labels; safe to share between threads (redis-py clients are)."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, *, audit_maxlen: int = AUDIT_MAXLEN) -> None:
        self.client = client
        self.keys = keys
        self.audit_maxlen = audit_maxlen
        self._update = client.register_script(_UPDATE)

    # --- writes ---------------------------------------------------------------------------------
    def acknowledge(self, facts: AlertFacts, actor: str) -> AlertLabel:
        """Mark the alert as seen by `actor` (the first acknowledgement is kept)."""
        return self._apply("acknowledge", facts, actor, {})

    def set_label(self, facts: AlertFacts, label: str, actor: str, *, defect_type: str = "",
                  mask_is_defect: bool = False) -> AlertLabel:
        """Label the alert (replacing an earlier label; the audit keeps both). Acknowledges it too."""
        if label not in LABELS:
            raise LabelError(f"unknown label {label!r}: use one of {', '.join(LABELS)}")
        defect_type = " ".join(defect_type.split())
        if label == CONFIRMED:
            if not DEFECT_TYPE_RE.match(defect_type):
                raise LabelError("a confirmed defect needs a defect type: 1-48 letters, digits, spaces, '.', '_' or"
                                 " '-', starting with a letter or digit")
        elif defect_type:
            raise LabelError(f"a defect type goes only with the label {CONFIRMED!r}, not {label!r}")
        fields = {"label": label, "defect_type": defect_type, "labelled_by": actor,
                  "mask_is_defect": "1" if (mask_is_defect and label == CONFIRMED) else "0"}
        return self._apply("label", facts, actor, fields)

    def add_comment(self, facts: AlertFacts, text: str, actor: str) -> AlertLabel:
        """Attach a comment; the hash keeps the latest, the audit keeps every one."""
        text = text.strip()
        if not text:
            raise LabelError("the comment is empty")
        if len(text) > COMMENT_MAX:
            raise LabelError(f"the comment is longer than {COMMENT_MAX} characters")
        return self._apply("comment", facts, actor, {"comment": text, "commented_by": actor}, comment=text)

    def _apply(self, action: str, facts: AlertFacts, actor: str, fields: dict[str, str],
               comment: str = "") -> AlertLabel:
        if not ACTOR_RE.match(actor):
            raise LabelError(f"bad actor name {actor!r}")
        now_ms = int(time.time() * 1000)
        if action == "label":
            fields["labelled_ms"] = str(now_ms)
        if action == "comment":
            fields["commented_ms"] = str(now_ms)
        base = {"frame_id": facts.frame_id, "line": facts.line, "camera": facts.camera, "score": repr(facts.score),
                "threshold": repr(facts.threshold), "alert_ts_ms": str(facts.ts_ms), "width": str(facts.width),
                "height": str(facts.height)}
        k = self.keys
        self._update(
            keys=[k.label(facts.frame_id), k.label_counts(facts.line), k.labels_index(facts.line), k.labels_audit,
                  k.frame(facts.frame_id, "image"), k.frame(facts.frame_id, "mask"),
                  k.label_blob(facts.frame_id, "image"), k.label_blob(facts.frame_id, "mask")],
            args=[action, actor, now_ms, facts.line, facts.frame_id, json.dumps({**base, **fields}),
                  self.audit_maxlen, facts.ts_ms, comment],
        )
        got = self.get(facts.frame_id)
        assert got is not None
        return got

    # --- reads ----------------------------------------------------------------------------------
    def get(self, frame_id: str) -> AlertLabel | None:
        h = self.client.hgetall(self.keys.label(frame_id))
        return AlertLabel.from_hash(h) if h else None

    def get_many(self, frame_ids: Iterable[str]) -> dict[str, AlertLabel]:
        """Labels of the given frames that have one (one round trip)."""
        ids = list(dict.fromkeys(frame_ids))
        if not ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for fid in ids:
            pipe.hgetall(self.keys.label(fid))
        return {fid: AlertLabel.from_hash(h) for fid, h in zip(ids, pipe.execute(), strict=True) if h}

    def labelled(self, line: str, *, label: str | None = None, since_ms: int | None = None,
                 until_ms: int | None = None, limit: int | None = None) -> list[AlertLabel]:
        """The line's acknowledged or labelled alerts, oldest first (alert time); `label` filters by label."""
        lo = "-inf" if since_ms is None else since_ms
        hi = "+inf" if until_ms is None else until_ms
        ids = [_text(x) for x in self.client.zrangebyscore(self.keys.labels_index(line), lo, hi)]
        got = self.get_many(ids)
        out = [got[i] for i in ids if i in got and (label is None or got[i].label == label)]
        return out[:limit] if limit is not None else out

    def newest(self, line: str, label: str, *, limit: int, where: Callable[[AlertLabel], bool] | None = None,
               page: int = 200, scan: int = 5000) -> list[AlertLabel]:
        """The line's newest `limit` alerts labelled `label` that pass `where`, newest first (alert time).

        Reads the index newest first, a page at a time and at most `scan` entries, so a caller that runs
        often (the adaptation gate, at every refresh) pays for what it uses, not for the line's history."""
        out: list[AlertLabel] = []
        start = 0
        while len(out) < limit and start < scan:
            stop = min(start + page, scan) - 1
            ids = [_text(x) for x in self.client.zrevrange(self.keys.labels_index(line), start, stop)]
            if not ids:
                break
            got = self.get_many(ids)
            for fid in ids:
                lab = got.get(fid)
                if lab is not None and lab.label == label and (where is None or where(lab)):
                    out.append(lab)
                    if len(out) >= limit:
                        break
            start = stop + 1
        return out

    def counts(self, line: str) -> LabelCounts:
        h = {_text(k): int(_text(v)) for k, v in self.client.hgetall(self.keys.label_counts(line)).items()}
        types = {k[5:]: v for k, v in h.items() if k.startswith("type:") and v > 0}
        return LabelCounts(confirmed=h.get(CONFIRMED, 0), false_alarm=h.get(FALSE_ALARM, 0), unsure=h.get(UNSURE, 0),
                           acknowledged=h.get("acknowledged", 0), defect_types=dict(sorted(types.items())))

    def audit(self, *, line: str | None = None, frame_id: str | None = None, count: int = 50,
              before: str | None = None, scan: int = 5000) -> list[dict[str, Any]]:
        """Newest first; filtered by line and/or frame among the newest `scan` entries before `before`."""
        hi = f"({before}" if before else "+"
        out: list[dict[str, Any]] = []
        for entry_id, f in self.client.xrevrange(self.keys.labels_audit, max=hi, count=scan):
            e = {_text(k): _text(v) for k, v in f.items()}
            if (line and e.get("line") != line) or (frame_id and e.get("frame_id") != frame_id):
                continue
            e["id"] = _text(entry_id)
            e["ts_ms"] = int(e.get("ts_ms") or e["id"].split("-")[0])
            out.append(e)
            if len(out) >= count:
                break
        return out

    def blob(self, frame_id: str, kind: str) -> bytes | None:
        """The kept image or mask of a labelled frame (copied when it was labelled)."""
        if kind not in ("image", "mask"):
            raise ValueError(f"kind must be image or mask, not {kind!r}")
        v = self.client.get(self.keys.label_blob(frame_id, kind))
        return bytes(v) if v is not None else None


def suggest_threshold(labels: Iterable[AlertLabel], current: float | None = None) -> dict[str, Any]:
    """The lowest image threshold (4 decimals) that would have avoided every labelled false alarm, and
    which confirmed defects it would have missed. `threshold` is None when no false alarm is labelled."""
    labels = list(labels)
    fa = [x for x in labels if x.label == FALSE_ALARM]
    conf = [x for x in labels if x.label == CONFIRMED]
    out: dict[str, Any] = {"current": current, "false_alarms": len(fa), "confirmed": len(conf), "threshold": None,
                           "missed": 0, "missed_frames": []}
    if not fa:
        out["text"] = "no false alarm labelled yet: nothing to suggest"
        return out
    t = math.floor(max(x.score for x in fa) * 1e4 + 1) / 1e4  # verdict is score >= threshold: strictly above
    missed = sorted((x for x in conf if x.score < t), key=lambda x: x.score)
    out.update(threshold=t, missed=len(missed), missed_frames=[x.frame_id for x in missed])
    now = f" (now {current:.4f})" if current is not None else ""
    if current is not None and t <= current:
        out["text"] = (f"the current threshold {current:.4f} already avoids all {len(fa)} labelled false alarm(s)"
                       " (they were raised under a lower threshold)")
    else:
        out["text"] = (f"threshold {t:.4f}{now} would have avoided all {len(fa)} labelled false alarm(s) and missed "
                       f"{len(missed)} of {len(conf)} confirmed defect(s)")
    return out


# --- export -------------------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._\-]+")
_MARKER = ".anoclip-labels-export"


def _file_stem(frame_id: str) -> str:
    return _UNSAFE.sub("_", frame_id).strip("._") or "frame"


_IMAGE_EXT = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


def sniff_content_type(data: bytes) -> str:
    """Blobs carry no type in Redis; the magic bytes tell PNG from JPEG (and WebP)."""
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def _image_ext(data: bytes) -> str:
    return _IMAGE_EXT.get(sniff_content_type(data), ".bin")


@dataclass
class ExportReport:
    root: Path
    good: int = 0
    defects: dict[str, int] = field(default_factory=dict)
    masks: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def written(self) -> int:
        return self.good + sum(self.defects.values())


def export_folder(store: LabelStore, line: str, class_name: str, out: str | Path) -> ExportReport:
    """Write the line's labels as `OUT/<class_name>/good/` (false alarms: the part was fine),
    `OUT/<class_name>/<defect type>/` (confirmed defects) and `masks/<defect type>/` (confirmed with the
    model's mask accepted as the outline), plus `labels.jsonl` with who, when and comments. `unsure`
    alerts are left out. Re-running replaces the class folder."""
    import shutil

    root = Path(out) / class_name
    if root.exists():
        if not (root / _MARKER).exists():
            raise LabelError(f"{root} exists and was not written by a label export: choose another output folder")
        shutil.rmtree(root)
    (root / "good").mkdir(parents=True)
    (root / _MARKER).write_text(f"labels of line {line}, exported {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    report = ExportReport(root)
    manifest = []
    for lab in store.labelled(line):
        if lab.label not in (CONFIRMED, FALSE_ALARM):
            continue
        image = store.blob(lab.frame_id, "image") if lab.has_image else None
        if image is None:
            report.skipped.append(f"{lab.frame_id}: no image was kept (it had expired before the alert was labelled)")
            continue
        folder = "good" if lab.label == FALSE_ALARM else _UNSAFE.sub("_", lab.defect_type.strip()).strip("._")
        path = root / folder / (_file_stem(lab.frame_id) + _image_ext(image))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image)
        rec = {**lab.to_dict(), "file": str(path.relative_to(root))}
        if lab.label == FALSE_ALARM:
            report.good += 1
        else:
            report.defects[folder] = report.defects.get(folder, 0) + 1
            mask = store.blob(lab.frame_id, "mask") if (lab.mask_is_defect and lab.has_mask) else None
            if mask is not None:
                mpath = root / "masks" / folder / (_file_stem(lab.frame_id) + ".png")
                mpath.parent.mkdir(parents=True, exist_ok=True)
                mpath.write_bytes(mask)
                rec["mask_file"] = str(mpath.relative_to(root))
                report.masks += 1
        manifest.append(rec)
    (Path(out) / f"{class_name}.labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest))
    return report


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes | bytearray) else str(v)
