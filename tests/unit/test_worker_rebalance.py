"""The worker's rebalance callbacks against a stand-in consumer that behaves like kafka-python 3.x.

kafka-python 3.x keeps a partition's fetch position (and paused flag) when an eager rebalance hands it
back to the member that just revoked it. The worker forgets that partition's frames in flight in
`on_revoked`, so it must rewind the partition in `on_assigned`, or those frames are never read again:
no result for them, and a later commit would skip past them.
"""

from __future__ import annotations

from typing import Any

from kafka import TopicPartition

from pipeline.settings import Settings
from pipeline.streaming.worker import InspectionWorker
from pipeline.streaming.worker.frames import Done, Frame

TOPIC = "frames"
TP0, TP1, TP2 = (TopicPartition(TOPIC, p) for p in range(3))


class FakeConsumer:
    """Positions per assigned partition; like kafka-python 3.x, a re-assigned partition keeps its position."""

    def __init__(self) -> None:
        self.positions: dict[TopicPartition, int | None] = {}
        self.async_commits: list[dict[TopicPartition, int]] = []
        self.seeks: list[tuple[TopicPartition, int]] = []

    def rebalance(self, worker: InspectionWorker, new: list[TopicPartition], *, lost: bool = False) -> None:
        """Eager rebalance: revoke everything, then assign `new` (kept partitions keep their state)."""
        if lost:
            worker.rebalancer.on_partitions_lost(list(self.positions))
            self.positions = {}
        else:
            worker.rebalancer.on_partitions_revoked(list(self.positions))
        self.positions = {tp: self.positions.get(tp) for tp in new}  # None: fetch the committed offset
        worker.rebalancer.on_partitions_assigned(list(new))

    def commit_async(self, offsets: dict[TopicPartition, Any]) -> None:
        self.async_commits.append({tp: o.offset for tp, o in offsets.items()})

    def seek(self, tp: TopicPartition, offset: int) -> None:
        if tp not in self.positions:
            raise ValueError("Unassigned partition")
        self.seeks.append((tp, offset))
        self.positions[tp] = offset

    def assignment(self) -> set[TopicPartition]:
        return set(self.positions)


def _worker(settings: Settings) -> tuple[InspectionWorker, FakeConsumer]:
    w = InspectionWorker(settings, worker_id="t")
    c = FakeConsumer()
    w.consumer = c
    return w, c


def _poll(w: InspectionWorker, c: FakeConsumer, tp: TopicPartition, n: int) -> list[Frame]:
    """What `_accept` does for `n` records from the partition's position, minus the envelope."""
    po = w.offsets.partitions[tp]
    start = c.positions[tp] or 0
    frames = []
    for off in range(start, start + n):
        po.add(off)
        frames.append(Frame(tp, po.epoch, off, b"bottle", b"x", []))
    c.positions[tp] = start + n
    return frames


def test_partition_handed_back_with_frames_in_flight_is_rewound(tiny_settings: Settings) -> None:
    w, c = _worker(tiny_settings)
    c.rebalance(w, [TP0, TP1, TP2])
    frames = _poll(w, c, TP1, 6)  # offsets 0-5
    for f in frames[:3]:  # 0-2 in Redis; 3 in the publisher, 4-5 buffered, not yet scored
        w.completions.put(Done(f))
    w.process_completions()
    for f in frames[4:]:
        assert w.batcher.add("bottle", f) is None
    assert w.batcher.waiting_lines() == {"bottle"}
    old_epoch = w.offsets.partitions[TP1].epoch

    c.rebalance(w, [TP0, TP1])  # B joins; TP1 comes straight back to this worker

    assert c.async_commits == [{TP1: 3}], "what is finished is committed in the callback"
    assert w.batcher.waiting_lines() == set() and w.batcher.poll_timeout_ms() == 100
    assert c.seeks == [(TP1, 3)], "the kept partition must be rewound to its first unfinished offset"
    assert c.positions[TP1] == 3 and c.positions[TP0] is None
    assert w.offsets.partitions[TP1].epoch != old_epoch

    w.completions.put(Done(frames[3]))  # the old epoch's publish lands: ignored, the frame is read again
    w.process_completions()
    again = _poll(w, c, TP1, 3)
    assert [f.offset for f in again] == [3, 4, 5], "the forgotten frames are read again"
    assert w.offsets.partitions[TP1].to_commit() == 3, "nothing past an unfinished frame is committable"
    for f in again:
        w.completions.put(Done(f))
    w.process_completions()
    assert w.offsets.partitions[TP1].to_commit() == 6
    assert w.in_flight() == 0


def test_partition_taken_back_after_another_owner_is_not_rewound(tiny_settings: Settings) -> None:
    w, c = _worker(tiny_settings)
    c.rebalance(w, [TP0, TP1])
    _poll(w, c, TP1, 4)  # all in flight
    c.rebalance(w, [TP0])  # TP1 goes to another member, which reads on from the committed offset
    assert c.seeks == []
    c.rebalance(w, [TP0, TP1])  # and comes back: fresh state, reads the committed offset
    assert c.seeks == [] and c.positions[TP1] is None


def test_lost_partitions_are_not_rewound(tiny_settings: Settings) -> None:
    w, c = _worker(tiny_settings)
    c.rebalance(w, [TP0, TP1])
    _poll(w, c, TP1, 4)
    c.rebalance(w, [TP0, TP1], lost=True)  # evicted: no commit, state dropped, read the committed offset
    assert c.async_commits == [] and c.seeks == []
    assert c.positions[TP1] is None and w.in_flight() == 0
