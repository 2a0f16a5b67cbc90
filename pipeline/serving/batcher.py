"""Concurrent requests into model batches: one thread owns the verdict path and scores what is waiting.

Requests are queued already decoded. The thread takes the oldest, then waits up to `max_wait_ms` for
more, but only while other requests are known to be on their way (accepted and still decoding): a lone
request is scored at once, concurrent ones share a forward. Frames of one line in a batch go through the one
verdict path together (`pipeline.verdicts.Inspector.inspect`: the line's served adapter, its memory bank, the
thresholds its workers published), each line in turn. A `memory: stream` line without a bank fails its frames
with `NoBankError`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from pipeline.adaptation.memory.service import NoBankError
from pipeline.inspection.frame_scorer import Inspection
from pipeline.verdicts.inspector import Inspector

log = logging.getLogger("anoclip.serve")


@dataclass
class Job:
    line: str
    image: np.ndarray
    future: Future[Inspection] = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)
    frame_id: str = ""


BatchHook = Callable[[str, int, float], None]
"""(line, frames, seconds) after each scored group: for metrics."""


class InspectionBatcher:
    """Scores submitted frames in batches of at most `max_batch` on its own thread."""

    def __init__(self, path: Inspector, *, max_batch: int = 8, max_wait_ms: float = 20.0,
                 on_batch: BatchHook | None = None) -> None:
        if path.memory is not None and not path.memory.follow_only:
            raise ValueError("serve scores with a follow-only memory service (it must never admit frames)")
        self.path = path
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_ms) / 1000.0
        self.on_batch = on_batch
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._incoming = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="anoclip-serve-batcher", daemon=True)
        self._stopping = False

    # --- what the HTTP side calls -----------------------------------------------------------------
    def start(self) -> InspectionBatcher:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def announce(self) -> None:
        """A request was accepted and will be submitted (or withdrawn) soon: worth waiting for."""
        with self._lock:
            self._incoming += 1

    def withdraw(self) -> None:
        """An announced request will not come (refused, or submitted: `submit` withdraws itself)."""
        with self._lock:
            self._incoming = max(0, self._incoming - 1)

    def submit(self, line: str, image: np.ndarray, *, announced: bool = True) -> Future[Inspection]:
        return self.submit_job(line, image, announced=announced).future

    def submit_job(self, line: str, image: np.ndarray, *, announced: bool = True, frame_id: str = "") -> Job:
        """`submit`, returning the job."""
        if self._stopping:
            raise RuntimeError("the server is stopping")
        job = Job(line, image, frame_id=frame_id)
        self._queue.put(job)
        if announced:
            self.withdraw()
        return job

    def stop(self, timeout: float = 30.0) -> None:
        """Score what is queued, then end the thread."""
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout=timeout)

    # --- the thread ------------------------------------------------------------------------------------
    def _others_coming(self) -> bool:
        with self._lock:
            return self._incoming > 0

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        batch, end = [first], False
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or not self._others_coming():
                    break
                try:
                    job = self._queue.get(timeout=min(remaining, 0.002))
                except queue.Empty:
                    continue
            if job is None:
                end = True
                break
            batch.append(job)
        return batch, end

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, end = self._collect(first)
            self._score(batch)
            if end:
                return

    def _score(self, batch: list[Job]) -> None:
        by_line: dict[str, list[Job]] = defaultdict(list)
        for job in batch:
            by_line[job.line].append(job)
        for line, jobs in by_line.items():
            t0 = time.perf_counter()
            try:
                out = self.path.inspect(line, [j.image for j in jobs], [j.frame_id for j in jobs])
                for j, insp in zip(jobs, out, strict=True):
                    insp.timings["queue"] = (t0 - j.queued_at) * 1e3
            except Exception as e:  # reported to each waiting request; the thread goes on
                if not isinstance(e, NoBankError):  # a line without a bank is the caller's answer, not a fault
                    log.exception("inspecting %d %s frames failed", len(jobs), line)
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            seconds = time.perf_counter() - t0
            if self.on_batch is not None:
                self.on_batch(line, len(jobs), seconds)
            for j, insp in zip(jobs, out, strict=True):
                j.future.set_result(insp)
