"""OffsetBook's per-partition views (what the rebalance listener commits and reports for the partitions
it gives up), beyond test_offsets.py's single partition; added after mutation testing found them unchecked."""

from __future__ import annotations

from pipeline.streaming.offsets import OffsetBook


def _book() -> OffsetBook:
    book = OffsetBook()
    for tp, offsets in (("p0", (0, 1, 2)), ("p1", (10, 11)), ("p2", ())):
        po = book.track(tp)
        for off in offsets:
            po.add(off)
    book.done("p0", book.partitions["p0"].epoch, 0)
    return book


def test_in_flight_and_to_commit_of_some_partitions_only() -> None:
    book = _book()
    assert book.in_flight() == 4 and book.in_flight(["p0"]) == 2 and book.in_flight(["p1", "gone"]) == 2
    assert book.in_flight([]) == 0
    assert book.to_commit(["p0"]) == {"p0": 1}
    assert book.to_commit(["p1", "gone"]) == {"p1": 10}, "an untracked partition has nothing to commit"
    assert book.to_commit() == {"p0": 1, "p1": 10}, "p2 polled nothing yet"


def test_mark_committed_moves_only_the_named_tracked_partitions() -> None:
    book = _book()
    book.mark_committed({"p0": 1, "gone": 5})
    assert book.partitions["p0"].committed == 1 and book.partitions["p1"].committed is None
    assert book.to_commit() == {"p1": 10}, "p0 is committed up to its first unfinished frame"
    assert "gone" not in book.partitions


def test_a_completion_is_counted_only_under_the_assignment_it_was_read_in() -> None:
    book = _book()
    old = book.partitions["p1"].epoch
    assert book.is_current("p1", old) and not book.is_current("p1", old + 100) and not book.is_current("gone", old)
    book.forget(["p1"])
    assert not book.is_current("p1", old)
    po = book.track("p1")
    assert po.epoch != old and book.is_current("p1", po.epoch)
    po.add(11)
    book.done("p1", old, 11)  # read before the rebalance: the new owner's frame 11 is still in flight
    assert po.pending == {11}
    book.done("p1", po.epoch, 11)
    assert po.pending == set()
