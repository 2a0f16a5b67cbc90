"""The per-line patch memory inside a worker (docs/memory.md): `lines[].memory: stream`.

* Scoring (the scorer thread, `score`): each frame of a line is scored by its `StreamMemory` (the bank
  served now, else mutual scoring over the line's last frames) fused with the zero-shot map, exactly as
  `anoclip eval --memory stream` scores it, then admitted or not; admitted patches wait for the next bank.
  This is cheap (one distance matmul per batch, and a block coreset of pending rows every ~70 frames).
  When a refresh is due, the pending patches are handed to the builder (no copy) and collecting starts anew.
* Building (the `memory-builder` thread, `_build`): under the line's bank lock (`RefreshLock`, kind
  `banks`: one builder per line at a time) the bank is built (coreset, scales), its thresholds calibrated
  on held-out admitted frames (`bank_thresholds`), it is gated (`gate_bank`: the build's newest admitted frames,
  kept out of it, with a synthetic defect pasted into each; refused if its pixel AUROC on them falls below the
  serving reference's by `gate_auroc_margin` or their median z leaves ±`gate_max_normal_z`; a refusal is counted,
  audited and drops the build's rows), and it is published to the bank registry
  (`VersionRegistry(kind="banks")`), which promotes it atomically unless the line was paused or its current
  bank moved (a rollback) since the build started from it.
* Serving (`sync`, `_install`): the builder thread follows each line's `current` bank pointer; a bank
  promoted by any worker (or a rollback) is loaded from Redis and staged, and the scorer thread swaps it in
  at the start of its next batch, registering the version's thresholds first. Frames are judged with the
  thresholds of what scored them: `bank:<version>`, or `bank:mutual` during the cold start.
* Following only (`follow_only=True`, `anoclip serve`): the registry's current bank is followed and frames are
  scored with it exactly as above, but nothing is ever admitted, built, published or locked (the caller's frames
  are untrusted); a line without a bank raises `NoBankError` (no window of the line's recent frames to score
  mutually against).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.adaptation.lifecycle import Candidate, Loaded, Outcome, ServiceThread, VersionFollower, settle
from pipeline.adaptation.memory.bank import MemoryBank, PatchRows
from pipeline.adaptation.memory.files import from_bytes, to_bytes
from pipeline.adaptation.memory.gate import gate_build
from pipeline.adaptation.memory.params import MemoryParams
from pipeline.adaptation.memory.records import frame_record
from pipeline.adaptation.memory.stream import BuildJob, StreamMemory, bank_thresholds
from pipeline.adaptation.registry import RefreshLock, VersionRegistry
from pipeline.errors import AnoclipError
from pipeline.inspection.frame_scorer import FrameScorer, RawScore
from pipeline.inspection.score_scale import from_z, thresholds_from_z
from pipeline.observability.telemetry import BANK_OUTCOMES, WorkerTelemetry

log = logging.getLogger(__name__)

COLD_START_KEY = "bank:mutual"
"""Threshold key of frames scored before the line has a bank (mutual scoring)."""
COLD_START_THRESHOLDS: dict[str, float] = {"image": 3.0, "pixel": 3.0, "pixel_median": 0.0}
"""Fused z units (as banks' own thresholds are stored): three upper-body SDs above the median of the window's own
frames, 0.5 on the anomaly scale. Registered with the line's thresholds on that scale (`thresholds_from_z`)."""
LOCK_TTL_S = 300.0
"""The bank lock's lease: longer than the largest build (tens of seconds for a thousand frames); a builder
that dies frees the line after it."""


class NoBankError(AnoclipError):
    """A follow-only memory service was asked to score a line that has no bank (cold start, or rolled back)."""

    def __init__(self, line: str) -> None:
        super().__init__(f"line {line!r} has no memory bank yet: until its workers publish one, its frames are "
                         "judged by mutual scoring against the line's recent stream frames, which are not at hand here")
        self.line = line


BUILDER_NICE = 10
"""The builder thread's niceness: on a busy CPU a bank build takes what scoring leaves (on Linux a thread
is its own scheduling entity; torch ops called from it run in it with the worker's one intra-op thread)."""


def lower_thread_priority(nice: int) -> bool:
    """Raise the calling thread's niceness by `nice` (Linux; elsewhere nothing). True when it took effect."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        return True
    except (AttributeError, OSError):  # no per-thread priorities here, or not allowed: build at full priority
        return False


def threshold_key(version: str | None) -> str:
    """The threshold key frames scored by bank `version` (None: the cold start) are judged with."""
    return COLD_START_KEY if version is None else f"bank:{version}"


@dataclass
class MemoryOutcome:
    """A frame as the memory scored it."""

    raw: RawScore
    """The frame with the fused map and image score in place of the zero-shot ones, on the anomaly scale
    (`pipeline.inspection.score_scale.from_z` of the memory's z units): what is judged."""
    threshold_key: str
    bank_version: str | None
    """The bank version that scored it; None during the cold start."""
    source: str
    """`bank:<id>`, `mutual:<n>` or `none` (`MemoryScore.source`)."""


@dataclass
class _Line:
    memory: StreamMemory
    serving: str | None = None
    """The registry version served (None: no bank yet, or rolled back to none)."""
    staged: tuple[MemoryBank | None, str | None, dict[str, Any] | None] | None = None
    """(bank, version, thresholds) waiting to be swapped in by the scorer thread."""
    building: bool = False
    carry: list[PatchRows] = field(default_factory=list)
    """Held-out patches of promoted builds, waiting for the scorer thread to add them to the next build."""


_OUTCOME_COUNTED = {"promote": "promoted", "refuse": "refused", "skipped": "skipped", "failed": "failed"}
"""A build's outcome (`build`'s `action`) -> its `anoclip_bank_refreshes_total` outcome."""


class MemoryService(ServiceThread):
    """Per-worker owner of the memory of every `memory: stream` line: scoring, building, serving."""

    def __init__(self, inspector: FrameScorer, registry: VersionRegistry | None, lines: list[str], worker_id: str,
                 telemetry: WorkerTelemetry | None = None, *, poll_s: float = 0.5,
                 params: MemoryParams | None = None, follow_only: bool = False) -> None:
        """`follow_only`: follow the registry's current banks and score with them, never admit, build, publish
        nor take the bank lock (`anoclip serve`: its frames are untrusted)."""
        if registry is not None and registry.kind != "banks":
            raise ValueError("the memory service needs the bank registry: VersionRegistry(..., kind='banks')")
        self.inspector = inspector
        self.registry = registry
        self.worker_id = worker_id
        self.telemetry = telemetry
        self.poll_s = poll_s
        self.follow_only = follow_only
        self.params = params or MemoryParams.from_settings(inspector.settings.memory)
        self.lines = {line: _Line(StreamMemory(inspector, line, self.params)) for line in lines}
        self.follower = VersionFollower(registry, self._load, self._serve_version) if registry is not None else None
        self._swap = threading.Lock()
        self._jobs: queue.Queue[tuple[str, BuildJob, str | None]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for line in lines:
            inspector.thresholds(line).set_version(COLD_START_KEY, thresholds_from_z(COLD_START_THRESHOLDS))
            if telemetry is not None:
                telemetry.init_memory_line(line)

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        """The blocks whose patch tokens the model must also return (`FrameScorer.score_raw(hidden_layers=...)`)."""
        return tuple(self.params.layers)

    def serves(self, line: str) -> bool:
        return line in self.lines

    def serving(self, line: str) -> str | None:
        return self.lines[line].serving

    def following(self, line: str) -> str | None:
        """The bank version the line's next batch is scored with (staged or serving); None: no bank."""
        return self._staged_or_serving(self.lines[line])

    # -- scoring (scorer thread) -------------------------------------------------------------------
    def score(self, line: str, raws: list[RawScore], frame_ids: list[str]) -> list[MemoryOutcome]:
        """Score a batch of one line in stream order, admit its frames, hand a due refresh to the builder.
        Follow-only: `score_only`."""
        if self.follow_only:
            return self.score_only(line, raws, frame_ids)
        st = self.lines[line]
        self._install(line, st)
        mem = st.memory
        grid = self.inspector.model.grid_size
        recs = [frame_record(r, fid, self.params, grid) for r, fid in zip(raws, frame_ids, strict=True)]
        bank, version = mem.bank, st.serving
        batch = mem.scorer.with_bank_batch(raws, recs, bank) if bank is not None else []
        recent = {w.frame_id for w in mem.window}  # a frame seen again (a batch retried frame by frame, a replay)
        out = []
        for i, (raw, rec) in enumerate(zip(raws, recs, strict=True)):
            result = batch[i] if bank is not None else mem.score_record(raw, rec)[0]
            if rec.frame_id not in recent:  # is scored again but not admitted twice
                mem.observe(rec, result, raw.image)
                recent.add(rec.frame_id)
            fused = dataclasses.replace(raw, anomaly_map=from_z(result.anomaly_map), score=from_z(float(result.score)),
                                        hidden=None)
            if bank is None:
                out.append(MemoryOutcome(fused, COLD_START_KEY, None, result.source))
            else:
                out.append(MemoryOutcome(fused, threshold_key(version), version, result.source))
        if self.telemetry is not None and bank is None:
            self.telemetry.memory_cold_start_frames.labels(line).inc(len(raws))
        if mem.due and not st.building:
            st.building = True
            self._jobs.put((line, mem.take_pending(self.params.gate_holdout_frames), st.serving))
        return out

    def score_only(self, line: str, raws: list[RawScore], frame_ids: list[str]) -> list[MemoryOutcome]:
        """Score a batch of one line with its current bank as `score` does, admitting nothing and handing nothing
        to the builder; `NoBankError` when the line has no bank (mutual scoring needs the line's recent frames)."""
        st = self.lines[line]
        self._install(line, st)
        bank, version = st.memory.bank, st.serving
        if bank is None:
            raise NoBankError(line)
        grid = self.inspector.model.grid_size
        recs = [frame_record(r, fid, self.params, grid) for r, fid in zip(raws, frame_ids, strict=True)]
        return [MemoryOutcome(dataclasses.replace(raw, anomaly_map=from_z(result.anomaly_map),
                                                  score=from_z(float(result.score)), hidden=None),
                              threshold_key(version), version, result.source)
                for raw, result in zip(raws, st.memory.scorer.with_bank_batch(raws, recs, bank), strict=True)]

    def _install(self, line: str, st: _Line) -> None:
        """Swap a staged bank in (between batches), its thresholds first."""
        with self._swap:
            staged, st.staged = st.staged, None
            carry, st.carry = st.carry, []
        for rows in carry:
            st.memory.carry_over(rows)
        if staged is None:
            return
        bank, version, thresholds = staged
        self.inspector.thresholds(line).set_version(threshold_key(version) if bank is not None else COLD_START_KEY,
                                                    thresholds_from_z(thresholds if bank is not None
                                                                      else COLD_START_THRESHOLDS))
        previous = st.serving
        st.memory.install(bank)
        st.serving = version if bank is not None else None
        if self.telemetry is not None:
            self.telemetry.set_bank(line, previous, st.serving, bank.patches if bank else 0, bank.nbytes if bank else 0)
        log.info("line %s: now serving memory bank %s", line,
                 f"{version} ({bank.patches} patches, {len(bank.frames)} frames)" if bank else "none (mutual scoring)")

    def _stage(self, line: str, bank: MemoryBank | None, version: str | None,
               thresholds: dict[str, Any] | None, carry: PatchRows | None = None) -> None:
        with self._swap:
            self.lines[line].staged = (bank, version, thresholds)
            if carry is not None and carry.rows:
                self.lines[line].carry.append(carry)

    def _staged_or_serving(self, st: _Line) -> str | None:
        with self._swap:
            return st.staged[1] if st.staged is not None else st.serving

    # -- building and following the registry (builder thread) -------------------------------------
    def start(self) -> MemoryService:
        self._start_thread("memory-builder", self._loop)
        return self

    def _loop(self) -> None:
        lower_thread_priority(BUILDER_NICE)
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=self.poll_s)
            except queue.Empty:
                job = None
            if job is not None and not self.follow_only:
                self.build(*job)
            for line in list(self.lines):
                try:
                    self.sync(line)
                except Exception:  # Redis down or a bad version: keep serving what we have
                    log.debug("line %s: bank sync failed", line, exc_info=True)

    def run_pending(self) -> int:
        """Build every job waiting (tests and callers without the builder thread); returns how many ran."""
        n = 0
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return n
            self.build(*job)
            n += 1

    def sync(self, line: str) -> bool:
        """Follow the registry's `current` bank pointer (`lifecycle.VersionFollower`); True when another bank (or
        none) was staged."""
        return self.follower.sync(line) if self.follower is not None else False

    def _load(self, line: str, version: str) -> Loaded:
        assert self.registry is not None
        bank = from_bytes(self.registry.tensors(line, version), self.lines[line].memory.target)
        return Loaded(bank, self.registry.meta(line, version).get("thresholds") or None)

    def _serve_version(self, line: str, loaded: Loaded | None, version: str | None) -> None:
        self._stage(line, loaded.state if loaded is not None else None, version,
                    loaded.thresholds if loaded is not None else None)

    def build(self, line: str, job: BuildJob, base_version: str | None) -> dict[str, Any]:
        """Build, calibrate and publish one bank (off the scorer thread); the outcome as a dict."""
        if self.follow_only:
            raise RuntimeError("a follow-only memory service never builds banks")
        st = self.lines[line]
        try:
            out = self._build(line, st, job, base_version)
        except Exception as e:  # a failed build keeps the served bank; the next due refresh tries again
            log.exception("line %s: building a memory bank failed", line)
            out = {"action": "failed", "reason": f"{type(e).__name__}: {e}"}
        finally:
            st.building = False
        self._count(line, _OUTCOME_COUNTED[out["action"]])
        return out

    def _build(self, line: str, st: _Line, job: BuildJob, base_version: str | None) -> dict[str, Any]:
        lock = None
        if self.registry is not None:
            lock = RefreshLock(self.registry.client, self.registry.keys, line, self.worker_id, LOCK_TTL_S,
                               kind="banks")
            if not lock.acquire():
                return {"action": "skipped", "reason": "another worker is building this line's bank"}
        try:
            if self.registry is not None and self.registry.is_paused(line):
                log.info("line %s: bank refresh skipped: the line's banks are paused", line)
                return {"action": "refuse", "reason": "line is paused"}
            t0 = time.perf_counter()
            bank = st.memory.build(job)
            cfg = self.inspector.line(line).threshold
            thresholds = bank_thresholds(bank, job.records, self.params, quantile=cfg.quantile,
                                         pixel_quantile=cfg.pixel_quantile)
            build_s = time.perf_counter() - t0
            validation, refusal = gate_build(self.inspector, line, job, bank, self.params, st.memory.scorer)
            gate_s = time.perf_counter() - t0 - build_s
            validation["gate_seconds"] = round(gate_s, 3)
            reason = (f"bank of {bank.patches} patches from {len(bank.frames)} frames "
                      f"({job.frames} newly admitted), built in {build_s:.1f} s, gated in {gate_s:.1f} s")
            meta = {**bank.meta, "thresholds": thresholds, "build_seconds": round(build_s, 3),
                    "worker": self.worker_id, "frames_admitted": job.frames, "validation": validation}
            if refusal is not None:  # its rows (and held-out rows) are dropped: see docs/memory.md, The bank gate
                candidate = Candidate(None, meta, refusal, refusal_audit={
                    "validation": validation, "bank_id": bank.version, "patches": bank.patches,
                    "from_version": base_version or ""})
                log.info("line %s: candidate memory bank refused by the gate: %s (%s)", line, refusal, validation)
            else:
                candidate = Candidate(to_bytes(bank), meta, reason,
                                      audit={"patches": bank.patches, "bank_id": bank.version})
            if self.registry is None:  # no registry (tests, replays): promoted here, as the one version
                outcome = (Outcome("refuse", refusal) if refusal is not None
                           else Outcome("promote", reason, bank.version))
            else:
                outcome = settle(self.registry, line, candidate, owner=self.worker_id, base_version=base_version,
                                 follower=self.follower)
            if not outcome.promoted:
                log.info("line %s: memory bank refused: %s", line, outcome.reason)
                return {"action": "refuse", "reason": outcome.reason, "validation": validation}
            self._stage(line, bank, outcome.version, thresholds, job.holdout_rows)
            log.info("line %s: promoted memory bank %s (%s)", line, outcome.version, reason)
            return {"action": "promote", "version": outcome.version, "validation": validation}
        finally:
            if lock is not None:
                lock.release()

    def _count(self, line: str, outcome: str) -> None:
        assert outcome in BANK_OUTCOMES
        if self.telemetry is not None:
            self.telemetry.bank_refreshes.labels(line, outcome).inc()
