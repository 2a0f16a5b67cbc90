"""What the worker's threads hand each other: frames with their place in Kafka, batches, completions."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kafka import TopicPartition

from pipeline.streaming.envelope import FrameMeta

UNKNOWN_LINE = "unknown"
"""Metric label of frames whose line could not be read or is not configured."""


@dataclass
class Frame:
    """One polled record, tagged with the partition epoch it was read under."""

    tp: TopicPartition
    epoch: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    meta: FrameMeta | None = None
    polled_at: float = field(default_factory=time.monotonic)

    @property
    def line_label(self) -> str:
        return self.meta.line if self.meta else UNKNOWN_LINE


@dataclass
class Batch:
    """Frames of one line, scored together."""

    line: str
    frames: list[Frame]


@dataclass
class Done:
    """A frame finished (published or dead-lettered): its offset may be committed."""

    frame: Frame


@dataclass
class DlqFailed:
    """A dead-letter send the broker did not acknowledge: retried later."""

    frame: Frame
    reason: str
    stage: str
    error: Exception
