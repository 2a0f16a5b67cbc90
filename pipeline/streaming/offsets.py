"""Which offset of a partition may be committed, when frames finish out of order.

Frames of one partition finish out of order (different lines batch separately, dead letters are
acknowledged by the broker on their own schedule). A partition may only be committed up to its
lowest unfinished offset, so a crash never skips a frame that was polled but not yet published.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field


@dataclass
class PartitionOffsets:
    """Offsets of one assigned partition: polled, finished, committed."""

    epoch: int = 0
    """Bumped on every (re)assignment; completions from an older assignment are ignored."""
    pending: set[int] = field(default_factory=set)
    next_offset: int | None = None
    """One past the highest offset polled so far."""
    committed: int | None = None

    def add(self, offset: int) -> None:
        self.pending.add(offset)
        if self.next_offset is None or offset + 1 > self.next_offset:
            self.next_offset = offset + 1

    def done(self, offset: int) -> None:
        self.pending.discard(offset)

    def committable(self) -> int | None:
        """The offset to commit now: the lowest unfinished one, or one past the last polled."""
        if self.next_offset is None:
            return None
        return min(self.pending) if self.pending else self.next_offset

    def to_commit(self) -> int | None:
        """`committable()` if it moved past what was committed, else None."""
        c = self.committable()
        if c is None or (self.committed is not None and c <= self.committed):
            return None
        return c

    def mark_committed(self, offset: int) -> None:
        if self.committed is None or offset > self.committed:
            self.committed = offset


class OffsetBook:
    """`PartitionOffsets` of every partition a worker owns, each under its own assignment epoch."""

    def __init__(self) -> None:
        self.partitions: dict[Hashable, PartitionOffsets] = {}
        self._epoch = 0

    def track(self, tp: Hashable) -> PartitionOffsets:
        """The partition's offsets, starting a fresh epoch if it is not tracked yet."""
        po = self.partitions.get(tp)
        if po is None:
            self._epoch += 1
            po = self.partitions[tp] = PartitionOffsets(epoch=self._epoch)
        return po

    def is_current(self, tp: Hashable, epoch: int) -> bool:
        po = self.partitions.get(tp)
        return po is not None and po.epoch == epoch

    def done(self, tp: Hashable, epoch: int, offset: int) -> None:
        """A frame finished; ignored if it was read under an older assignment of the partition."""
        if self.is_current(tp, epoch):
            self.partitions[tp].done(offset)

    def in_flight(self, tps: Iterable[Hashable] | None = None) -> int:
        """Frames polled and not finished (of `tps`, or of every partition)."""
        keys = self.partitions if tps is None else [tp for tp in tps if tp in self.partitions]
        return sum(len(self.partitions[tp].pending) for tp in keys)

    def to_commit(self, tps: Iterable[Hashable] | None = None) -> dict[Hashable, int]:
        """Partition -> offset to commit, for those whose commit point moved."""
        out = {}
        for tp in self.partitions if tps is None else tps:
            po = self.partitions.get(tp)
            off = po.to_commit() if po is not None else None
            if off is not None:
                out[tp] = off
        return out

    def mark_committed(self, offsets: Mapping[Hashable, int]) -> None:
        for tp, off in offsets.items():
            if tp in self.partitions:
                self.partitions[tp].mark_committed(off)

    def forget(self, tps: Iterable[Hashable]) -> None:
        for tp in tps:
            self.partitions.pop(tp, None)
