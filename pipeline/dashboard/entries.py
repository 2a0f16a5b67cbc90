"""Redis stream entries and hash values decoded for the dashboard page.

Decoded generically (JSON values parsed, numbers typed, names and ids kept as text) and then given a few
normalised fields the page relies on (`id`, `ts_ms`, `frame_id`, `anomalous`), so the page keeps working if
the publisher adds fields.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

from pipeline.streaming.records import is_anomalous_verdict

_NUMBER = re.compile(r"^-?\d+(\.\d+)?([eE][-+]?\d+)?$")


def as_text(v: Any) -> str:
    """A Redis value (bytes or not) as text; undecodable bytes replaced."""
    return v.decode("utf-8", "replace") if isinstance(v, bytes | bytearray) else str(v)


def decode_value(raw: Any) -> Any:
    """A stream or hash value as the page wants it: JSON parsed, numbers typed, the rest as text."""
    s = as_text(raw)
    t = s.strip()
    if t[:1] in "[{":
        with contextlib.suppress(ValueError):
            return json.loads(t)
    if _NUMBER.match(t):
        return int(t) if re.fullmatch(r"-?\d+", t) else float(t)
    return s


TEXT_FIELDS = frozenset({"frame_id", "line", "line_id", "camera", "worker", "worker_id", "host", "lines",
                         "partitions", "version", "from_version", "adapter_version", "bank_version", "request_id",
                         "actor"})
"""Names and ids: kept as text even when they look like numbers (frame "0042" is not frame 42)."""


def decode_fields(fields: dict[Any, Any]) -> dict[str, Any]:
    """Decode every field of a hash or stream entry; dashes in names become underscores."""
    out = {}
    for k, v in fields.items():
        name = as_text(k).replace("-", "_")
        out[name] = as_text(v) if name in TEXT_FIELDS else decode_value(v)
    return out


def stream_entry(entry_id: Any, fields: dict[Any, Any]) -> dict[str, Any]:
    """One stream entry with `id`, `ts_ms` (from the entry id) and `anomalous` added."""
    sid = as_text(entry_id)
    out = decode_fields(fields)
    out["id"] = sid
    out["ts_ms"] = int(sid.split("-")[0])
    if "frame_id" in out:
        out["frame_id"] = str(out["frame_id"])
    if "line" not in out and "line_id" in out:
        out["line"] = out["line_id"]
    out["anomalous"] = is_anomalous_verdict(out.get("verdict", False))
    return out
