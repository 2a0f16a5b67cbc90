"""The housekeeping thread: Redis readiness, each line's threshold state (calibration resumed from Redis,
operator overrides applied, the worker's view published, including the served version's own thresholds)
and the worker's heartbeat."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.inspection.inspector import Inspector
from pipeline.observability.telemetry import WorkerTelemetry
from pipeline.services.redis_client import RETRYABLE
from pipeline.settings import Settings
from pipeline.streaming.redis_io import ResultPublisher, manual_override
from pipeline.streaming.worker.publishing import RedisStatus

log = logging.getLogger("anoclip.worker")

THRESHOLD_SOURCES = ("manual", "config", "version", "calibrated", "default")


@dataclass
class Housekeeping:
    """Runs every `heartbeat_interval_s` until stopped; never raises."""

    settings: Settings
    inspector: Inspector
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
        state = self.publisher.read_threshold(line)
        first = line not in self._synced
        self._synced.add(line)
        ident = self.calibration_identity(line)
        if "calibrated_image" in state:
            self._adopt_calibration(line, state, ident, first)
        image, pixel = manual_override(state)
        if (image, pixel) != (th.override_image, th.override_pixel):
            log.info("line %s: manual threshold override image=%s pixel=%s", line, image, pixel)
            th.set_override(image, pixel)
        d = th.to_dict()
        if th.calibration is not None:
            d.update(ident)
        self.publisher.write_threshold(line, d)
        self.telemetry.set_threshold(line, str(d["image_source"]), float(d["image"]))  # type: ignore[arg-type]

    def _adopt_calibration(self, line: str, state: dict[str, str], ident: dict[str, str], first: bool) -> None:
        """The calibration in Redis is the line's, whichever worker made it.

        A line spread over several workers (frames keyed by frame id) must be judged by one threshold, not
        one per worker: a worker still calibrating adopts the one published, and one that finished its own
        calibration after another worker had published gives its own up (when two finish in the same
        heartbeat, the last write wins and the other adopts it on its next heartbeat). A restarted worker
        resumes it the same way.
        """
        th = self.inspector.thresholds(line)
        stale = {k: state.get(k) for k, v in ident.items() if state.get(k) != v}
        if stale:  # calibrated with another model, prompt set or quantile: its numbers do not apply
            if first and th.calibration is None:
                log.info("line %s: not resuming the calibration in Redis, it was made with %s", line, stale)
            return
        try:
            image, pixel = float(state["calibrated_image"]), float(state["calibrated_pixel"])
        except (ValueError, KeyError) as e:
            if first:
                log.warning("line %s: ignoring unreadable calibration in Redis: %s", line, e)
            return
        own = th.calibration
        if own is not None and math.isclose(own.image, image, rel_tol=1e-6, abs_tol=1e-9) and math.isclose(
                own.pixel, pixel, rel_tol=1e-6, abs_tol=1e-9):
            return
        try:
            th.restore(state)
        except (ValueError, KeyError) as e:
            log.warning("line %s: ignoring unreadable calibration in Redis: %s", line, e)
            return
        if own is None:
            how = "resumed" if first else "adopted"
            log.info("line %s: %s calibrated thresholds from Redis (image %.4f, published by worker %s)",
                     line, how, image, state.get("worker", "?"))
        else:
            log.info("line %s: using the line's calibration in Redis (image %.4f, published by worker %s) "
                     "instead of this worker's (image %.4f)", line, image, state.get("worker", "?"), own.image)

    def calibration_identity(self, line: str) -> dict[str, str]:
        """What a calibration depends on: one made with another model, prompt set or quantile is not resumed."""
        m = self.settings.model
        return {"calibrated_model": f"{m.arch}/{m.pretrained}/{m.precision}",
                "calibrated_prompts": self.inspector.prompt_hash(line),
                "calibrated_quantile": str(self.settings.line(line).threshold.quantile)}
