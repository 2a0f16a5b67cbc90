"""The frame envelope: what is accepted, and the reason given for everything that is not."""

from __future__ import annotations

import time

import pytest

from pipeline.streaming import envelope as env
from pipeline.streaming.envelope import EnvelopeError


def _headers(**over: str | None) -> list[tuple[str, bytes]]:
    base = dict(env.build_headers("f-1", "bottle", "cam-1", time.time_ns(), "image/jpeg"))
    for k, v in over.items():
        name = k.replace("_", "-")
        if v is None:
            base.pop(name)
        else:
            base[name] = v.encode()
    return list(base.items())


def test_round_trip() -> None:
    ts = 1_790_000_000_123_456_789
    hs = env.build_headers("f-1", "bottle", "cam-7", ts, "image/png", extra={env.H_SYNTHETIC_DEFECT: "hole"})
    assert [k for k, _ in hs][:6] == list(env.REQUIRED_HEADERS)
    meta = env.parse_meta(hs)
    assert meta == env.FrameMeta("f-1", "bottle", "cam-7", ts, "image/png", "1", "hole")


@pytest.mark.parametrize(
    ("over", "words"),
    [
        ({"frame_id": None}, "missing header 'frame-id'"),
        ({"line_id": None, "camera_id": None}, "missing headers 'line-id', 'camera-id'"),
        ({"frame_id": ""}, "empty header 'frame-id'"),
        ({"frame_id": "a b"}, "malformed header 'frame-id'"),
        ({"frame_id": "x" * 300}, "malformed header 'frame-id'"),
        ({"frame_id": "x" * 201}, "it has 201 characters (at most 200)"),
        ({"frame_id": "cam/1/f"}, "it contains '/'"),
        ({"frame_id": ".."}, "it contains '..'"),
        ({"frame_id": "a..b"}, "it contains '..'"),
        ({"frame_id": "fr\u00e4me-1"}, "it is not ASCII"),
        ({"frame_id": "f*1"}, "it contains '*'"),
        ({"capture_ts": "soon"}, "malformed header 'capture-ts'"),
        ({"capture_ts": "1790000000"}, "not nanoseconds"),
        ({"capture_ts": "-5"}, "malformed header 'capture-ts'"),
        ({"schema": "2"}, "unsupported schema version '2'"),
        ({"camera_id": " cam"}, "whitespace or control characters"),
        ({"line_id": "bot\ntle"}, "whitespace or control characters"),
    ],
)
def test_bad_headers_name_the_problem(over: dict[str, str | None], words: str) -> None:
    with pytest.raises(EnvelopeError) as e:
        env.parse_meta(_headers(**over))
    assert words in str(e.value)
    assert e.value.stage == env.STAGE_HEADERS


def test_non_utf8_and_duplicate_headers() -> None:
    hs = [(k, b"\xff\xfe" if k == env.H_LINE_ID else v) for k, v in _headers()]
    with pytest.raises(EnvelopeError, match="not UTF-8"):
        env.parse_meta(hs)
    with pytest.raises(EnvelopeError, match="appears 2 times"):
        env.parse_meta([*_headers(), (env.H_FRAME_ID, b"other")])
    with pytest.raises(EnvelopeError, match="missing headers"):
        env.parse_meta(None)


def test_payload_checks() -> None:
    env.check_payload(b"x" * 10, "image/jpeg", 100)
    env.check_payload(b"x" * 10, "image/png; q=1", 100)
    with pytest.raises(EnvelopeError, match="frame too large: 101 bytes") as e:
        env.check_payload(b"x" * 101, "image/jpeg", 100)
    assert e.value.stage == env.STAGE_SIZE
    with pytest.raises(EnvelopeError, match="empty frame"):
        env.check_payload(b"", "image/jpeg", 100)
    with pytest.raises(EnvelopeError, match="unsupported content type 'image/gif'"):
        env.check_payload(b"GIF89a", "image/gif", 100)


def test_dlq_headers_keep_originals_and_add_the_reason() -> None:
    original = [*_headers(), ("error", b"spoofed")]
    hs = env.dlq_headers(original, "truncated image", env.STAGE_DECODE, "frames", 3, 42)
    d = dict(hs)
    assert d[env.H_FRAME_ID] == b"f-1" and d[env.H_LINE_ID] == b"bottle"
    assert d["error"] == b"truncated image"  # the producer's own 'error' header cannot masquerade as ours
    assert [k for k, _ in hs].count("error") == 1
    assert d["error-stage"] == b"decode"
    assert (d["source-topic"], d["source-partition"], d["source-offset"]) == (b"frames", b"3", b"42")
    assert int(d["failed-at"]) > 0
    assert all(isinstance(v, bytes) for _, v in env.dlq_headers([("k", None)], "r", "s", "t", 0, 0))


def test_one_frame_id_rule_for_envelope_and_dashboard() -> None:
    """Whatever the envelope accepts, the dashboard can show, and the other way round."""
    from pipeline.dashboard import store  # the dashboard's id rules (its server checks URLs with them)
    from pipeline.redis_keys import FRAME_ID_RE

    assert store.FRAME_ID_RE is FRAME_ID_RE
    for fid in ("bottle.0f3a", "x" * 200, "a:b-c_d.e", "a/b", "..", "a..b", "x" * 201, "caf\u00e9", "%2e%2e"):
        accepted = True
        try:
            env.parse_meta(_headers(frame_id=fid))
        except EnvelopeError:
            accepted = False
        assert accepted == bool(FRAME_ID_RE.match(fid)), fid
