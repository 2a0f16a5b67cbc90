"""Scoring frames with a memory: `BankScorer` fuses memory distances (a bank's, or mutual scores against the
line's last frames) with the zero-shot map and CLS score into a frame's map and image score (`MemoryScore`), in z
units of normal frames. Also the offline paths of `anoclip eval --memory train|mutual`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.adaptation.memory.bank import MemoryBank, build_bank
from pipeline.adaptation.memory.params import MemoryParams, bank_target, check_layers
from pipeline.adaptation.memory.records import FrameRecord, frame_record, score_frames
from pipeline.inspection.frame_scorer import FrameScorer, RawScore
from pipeline.model import AnoCLIP, TileLayout
from pipeline.model.memory import ScoreScale, fuse, grid_to_map, mutual_scores, top_mean


@dataclass
class MemoryScore:
    """A frame's memory verdict: fused map and image score, in z units of normal frames."""

    anomaly_map: torch.Tensor
    """(h, w) fused z map at the model input size (like `RawScore.anomaly_map`)."""
    score: float
    """Fused image score."""
    patch_z: torch.Tensor | None
    """(n_tiles, P) the memory's own z per patch (None when nothing could be compared)."""
    source: str
    """What scored it: `bank:<version>`, `mutual:<n frames>`, or `none` (no reference yet)."""


class BankScorer:
    """Turns memory distances (bank or mutual) and the zero-shot outputs into the fused map and score."""

    def __init__(self, model: AnoCLIP, params: MemoryParams) -> None:
        check_layers(model, params)
        self.model = model
        self.params = params

    def _memory_map(self, z: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
        size = self.model.image_size
        maps = grid_to_map(z, self.model.grid_size, size)
        return self.model.merge_tiles(maps, TileLayout(input_hw[0], input_hw[1], size))[0]

    def fused(
        self, raw: RawScore, memory_raw: torch.Tensor | None, mem: ScoreScale | None, zs: ScoreScale, cls: ScoreScale,
        source: str,
    ) -> MemoryScore:
        """Fuse a frame's memory scores (n_tiles, P; None = none) with its zero-shot map and CLS score."""
        w = self.params.fusion_weight
        zs_map = zs.z(raw.anomaly_map.float())
        cls_z = float(cls.z(torch.tensor(raw.score)))
        if memory_raw is None or mem is None:
            return MemoryScore(fuse(torch.zeros_like(zs_map), zs_map, w), (1 - w) * cls_z, None, source)
        z = mem.z(memory_raw.float())
        amap = fuse(self._memory_map(z, raw.input_hw), zs_map, w)
        image = float(fuse(top_mean(z.reshape(-1), self.params.image_top_k), torch.tensor(cls_z), w))
        return MemoryScore(amap, image, z, source)

    def with_bank(self, raw: RawScore, rec: FrameRecord, bank: MemoryBank) -> MemoryScore:
        return self.with_bank_batch([raw], [rec], bank)[0]

    def with_bank_batch(
        self, raws: Sequence[RawScore], recs: Sequence[FrameRecord], bank: MemoryBank
    ) -> list[MemoryScore]:
        """Score frames against one bank with a single distance matmul (a 225-row query per frame wastes it)."""
        if not recs:
            return []
        flat = torch.cat([r.features.reshape(-1, r.features.shape[-1]) for r in recs])
        d_all = bank.distances(flat).split([r.features.shape[0] * r.features.shape[1] for r in recs])
        s = bank.scales
        out = []
        for raw, rec, d in zip(raws, recs, d_all, strict=True):
            rec.memory_raw = d.reshape(rec.features.shape[:2])
            out.append(self.fused(raw, rec.memory_raw, s.memory, s.zero_shot, s.cls, f"bank:{bank.version}"))
        return out


def mutual_raw(rec: FrameRecord, window: Sequence[FrameRecord], share: float) -> tuple[torch.Tensor, ScoreScale]:
    """(n_tiles, P) mutual scores of a frame against `window`, and their scale: the window's own mutual scores
    (as they were scored) plus this frame's."""
    flat = rec.features.reshape(1, -1, rec.features.shape[-1])
    refs = [w.features.reshape(-1, w.features.shape[-1]) for w in window]
    m = mutual_scores(flat, refs, share)[0].reshape(rec.features.shape[:2])
    hist = [w.memory_raw.reshape(-1) for w in window if w.memory_raw is not None] + [m.reshape(-1)]
    return m, ScoreScale.of(torch.cat(hist))


def score_mutual(scorer: BankScorer, raw: RawScore, rec: FrameRecord, window: Sequence[FrameRecord]) -> MemoryScore:
    """A frame scored as a line without a bank scores it: mutually against `window` (its last frames), fused with
    the zero-shot map in the window's z units; the zero-shot map alone when the window is empty."""
    if not window:
        zs = ScoreScale.of(rec.zero_shot_sample)
        return scorer.fused(raw, None, None, zs, ScoreScale(rec.cls_score, 1.0), "none")
    m, mem = mutual_raw(rec, window, scorer.params.mutual_share)
    rec.memory_raw = m
    zs = ScoreScale.of(torch.cat([w.zero_shot_sample for w in window] + [rec.zero_shot_sample]))
    cls = ScoreScale.of(torch.tensor([w.cls_score for w in window] + [rec.cls_score]))
    return scorer.fused(raw, m, mem, zs, cls, f"mutual:{len(window)}")


def score_with_bank(
    inspector: FrameScorer, line_id: str, images: list[np.ndarray], bank: MemoryBank, params: MemoryParams,
    tta: str | None = None,
) -> list[MemoryScore]:
    """Score frames against a fixed bank (offline: `anoclip eval --memory train`)."""
    scorer = BankScorer(inspector.model, params)
    raws = score_frames(inspector, line_id, images, params, tta)
    grid = inspector.model.grid_size
    return scorer.with_bank_batch(raws, [frame_record(r, str(i), params, grid) for i, r in enumerate(raws)], bank)


def bank_from_images(
    inspector: FrameScorer, line_id: str, images: list[np.ndarray], params: MemoryParams, *, ids: Sequence[str] = (),
    batch: int = 8,
) -> MemoryBank:
    """A bank from images known to be normal (every patch kept): `anoclip eval --memory train`, or a line's
    reference images."""
    if not images:
        raise ValueError("a bank needs at least one image")
    target = bank_target(inspector, line_id, params)
    grid = inspector.model.grid_size
    records: list[FrameRecord] = []
    for start in range(0, len(images), batch):
        raws = score_frames(inspector, line_id, images[start : start + batch], params)
        for j, raw in enumerate(raws):
            i = start + j
            records.append(frame_record(raw, ids[i] if i < len(ids) else f"image-{i}", params, grid))
    return build_bank(line_id, records, params, target)


def mutual_batch(
    inspector: FrameScorer, line_id: str, raws: Sequence[RawScore], params: MemoryParams, ids: Sequence[str] = ()
) -> list[MemoryScore]:
    """Mutual scoring of a set of frames against each other (`anoclip eval --memory mutual`): no normal images.

    Scales are the robust statistics (`robust_stats`) of the set itself: defect patches are a few percent
    of its patches and barely move them.
    """
    if len(raws) < 2:
        raise ValueError("mutual scoring needs at least two frames")
    scorer = BankScorer(inspector.model, params)
    grid = inspector.model.grid_size
    recs = [frame_record(r, ids[i] if i < len(ids) else str(i), params, grid) for i, r in enumerate(raws)]
    flat = [r.features.reshape(-1, r.features.shape[-1]) for r in recs]
    out_raw = []
    for i, rec in enumerate(recs):
        refs = flat[:i] + flat[i + 1 :]
        out_raw.append(mutual_scores(flat[i][None], refs, params.mutual_share)[0].reshape(rec.features.shape[:2]))
    mem = ScoreScale.of(torch.cat([m.reshape(-1) for m in out_raw]))
    zs = ScoreScale.of(torch.cat([r.zero_shot_sample for r in recs]))
    cls = ScoreScale.of(torch.tensor([r.cls_score for r in recs]))
    return [scorer.fused(raw, m, mem, zs, cls, f"mutual:{len(recs) - 1}") for raw, m in zip(raws, out_raw, strict=True)]
