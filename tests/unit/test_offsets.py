"""Commit positions when frames of one partition finish out of order."""

from __future__ import annotations

from pipeline.streaming.offsets import PartitionOffsets


def test_nothing_polled_nothing_to_commit() -> None:
    po = PartitionOffsets()
    assert po.committable() is None and po.to_commit() is None


def test_commit_stops_at_the_lowest_unfinished_offset() -> None:
    po = PartitionOffsets()
    for off in range(10, 15):
        po.add(off)
    assert po.to_commit() == 10  # nothing finished: the committed position stays before frame 10
    po.done(12)
    po.done(13)
    assert po.to_commit() == 10  # 10 and 11 still in flight
    po.done(10)
    assert po.to_commit() == 11
    po.done(11)
    po.done(14)
    assert po.to_commit() == 15  # all finished: one past the last polled


def test_to_commit_only_moves_forward() -> None:
    po = PartitionOffsets()
    po.add(0)
    po.done(0)
    assert po.to_commit() == 1
    po.mark_committed(1)
    assert po.to_commit() is None
    po.mark_committed(0)  # an older commit result never moves the position back
    assert po.committed == 1
    po.add(1)
    assert po.to_commit() is None  # 1 pending: committable is 1, already committed
    po.done(1)
    assert po.to_commit() == 2


def test_done_twice_or_unknown_is_harmless() -> None:
    po = PartitionOffsets()
    po.add(5)
    po.done(5)
    po.done(5)
    po.done(99)
    assert po.to_commit() == 6
