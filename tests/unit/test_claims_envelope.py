"""Envelope details a person reads in a dead letter, and its limits at the exact boundary; added after
mutation testing (tests/mutation/mutate.py) showed them unchecked."""

from __future__ import annotations

import pytest

from pipeline.streaming import envelope as env
from pipeline.streaming.envelope import EnvelopeError


def _headers(**over: bytes) -> list[tuple[str, bytes]]:
    hs = dict(env.build_headers("f-1", "bottle", "cam-1", 1_790_000_000_000_000_000, "image/png"))
    hs.update({k.replace("_", "-"): v for k, v in over.items()})
    return list(hs.items())


def test_header_size_limit_is_inclusive_and_named() -> None:
    at_limit = b"c" * env.MAX_HEADER_BYTES
    assert env.parse_meta(_headers(camera_id=at_limit)).camera == at_limit.decode()
    with pytest.raises(EnvelopeError) as e:
        env.parse_meta(_headers(camera_id=at_limit + b"c"))
    assert (e.value.reason, e.value.stage) == (f"header 'camera-id' is {env.MAX_HEADER_BYTES + 1} bytes (limit "
                                               f"{env.MAX_HEADER_BYTES})", env.STAGE_HEADERS)


def test_payload_limits_and_stages() -> None:
    env.check_payload(b"x" * 100, "image/jpeg", 100)  # exactly at the limit: accepted
    with pytest.raises(EnvelopeError) as e:
        env.check_payload(b"", "image/jpeg", 100)
    assert (e.value.reason, e.value.stage) == ("empty frame: the record has no image bytes", env.STAGE_SIZE)
    with pytest.raises(EnvelopeError) as e:
        env.check_payload(None, "image/jpeg", 100)
    assert e.value.stage == env.STAGE_SIZE
    with pytest.raises(EnvelopeError) as e:
        env.check_payload(b"x", "image/webp", 100)
    assert (e.value.reason, e.value.stage) == (
        "unsupported content type 'image/webp' (supported: image/jpeg, image/png)", env.STAGE_DECODE)


def test_malformed_frame_id_shows_its_first_80_characters() -> None:
    fid = "a" * 79 + "bc" + "d" * 200
    with pytest.raises(EnvelopeError) as e:
        env.parse_meta(_headers(frame_id=fid.encode()))
    assert e.value.reason.startswith(f"malformed header 'frame-id': {fid[:80]!r}: ")


def test_dlq_reason_is_bytes_of_at_most_4096_whatever_the_text() -> None:
    hs = dict(env.dlq_headers([("k", None), ("j", b"v")], "\ud800 bad \u00e9" + "x" * 5000, "decode", "t", 1, 2))
    assert hs["k"] == b"" and hs["j"] == b"v", "a header without value is re-sent empty"
    assert hs[env.H_ERROR].startswith(b"? bad \xc3\xa9x") and len(hs[env.H_ERROR]) == 4096


def test_a_synthetic_defect_header_of_any_bytes_is_read_never_raised() -> None:
    """Added after mutation testing: the optional ground-truth header is decoded with replacement, so bytes
    that are not UTF-8 still give a frame (the envelope's rule: a frame or a named error, never a crash)."""
    meta = env.parse_meta([*_headers(), (env.H_SYNTHETIC_DEFECT, b"scratch\xff\xfe")])
    assert meta.synthetic_defect == "scratch\ufffd\ufffd"
    assert env.parse_meta(_headers()).synthetic_defect is None


def test_capture_ts_limits_and_messages() -> None:
    """Added after mutation testing: nanoseconds up to 10**19 (year 2286) inclusive, one more is refused; a
    non-number is shown by its first 40 characters; an unknown schema names the supported ones."""
    assert env.parse_meta(_headers(capture_ts=str(10**19).encode())).capture_ts_ns == 10**19
    assert env.parse_meta(_headers(capture_ts=str(10**18).encode())).capture_ts_ns == 10**18
    for bad in (10**19 + 1, 10**18 - 1):
        with pytest.raises(EnvelopeError) as e:
            env.parse_meta(_headers(capture_ts=str(bad).encode()))
        assert e.value.reason == f"malformed header 'capture-ts': {bad} is not nanoseconds since the epoch"
    text = "t" * 39 + "uv" + "w" * 100
    with pytest.raises(EnvelopeError) as e:
        env.parse_meta(_headers(capture_ts=text.encode()))
    assert e.value.reason == f"malformed header 'capture-ts': {text[:40]!r} is not nanoseconds since the epoch"
    with pytest.raises(EnvelopeError) as e:
        env.parse_meta(_headers(schema=b"2"))
    assert (e.value.reason, e.value.stage) == (
        f"unsupported schema version '2' (supported: {env.SCHEMA_VERSION})", env.STAGE_HEADERS)
