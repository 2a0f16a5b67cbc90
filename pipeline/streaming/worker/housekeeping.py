"""The housekeeping thread: Redis readiness, each line's threshold state (calibration resumed from Redis,
operator overrides applied, the worker's view published, including the served version's own thresholds)
and the worker's heartbeat."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.inspection.thresholds import calibration_identity, follow_published
from pipeline.observability.telemetry import WorkerTelemetry
from pipeline.services.redis_client import RETRYABLE
from pipeline.settings import Settings
from pipeline.streaming.redis_io import ResultPublisher
from pipeline.streaming.worker.publishing import RedisStatus

log = logging.getLogger("anoclip.worker")

THRESHOLD_SOURCES = ("manual", "config", "version", "calibrated", "default")


@dataclass
class Housekeeping:
    """Runs every `heartbeat_interval_s` until stopped; never raises."""

    settings: Settings
    inspector: FrameScorer
    publisher: ResultPublisher
    telemetry: WorkerTelemetry
    redis: RedisStatus
    heartbeat: Callable[[], dict[str, Any]]
    """The heartbeat hash's fields, from the runtime."""
    _synced: set[str] = field(default_factory=set)
    """Lines whose threshold state was read once (a calibration is resumed only on the first read)."""

    def __post_init__(self) -> None:
        self.telemetry.init_lines(self.lines)  # labelled counters of known lines start at 0

    @property
    def lines(self) -> list[str]:
        return sorted(line.id for line in self.settings.lines)

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.settings.worker.heartbeat_interval_s):
            self.once()

    def once(self) -> None:
        try:
            ok = self.publisher.ping()
            self.redis.set(ok)
            if not ok:
                return
            for line in self.lines:
                self.sync_threshold(line)
            self.publisher.heartbeat(self.heartbeat())
        except RETRYABLE as e:
            self.redis.set(False)
            log.debug("housekeeping: Redis unavailable: %s", e)
        except Exception:  # housekeeping must never take the worker down
            log.exception("housekeeping failed")

    def sync_threshold(self, line: str) -> None:
        th = self.inspector.thresholds(line)
        first = line not in self._synced
        self._synced.add(line)
        ident = self.calibration_identity(line)
        follow_published(line, th, self.publisher.read_threshold(line), ident, first)
        d = th.to_dict()
        if th.calibration is not None:
            d.update(ident)
        self.publisher.write_threshold(line, d)
        self.telemetry.set_threshold(line, str(d["image_source"]), float(d["image"]))  # type: ignore[arg-type]

    def calibration_identity(self, line: str) -> dict[str, str]:
        """What a calibration depends on: one made with another model, prompt set or quantile is not resumed."""
        return calibration_identity(self.settings, line, self.inspector.prompt_hash(line))
