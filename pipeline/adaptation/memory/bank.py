"""A line's bank of normal patch features (`MemoryBank`): fp16 patch features of admitted frames, which frame each
came from, the z scales that make its distances comparable with the zero-shot map (`BankScales`), and metadata.

`build_bank` greedy-coresets a parent bank plus new frames' admitted patches (`PatchRows`) down to the byte budget
and calibrates its scales (leave-own-frame-out distances, so the scale is what a new normal frame sees).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

from pipeline.adaptation.memory.params import (
    BYTES_PER_VALUE,
    FORMAT,
    FORMAT_VERSION,
    BankTarget,
    MemoryParams,
)
from pipeline.adaptation.memory.records import FrameRecord, kept_rows
from pipeline.model.memory import ScoreScale, greedy_coreset, nearest_distances


@dataclass(frozen=True)
class BankScales:
    """Robust location and scale on normal frames of the three scores that get fused."""

    memory: ScoreScale
    """Nearest-bank-patch distance of a normal patch (leave-own-frame-out)."""
    zero_shot: ScoreScale
    """Zero-shot pixel p(abnormal)."""
    cls: ScoreScale
    """Zero-shot image score (CLS)."""

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {"memory": self.memory.to_dict(), "zero_shot": self.zero_shot.to_dict(), "cls": self.cls.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BankScales:
        return cls(*(ScoreScale(float(d[k]["center"]), float(d[k]["scale"])) for k in ("memory", "zero_shot", "cls")))


@dataclass
class MemoryBank:
    """A line's bank of normal patch features, versioned by content."""

    features: torch.Tensor
    """(M, F) fp16 unit patch features."""
    origin: torch.Tensor
    """(M,) int64: index into `frames` of the frame each row came from."""
    frames: list[str]
    """Ids of the frames with rows in the bank, in admission order."""
    scales: BankScales
    meta: dict[str, Any]
    _sq: torch.Tensor | None = field(default=None, repr=False)

    @property
    def version(self) -> str:
        return str(self.meta["id"])

    @property
    def patches(self) -> int:
        return int(self.features.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.features.numel() * self.features.element_size())

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """(..., F) -> (...) distance of each patch to its nearest bank row."""
        if self._sq is None:
            f = self.features.float()
            self._sq = (f * f).sum(-1)
        flat = features.reshape(-1, features.shape[-1])
        return nearest_distances(flat, self.features, 1, bank_sq=self._sq)[:, 0].reshape(features.shape[:-1])


def content_id(features: torch.Tensor, origin: torch.Tensor, essentials: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(essentials, sort_keys=True).encode())
    h.update(features.contiguous().numpy().tobytes())
    h.update(origin.contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


class PatchRows:
    """Admitted patch features waiting for a bank, with the frame each came from (appends are cheap)."""

    def __init__(self, features: torch.Tensor, origin: torch.Tensor, frames: list[str]) -> None:
        self._parts = [features.to(torch.float16)]
        self._origins = [origin]
        self.frames = frames
        self._rows = int(features.shape[0])

    @classmethod
    def empty(cls, width: int) -> PatchRows:
        return cls(torch.empty((0, width), dtype=torch.float16), torch.empty(0, dtype=torch.int64), [])

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def features(self) -> torch.Tensor:
        """(R, F) fp16."""
        if len(self._parts) > 1:
            self._parts = [torch.cat(self._parts)]
        return self._parts[0]

    @property
    def origin(self) -> torch.Tensor:
        """(R,) int64 index into `frames`."""
        if len(self._origins) > 1:
            self._origins = [torch.cat(self._origins)]
        return self._origins[0]

    def add(self, frame_id: str, rows: torch.Tensor) -> None:
        self.frames.append(frame_id)
        self._parts.append(rows.to(torch.float16))
        self._origins.append(torch.full((rows.shape[0],), len(self.frames) - 1, dtype=torch.int64))
        self._rows += int(rows.shape[0])

    def extend(self, other: PatchRows) -> None:
        offset = len(self.frames)
        self.frames = self.frames + other.frames
        self._parts.append(other.features)
        self._origins.append(other.origin + offset)
        self._rows += other.rows

    def select(self, idx: torch.Tensor) -> PatchRows:
        """The rows at `idx` (in that order), frames without rows dropped and renumbered."""
        origin = self.origin[idx]
        used = torch.unique(origin)
        remap = torch.full((len(self.frames),), -1, dtype=torch.int64)
        remap[used] = torch.arange(used.numel())
        return PatchRows(self.features[idx], remap[origin], [self.frames[int(i)] for i in used])

def rows_of(records: Sequence[FrameRecord], width: int) -> PatchRows:
    """The records' admitted patches as fp16 rows."""
    rows = PatchRows.empty(width)
    for rec in records:
        r = kept_rows(rec)
        if r.shape[0]:
            rows.add(rec.frame_id, r)
    return rows


def reduce_rows(rows: PatchRows, n: int, params: MemoryParams) -> tuple[PatchRows, float]:
    """Greedy-coreset `rows` to at most `n` (admission order kept); also the coverage radius."""
    if rows.rows <= n:
        return rows, 0.0
    idx, radius = greedy_coreset(rows.features, n, projection_dim=params.projection_dim, seed=params.seed)
    return rows.select(idx.sort().values), radius


def _leave_frame_out(features: torch.Tensor, origin: torch.Tensor, records: Sequence[FrameRecord],
                     index_of: dict[str, int]) -> torch.Tensor:
    """Distances of the records' admitted patches to the bank without the record's own rows: what a new
    normal frame sees. Admitted patches only: a patch admission refused (and every frame refused it at
    the same spot) has no counterpart in the bank, and counting such gaps as normal would widen the scale
    until a defect looks normal too; left out, a gap keeps being flagged, the safe side. (With a MAD scale
    this made admission stall on parts whose patch distances have a long normal tail; the upper-body
    scale of `robust_stats` covers that tail.) A bank made of one frame falls back to each row's nearest
    other row."""
    out = []
    for rec in records:
        own = index_of.get(rec.frame_id)
        mask = origin != own if own is not None else torch.ones_like(origin, dtype=torch.bool)
        q = kept_rows(rec)
        if bool(mask.any()) and q.shape[0]:
            out.append(nearest_distances(q, features[mask], 1)[:, 0])
    if out:
        return torch.cat(out)
    return nearest_distances(features, features, 2)[:, 1]  # one-frame bank: nearest other row


def build_bank(
    line_id: str,
    records: Sequence[FrameRecord],
    params: MemoryParams,
    target: BankTarget,
    *,
    parent: MemoryBank | None = None,
    rows: PatchRows | None = None,
    cls_history: Iterable[float] = (),
) -> MemoryBank:
    """A new bank: the parent's rows plus new admitted patches, greedy-coresetted to the byte budget.

    New patches are the records' kept patches, or `rows` when given (a stream passes its pending rows,
    already reduced block by block; `records` then only calibrate). Scales: memory distances of the
    newest `calibration_frames` records, each against the new bank without its own rows (what a new
    normal frame sees); zero-shot and CLS from the records (CLS also from `cls_history`).
    """
    new = rows if rows is not None else rows_of(records, target.feature_dim)
    if new.rows == 0 and parent is None:
        raise ValueError("a bank needs at least one frame with admitted patches")
    if new.features.shape[1] != target.feature_dim:
        raise ValueError(f"features are {new.features.shape[1]} wide, the target expects {target.feature_dim}")
    pool = PatchRows(parent.features, parent.origin, list(parent.frames)) if parent is not None \
        else PatchRows.empty(target.feature_dim)
    pool.extend(new)
    pool, radius = reduce_rows(pool, params.max_patches(target.feature_dim), params)
    features, origin, frames = pool.features.contiguous(), pool.origin, pool.frames
    index_of = {fid: i for i, fid in enumerate(frames)}
    calib = list(records)[-params.calibration_frames:]
    mem = ScoreScale.of(_leave_frame_out(features.float(), origin, calib, index_of))
    cls_values = list(cls_history) or [r.cls_score for r in records]
    if calib:
        zs = ScoreScale.of(torch.cat([r.zero_shot_sample for r in calib]))
        cls = ScoreScale.of(torch.tensor(cls_values, dtype=torch.float32))
    elif parent is not None:
        zs, cls = parent.scales.zero_shot, parent.scales.cls
    else:
        raise ValueError("a bank needs frames to calibrate its scales on")
    scales = BankScales(mem, zs, cls)
    essentials = {"line": line_id, **asdict(target), "scales": scales.to_dict()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "id": content_id(features, origin, essentials),
        "line": line_id,
        "arch": target.arch,
        "weights_id": target.weights_id,
        "layers": list(target.layers),
        "neighbourhood": target.neighbourhood,
        "feature_dim": target.feature_dim,
        "dtype": "float16",
        "patches": int(features.shape[0]),
        "bytes": int(features.numel() * BYTES_PER_VALUE),
        "frames": len(frames),
        "frames_new": len(new.frames),
        "coreset_radius": radius,
        "parent": parent.version if parent is not None else None,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "scales": scales.to_dict(),
        "params": params.to_dict(),
    }
    return MemoryBank(features, origin, frames, scales, meta)
