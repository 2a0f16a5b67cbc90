"""Which offset of a partition may be committed, when frames finish out of order.

Frames of one partition finish out of order (different lines batch separately, dead letters are
acknowledged by the broker on their own schedule). A partition may only be committed up to its
lowest unfinished offset, so a crash never skips a frame that was polled but not yet published.
"""

from __future__ import annotations

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
