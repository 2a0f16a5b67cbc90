"""Micro-batching per line: frames wait until a batch is full or its oldest frame has waited `max_wait_ms`."""

from __future__ import annotations

import time
from collections.abc import Collection

from kafka import TopicPartition

from pipeline.streaming.worker.frames import Batch, Frame


class LineBatcher:
    """Per-line buffers of accepted frames (poll thread only)."""

    def __init__(self, max_batch: int, max_wait_ms: int) -> None:
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self._frames: dict[str, list[Frame]] = {}
        self._since: dict[str, float] = {}

    def add(self, line: str, frame: Frame) -> Batch | None:
        """Buffer a frame; returns the line's batch once it is full."""
        buf = self._frames.setdefault(line, [])
        if not buf:
            self._since[line] = time.monotonic()
        buf.append(frame)
        return self.take(line) if len(buf) >= self.max_batch else None

    def take(self, line: str) -> Batch | None:
        frames = self._frames.pop(line, [])
        self._since.pop(line, None)
        return Batch(line, frames) if frames else None

    def due(self, force: bool = False) -> list[Batch]:
        """Batches whose oldest frame has waited long enough (all of them with `force`)."""
        now = time.monotonic()
        ready = [line for line, since in self._since.items() if force or now - since >= self.max_wait_s]
        return [b for b in (self.take(line) for line in ready) if b is not None]

    def poll_timeout_ms(self) -> int:
        """How long the poll may block without making a waiting batch late (at most 100 ms)."""
        if not self._since:
            return 100
        due = min(self._since.values()) + self.max_wait_s - time.monotonic()
        return int(max(0.0, min(0.1, due)) * 1000)

    def drop_partitions(self, gone: Collection[TopicPartition]) -> None:
        """Forget buffered frames of partitions this worker no longer owns (their next owner reads them)."""
        for line in list(self._frames):
            kept = [f for f in self._frames[line] if f.tp not in gone]
            if kept:
                self._frames[line] = kept
            else:
                self.take(line)

    def waiting_lines(self) -> set[str]:
        return set(self._frames)
