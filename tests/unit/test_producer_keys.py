"""Issue 15, finding 8: frames are keyed so that one line spreads over every partition.

Keyed by line id, the three default lines all hashed to partition 1 of 4 and a second worker sat idle.
The partition is what kafka-python's default partitioner (murmur2 of the key) picks, as the broker sees it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kafka.partitioner.default import murmur2

from pipeline.settings import load_settings
from pipeline.streaming.producer import new_frame_id, record_key

REPO = Path(__file__).resolve().parents[2]


def _partition(key: bytes, n: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % n  # kafka-python's DefaultPartitioner for a keyed record


def test_default_lines_spread_over_all_partitions() -> None:
    settings = load_settings(REPO / "config.yaml")
    n = settings.kafka.partitions
    assert settings.kafka.partition_key == "frame"
    for line in settings.lines:
        hit = {_partition(record_key(settings.kafka.partition_key, new_frame_id(line.id), line.id, "cam-1"), n)
               for _ in range(64)}
        assert hit == set(range(n)), f"line {line.id} reaches partitions {sorted(hit)} of {n}"


@pytest.mark.parametrize(("kind", "expected"), [("frame", b"f-1"), ("camera", b"cam-7"), ("line", b"bottle")])
def test_partition_key_choices(kind: str, expected: bytes) -> None:
    assert record_key(kind, "f-1", "bottle", "cam-7") == expected


class _FakeKafka:
    """What FrameProducer calls on a kafka-python producer; keeps the records."""

    def __init__(self) -> None:
        self.records: list[dict[str, object]] = []

    def send(self, topic: str, *, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> object:
        self.records.append({"topic": topic, "key": key, "value": value, "headers": dict(headers)})

        class _Done:
            def add_callback(self, fn: object, *a: object) -> None:
                fn(None, *a)  # type: ignore[operator]

            def add_errback(self, fn: object, *a: object) -> None:
                pass

        return _Done()

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        pass


def test_live_frames_carry_their_capture_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A live source's capture time goes into the envelope, not the (later) send time; an explicit
    `capture_ts_ns` still wins, and frames of files (no capture time) get the send time."""
    import time

    from pipeline.streaming import producer as producer_mod
    from pipeline.streaming.envelope import parse_meta
    from pipeline.streaming.frame_sources import SourceFrame

    fake = _FakeKafka()
    monkeypatch.setattr(producer_mod, "make_producer", lambda _settings: fake)
    p = producer_mod.FrameProducer(load_settings(REPO / "config.yaml"))
    grabbed = time.time_ns() - 3_000_000_000  # grabbed 3 s ago, waited for the broker since
    p.send("bottle", SourceFrame(b"jpeg", "image/jpeg", "rtsp#1", capture_ts_ns=grabbed))
    p.send("bottle", SourceFrame(b"jpeg", "image/jpeg", "rtsp#2", capture_ts_ns=grabbed), capture_ts_ns=grabbed + 7)
    before = time.time_ns()
    p.send("bottle", SourceFrame(b"jpeg", "image/jpeg", "a.jpg"))
    p.close()
    metas = [parse_meta(list(r["headers"].items())) for r in fake.records]  # type: ignore[union-attr]
    assert metas[0].capture_ts_ns == grabbed
    assert metas[1].capture_ts_ns == grabbed + 7
    assert before <= metas[2].capture_ts_ns <= time.time_ns()
    assert p.stats.sent == p.stats.acked == 3
