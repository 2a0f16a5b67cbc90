"""The one verdict path: given a line and frames, what is served now (adapter, memory bank, thresholds) and
what the verdict on each frame is.

The worker's scorer thread, `anoclip serve`'s batcher, `anoclip score` and the Python API all call
`Inspector.inspect_frames` / `inspect`; nothing else combines scores and thresholds, so a frame gets the same
score, verdict and mask wherever it is judged. What differs between them is only what they are handed:

* `adapters`: a lookup line -> (adapter, version) (a worker's `AdapterService`, a follower of the registry, or
  nothing: the base model). A fixed adapter (an adapter file) is passed per call.
* `memory`: the `MemoryService` of the `memory: stream` lines (a worker's own, which admits and builds, or a
  follow-only one that scores with the registry's current bank).
* `published`: where the line's thresholds come from. A worker calibrates them on its warm-up frames and
  publishes them; a follower (`PublishedThresholds`) reads what the workers published (calibration and the
  operator's override) and never calibrates on the frames it is given.

Every score leaves this path on one scale, the anomaly score from 0 to 1 (`pipeline.inspection.score_scale`):
the memory's fused z scores and its banks' thresholds are mapped onto it before judging.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.adaptation.memory.service import threshold_key
from pipeline.inspection.frame_scorer import FrameScorer, Inspection, RawScore
from pipeline.inspection.render import bounded_size
from pipeline.inspection.thresholds import LineThresholds, ThresholdView

if TYPE_CHECKING:
    from pipeline.adaptation.memory.service import MemoryService
    from pipeline.model import TokenAdapter
    from pipeline.settings import LineSettings, Settings
    from pipeline.verdicts.following import Following

FOLLOW_MODES = ("auto", "always", "never")
"""`Inspector.from_settings(follow=...)`: follow the line's workers through Redis when it answers, always, never."""

AdapterLookup = Callable[[str], tuple[Any, "str | None"]]
"""line -> (adapter, version) to score it with; (None, None): the base model (`AdapterService.adapter_for`)."""


class ThresholdSource(Protocol):
    """Keeps a line's thresholds in step with what its workers published (`following.PublishedThresholds`)."""

    def sync(self, line: str, thresholds: LineThresholds) -> None: ...


@dataclass(frozen=True)
class Served:
    """What a line's next frames are scored and judged with."""

    line: str
    adapter_version: str | None
    """The adapter (a registry version, `file-<id>`, `per_frame`) or None: the base model."""
    bank_version: str | None
    """The memory bank (None: no memory, or its cold start when `memory` is True)."""
    memory: bool
    thresholds: ThresholdView


@dataclass
class Verdict:
    """One frame through the path: the judged inspection and the model's raw view of it (the TTA buffer and the
    memory admit from the raw view)."""

    inspection: Inspection
    raw: RawScore


class Inspector:
    """Scores and judges frames of a line with what the line is served now; see the module docstring."""

    def __init__(self, scorer: FrameScorer, *, adapters: AdapterLookup | None = None,
                 memory: MemoryService | None = None, published: ThresholdSource | None = None,
                 render_max_side: int | None = None, tta: str | None = None,
                 following: Following | None = None, calibrate: bool | None = None) -> None:
        """`render_max_side`: judge maps at a bounded size (workers and serve: the map comes from a grid of a few
        hundred pixels) instead of the frame's own. `tta`: `per_frame` adapts a fresh adapter per frame (default:
        the config's `tta.mode` when it is `per_frame`). `calibrate`: frames judged by the line's own thresholds
        feed their warm-up calibration (default: only without `published`; never for evaluation frames)."""
        self.scorer = scorer
        self.adapters = adapters
        self.memory = memory
        self.published = published
        self.render_max_side = render_max_side
        self.tta = tta if tta is not None else ("per_frame" if scorer.settings.tta.mode == "per_frame" else None)
        self.following = following
        self.calibrate = published is None if calibrate is None else calibrate

    @classmethod
    def from_settings(cls, settings: Settings, *, follow: str = "auto") -> Inspector:
        """Load the model and, by `follow`, what the line's workers serve:

        * `auto` (default): follow the workers' Redis (adapters, banks, published thresholds) when it answers;
          without it, zero-shot lines are judged with the config's thresholds and a `memory: stream` line fails
          with `NoBankError` (its verdicts need its bank);
        * `always`: as auto, but an unreachable Redis is an error;
        * `never`: the base model and the config's thresholds (calibrated on the first frames given).
        """
        if follow not in FOLLOW_MODES:
            raise ValueError(f"follow must be one of {', '.join(FOLLOW_MODES)}, got {follow!r}")
        from pipeline.inspection.runtimes import build_model  # precision per CPU, exported runtimes

        scorer = FrameScorer(settings, build_model(settings.model))
        if follow == "never":
            return cls(scorer)
        from pipeline.verdicts.following import start_following

        return cls.over(scorer, start_following(settings, scorer, required=follow == "always"))

    @classmethod
    def over(cls, scorer: FrameScorer, following: Following, *, render_max_side: int | None = None) -> Inspector:
        """The path of a follower: what `following` follows, thresholds as the workers published them."""
        return cls(scorer, adapters=following.adapters.adapter_for if following.adapters is not None else None,
                   memory=following.memory, published=following.published, render_max_side=render_max_side,
                   following=following)

    def close(self) -> None:
        """Stop following the registry (threads of `from_settings`)."""
        if self.following is not None:
            self.following.stop()

    def __enter__(self) -> Inspector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the scorer holds, for callers that only need the model's view ------------------------------
    @property
    def settings(self) -> Settings:
        return self.scorer.settings

    @property
    def model(self) -> Any:
        return self.scorer.model

    def line(self, line_id: str) -> LineSettings:
        return self.scorer.line(line_id)

    def prepare_line(self, line_id: str) -> Any:
        return self.scorer.prepare_line(line_id)

    def thresholds(self, line_id: str) -> LineThresholds:
        return self.scorer.thresholds(line_id)

    def score_raw(self, line_id: str, images: list[np.ndarray], adapter: TokenAdapter | None = None,
                  tta: str | None = None, hidden_layers: tuple[int, ...] = ()) -> list[RawScore]:
        """The model's view only (no memory, no thresholds): `FrameScorer.score_raw`."""
        return self.scorer.score_raw(line_id, images, adapter, tta, hidden_layers)

    # -- the path ------------------------------------------------------------------------------------
    def _memory_for(self, line: str) -> MemoryService | None:
        return self.memory if self.memory is not None and self.memory.serves(line) else None

    def _tta(self, tta: str | None) -> str | None:
        tta = tta if tta is not None else self.tta
        return None if tta == "off" else tta

    def _serving(self, line: str, tta: str | None, adapter: TokenAdapter | None = None,
                 adapter_version: str | None = None) -> tuple[Any, str | None, MemoryService | None, LineThresholds]:
        """(adapter, its version, the line's memory or None, its thresholds) for the line's next frames, the
        published thresholds brought in step: one read of each per call, so every frame of it is scored and judged
        with the same versions. A fixed `adapter` (an adapter file) stands instead of the line's served one."""
        if adapter is None and tta != "per_frame" and self.adapters is not None:
            adapter, adapter_version = self.adapters(line)
        if tta == "per_frame":
            adapter_version = "per_frame"
        th = self.scorer.thresholds(line)
        if self.published is not None:
            self.published.sync(line, th)
        return adapter, adapter_version, self._memory_for(line), th

    def served(self, line: str) -> Served:
        """What the line's next frames are scored and judged with."""
        self.scorer.line(line)  # an unknown line fails here, naming the configured ones
        _, version, memory, th = self._serving(line, self._tta(None))
        if memory is not None:
            bank = memory.following(line)
            return Served(line, version, bank, True, th.view(threshold_key(bank)))
        return Served(line, version, None, False, th.view(version))

    def inspect_frames(self, line: str, images: list[np.ndarray], frame_ids: list[str] | None = None, *,
                       adapter: TokenAdapter | None = None, adapter_version: str | None = None,
                       tta: str | None = None) -> list[Verdict]:
        """Score and judge frames of one line, in order. `frame_ids` name them for the memory (a frame seen
        again is not admitted twice); `adapter`/`adapter_version` fix the adapter for this call (an adapter
        file) instead of the line's served one; `tta` overrides the path's per-frame TTA choice."""
        tta = self._tta(tta)
        adapter, adapter_version, memory, _ = self._serving(line, tta, adapter, adapter_version)
        raws = self.scorer.score_raw(line, images, adapter, tta,
                                     hidden_layers=memory.hidden_layers if memory is not None else ())
        if memory is not None:
            ids = list(frame_ids) if frame_ids is not None else [f"{line}.{time.time_ns()}.{i}"
                                                                 for i in range(len(raws))]
            judged = [(o.raw, o.threshold_key, o.bank_version) for o in memory.score(line, raws, ids)]
        else:
            judged = [(r, adapter_version, None) for r in raws]
        out = []
        for raw, (r, key, bank) in zip(raws, judged, strict=True):
            if self.render_max_side is not None:
                r = dataclasses.replace(r, frame_hw=bounded_size(*r.frame_hw, self.render_max_side))
            insp = self.scorer.judge(line, r, key, calibrate=self.calibrate)
            out.append(Verdict(dataclasses.replace(insp, adapter_version=adapter_version, bank_version=bank), raw))
        return out

    def inspect(self, line: str, images: list[np.ndarray], frame_ids: list[str] | None = None, *,
                adapter: TokenAdapter | None = None, adapter_version: str | None = None,
                tta: str | None = None) -> list[Inspection]:
        """`inspect_frames`, the inspections only."""
        return [v.inspection for v in self.inspect_frames(line, images, frame_ids, adapter=adapter,
                                                          adapter_version=adapter_version, tta=tta)]
