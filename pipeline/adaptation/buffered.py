"""TTA around the Inspector: one line's buffered-TTA state, stream replay, and the eval harness's scorers.

* `BufferedTTA` — what the streaming worker keeps per line: the token buffer (with admission), the
  serving adapter and the refresh policy. `observe` after scoring a frame; when `due`, call
  `train_candidate` (safe off the poll thread: it works on a snapshot) and `promote` an accepted one
  (or publish it to the registry, which promotes).
* `replay_buffered` — run a finite stream through exactly that logic, causally: each frame is scored
  with the adapter trained on frames before it.
* `eval_scorer(mode, inspector, settings)` — what `pipeline.evaluation.loop.make_scorer` calls:
  `per_frame` and `buffered` scorers with `begin_class` / `score` / `end_class`.

Pure torch TTA lives in `pipeline.model.self_training`; this module only wires it to lines and settings.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pipeline.adaptation.adapter_files import adapter_id
from pipeline.adaptation.token_buffer import TokenBuffer
from pipeline.inspection.inspector import Inspector, RawScore
from pipeline.model.adapters import ResidualAdapter
from pipeline.model.self_training import (
    Admission,
    AdmissionRule,
    BufferedBudget,
    GateRule,
    TrainingReport,
    TTAParams,
    patch_scores,
    refresh_adapter,
)
from pipeline.model.text import TextFeatures
from pipeline.settings import Settings, TTASettings


def admission_ceiling(inspector: Inspector, line_id: str) -> float | None:
    """The absolute image-score ceiling for admission: the configured one, else the line's image
    threshold once it is configured or calibrated (a frame the line would call anomalous never enters)."""
    cfg = inspector.settings.tta.admit_max_image_score
    if cfg is not None:
        return cfg
    th = inspector.thresholds(line_id)
    return th.image if th.source != "default" else None


class BufferedTTA:
    """Buffered TTA state of one line: token buffer, serving adapter, refresh policy."""

    def __init__(
        self,
        line_id: str,
        text: TextFeatures,
        kind: str,
        settings: TTASettings,
        *,
        temperature: float = 1.0,
        max_image_score: float | None = None,
    ) -> None:
        self.line_id = line_id
        self.text = text
        self.kind = kind
        self.settings = settings
        self.temperature = temperature
        self.params = TTAParams.from_settings(settings)
        self.budget = BufferedBudget.from_settings(settings)
        self.gate = GateRule.from_settings(settings)
        self.buffer = TokenBuffer(
            line_id,
            AdmissionRule.from_settings(settings, max_image_score),
            max_frames=settings.buffer_frames,
            max_bytes=settings.buffer_bytes,
        )
        self.current: ResidualAdapter | None = None
        self.version: str | None = None
        self.reports: deque[TrainingReport] = deque(maxlen=100)
        """The most recent refresh reports (bounded: a stream runs for months)."""
        self._since_refresh = 0
        self._scoring_seconds = 0.0
        self._lock = threading.Lock()

    @classmethod
    def for_line(cls, inspector: Inspector, line_id: str) -> BufferedTTA:
        """State for a line as the Inspector serves it (its text features, adapter kind, thresholds)."""
        return cls(
            line_id,
            inspector.prepare_line(line_id),
            inspector.line(line_id).adapter_kind,
            inspector.settings.tta,
            temperature=inspector.model.temperature,
            max_image_score=admission_ceiling(inspector, line_id),
        )

    def set_ceiling(self, max_image_score: float | None) -> None:
        """Update the absolute admission ceiling (e.g. once the line's threshold is calibrated)."""
        r = self.buffer.rule
        self.buffer.rule = AdmissionRule(max_image_score, r.image_z, r.patch_z, r.max_abnormal_share)

    def observe(
        self,
        frame_id: str,
        tokens: torch.Tensor,
        image_score: float,
        timestamp: float | None = None,
        score_seconds: float | None = None,
    ) -> Admission:
        """Offer a scored frame's raw tokens (`RawScore.tokens`) to the buffer; judged with the base model.

        `score_seconds`: what scoring this frame cost; the next refresh trains at most `train_share` of
        the sum (plus the absolute `train_seconds` cap). Without it only `train_seconds` applies.
        """
        scores = patch_scores(tokens, self.text, None, self.temperature)
        decision = self.buffer.offer(frame_id, tokens, image_score, scores, timestamp)
        with self._lock:
            self._since_refresh += 1
            self._scoring_seconds += float(score_seconds or 0.0)
        return decision

    def refresh_budget(self, timed: bool = True) -> BufferedBudget:
        """The budget a refresh started now gets: steps, and the smaller of the two time limits.

        `timed=False` drops the time limits, so the refresh runs its full step budget and is
        deterministic (replay and evaluation); a live stream keeps them so training never starves it.
        """
        if not timed:
            return BufferedBudget(self.budget.max_steps, math.inf, self.budget.batch_tokens)
        seconds = self.settings.train_seconds
        if self._scoring_seconds > 0:
            seconds = min(seconds, self.settings.train_share * self._scoring_seconds)
        return BufferedBudget(self.budget.max_steps, seconds, self.budget.batch_tokens)

    @property
    def since_refresh(self) -> int:
        """Frames offered since the last refresh (or since the start)."""
        return self._since_refresh

    @property
    def due(self) -> bool:
        """A refresh is due: `refresh_every` frames offered since the last one and enough admitted."""
        return self._since_refresh >= self.settings.refresh_every and len(self.buffer) >= self.settings.min_frames

    def train_candidate(
        self,
        progress: Callable[[int, float], None] | None = None,
        timed: bool = True,
        budget: BufferedBudget | None = None,
    ) -> tuple[ResidualAdapter | None, TrainingReport]:
        """Train and gate a candidate on a snapshot of the buffer (`budget`, default `refresh_budget(timed)`);
        does not promote it."""
        budget = budget or self.refresh_budget(timed)
        with self._lock:
            self._since_refresh = 0
            self._scoring_seconds = 0.0
        admission = self.buffer.stats()
        frames, window = None, self.buffer.window()
        if len(self.buffer):
            frames, window = self.buffer.snapshot_with_window(self.text.class_embeddings.device)
        if frames is None:
            adapter, report = refresh_adapter_empty(self.kind, self.params, budget, self.gate)
        else:
            adapter, report = refresh_adapter(
                frames, self.text, self.kind, self.params, budget, self.gate,
                holdout=self.settings.holdout, min_frames=self.settings.min_frames,
                temperature=self.temperature, progress=progress,
            )
        report.extra.update(line=self.line_id, training_window=window, admission=admission,
                            base_version=self.version)
        if adapter is not None:
            report.extra["candidate_id"] = adapter_id(adapter)
        self.reports.append(report)
        return adapter, report

    def promote(self, adapter: ResidualAdapter, version: str | None = None) -> str:
        """Serve `adapter` from now on (call only for accepted candidates)."""
        with self._lock:
            self.current = adapter
            self.version = version or f"local-{adapter_id(adapter)}"
            return self.version

    def serve(self, adapter: ResidualAdapter | None, version: str | None) -> None:
        """Serve a version loaded from elsewhere (the registry); None goes back to the base model."""
        with self._lock:
            self.current, self.version = adapter, version

    def refresh(self, progress: Callable[[int, float], None] | None = None, timed: bool = True) -> TrainingReport:
        """Train, gate and, if accepted, promote locally (single-process use: replay, eval, CLI)."""
        adapter, report = self.train_candidate(progress, timed)
        if adapter is not None and report.accepted:
            report.extra["version"] = self.promote(adapter)
        return report


def refresh_adapter_empty(
    kind: str, params: TTAParams, budget: BufferedBudget, gate: GateRule
) -> tuple[None, TrainingReport]:
    """The report of a refresh with nothing buffered."""
    return None, TrainingReport(
        kind=kind, accepted=False, reasons=["no admitted frames"], steps=0, seconds=0.0, gate_seconds=0.0,
        stopped_by="", losses=[], loss_parts={}, frames_train=0, frames_val=0, tokens_train=0, tokens_masked=0,
        tokens_seen=0, validation={}, params=asdict(params), budget=asdict(budget), gate=asdict(gate),
    )


def _score_seconds(raw: RawScore) -> float:
    return sum(raw.timings.values()) / 1e3


@dataclass
class ReplayStep:
    raw: RawScore
    """The frame as scored with the adapter serving at that moment (tokens are raw, pre-adapter)."""
    adapter_version: str | None
    admission: Admission
    refresh: TrainingReport | None
    """Set on the frame after which a refresh ran."""


def replay_buffered(
    inspector: Inspector,
    line_id: str,
    images: Iterable[np.ndarray],
    *,
    refresh_every: int | None = None,
    state: BufferedTTA | None = None,
    timed: bool = False,
) -> Iterator[ReplayStep]:
    """Replay a stream of frames through buffered TTA, causally, in batches of the model's batch size.

    Each frame is scored with the adapter serving when its batch starts (trained only on earlier frames),
    then offered to the buffer; a refresh runs after the batch in which it fell due, synchronously.
    By default refreshes run their full step budget (deterministic); `timed=True` applies the stream's
    time limits (`train_seconds`, `train_share` of the scoring time).
    """
    st = state or BufferedTTA.for_line(inspector, line_id)
    if refresh_every is not None:
        st.settings = st.settings.model_copy(update={"refresh_every": refresh_every})
    every = st.settings.refresh_every
    batch_size = inspector.settings.model.batch_size
    pending: list[np.ndarray] = []
    n = 0

    def run(batch: list[np.ndarray]) -> Iterator[ReplayStep]:
        nonlocal n
        version = st.version
        raws = inspector.score_raw(line_id, batch, adapter=st.current)
        steps = []
        for raw in raws:
            admission = st.observe(f"replay-{n}", raw.tokens, raw.score, score_seconds=_score_seconds(raw))
            steps.append(ReplayStep(raw, version, admission, None))
            n += 1
        if st.due:
            steps[-1].refresh = st.refresh(timed=timed)
        yield from steps

    for img in images:
        pending.append(img)
        # end a batch at the refresh point, so a refresh happens right after the frame that made it due
        if len(pending) >= batch_size or st.since_refresh + len(pending) == every:
            yield from run(pending)
            pending = []
    if pending:
        yield from run(pending)


# ------------------------------------------------------------------------------------------------
# eval harness hook (pipeline.evaluation.loop.make_scorer)
# ------------------------------------------------------------------------------------------------
class PerFrameScorer:
    """`--tta per_frame`: every frame's map from its own fresh adapter; nothing carries between frames."""

    name = "per_frame"

    def __init__(self, inspector: Inspector) -> None:
        self.inspector = inspector

    def begin_class(self, line_id: str) -> None:
        self.inspector.prepare_line(line_id)

    def score(self, line_id: str, images: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        return [(r.score, r.anomaly_map.numpy()) for r in self.inspector.score_raw(line_id, images, tta="per_frame")]

    def end_class(self, line_id: str) -> None:
        return None


class BufferedScorer:
    """`--tta buffered`: a fresh `BufferedTTA` per class, fed the class's frames in stream order."""

    name = "buffered"

    def __init__(self, inspector: Inspector) -> None:
        self.inspector = inspector
        self.state: BufferedTTA | None = None
        self.reports: dict[str, list[TrainingReport]] = {}
        self._n = 0

    def begin_class(self, line_id: str) -> None:
        self.state = BufferedTTA.for_line(self.inspector, line_id)
        self._n = 0

    def score(self, line_id: str, images: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        st = self.state
        if st is None or st.line_id != line_id:
            self.begin_class(line_id)
            st = self.state
        assert st is not None
        raws = self.inspector.score_raw(line_id, images, adapter=st.current)
        for raw in raws:
            st.observe(f"{line_id}-{self._n}", raw.tokens, raw.score, time.time(), _score_seconds(raw))
            self._n += 1
        if st.due:
            st.refresh(timed=False)  # the full step budget: evaluation results must not depend on host load
        return [(r.score, r.anomaly_map.numpy()) for r in raws]

    def end_class(self, line_id: str) -> None:
        if self.state is not None:
            self.reports[line_id] = list(self.state.reports)
        self.state = None


def eval_scorer(mode: str, inspector: Inspector, settings: Settings | None = None) -> PerFrameScorer | BufferedScorer:
    """The evaluation scorer for a TTA mode ('per_frame' or 'buffered'); settings come from the inspector."""
    if mode == "per_frame":
        return PerFrameScorer(inspector)
    if mode == "buffered":
        return BufferedScorer(inspector)
    raise ValueError(f"no TTA scorer for mode {mode!r} (per_frame | buffered)")


def report_figures(report: TrainingReport) -> dict[str, Any]:
    """A short dict for logs and audit entries."""
    return {"accepted": report.accepted, "reasons": report.reasons, "steps": report.steps,
            "seconds": round(report.seconds, 3), "validation": report.validation}
