"""The eval harness's TTA scorers (what `pipeline.evaluation.loop.make_scorer` calls): `eval_scorer(mode,
inspector, settings)` gives the `per_frame` and `buffered` scorers with `begin_class` / `score` / `end_class`.

The buffered one runs `pipeline.adaptation.tta.buffered.BufferedTTA` over a class's frames, scales its
refresh cadence to the class (`expect_frames`), reports its refreshes per class (`adaptation`) and raises
`BufferedTTAError` when none ran, so a report never claims an adaptation that did not happen.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from pipeline.adaptation.tta.buffered import BufferedTTA, BufferedTTAError, score_seconds
from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.model.tta_train import TrainingReport
from pipeline.settings import Settings, TTASettings


class PerFrameScorer:
    """`--tta per_frame`: every frame's map from its own fresh adapter; nothing carries between frames."""

    name = "per_frame"

    def __init__(self, inspector: FrameScorer) -> None:
        self.inspector = inspector

    def begin_class(self, line_id: str) -> None:
        self.inspector.prepare_line(line_id)

    def score(self, line_id: str, images: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        return [(r.score, r.anomaly_map.numpy()) for r in self.inspector.score_raw(line_id, images, tta="per_frame")]

    def end_class(self, line_id: str) -> None:
        return None


EVAL_REFRESHES = 3
"""Refreshes an evaluation plans per class: after 1/4, 1/2 and 3/4 of its frames (never after the last)."""
EVAL_MIN_FRAMES = 4
"""The fewest admitted frames an evaluation refresh trains on (3 to train, 1 held out)."""


def eval_schedule(n_frames: int, settings: TTASettings) -> tuple[int, int]:
    """(refresh_every, min_frames) for a class of `n_frames`: dataset classes hold 40-500 frames, far fewer
    than a stream's defaults (500 between refreshes, 50 admitted), which would never refresh there.

    refresh_every = min(tta.refresh_every, ceil(n / (EVAL_REFRESHES + 1))): refreshes after each quarter;
    min_frames = min(tta.min_frames, max(EVAL_MIN_FRAMES, refresh_every // 2)).
    """
    every = min(settings.refresh_every, max(1, math.ceil(n_frames / (EVAL_REFRESHES + 1))))
    return every, min(settings.min_frames, max(EVAL_MIN_FRAMES, every // 2))


class BufferedScorer:
    """`--tta buffered`: a fresh `BufferedTTA` per class, fed the class's frames in stream order, causally.

    The refresh cadence is scaled to the class (`expect_frames`, see `eval_schedule`); a refresh runs right
    after the frame that made it due, and the maps of the batch's later frames are rebuilt from their
    (pre-adapter) tokens with what it promoted, so batches, and image scores, stay those of `--tta off`.
    `adaptation[line]` says what happened per class (refreshes, promotions, reasons, schedule, admission);
    `end_class` raises `BufferedTTAError` when no refresh ran, so a report never claims an adaptation that
    did not happen.
    """

    name = "buffered"

    def __init__(self, inspector: FrameScorer) -> None:
        self.inspector = inspector
        self.state: BufferedTTA | None = None
        self.reports: dict[str, list[TrainingReport]] = {}
        self.adaptation: dict[str, dict[str, Any]] = {}
        self._n = 0
        self._expected: int | None = None
        self._refreshed_after: list[int] = []

    def begin_class(self, line_id: str) -> None:
        self.state = BufferedTTA.for_line(self.inspector, line_id)
        self._n = 0
        self._expected = None
        self._refreshed_after = []

    def expect_frames(self, line_id: str, n_frames: int) -> None:
        """The class's size, known before its first frame: scale the refresh cadence to it."""
        if self.state is None or self.state.line_id != line_id:
            self.begin_class(line_id)
        assert self.state is not None
        every, min_frames = eval_schedule(n_frames, self.state.settings)
        self.state.settings = self.state.settings.model_copy(update={"refresh_every": every, "min_frames": min_frames})
        self._expected = n_frames

    def score(self, line_id: str, images: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        st = self.state
        if st is None or st.line_id != line_id:
            self.begin_class(line_id)
            st = self.state
        assert st is not None
        raws = self.inspector.score_raw(line_id, images, adapter=st.current)
        version = st.version
        out: list[tuple[float, np.ndarray]] = []
        for raw in raws:
            amap = raw.anomaly_map
            if st.version != version:  # promoted mid-batch: this frame's map comes from the new adapter
                assert st.map_fn is not None
                amap = st.map_fn(raw.tokens, raw.input_hw, st.current).cpu()
            out.append((raw.score, amap.numpy()))
            st.observe(f"{line_id}-{self._n}", raw.tokens, raw.score, time.time(), score_seconds(raw),
                       input_hw=raw.input_hw, image=raw.image)
            self._n += 1
            frames_left = self._expected is None or self._n < self._expected
            if st.due and frames_left:
                st.refresh(timed=False)  # the full step budget: evaluation results must not depend on host load
                self._refreshed_after.append(self._n)
        return out

    def end_class(self, line_id: str) -> None:
        st = self.state
        self.state = None
        if st is None:
            return
        reports = list(st.reports)
        self.reports[line_id] = reports
        stats = st.buffer.stats()
        summary = {
            "mode": "buffered",
            "refreshes": len(reports),
            "promoted": sum(r.accepted for r in reports),
            "refused": sum(not r.accepted for r in reports),
            "outcomes": [
                {"after_frame": n, "accepted": r.accepted, "reasons": r.reasons, "steps": r.steps,
                 "frames_train": r.frames_train, "frames_val": r.frames_val,
                 "positives": r.extra.get("positives", {}),
                 **{k: r.validation[k] for k in ("pixel_auroc_candidate", "pixel_auroc_serving", "contrast_ratio")
                    if k in r.validation},
                 "thresholds": r.thresholds}
                for n, r in zip(self._refreshed_after, reports, strict=False)
            ],
            "schedule": {"frames": self._n, "refresh_every": st.settings.refresh_every,
                         "min_frames": st.settings.min_frames},
            "admission": stats,
        }
        self.adaptation[line_id] = summary
        if not reports:
            raise BufferedTTAError(
                f"buffered TTA on line {line_id!r}: no refresh ran ({self._n} frames offered, "
                f"{stats.get('admitted', 0)} admitted; a refresh needs {st.settings.min_frames} admitted frames "
                f"and {st.settings.refresh_every} offered, with frames left to serve). The report would claim an "
                "adaptation that did not happen: evaluate with --tta off, or a larger class.")


def eval_scorer(mode: str, inspector: FrameScorer, settings: Settings | None = None) -> PerFrameScorer | BufferedScorer:
    """The evaluation scorer for a TTA mode ('per_frame' or 'buffered'); settings come from the inspector."""
    if mode == "per_frame":
        return PerFrameScorer(inspector)
    if mode == "buffered":
        return BufferedScorer(inspector)
    raise ValueError(f"no TTA scorer for mode {mode!r} (per_frame | buffered)")
