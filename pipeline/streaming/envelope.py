"""The frame envelope on the `frames` topic, and the dead-letter record on `frames.dlq`.

A frame is the encoded image bytes as the record value (never base64) and its metadata as headers,
so brokers, tools and other languages can route and inspect frames without decoding images. Parsing
is strict: a frame that cannot be attributed (no id, no line, garbled timestamp) is dead-lettered with
a reason a person can read, never guessed at.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pipeline.errors import AnoclipError
from pipeline.redis_keys import FRAME_ID_MAX_LEN, frame_id_problem

# --- wire names -----------------------------------------------------------------------------------
H_FRAME_ID = "frame-id"
H_LINE_ID = "line-id"
H_CAMERA_ID = "camera-id"
H_CAPTURE_TS = "capture-ts"
H_CONTENT_TYPE = "content-type"
H_SCHEMA = "schema"
REQUIRED_HEADERS = (H_FRAME_ID, H_LINE_ID, H_CAMERA_ID, H_CAPTURE_TS, H_CONTENT_TYPE, H_SCHEMA)
H_SYNTHETIC_DEFECT = "x-synthetic-defect"
"""Optional, synthetic frames only: the drawn defect ('none' if clean), so demos can show ground truth."""

# dead-letter headers, added to the original ones
H_ERROR = "error"
H_ERROR_STAGE = "error-stage"
H_SOURCE_TOPIC = "source-topic"
H_SOURCE_PARTITION = "source-partition"
H_SOURCE_OFFSET = "source-offset"
H_FAILED_AT = "failed-at"

SCHEMA_VERSION = "1"
SUPPORTED_SCHEMAS = frozenset({SCHEMA_VERSION})
CONTENT_TYPES = ("image/jpeg", "image/png")
MAX_ID_LEN = FRAME_ID_MAX_LEN
MAX_HEADER_BYTES = 1024

# error stages: where in the worker a frame was refused
STAGE_HEADERS = "headers"
STAGE_SIZE = "size"
STAGE_LINE = "line"
STAGE_DECODE = "decode"
STAGE_INSPECT = "inspect"
STAGE_CONFLICT = "conflict"
"""The frame's id was published before with other content (a reused id, not a replay)."""

Headers = Sequence[tuple[str, bytes | None]]


class EnvelopeError(AnoclipError):
    """A frame that cannot be scored; `stage` says where it was refused, the message says why."""

    def __init__(self, reason: str, stage: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.stage = stage


@dataclass(frozen=True)
class FrameMeta:
    """The validated headers of one frame."""

    frame_id: str
    line: str
    camera: str
    capture_ts_ns: int
    content_type: str
    schema: str
    synthetic_defect: str | None = None


def build_headers(frame_id: str, line: str, camera: str, capture_ts_ns: int, content_type: str,
                  *, schema: str = SCHEMA_VERSION, extra: dict[str, str] | None = None) -> list[tuple[str, bytes]]:
    """Kafka headers of a frame (UTF-8 values; the timestamp as decimal nanoseconds since the epoch)."""
    hs = [
        (H_FRAME_ID, frame_id.encode()),
        (H_LINE_ID, line.encode()),
        (H_CAMERA_ID, camera.encode()),
        (H_CAPTURE_TS, str(int(capture_ts_ns)).encode()),
        (H_CONTENT_TYPE, content_type.encode()),
        (H_SCHEMA, schema.encode()),
    ]
    for k, v in (extra or {}).items():
        hs.append((k, v.encode()))
    return hs


def headers_dict(headers: Iterable[tuple[str, bytes | None]] | None) -> dict[str, bytes | None]:
    """Headers as a dict; a repeated name keeps its first value (duplicates are refused in `parse_meta`)."""
    out: dict[str, bytes | None] = {}
    for k, v in headers or ():
        out.setdefault(k, v)
    return out


def _text(hs: dict[str, bytes | None], name: str) -> str:
    if name not in hs:
        raise EnvelopeError(f"missing header {name!r}", STAGE_HEADERS)
    raw = hs[name]
    if raw is None or len(raw) == 0:
        raise EnvelopeError(f"empty header {name!r}", STAGE_HEADERS)
    if len(raw) > MAX_HEADER_BYTES:
        raise EnvelopeError(f"header {name!r} is {len(raw)} bytes (limit {MAX_HEADER_BYTES})", STAGE_HEADERS)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EnvelopeError(f"header {name!r} is not UTF-8 text", STAGE_HEADERS) from e
    if text != text.strip() or not text.isprintable():
        raise EnvelopeError(f"header {name!r} has whitespace or control characters: {text!r}", STAGE_HEADERS)
    return text


def parse_meta(headers: Iterable[tuple[str, bytes | None]] | None) -> FrameMeta:
    """Validate a frame's headers; raise EnvelopeError(stage='headers') naming the first problem."""
    pairs = list(headers or ())
    names = [k for k, _ in pairs]
    for name in REQUIRED_HEADERS:
        if names.count(name) > 1:
            raise EnvelopeError(f"header {name!r} appears {names.count(name)} times", STAGE_HEADERS)
    hs = headers_dict(pairs)
    missing = [h for h in REQUIRED_HEADERS if h not in hs]
    if missing:
        raise EnvelopeError(f"missing header{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}",
                            STAGE_HEADERS)
    frame_id = _text(hs, H_FRAME_ID)
    problem = frame_id_problem(frame_id)  # the rule the dashboard's URLs use too (pipeline.redis_keys)
    if problem:
        raise EnvelopeError(f"malformed header 'frame-id': {frame_id[:80]!r}: {problem}", STAGE_HEADERS)
    line = _text(hs, H_LINE_ID)
    camera = _text(hs, H_CAMERA_ID)
    ts_text = _text(hs, H_CAPTURE_TS)
    if not (ts_text.isascii() and ts_text.isdigit()):  # '²' is a digit to isdigit() but not to int()
        raise EnvelopeError(f"malformed header 'capture-ts': {ts_text[:40]!r} is not nanoseconds since the epoch",
                            STAGE_HEADERS)
    capture_ts = int(ts_text)
    if capture_ts < 10**18 or capture_ts > 10**19:  # years 2001..2286: catches seconds or milliseconds
        raise EnvelopeError(f"malformed header 'capture-ts': {capture_ts} is not nanoseconds since the epoch",
                            STAGE_HEADERS)
    content_type = _text(hs, H_CONTENT_TYPE).lower()
    schema = _text(hs, H_SCHEMA)
    if schema not in SUPPORTED_SCHEMAS:
        known = ", ".join(sorted(SUPPORTED_SCHEMAS))
        raise EnvelopeError(f"unsupported schema version {schema!r} (supported: {known})", STAGE_HEADERS)
    defect = hs.get(H_SYNTHETIC_DEFECT)
    return FrameMeta(frame_id, line, camera, capture_ts, content_type, schema,
                     defect.decode("utf-8", "replace") if defect else None)


def check_payload(value: bytes | None, content_type: str, max_bytes: int) -> None:
    """Cheap checks before decoding: present, within the byte budget, a content type we decode."""
    if not value:
        raise EnvelopeError("empty frame: the record has no image bytes", STAGE_SIZE)
    if len(value) > max_bytes:
        raise EnvelopeError(f"frame too large: {len(value)} bytes exceeds the limit of {max_bytes}", STAGE_SIZE)
    if content_type.split(";")[0].strip() not in CONTENT_TYPES:
        raise EnvelopeError(f"unsupported content type {content_type!r} (supported: {', '.join(CONTENT_TYPES)})",
                            STAGE_DECODE)


def dlq_headers(original: Iterable[tuple[str, bytes | None]] | None, error: str, stage: str,
                topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    """The original headers plus the reason and the source position, for the DLQ record."""
    out: list[tuple[str, bytes]] = [(k, v if v is not None else b"") for k, v in original or ()
                                    if k not in _DLQ_NAMES]
    out += [
        (H_ERROR, error.encode("utf-8", "replace")[:4096]),
        (H_ERROR_STAGE, stage.encode()),
        (H_SOURCE_TOPIC, topic.encode()),
        (H_SOURCE_PARTITION, str(partition).encode()),
        (H_SOURCE_OFFSET, str(offset).encode()),
        (H_FAILED_AT, str(time.time_ns()).encode()),
    ]
    return out


_DLQ_NAMES = {H_ERROR, H_ERROR_STAGE, H_SOURCE_TOPIC, H_SOURCE_PARTITION, H_SOURCE_OFFSET, H_FAILED_AT}
