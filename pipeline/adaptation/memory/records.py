"""Frames as the memory sees them: a scored frame's patch features and the samples its scales are computed from
(`FrameRecord`), and the frame's admitted patches as rows (`kept_rows`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.adaptation.memory.params import MemoryParams, check_layers
from pipeline.inspection.frame_scorer import FrameScorer, RawScore
from pipeline.model.memory import patch_features

_STATS_STRIDE = 8  # zero-shot maps are sampled every 8th pixel for their scale: plenty for a median



@dataclass
class FrameRecord:
    """One scored frame: its memory features and what its scales are computed from."""

    frame_id: str
    features: torch.Tensor
    """(n_tiles, P, F) unit patch features."""
    zero_shot_sample: torch.Tensor
    """A strided sample of the zero-shot map's values (for the zero-shot scale)."""
    cls_score: float
    keep: torch.Tensor | None = None
    """(n_tiles, P) patches admitted into a bank; None = not admitted."""
    memory_raw: torch.Tensor | None = None
    """(n_tiles, P) the frame's memory distances (bank) or mutual scores when it was scored."""


def frame_record(raw: RawScore, frame_id: str, params: MemoryParams, grid: int) -> FrameRecord:
    """Memory features of a frame scored with `hidden_layers=params.layers`."""
    if raw.hidden is None:
        raise ValueError("the frame was scored without hidden layers: use score_raw(..., hidden_layers=params.layers)")
    if raw.hidden.shape[1] != len(params.layers):
        raise ValueError(f"the frame carries {raw.hidden.shape[1]} hidden layers, the memory uses {len(params.layers)}")
    feats = patch_features(raw.hidden, grid, params.neighbourhood)
    sample = raw.anomaly_map[::_STATS_STRIDE, ::_STATS_STRIDE].reshape(-1).float()
    return FrameRecord(frame_id, feats, sample, float(raw.score))


def score_frames(
    inspector: FrameScorer, line_id: str, images: list[np.ndarray], params: MemoryParams, tta: str | None = None
) -> list[RawScore]:
    """The FrameScorer's raw scores with the memory's hidden layers, from the same forward as the zero-shot map."""
    check_layers(inspector.model, params)
    return inspector.score_raw(line_id, images, tta=tta, hidden_layers=tuple(params.layers))

def kept_rows(rec: FrameRecord) -> torch.Tensor:
    """(R, F) the record's admitted patches (all of them when it carries no admission mask)."""
    f = rec.features.reshape(-1, rec.features.shape[-1])
    return f if rec.keep is None else f[rec.keep.reshape(-1)]

