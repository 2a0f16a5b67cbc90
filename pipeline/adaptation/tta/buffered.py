"""TTA around the FrameScorer: one line's buffered-TTA state and stream replay.

* `BufferedTTA` — what the streaming worker keeps per line: the token buffer (with admission), the
  serving adapter and the refresh policy. `observe` after scoring a frame; when `due`, call
  `train_candidate` (safe off the poll thread: it works on a snapshot) and `promote` an accepted one
  (or publish it to the registry, which promotes).
* `replay_buffered` — run a finite stream through exactly that logic, causally: each frame is scored
  with the adapter trained on frames before it.
* The eval harness's scorers (`eval_scorer`) build on `BufferedTTA`: `pipeline.adaptation.tta.eval_scorers`.

The gate's labelled frames are made here: synthetic defects (`pipeline.adaptation.synthetic`) pasted
into the newest held-out frames, plus operators' labels: confirmed defects with their mask (positives) and
false alarms (all-normal frames, whose pixels count as normal in the gate's AUROC and contrast, so a
candidate that raises them looks worse), all scored with the base model at each refresh. The worker's
`AdapterService` hands the newest labels from Redis to `set_operator_frames` before each refresh;
`add_known_defect` / `add_known_normal` add frames by hand (replay, evaluation, tests). Pure torch TTA lives
in `pipeline.model.tta_*` (`tta_train.refresh_adapter`, `tta_gate`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.adaptation.synthetic import paste_positives
from pipeline.adaptation.tta.files import adapter_id
from pipeline.adaptation.tta.token_buffer import TokenBuffer
from pipeline.errors import AnoclipError
from pipeline.inspection.frame_scorer import FrameScorer, RawScore
from pipeline.inspection.imaging import model_input_size
from pipeline.model.adapters import ResidualAdapter
from pipeline.model.text import TextFeatures
from pipeline.model.tta_admission import Admission
from pipeline.model.tta_gate import GateFrame
from pipeline.model.tta_params import AdmissionRule, BufferedBudget, GateRule, TTAParams
from pipeline.model.tta_scoring import MapFn, patch_scores
from pipeline.model.tta_train import TrainingReport, holdout_count, refresh_adapter
from pipeline.settings import TTASettings

ScoreFn = Callable[[list[np.ndarray]], list[RawScore]]
"""Score frames with the line's *base* model (no adapter): what the gate's positives are scored with."""

LABELLED_MAX = 64
"""Frames added by hand (`add_known_defect`, `add_known_normal`) a line keeps for its gate (oldest out first)."""
FALSE_ALARM_SOURCE = "false_alarm"
"""`GateFrame.source` of an operator's false alarm: a frame whose every pixel is labelled normal."""


class BufferedTTAError(AnoclipError):
    """Buffered TTA cannot do what was asked, e.g. an evaluation in which no refresh ran."""


def model_map_fn(inspector: FrameScorer, text: TextFeatures) -> MapFn:
    """A frame's map from its raw tokens exactly as the scorer builds it (`AnoCLIP.maps_from_tokens`)."""
    model = inspector.model

    def fn(tokens: torch.Tensor, hw: tuple[int, int] | None, adapter: Callable | None) -> torch.Tensor:
        t = tokens.to(text.class_embeddings.device, torch.float32)
        if t.ndim == 3:  # (n_layers, P, C): one tile
            t = t[None]
        if hw is None:
            if t.shape[0] != 1:
                raise ValueError(f"a frame of {t.shape[0]} tiles needs its input size to rebuild its map")
            hw = (model.image_size, model.image_size)
        with torch.no_grad():
            return model.maps_from_tokens(t[None], text, tuple(hw), adapter)[0]

    return fn


def input_resizer(inspector: FrameScorer) -> Callable[[np.ndarray], np.ndarray]:
    """Resize a frame to its model input size (what the buffer keeps for the gate's pasted defects)."""
    size, mode = inspector.model.image_size, inspector.settings.model.resize

    def fn(image: np.ndarray) -> np.ndarray:
        h, w = model_input_size(image.shape[0], image.shape[1], size, mode)
        if (h, w) == image.shape[:2]:
            return np.ascontiguousarray(image)
        return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    return fn


def _mask_to(mask: np.ndarray, hw: tuple[int, int]) -> torch.Tensor:
    m = np.asarray(mask, dtype=bool)
    if m.shape != hw:
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((hw[1], hw[0]), Image.NEAREST)) > 127
    return torch.from_numpy(np.ascontiguousarray(m))


def admission_ceiling(inspector: FrameScorer, line_id: str) -> float | None:
    """The absolute image-score ceiling for admission: the configured one, else the line's image
    threshold once it is configured or calibrated (a frame the line would call anomalous never enters)."""
    cfg = inspector.settings.tta.admit_max_image_score
    if cfg is not None:
        return cfg
    th = inspector.thresholds(line_id)
    return th.image if th.image_source != "default" else None


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
        score_fn: ScoreFn | None = None,
        map_fn: MapFn | None = None,
        to_input: Callable[[np.ndarray], np.ndarray] | None = None,
        quantiles: tuple[float, float] = (0.99, 0.999),
    ) -> None:
        """`score_fn` scores frames with the base model (for the gate's pasted positives; without it the gate
        judges on held-out frames only); `map_fn` rebuilds a frame's map from its tokens (default: token grid);
        `to_input` resizes a frame to its model input size; `quantiles`: (image, pixel) of the line's
        calibration, used for each candidate's own thresholds."""
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
            max_images=settings.gate_positives if score_fn is not None else 0,
        )
        self.score_fn = score_fn
        self.map_fn = map_fn
        self.to_input = to_input
        self.quantiles = quantiles
        self.labelled: deque[tuple[np.ndarray, np.ndarray, str]] = deque(maxlen=LABELLED_MAX)
        """Frames added by hand (image, defect mask, source) that join every refresh's gate."""
        self.operator: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
        """Operators' labelled frames by frame id (image, mask, source), replaced before each refresh
        (`set_operator_frames`), so a frame counts once however many refreshes it sees."""
        self.current: ResidualAdapter | None = None
        self.version: str | None = None
        self.thresholds: dict[str, Any] | None = None
        """The serving version's own thresholds (None: the base model's, i.e. the line's)."""
        self.reports: deque[TrainingReport] = deque(maxlen=100)
        """The most recent refresh reports (bounded: a stream runs for months)."""
        self._since_refresh = 0
        self._scoring_seconds = 0.0
        self._lock = threading.Lock()

    @classmethod
    def for_line(cls, inspector: FrameScorer, line_id: str) -> BufferedTTA:
        """State for a line as the FrameScorer serves it (its text features, adapter kind, thresholds), with
        the gate's positives scored by the FrameScorer's base model and maps built as the scorer builds them."""
        text = inspector.prepare_line(line_id)
        th = inspector.line(line_id).threshold
        return cls(
            line_id,
            text,
            inspector.line(line_id).adapter_kind,
            inspector.settings.tta,
            temperature=inspector.model.temperature,
            max_image_score=admission_ceiling(inspector, line_id),
            score_fn=lambda images: inspector.score_raw(line_id, images),
            map_fn=model_map_fn(inspector, text),
            to_input=input_resizer(inspector),
            quantiles=(th.quantile, th.pixel_quantile),
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
        *,
        input_hw: tuple[int, int] | None = None,
        image: np.ndarray | None = None,
    ) -> Admission:
        """Offer a scored frame's raw tokens (`RawScore.tokens`) to the buffer; judged with the base model.

        `score_seconds`: what scoring this frame cost; the next refresh trains at most `train_share` of
        the sum (plus the absolute `train_seconds` cap). Without it only `train_seconds` applies.
        `input_hw` (`RawScore.input_hw`) and `image` (the frame) let the gate rebuild maps and paste
        synthetic defects into the newest admitted frames.
        """
        scores = patch_scores(tokens, self.text, None, self.temperature)
        keep: np.ndarray | Callable[[], np.ndarray] | None = None
        if image is not None and self.buffer.max_images:
            resize = self.to_input
            keep = image if resize is None else (lambda: resize(image))  # resized only if admitted
        decision = self.buffer.offer(frame_id, tokens, image_score, scores, timestamp, input_hw=input_hw,
                                     image=keep)
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

    def add_known_defect(self, image: np.ndarray, mask: np.ndarray, source: str = "operator") -> None:
        """A frame with a confirmed defect and its mask joins the gate's labelled positives at every later
        refresh (scored with the base model then)."""
        self.labelled.append(_labelled_item(image, mask, source))

    def add_known_normal(self, image: np.ndarray, source: str = FALSE_ALARM_SOURCE) -> None:
        """A frame known to be normal (an operator's false alarm) joins every later refresh's gate: all its
        pixels count as normal, so a candidate that raises its scores loses pixel AUROC and contrast."""
        self.labelled.append(_labelled_item(image, None, source))

    def set_operator_frames(self, frames: Iterable[tuple[str, np.ndarray, np.ndarray | None]]) -> None:
        """Replace the operators' frames of the next refreshes: (frame id, image, defect mask), mask None for a
        false alarm. Replacing, not adding, keeps each frame once and follows relabels and deletions."""
        items = {fid: _labelled_item(image, mask, "operator" if mask is not None else FALSE_ALARM_SOURCE)
                 for fid, image, mask in frames}
        with self._lock:
            self.operator = items

    def make_positives(self, frame_ids: list[str], images: dict[str, np.ndarray]) -> list[GateFrame]:
        """The gate's labelled frames: a synthetic defect pasted into each held-out frame whose image is kept
        (newest `gate_positives`), plus the labelled frames (defects and false alarms), scored with the base
        model."""
        if self.score_fn is None:
            return []
        newest = [f for f in frame_ids if f in images][-self.settings.gate_positives :]
        pasted = [(a.image, a.mask, "synthetic")
                  for _, a in paste_positives([(f, images[f]) for f in newest], self.params.seed)]
        with self._lock:
            operator = list(self.operator.values())
        items = pasted + list(self.labelled) + operator
        if not items:
            return []
        raws = self.score_fn([im for im, _, _ in items])
        return [GateFrame(r.tokens, _mask_to(m, r.input_hw), src)
                for r, (_, m, src) in zip(raws, items, strict=True)]

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
            frames, window, ids, images = self.buffer.snapshot_full(self.text.class_embeddings.device)
        serving, base_version = self.current, self.version
        positives: list[GateFrame] = []
        if frames is None:
            adapter, report = refresh_adapter_empty(self.kind, self.params, budget, self.gate)
        else:
            t0 = time.perf_counter()
            if frames.n_frames >= max(2, self.settings.min_frames):
                val_ids = ids[len(ids) - holdout_count(len(ids), self.settings.holdout):]
                positives = self.make_positives(val_ids, images)
            positives_s = time.perf_counter() - t0
            adapter, report = refresh_adapter(
                frames, self.text, self.kind, self.params, budget, self.gate,
                holdout=self.settings.holdout, min_frames=self.settings.min_frames,
                temperature=self.temperature, progress=progress, serving=serving, positives=positives,
                map_fn=self.map_fn, quantiles=self.quantiles,
            )
            report.gate_seconds += positives_s
        report.extra.update(line=self.line_id, training_window=window, admission=admission,
                            base_version=base_version,
                            positives=positive_counts(positives))
        if adapter is not None:
            report.extra["candidate_id"] = adapter_id(adapter)
        self.reports.append(report)
        return adapter, report

    def promote(
        self, adapter: ResidualAdapter, version: str | None = None, thresholds: dict[str, Any] | None = None
    ) -> str:
        """Serve `adapter`, with its own `thresholds`, from now on (call only for accepted candidates)."""
        with self._lock:
            self.current = adapter
            self.version = version or f"local-{adapter_id(adapter)}"
            self.thresholds = thresholds
            return self.version

    def serve(
        self, adapter: ResidualAdapter | None, version: str | None, thresholds: dict[str, Any] | None = None
    ) -> None:
        """Serve a version loaded from elsewhere (the registry); None goes back to the base model."""
        with self._lock:
            self.current, self.version, self.thresholds = adapter, version, thresholds

    def refresh(self, progress: Callable[[int, float], None] | None = None, timed: bool = True) -> TrainingReport:
        """Train, gate and, if accepted, promote locally (single-process use: replay, eval, CLI)."""
        adapter, report = self.train_candidate(progress, timed)
        if adapter is not None and report.accepted:
            report.extra["version"] = self.promote(adapter, thresholds=report.thresholds or None)
        return report


def positive_counts(frames: Iterable[GateFrame]) -> dict[str, int]:
    """The gate's labelled frames by source: synthetic and operator-confirmed defects, false alarms."""
    n = Counter(f.source for f in frames)
    labelled = sum(v for k, v in n.items() if k not in ("synthetic", FALSE_ALARM_SOURCE))
    return {"synthetic": n["synthetic"], "operator": labelled, FALSE_ALARM_SOURCE: n[FALSE_ALARM_SOURCE]}


def _labelled_item(image: np.ndarray, mask: np.ndarray | None, source: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(image, bool mask, source) for the gate; a defect needs a non-empty mask, a normal frame (mask None) gets
    an empty one."""
    if image.ndim != 3:
        raise ValueError(f"a labelled frame needs an HxWx3 image, got {image.shape}")
    if mask is None:
        return image, np.zeros(image.shape[:2], bool), source
    if mask.shape != image.shape[:2]:
        raise ValueError(f"a labelled frame needs an HxWx3 image and an HxW mask, got {image.shape} and "
                         f"{mask.shape}")
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        raise ValueError("a labelled frame needs a non-empty defect mask")
    return image, m, source


def refresh_adapter_empty(
    kind: str, params: TTAParams, budget: BufferedBudget, gate: GateRule
) -> tuple[None, TrainingReport]:
    """The report of a refresh with nothing buffered."""
    return None, TrainingReport(
        kind=kind, accepted=False, reasons=["no admitted frames"], steps=0, seconds=0.0, gate_seconds=0.0,
        stopped_by="", losses=[], loss_parts={}, frames_train=0, frames_val=0, tokens_train=0, tokens_masked=0,
        tokens_seen=0, validation={}, params=asdict(params), budget=asdict(budget), gate=asdict(gate),
    )


def score_seconds(raw: RawScore) -> float:
    """The seconds scoring `raw` took (its timings are in ms)."""
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
    inspector: FrameScorer,
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
            admission = st.observe(f"replay-{n}", raw.tokens, raw.score, score_seconds=score_seconds(raw),
                                   input_hw=raw.input_hw, image=raw.image)
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


def report_figures(report: TrainingReport) -> dict[str, Any]:
    """A short dict for logs and audit entries: the gate's figures (held-out frames, labelled positives:
    the candidate's and the serving version's pixel AUROC and contrast), the candidate's own thresholds and
    the admission counts behind its buffer."""
    return {"accepted": report.accepted, "reasons": report.reasons, "steps": report.steps,
            "seconds": round(report.seconds, 3), "validation": report.validation, "thresholds": report.thresholds,
            "admission": report.extra.get("admission", {}), "positives": report.extra.get("positives", {})}
