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
