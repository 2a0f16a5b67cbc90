"""The causal per-line logic a worker runs (`StreamMemory`): cold start by mutual scoring over the last frames,
admission of normal-looking patches (`admit_patches`), banks refreshed on a doubling schedule, built from a
`BuildJob` maybe on another thread. `replay_stream` runs a finite stream through it (what
`anoclip eval --memory stream` does); `bank_thresholds` calibrates a bank's alert thresholds on held-out frames.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.adaptation.memory.bank import MemoryBank, PatchRows, build_bank
from pipeline.adaptation.memory.params import MemoryParams, bank_target
from pipeline.adaptation.memory.records import FrameRecord, frame_record, kept_rows, score_frames
from pipeline.adaptation.memory.scoring import BankScorer, MemoryScore, score_mutual
from pipeline.adaptation.tta.buffered import input_resizer
from pipeline.inspection.frame_scorer import FrameScorer, RawScore
from pipeline.model.memory import fuse, greedy_coreset, nearest_distances, top_mean


@dataclass
class PatchAdmission:
    """What admission decided for one frame."""

    admitted: bool
    patches_kept: int
    abnormal_share: float
    reason: str


def admit_patches(patch_z: torch.Tensor | None, params: MemoryParams) -> tuple[torch.Tensor | None, PatchAdmission]:
    """Which patches of a scored frame may enter the bank.

    A patch is kept only if its memory z is below `admit_patch_z` and no patch of its 3x3 neighbourhood
    is above it (a defect's rim looks half normal); a frame with more than `admit_max_abnormal_share`
    patches above it adds nothing. A frame scored against nothing adds nothing either.
    """
    if patch_z is None:
        return None, PatchAdmission(False, 0, float("nan"), "no reference yet")
    high = patch_z >= params.admit_patch_z
    share = float(high.float().mean())
    if share > params.admit_max_abnormal_share:
        return None, PatchAdmission(False, 0, share, f"{share:.1%} of patches look abnormal")
    g = int(round(patch_z.shape[-1] ** 0.5))
    near = F.max_pool2d(high.float().reshape(-1, 1, g, g), 3, stride=1, padding=1).reshape(patch_z.shape) > 0
    keep = ~near
    n = int(keep.sum())
    if n == 0:
        return None, PatchAdmission(False, 0, share, "no patch clear of abnormal ones")
    return keep, PatchAdmission(True, n, share, "admitted")


@dataclass
class StreamStep:
    """One frame through the stream memory."""

    frame_id: str
    result: MemoryScore
    admission: PatchAdmission
    refreshed: MemoryBank | None
    """The bank built right after this frame (it scores only later frames), if a refresh ran."""
    window_ids: list[str]
    """The frames a mutual score compared with (empty when a bank scored the frame)."""


@dataclass
class BuildJob:
    """What the next bank is built from: taken from a `StreamMemory` at once, built later, maybe elsewhere."""

    records: list[FrameRecord]
    """The newest admitted frames (calibration)."""
    rows: PatchRows
    """The pending admitted patches."""
    cls_history: list[float]
    parent: MemoryBank | None
    frames: int
    """Admitted frames the rows come from."""
    holdout: list[HeldOut] = field(default_factory=list)
    """The gate's held-out frames: the newest admitted frames of the build, kept out of `rows` and `records`."""
    holdout_rows: PatchRows | None = None
    """Their admitted patches: they join the next build once this one is promoted (dropped if it is refused)."""
    window: list[FrameRecord] = field(default_factory=list)
    """The line's last frames at hand-over: the cold-start reference the gate compares a first bank with."""


@dataclass
class HeldOut:
    """An admitted frame held out of a build for its gate: its record and its image at model input size (None when
    the frame came without one; then it gives no pasted positive)."""

    record: FrameRecord
    image: np.ndarray | None


def bank_thresholds(bank: MemoryBank, records: Sequence[FrameRecord], params: MemoryParams, *,
                    quantile: float = 0.99, pixel_quantile: float = 0.999) -> dict[str, float]:
    """Thresholds in the fused z units for frames scored by `bank`, calibrated on held-out normal frames.

    Each of `records` (admitted frames, normally the bank's newest calibration frames) is scored as a new
    frame would be, against the bank without its own rows: the image threshold is the `quantile` of their fused
    image scores, the pixel threshold w x the `pixel_quantile` of their memory z plus (1 - w) x that of their
    zero-shot z (a sum of quantiles: at or above the fused map's). None of the frames' own patches answer for
    them, so the figures are held out. Only their admitted patches count: an admitted frame may still carry a
    spot admission refused (a recurring defect does, every time), and counting it as normal would raise the
    threshold over the very defect (measured: a stain in 30% of frames, 5.3-5.9 z, under an image threshold
    of 5.8 after three refreshes); the figures are then those of normal patches, the alerting side.
    """
    if not records:
        return {}
    w, s = params.fusion_weight, bank.scales
    index_of = {fid: i for i, fid in enumerate(bank.frames)}
    feats = bank.features.float()
    images, mem_z, zs_z = [], [], []
    for rec in records:
        own = index_of.get(rec.frame_id)
        mask = bank.origin != own if own is not None else torch.ones_like(bank.origin, dtype=torch.bool)
        if not bool(mask.any()):
            continue
        q = kept_rows(rec)
        if q.shape[0] == 0:
            continue
        z = s.memory.z(nearest_distances(q, feats[mask], 1)[:, 0])
        cls_z = s.cls.z(torch.tensor(rec.cls_score))
        images.append(float(fuse(top_mean(z, params.image_top_k), cls_z, w)))
        mem_z.append(z)
        zs_z.append(s.zero_shot.z(rec.zero_shot_sample))
    if not images:
        return {}
    pixel = w * float(torch.quantile(torch.cat(mem_z), pixel_quantile)) + (1 - w) * float(
        torch.quantile(torch.cat(zs_z), pixel_quantile))
    return {"image": float(np.quantile(images, quantile)), "pixel": pixel, "pixel_median": 0.0,
            "frames": len(images)}


class StreamMemory:
    """A line's memory as a worker runs it, causally: a frame is scored only with what came before it.

    Until the line has a bank, each frame is mutually scored against the last `window_frames` frames
    (all of them: mutual scoring tolerates defects in under `mutual_share` of them). Admitted patches
    (`admit_patches`) wait in `pending`; once `min_bank_frames` frames are admitted the first bank is
    built, then refreshed whenever as many admitted frames arrived as the schedule allows: 4, 8, 16, ...
    up to `refresh_max_frames` (doubling: quick on a new line, cheap on a warm one). A refresh builds on
    the serving bank (its rows compete with the new ones in the coreset) and serves the result at once.

    Pending patches are reduced block by block as they arrive (every `BLOCK_ROWS` rows are cut to their
    greedy k-center candidates, their share of 2 x the budget): the first stage of the composable
    coreset, so a refresh covering a thousand frames neither holds their patches nor redoes that work.
    """

    BLOCK_ROWS = 16384
    OVERSAMPLE = 2.0

    def __init__(self, inspector: FrameScorer, line_id: str, params: MemoryParams) -> None:
        self.inspector = inspector
        self.line_id = line_id
        self.params = params
        self.target = bank_target(inspector, line_id, params)
        self.scorer = BankScorer(inspector.model, params)
        self.bank: MemoryBank | None = None
        self.window: deque[FrameRecord] = deque(maxlen=params.window_frames)
        self.pending = PatchRows.empty(self.target.feature_dim)
        self.pending_frames = 0
        self._reduced_rows = 0
        self._block_frames = 0
        self.calibration: deque[FrameRecord] = deque(maxlen=params.calibration_frames + params.gate_holdout_frames)
        self.recent: deque[HeldOut] = deque(maxlen=max(params.gate_holdout_frames, 1))
        """The newest admitted frames with their images at model input size: a build's held-out frames."""
        self._to_input = input_resizer(inspector) if params.gate_holdout_frames > 0 else None
        self.cls_history: deque[float] = deque(maxlen=256)
        self.admitted = 0
        self.refreshes = 0
        self.next_refresh = params.min_bank_frames
        self.versions: list[str] = []

    # -- scoring -----------------------------------------------------------------------------------
    def score(self, raw: RawScore, frame_id: str) -> tuple[MemoryScore, FrameRecord, list[str]]:
        """Score one frame with the current state (bank, else mutual over the window); changes nothing."""
        rec = frame_record(raw, frame_id, self.params, self.inspector.model.grid_size)
        result, ids = self._score_record(raw, rec)
        return result, rec, ids

    def score_record(self, raw: RawScore, rec: FrameRecord) -> tuple[MemoryScore, list[str]]:
        """Score one frame's record with the current state (bank, else mutual over the window); changes nothing.
        Also the frames a mutual score compared with."""
        return self._score_record(raw, rec)

    def _score_record(self, raw: RawScore, rec: FrameRecord) -> tuple[MemoryScore, list[str]]:
        if self.bank is not None:
            return self.scorer.with_bank(raw, rec, self.bank), []
        window = list(self.window)
        return score_mutual(self.scorer, raw, rec, window), [w.frame_id for w in window]

    # -- learning ----------------------------------------------------------------------------------
    def observe(self, rec: FrameRecord, result: MemoryScore, image: np.ndarray | None = None) -> PatchAdmission:
        """Admission of a scored frame; the frame joins the mutual window either way. `image` (the frame): an
        admitted frame keeps it, at model input size, while it is among the newest (the bank gate's held-out
        frames paste their synthetic defects into it)."""
        kind, _, n = result.source.partition(":")
        if kind == "mutual" and int(n) < self.params.admit_min_window:
            keep, adm = None, PatchAdmission(False, 0, float("nan"), f"cold-start window of {n} frames is too small")
        else:
            keep, adm = admit_patches(result.patch_z, self.params)
        rec.keep = keep
        if keep is not None:
            self.add_rows(rec.frame_id, kept_rows(rec))
            self.calibration.append(rec)
            self.cls_history.append(rec.cls_score)
            if self._to_input is not None:
                self.recent.append(HeldOut(rec, self._to_input(image) if image is not None else None))
        self.window.append(rec)
        return adm

    def add_rows(self, frame_id: str, rows: torch.Tensor) -> None:
        """Queue an admitted frame's patches for the next bank, reducing full blocks as they fill."""
        self.pending.add(frame_id, rows)
        self.pending_frames += 1
        self.admitted += 1
        self._block_frames += 1
        if self.pending.rows - self._reduced_rows >= self.BLOCK_ROWS:
            self._reduce_block()

    def _reduce_block(self) -> None:
        n_max = self.params.max_patches(self.target.feature_dim)
        quota = math.ceil(self.OVERSAMPLE * n_max * self._block_frames / max(self.next_refresh, 1))
        start = self._reduced_rows
        block = self.pending.select(torch.arange(start, self.pending.rows))
        if block.rows > quota:
            idx, _ = greedy_coreset(block.features, quota, projection_dim=self.params.projection_dim,
                                    seed=self.params.seed)
            keep = torch.cat([torch.arange(start), start + idx.sort().values])
            self.pending = self.pending.select(keep)
        self._reduced_rows = self.pending.rows
        self._block_frames = 0

    @property
    def due(self) -> bool:
        return self.pending_frames >= self.next_refresh

    def take_pending(self, holdout: int = 0) -> BuildJob:
        """Hand the pending admitted patches over to a build and start collecting anew (cheap: no copies).

        A worker takes them on its scoring thread, builds on another (`build`) and serves the result between
        batches (`install`); frames admitted meanwhile wait for the next bank. Advances the refresh schedule.

        `holdout`: at most this many of the newest admitted frames (and at most a quarter of the build) are held
        out for the bank gate (`gate_bank`): their patches are kept apart from the rows (`BuildJob.holdout_rows`)
        and they calibrate nothing, so the gate judges the candidate on frames it has never seen (a time split)."""
        if self.pending_frames == 0:
            raise ValueError("nothing admitted since the last bank")
        n_h = min(holdout, self.params.gate_holdout_frames, self.pending_frames // 4, len(self.recent))
        held = list(self.recent)[len(self.recent) - n_h:] if n_h > 0 else []
        held_ids = {h.record.frame_id for h in held}
        rows, held_rows = self.pending, None
        if held_ids:
            frame_held = torch.tensor([f in held_ids for f in rows.frames], dtype=torch.bool)
            row_held = frame_held[rows.origin] if rows.rows else torch.zeros(0, dtype=torch.bool)
            held_rows = rows.select(torch.nonzero(row_held).flatten())
            rows = rows.select(torch.nonzero(~row_held).flatten())
        records = [r for r in self.calibration if r.frame_id not in held_ids][-self.params.calibration_frames:]
        job = BuildJob(records, rows, list(self.cls_history), self.bank, self.pending_frames - len(held),
                       held, held_rows, list(self.window))
        self.pending = PatchRows.empty(self.target.feature_dim)
        self.pending_frames = self._reduced_rows = self._block_frames = 0
        self.next_refresh = min(self.next_refresh * 2, self.params.refresh_max_frames)
        return job

    def build(self, job: BuildJob) -> MemoryBank:
        """The bank of a job from `take_pending`: touches no state of the stream, so any thread may run it."""
        return build_bank(self.line_id, job.records, self.params, self.target, parent=job.parent, rows=job.rows,
                          cls_history=job.cls_history)

    def carry_over(self, rows: PatchRows) -> None:
        """Admitted patches held out of a promoted build join the next one (they do not advance the schedule)."""
        if rows.rows:
            self.pending.extend(rows)

    def install(self, bank: MemoryBank | None) -> None:
        """Serve `bank` from the next frame on (None: back to mutual scoring, e.g. after a rollback to no bank)."""
        self.bank = bank
        if bank is not None:
            self.refreshes += 1
            self.versions.append(bank.version)

    def refresh(self) -> MemoryBank:
        """Build the next bank from the serving one and the pending admitted patches, and serve it."""
        bank = self.build(self.take_pending())
        self.install(bank)
        return bank

    def step(self, raw: RawScore, frame_id: str) -> StreamStep:
        """Score, admit, and refresh if due: one frame, exactly in stream order."""
        return self.step_batch([raw], [frame_id])[0]

    def step_batch(self, raws: Sequence[RawScore], frame_ids: Sequence[str]) -> list[StreamStep]:
        """Frames in stream order, as a worker takes them: frames the serving bank scores are scored together
        (one matmul); after a refresh, or without a bank, frame by frame. Each frame is admitted, and a due
        refresh run, before the next frame is looked at, so no frame is scored with itself or a later one."""
        grid = self.inspector.model.grid_size
        recs = [frame_record(r, fid, self.params, grid) for r, fid in zip(raws, frame_ids, strict=True)]
        bank = self.bank
        batch = self.scorer.with_bank_batch(raws, recs, bank) if bank is not None else []
        steps = []
        for i, (raw, rec) in enumerate(zip(raws, recs, strict=True)):
            if bank is not None and self.bank is bank:
                result, ids = batch[i], []
            else:
                result, ids = self._score_record(raw, rec)
            adm = self.observe(rec, result)
            refreshed = self.refresh() if self.due else None
            steps.append(StreamStep(rec.frame_id, result, adm, refreshed, ids))
        return steps

    def summary(self) -> dict[str, Any]:
        """Figures for reports and metrics."""
        b = self.bank
        return {
            "bank_version": b.version if b else None,
            "bank_versions": list(self.versions),
            "patches": b.patches if b else 0,
            "bytes": b.nbytes if b else 0,
            "bank_frames": len(b.frames) if b else 0,
            "refreshes": self.refreshes,
            "admitted": self.admitted,
            "pending_frames": self.pending_frames,
            "pending_rows": self.pending.rows,
            "window_frames": len(self.window),
        }


def replay_stream(
    inspector: FrameScorer,
    line_id: str,
    images: Iterable[np.ndarray],
    params: MemoryParams,
    *,
    ids: Iterable[str] | None = None,
    state: StreamMemory | None = None,
    batch: int = 8,
) -> Iterator[StreamStep]:
    """Run frames through `StreamMemory` in order: the model scores batches, the memory steps frame by frame."""
    st = state or StreamMemory(inspector, line_id, params)
    id_iter = iter(ids) if ids is not None else None
    buf: list[np.ndarray] = []
    n = 0

    def flush() -> Iterator[StreamStep]:
        nonlocal n
        raws = score_frames(inspector, line_id, buf, params)
        fids = [next(id_iter) if id_iter is not None else str(n + i) for i in range(len(raws))]
        n += len(raws)
        yield from st.step_batch(raws, fids)
        buf.clear()

    for img in images:
        buf.append(img)
        if len(buf) >= batch:
            yield from flush()
    if buf:
        yield from flush()
