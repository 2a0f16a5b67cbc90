"""Streaming TTA inside a worker: serve each line's current adapter, buffer its frames, refresh it.

* Serving: every `trainer_poll_s` the service reads each line's `current` pointer in the registry and,
  when it moved (a promotion by any worker, a rollback), loads that version and swaps it in between
  batches, together with the thresholds it carries (calibrated on its held-out frames; the line's
  `LineThresholds` judges each frame with the thresholds of the version that scored it, manual
  overrides still win). `adapter_for(line)` is a lock-free read of (adapter, version); results name it.
* Buffering: `observe` offers each scored frame's raw tokens to the line's `BufferedTTA` (admission
  judged with the base model).
* Refreshing: a trainer thread, off the poll and scoring threads, trains when a refresh is due (every
  `refresh_every` frames or `refresh_interval_s`) or requested (`anoclip versions refresh`), under a
  per-line Redis lock so one worker trains per line. The training budget is a share of the scoring
  time (`train_share`). Accepted candidates are published through the registry, which refuses them if
  the line was paused or rolled back meanwhile; refusals are recorded with their reasons.
* Operator labels: before each refresh the line's newest `gate_max_labelled` confirmed defects (kept image
  and a mask the operator endorsed) and as many false alarms (kept image) are read from Redis
  (`LabelStore.newest`) and handed to the gate (`BufferedTTA.set_operator_frames`): the defects as
  labelled positives, the false alarms as all-normal frames. Decoded frames are cached by (frame, label,
  labelled time), so each is read once and a relabel replaces it. The audit entry's `positives` counts them.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import redis
from PIL import Image

from pipeline.adaptation.lifecycle import Candidate, Loaded, ServiceThread, VersionFollower, settle
from pipeline.adaptation.registry import RefreshLock, VersionRegistry
from pipeline.adaptation.tta.buffered import BufferedTTA, admission_ceiling, report_figures
from pipeline.adaptation.tta.files import TrainingMeta, build_meta, from_bytes, target_for, to_bytes
from pipeline.errors import ImageError
from pipeline.inspection.frame_scorer import FrameScorer, RawScore
from pipeline.inspection.imaging import decode_image
from pipeline.model.tta_params import BufferedBudget, TTAParams
from pipeline.observability.telemetry import WorkerTelemetry
from pipeline.operators.labels import CONFIRMED, FALSE_ALARM, AlertLabel, LabelStore

log = logging.getLogger(__name__)


@dataclass
class _LineState:
    tta: BufferedTTA
    serving: tuple[Any, str | None] = (None, None)
    last_refresh: float = field(default_factory=time.monotonic)
    seen_request: str | None = None
    """Last refresh request read; None until first read (requests from before this worker are not ours)."""
    pending: dict[str, float] = field(default_factory=dict)
    """Refresh request id -> when it was made (epoch seconds), until answered."""
    labels: dict[LabelKey, LabelledImage | None] = field(default_factory=dict)
    """Operator-labelled frames as last decoded (None: unusable), kept while the label stays among the newest."""
    remembers: bool = False
    """The line also runs the patch memory (`memory: stream`): its verdicts come from the memory's fused score."""


LabelKey = tuple[str, str, int]
"""(frame id, label, labelled time): a relabel is a new key."""
LabelledImage = tuple[np.ndarray, np.ndarray | None]
"""(image at model input size, defect mask or None for a false alarm)."""


class LabelReader(Protocol):
    """What the gate reads of `pipeline.operators.labels.LabelStore`."""

    def newest(self, line: str, label: str, *, limit: int,
               where: Callable[[AlertLabel], bool] | None = None) -> list[AlertLabel]: ...

    def blob(self, frame_id: str, kind: str) -> bytes | None: ...


def _usable_defect(lab: AlertLabel) -> bool:
    # the kept mask is the model's own: ground truth only where the operator said it outlines the defect
    return lab.has_image and lab.has_mask and lab.mask_is_defect


def _usable_false_alarm(lab: AlertLabel) -> bool:
    return lab.has_image


def _decode_label(store: LabelReader, lab: AlertLabel,
                  to_input: Callable[[np.ndarray], np.ndarray] | None) -> LabelledImage | None:
    """A labelled frame as the gate takes it; None when its image or mask is gone or empty."""
    data = store.blob(lab.frame_id, "image")
    if data is None:
        return None
    image = decode_image(data)
    if to_input is not None:
        image = to_input(image)  # what the buffer keeps too: the model input size, not the camera's
    if lab.label != CONFIRMED:
        return image, None
    mdata = store.blob(lab.frame_id, "mask")
    if mdata is None:
        return None
    with Image.open(io.BytesIO(mdata)) as im:
        m = im.convert("L")
        if m.size != (image.shape[1], image.shape[0]):
            m = m.resize((image.shape[1], image.shape[0]), Image.NEAREST)
        mask = np.asarray(m) > 127
    return (image, mask) if mask.any() else None


def operator_frames(
    store: LabelReader,
    line: str,
    limit: int,
    cache: dict[LabelKey, LabelledImage | None],
    to_input: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """The line's newest `limit` usable confirmed defects and `limit` false alarms as (frame id, image, mask or
    None), oldest first. Decodes only frames not in `cache` and leaves in it only the ones returned now, so a
    frame costs one read however many refreshes it joins and memory stays bounded by 2 x `limit`."""
    if limit <= 0:
        cache.clear()
        return []
    labs = [*store.newest(line, CONFIRMED, limit=limit, where=_usable_defect),
            *store.newest(line, FALSE_ALARM, limit=limit, where=_usable_false_alarm)]
    keep: dict[LabelKey, LabelledImage | None] = {}
    out = []
    for lab in sorted(labs, key=lambda x: (x.alert_ts_ms, x.frame_id)):
        key = (lab.frame_id, lab.label, lab.labelled_ms)
        if key in cache:
            item = cache[key]
        else:
            try:
                item = _decode_label(store, lab, to_input)
            except (ImageError, OSError, ValueError) as e:  # one bad blob must not cost the refresh
                log.warning("line %s: labelled frame %s left out of the gate: %s", line, lab.frame_id, e)
                item = None
        keep[key] = item
        if item is not None:
            out.append((lab.frame_id, item[0], item[1]))
    cache.clear()
    cache.update(keep)
    return out


class AdapterService(ServiceThread):
    """Per-worker owner of every line's adapter: serving, buffering, refreshing."""

    def __init__(
        self,
        inspector: FrameScorer,
        registry: VersionRegistry,
        lines: list[str],
        worker_id: str,
        telemetry: WorkerTelemetry | None = None,
    ) -> None:
        self.inspector = inspector
        self.registry = registry
        self.settings = inspector.settings.tta
        self.worker_id = worker_id
        self.telemetry = telemetry
        self.labels = LabelStore(registry.client, registry.keys)
        self.compute_dtype = TTAParams.from_settings(self.settings).compute_dtype
        self.lines: dict[str, _LineState] = {
            line: _LineState(BufferedTTA.for_line(inspector, line), remembers=inspector.line(line).memory == "stream")
            for line in lines
        }
        for st in self.lines.values():
            try:
                st.seen_request = registry.last_request_id(st.tta.line_id)
            except Exception:  # Redis away at start-up: read it on the first trainer step
                st.seen_request = None
        self.targets = {line: target_for(inspector, line) for line in lines}
        """What each line's adapters must fit (model weights, prompts, line): fixed for the worker's life."""
        self.follower = VersionFollower(registry, self._load, self._serve_version)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._train = True

    # -- serving --------------------------------------------------------------------------------
    def adapter_for(self, line: str) -> tuple[Any, str | None]:
        st = self.lines.get(line)
        return st.serving if st is not None else (None, None)

    def sync(self, line: str) -> bool:
        """Follow the registry's `current` pointer (`lifecycle.VersionFollower`); True when the adapter changed."""
        return self.follower.sync(line)

    def _load(self, line: str, version: str) -> Loaded:
        adapter, meta = from_bytes(self.registry.tensors(line, version), self.targets[line],
                                   self.lines[line].tta.text, self.compute_dtype)
        return Loaded(adapter, meta.get("thresholds") or None)

    def _serve_version(self, line: str, loaded: Loaded | None, version: str | None) -> None:
        st = self.lines[line]
        adapter, thresholds = (loaded.state, loaded.thresholds) if loaded is not None else (None, None)
        previous = st.serving[1]
        if not st.remembers:  # a memory line is judged by its bank's thresholds; the adapter's judge no frame
            # thresholds first: a frame judged as `version` must find that version's thresholds
            self.inspector.thresholds(line).set_version(version, thresholds)
        st.serving = (adapter, version)
        st.tta.serve(adapter, version, thresholds)
        if self.telemetry is not None:
            self.telemetry.adapter_version.labels(line, previous or "base").set(0)
            self.telemetry.adapter_version.labels(line, version or "base").set(1)
        log.info("line %s: now serving adapter %s (thresholds %s)", line, version or "none (base model)",
                 thresholds or "of the line")

    # -- buffering ------------------------------------------------------------------------------
    def observe(self, line: str, frame_id: str, raw: RawScore, score_seconds: float, timestamp: float, *,
                judged_anomalous: bool = False) -> None:
        """Offer a scored frame to the line's buffer (only in buffered mode).

        A line's image threshold caps admission (`admission_ceiling`: a frame the line would call anomalous never
        enters). On a line that also runs the memory the verdict comes from the fused score, which is not the raw
        CLS score the buffer ranks, so the cap is the verdict itself (`judged_anomalous`)."""
        st = self.lines.get(line)
        if st is None or self.settings.mode != "buffered":
            return
        if st.remembers:
            if judged_anomalous:  # judged by the bank's (or the cold start's) thresholds: never a default
                return
            st.tta.set_ceiling(self.settings.admit_max_image_score)
        else:
            st.tta.set_ceiling(admission_ceiling(self.inspector, line))
        st.tta.observe(frame_id, raw.tokens, raw.score, timestamp, score_seconds=score_seconds,
                       input_hw=raw.input_hw, image=raw.image)
        if self.telemetry is not None:
            self.telemetry.tta_buffer_frames.labels(line).set(len(st.tta.buffer))

    # -- refreshing -----------------------------------------------------------------------------
    def start(self, *, train: bool = True) -> AdapterService:
        """Run the service thread. `train=False` only follows the registry (`anoclip serve`): it buffers
        nothing, so it never trains nor answers refresh requests; the workers do."""
        self._train = train
        self._start_thread("adapter-trainer" if train else "adapter-follower", self._loop)
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.trainer_poll_s):
            for line in list(self.lines):
                try:
                    self.sync(line)
                    if self._train and self.settings.mode == "buffered":
                        self._maybe_refresh(line)
                except Exception:  # Redis down or a bug: the trainer must never take the worker down
                    log.exception("line %s: adapter service step failed", line)

    def _collect_requests(self, st: _LineState) -> None:
        line = st.tta.line_id
        if st.seen_request is None:
            st.seen_request = self.registry.last_request_id(line)
        for entry_id, fields in self.registry.refresh_requests(line, st.seen_request):
            st.seen_request = entry_id
            st.pending[fields["request_id"]] = float(fields.get("ts", time.time()))
        for rid in list(st.pending):
            if self.registry.wait_outcome(line, rid, 0) is not None:
                del st.pending[rid]  # another worker answered it

    def _maybe_refresh(self, line: str) -> None:
        st = self.lines[line]
        self._collect_requests(st)
        s = self.settings
        enough = len(st.tta.buffer) >= s.min_frames
        interval_due = (
            s.refresh_interval_s is not None and enough and time.monotonic() - st.last_refresh >= s.refresh_interval_s
        )
        requested = bool(st.pending)
        if requested and not enough and time.time() - min(st.pending.values()) < s.request_grace_s:
            return  # let a worker that holds this line's frames answer first
        if not (st.tta.due or interval_due or requested):
            return
        lock = RefreshLock(self.registry.client, self.registry.keys, line, self.worker_id, s.lock_ttl_s)
        if not lock.acquire():
            return  # another worker is training (or answering) for this line
        try:
            if requested:
                self._collect_requests(st)  # answered while we waited for the lock? then not again
                if not (st.pending or st.tta.due or interval_due):
                    return
            if self.registry.is_paused(line):
                # Only the lock holder answers, so a request gets exactly one answer.
                for rid in list(st.pending):
                    self.registry.record(line, "refuse", actor=self.worker_id, reason="line is paused",
                                         request_id=rid)
                st.pending.clear()
                st.last_refresh = time.monotonic()
                return
            self.refresh(line, lock, list(st.pending))
        finally:
            lock.release()

    def refresh(self, line: str, lock: RefreshLock | None = None, request_ids: list[str] | None = None) -> dict:
        """Train, gate and publish (or refuse) one candidate for `line`; answers `request_ids`."""
        st = self.lines[line]
        base_version = st.serving[1]
        last_renew = [time.monotonic()]
        share = self.settings.train_share
        step_started = [time.perf_counter()]

        def progress(step: int, loss: float) -> None:
            # Duty cycle: after a step that took t, rest t * (1 - share) / share, so training takes at
            # most `train_share` of the cores while scoring goes on (both share the same torch threads).
            busy = time.perf_counter() - step_started[0]
            if share < 1:
                self._stop.wait(busy * (1 - share) / share)
            if self._stop.is_set():
                raise RuntimeError("worker stopping")
            if lock is not None and time.monotonic() - last_renew[0] > lock.ttl_ms / 3000:
                if not lock.renew():
                    raise RuntimeError("trainer lock lost during training")
                last_renew[0] = time.monotonic()
            step_started[0] = time.perf_counter()

        st.last_refresh = time.monotonic()
        rids = request_ids or []
        budget = st.tta.refresh_budget(True)
        # The budget is training time; with the rests in between, the wall-clock limit is 1/share longer.
        budget = BufferedBudget(budget.max_steps, budget.max_seconds / share, budget.batch_tokens)
        self._load_labels(st)
        try:
            adapter, report = st.tta.train_candidate(progress, budget=budget)
        except RuntimeError as e:
            self._count(line, "abandoned")
            log.warning("line %s: refresh abandoned: %s", line, e)
            return {"action": "abandoned", "reason": str(e)}
        figures = report_figures(report)
        if adapter is None or not report.accepted:
            candidate = Candidate(None, {}, "; ".join(report.reasons) or "refused", refusal_audit={"report": figures})
        else:
            meta = build_meta(adapter, self.targets[line],
                              training_window=report.extra.get("training_window"), validation=report.validation,
                              training=TrainingMeta.from_report(report), thresholds=report.thresholds)
            candidate = Candidate(to_bytes(adapter, meta), meta, report.summary(),
                                  audit={"admission": figures["admission"], "positives": figures["positives"]})
        outcome = settle(self.registry, line, candidate, owner=self.worker_id, base_version=base_version,
                         request_ids=rids)
        self._forget(st, rids)
        if not outcome.promoted:
            self._count(line, "refused")
            log.info("line %s: candidate adapter refused: %s", line, outcome.reason)
            return {"action": "refuse", "reason": outcome.reason}
        self._count(line, "promoted")
        self.sync(line)
        log.info("line %s: promoted adapter %s (%s)", line, outcome.version, report.summary())
        return {"action": "promote", "version": outcome.version}

    def _load_labels(self, st: _LineState) -> None:
        """Hand the line's newest operator labels to its gate (kept as they were when Redis cannot answer)."""
        tta = st.tta
        limit = self.settings.gate_max_labelled if tta.score_fn is not None else 0
        try:
            frames = operator_frames(self.labels, tta.line_id, limit, st.labels, tta.to_input)
        except redis.RedisError as e:
            log.warning("line %s: operator labels unavailable, the gate uses the last ones read: %s", tta.line_id, e)
            return
        tta.set_operator_frames(frames)

    @staticmethod
    def _forget(st: _LineState, rids: list[str]) -> None:
        for rid in rids:
            st.pending.pop(rid, None)

    def _count(self, line: str, outcome: str) -> None:
        if self.telemetry is not None:
            self.telemetry.tta_runs.labels(line, outcome).inc()
