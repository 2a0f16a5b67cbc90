"""A line's normal patch memory around the Inspector (docs/memory.md).

* `MemoryParams` — the `memory:` settings as the code uses them.
* `MemoryBank` — a versioned bank: fp16 patch features of admitted frames, which frame each came from,
  the z scales that make its distances comparable with the zero-shot map, and metadata. `to_bytes` /
  `from_bytes` give safetensors bytes (what a registry stores, like adapters); loading checks the
  bank fits the model, the line and the feature choice.
* `build_bank` — greedy-coreset a parent bank plus new frames' admitted patches down to the byte budget
  and calibrate its scales (leave-own-frame-out distances, so the scale is what a new normal frame sees).
* `MemoryScorer` — a frame's fused map and image score from a bank, or from mutual scoring.
* `StreamMemory` — the causal per-line logic a worker runs: cold start by mutual scoring over the last
  frames, admission of normal-looking patches, banks refreshed on a doubling schedule. `replay_stream`
  runs a finite stream through it (what `anoclip eval --memory stream` does).
* `gate_bank` — the worker's check of a candidate bank on held-out frames with synthetic defects pasted in
  (`make_positives`) against the serving bank or mutual scoring (docs/memory.md, *The bank gate*).

Pure-torch math lives in `pipeline.model.memory`; this module wires it to lines, frames and settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.adaptation.synthetic import synthetic_anomaly
from pipeline.adaptation.tta.buffered import input_resizer
from pipeline.adaptation.tta.files import read_header_meta
from pipeline.errors import AnoclipError, ConfigError
from pipeline.inspection.inspector import Inspector, RawScore
from pipeline.model import AnoCLIP, TileLayout
from pipeline.model.memory import (
    ScoreScale,
    fuse,
    greedy_coreset,
    grid_to_map,
    mutual_scores,
    nearest_distances,
    patch_features,
    top_mean,
)
from pipeline.model.self_training import GateResult, pixel_auroc, stream_seed
from pipeline.settings import MemorySettings

FORMAT = "anoclip-memory"
FORMAT_VERSION = 1
META_KEY = "anoclip_memory"
_MAX_HEADER = 1 << 26
_BYTES_PER_VALUE = 2  # banks hold fp16
_STATS_STRIDE = 8  # zero-shot maps are sampled every 8th pixel for their scale: plenty for a median


class MemoryBankError(AnoclipError):
    """A memory bank cannot be used: not a bank, damaged, or made for another model, line or feature choice."""


# --------------------------------------------------------------------------------------------------
# parameters and identity


@dataclass(frozen=True)
class MemoryParams:
    """The `memory:` settings (pipeline.settings.MemorySettings) as plain values."""

    layers: tuple[int, ...] = (6,)
    neighbourhood: int = 1
    budget_bytes: int = 16 << 20
    image_top_k: int = 5
    fusion_weight: float = 0.8
    mutual_share: float = 0.5
    window_frames: int = 16
    min_bank_frames: int = 4
    refresh_max_frames: int = 1000
    admit_patch_z: float = 2.5
    admit_min_window: int = 8
    admit_max_abnormal_share: float = 0.25
    calibration_frames: int = 8
    gate_holdout_frames: int = 8
    gate_auroc_margin: float = 0.05
    gate_max_normal_z: float = 1.0
    projection_dim: int = 128
    seed: int = 0

    @classmethod
    def from_settings(cls, s: MemorySettings) -> MemoryParams:
        d = s.model_dump()
        d["layers"] = tuple(d["layers"])
        return cls(**d)

    def max_patches(self, feature_dim: int) -> int:
        """Rows of `feature_dim` fp16 values that fit the byte budget."""
        return max(1, self.budget_bytes // (_BYTES_PER_VALUE * feature_dim))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d


@dataclass(frozen=True)
class BankTarget:
    """What a bank must fit: the model's exact weights, the line, and how features are made."""

    arch: str
    weights_id: str
    line: str
    layers: tuple[int, ...]
    neighbourhood: int
    feature_dim: int


def check_layers(model: AnoCLIP, params: MemoryParams) -> None:
    """`memory.layers` must name blocks the model has; fails at start-up, naming the key."""
    n = len(model.encoder.blocks)
    bad = [i for i in params.layers if not 1 <= i <= n]
    if bad:
        raise ConfigError(f"memory.layers: block(s) {bad} do not exist in {model.arch} ({n} blocks)")


def bank_target(inspector: Inspector, line_id: str, params: MemoryParams) -> BankTarget:
    """The target of a line's bank as the Inspector serves it."""
    m = inspector.model
    check_layers(m, params)
    width = int(m.encoder.visual.conv1.out_channels) * len(params.layers)
    return BankTarget(m.arch, m.weights_id, line_id, tuple(params.layers), params.neighbourhood, width)


# --------------------------------------------------------------------------------------------------
# frames as the memory sees them


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
    inspector: Inspector, line_id: str, images: list[np.ndarray], params: MemoryParams, tta: str | None = None
) -> list[RawScore]:
    """The Inspector's raw scores with the memory's hidden layers, from the same forward as the zero-shot map."""
    check_layers(inspector.model, params)
    return inspector.score_raw(line_id, images, tta=tta, hidden_layers=tuple(params.layers))


# --------------------------------------------------------------------------------------------------
# the bank


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


def _content_id(features: torch.Tensor, origin: torch.Tensor, essentials: dict[str, Any]) -> str:
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


def kept_rows(rec: FrameRecord) -> torch.Tensor:
    """(R, F) the record's admitted patches (all of them when it carries no admission mask)."""
    f = rec.features.reshape(-1, rec.features.shape[-1])
    return f if rec.keep is None else f[rec.keep.reshape(-1)]


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
        "id": _content_id(features, origin, essentials),
        "line": line_id,
        "arch": target.arch,
        "weights_id": target.weights_id,
        "layers": list(target.layers),
        "neighbourhood": target.neighbourhood,
        "feature_dim": target.feature_dim,
        "dtype": "float16",
        "patches": int(features.shape[0]),
        "bytes": int(features.numel() * _BYTES_PER_VALUE),
        "frames": len(frames),
        "frames_new": len(new.frames),
        "coreset_radius": radius,
        "parent": parent.version if parent is not None else None,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "scales": scales.to_dict(),
        "params": params.to_dict(),
    }
    return MemoryBank(features, origin, frames, scales, meta)


# --------------------------------------------------------------------------------------------------
# serialisation (safetensors: tensors + JSON metadata in the header; never pickles)


def to_bytes(bank: MemoryBank) -> bytes:
    """safetensors bytes: `features` (fp16), `origin` (int64), metadata (with the frame ids) in the header."""
    meta = dict(bank.meta, frame_ids=bank.frames)
    tensors = {"features": bank.features.to(torch.float16).contiguous(), "origin": bank.origin.contiguous()}
    return st_save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def read_meta(data: bytes) -> dict[str, Any]:
    """The bank's metadata from safetensors bytes (parses only the JSON header)."""
    return read_header_meta(data, meta_key=META_KEY, fmt=FORMAT, version=FORMAT_VERSION, error=MemoryBankError,
                            noun="memory bank", max_header=_MAX_HEADER)


def check_meta(meta: dict[str, Any], target: BankTarget) -> None:
    """Raise MemoryBankError naming every way the bank does not fit `target`."""
    want = asdict(target)
    want["layers"] = list(target.layers)
    problems = [f"its {k} is {meta.get(k)!r}, expected {v!r}" for k, v in want.items() if meta.get(k) != v]
    if problems:
        raise MemoryBankError("memory bank does not fit: " + "; ".join(problems))


def from_bytes(data: bytes, target: BankTarget | None = None) -> MemoryBank:
    """Read (and, given a target, check) a bank; MemoryBankError on anything that is not a sound bank."""
    meta = read_meta(data)
    if target is not None:
        check_meta(meta, target)
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types for damaged data
        raise MemoryBankError(f"memory bank tensors unreadable: {e}") from e
    if set(tensors) != {"features", "origin"}:
        raise MemoryBankError(f"memory bank holds tensors {sorted(tensors)}, expected features and origin")
    feats, origin = tensors["features"], tensors["origin"]
    frames = meta.pop("frame_ids", None)
    if not isinstance(frames, list):
        raise MemoryBankError("memory bank metadata lacks its frame ids")
    m = feats.shape[0] if feats.ndim == 2 else -1
    if feats.dtype != torch.float16 or feats.ndim != 2 or feats.shape[1] != meta.get("feature_dim"):
        raise MemoryBankError(f"memory bank features are {tuple(feats.shape)} {feats.dtype}, "
                              f"expected (M, {meta.get('feature_dim')}) float16")
    if origin.dtype != torch.int64 or tuple(origin.shape) != (m,) or (
        m and (int(origin.min()) < 0 or int(origin.max()) >= len(frames))
    ):
        raise MemoryBankError("memory bank origins do not match its rows and frames")
    if not bool(torch.isfinite(feats).all()):
        raise MemoryBankError("memory bank features hold non-finite values")
    try:
        scales = BankScales.from_dict(meta["scales"])
    except (KeyError, TypeError, ValueError) as e:
        raise MemoryBankError(f"memory bank scales invalid: {e}") from e
    essentials = {"line": meta["line"], **{k: meta[k] for k in ("arch", "weights_id", "layers", "neighbourhood",
                                                               "feature_dim")}, "scales": scales.to_dict()}
    if _content_id(feats, origin, essentials) != meta.get("id"):
        raise MemoryBankError("memory bank content does not match its id (damaged or altered)")
    return MemoryBank(feats, origin, frames, scales, meta)


# --------------------------------------------------------------------------------------------------
# scoring


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


class MemoryScorer:
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


def _mutual_raw(rec: FrameRecord, window: Sequence[FrameRecord], share: float) -> tuple[torch.Tensor, ScoreScale]:
    """(n_tiles, P) mutual scores of a frame against `window`, and their scale: the window's own mutual scores
    (as they were scored) plus this frame's."""
    flat = rec.features.reshape(1, -1, rec.features.shape[-1])
    refs = [w.features.reshape(-1, w.features.shape[-1]) for w in window]
    m = mutual_scores(flat, refs, share)[0].reshape(rec.features.shape[:2])
    hist = [w.memory_raw.reshape(-1) for w in window if w.memory_raw is not None] + [m.reshape(-1)]
    return m, ScoreScale.of(torch.cat(hist))


def score_mutual(scorer: MemoryScorer, raw: RawScore, rec: FrameRecord, window: Sequence[FrameRecord]) -> MemoryScore:
    """A frame scored as a line without a bank scores it: mutually against `window` (its last frames), fused with
    the zero-shot map in the window's z units; the zero-shot map alone when the window is empty."""
    if not window:
        zs = ScoreScale.of(rec.zero_shot_sample)
        return scorer.fused(raw, None, None, zs, ScoreScale(rec.cls_score, 1.0), "none")
    m, mem = _mutual_raw(rec, window, scorer.params.mutual_share)
    rec.memory_raw = m
    zs = ScoreScale.of(torch.cat([w.zero_shot_sample for w in window] + [rec.zero_shot_sample]))
    cls = ScoreScale.of(torch.tensor([w.cls_score for w in window] + [rec.cls_score]))
    return scorer.fused(raw, m, mem, zs, cls, f"mutual:{len(window)}")


def score_with_bank(
    inspector: Inspector, line_id: str, images: list[np.ndarray], bank: MemoryBank, params: MemoryParams,
    tta: str | None = None,
) -> list[MemoryScore]:
    """Score frames against a fixed bank (offline: `anoclip eval --memory train`)."""
    scorer = MemoryScorer(inspector.model, params)
    raws = score_frames(inspector, line_id, images, params, tta)
    grid = inspector.model.grid_size
    return scorer.with_bank_batch(raws, [frame_record(r, str(i), params, grid) for i, r in enumerate(raws)], bank)


def bank_from_images(
    inspector: Inspector, line_id: str, images: list[np.ndarray], params: MemoryParams, *, ids: Sequence[str] = (),
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
    inspector: Inspector, line_id: str, raws: Sequence[RawScore], params: MemoryParams, ids: Sequence[str] = ()
) -> list[MemoryScore]:
    """Mutual scoring of a set of frames against each other (`anoclip eval --memory mutual`): no normal images.

    Scales are the robust statistics (`robust_stats`) of the set itself: defect patches are a few percent
    of its patches and barely move them.
    """
    if len(raws) < 2:
        raise ValueError("mutual scoring needs at least two frames")
    scorer = MemoryScorer(inspector.model, params)
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


# --------------------------------------------------------------------------------------------------
# the stream: cold start, admission, refreshes


@dataclass
class Admission:
    """What admission decided for one frame."""

    admitted: bool
    patches_kept: int
    abnormal_share: float
    reason: str


def admit_patches(patch_z: torch.Tensor | None, params: MemoryParams) -> tuple[torch.Tensor | None, Admission]:
    """Which patches of a scored frame may enter the bank.

    A patch is kept only if its memory z is below `admit_patch_z` and no patch of its 3x3 neighbourhood
    is above it (a defect's rim looks half normal); a frame with more than `admit_max_abnormal_share`
    patches above it adds nothing. A frame scored against nothing adds nothing either.
    """
    if patch_z is None:
        return None, Admission(False, 0, float("nan"), "no reference yet")
    high = patch_z >= params.admit_patch_z
    share = float(high.float().mean())
    if share > params.admit_max_abnormal_share:
        return None, Admission(False, 0, share, f"{share:.1%} of patches look abnormal")
    g = int(round(patch_z.shape[-1] ** 0.5))
    near = F.max_pool2d(high.float().reshape(-1, 1, g, g), 3, stride=1, padding=1).reshape(patch_z.shape) > 0
    keep = ~near
    n = int(keep.sum())
    if n == 0:
        return None, Admission(False, 0, share, "no patch clear of abnormal ones")
    return keep, Admission(True, n, share, "admitted")


@dataclass
class StreamStep:
    """One frame through the stream memory."""

    frame_id: str
    result: MemoryScore
    admission: Admission
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


# --------------------------------------------------------------------------------------------------
# the bank gate: held-out frames and pasted positives (docs/memory.md, *The bank gate*)


@dataclass(frozen=True)
class BankGateRule:
    """When a candidate bank is refused (`gate_bank`)."""

    auroc_margin: float = 0.05
    """Refuse if its pixel AUROC on the pasted positives is below the serving reference's minus this."""
    max_normal_z: float = 1.0
    """Refuse if the held-out normal frames' median memory z lies farther than this from 0."""

    @classmethod
    def from_params(cls, p: MemoryParams) -> BankGateRule:
        return cls(p.gate_auroc_margin, p.gate_max_normal_z)


@dataclass
class BankPositive:
    """A labelled frame of the bank gate: a synthetic defect pasted into a held-out frame, scored by the model."""

    raw: RawScore
    record: FrameRecord
    mask: torch.Tensor
    """(h, w) bool at the model input size: True = the pasted defect."""
    source_frame: str
    """The held-out frame it was pasted into (left out of a mutual reference, as a new frame is)."""


def _mask_at(mask: np.ndarray, hw: tuple[int, int]) -> torch.Tensor:
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    if tuple(m.shape[-2:]) != tuple(hw):
        m = F.interpolate(m, size=tuple(hw), mode="nearest")
    return m[0, 0] > 0.5


POSITIVE_KIND = "perlin"
"""The bank gate pastes foreign-texture blobs only. A patch memory is location-blind: a CutPaste rectangle of the
frame's own material is, inside its rim, normal patches at another place, which a bank rightly matches (measured,
tiny test model, wood: pixel AUROC 0.08-0.99 per CutPaste frame against a bank of normal frames, 0.55-0.96 per
Perlin frame); such labels would measure chance, not the bank."""


def make_positives(
    inspector: Inspector, line_id: str, held: Sequence[HeldOut], params: MemoryParams
) -> list[BankPositive]:
    """One synthetic defect (`synthetic_anomaly`, a Perlin-masked foreign texture: `POSITIVE_KIND`; deterministic
    in the frame id) pasted into each held-out frame that kept its image, scored by the model (base weights, no
    TTA): one forward per frame."""
    items = [(h.record.frame_id, h.image) for h in held if h.image is not None and min(h.image.shape[:2]) >= 8]
    if not items:  # no image kept (or one too small to paste into)
        return []
    pasted = [synthetic_anomaly(img, stream_seed(params.seed, zlib.crc32(fid.encode())), POSITIVE_KIND)
              for fid, img in items]
    raws = score_frames(inspector, line_id, [a.image for a in pasted], params)
    grid = inspector.model.grid_size
    out = []
    for (fid, _), a, r in zip(items, pasted, raws, strict=True):
        rec = frame_record(r, f"{fid}#{a.kind}", params, grid)
        out.append(BankPositive(dataclasses.replace(r, hidden=None, image=None), rec, _mask_at(a.mask, r.input_hw),
                                fid))
    return out


def normal_median_z(bank: MemoryBank, normals: Sequence[FrameRecord]) -> float:
    """Median memory z, under `bank`'s scales, of the admitted patches of frames not in it (NaN: none)."""
    zs = [bank.scales.memory.z(bank.distances(q)) for q in (kept_rows(r) for r in normals) if q.shape[0]]
    return float(torch.cat(zs).median()) if zs else math.nan


def _mutual_median_z(normals: Sequence[FrameRecord], window: Sequence[FrameRecord], share: float) -> float:
    zs = []
    for r in normals:
        ref = [w for w in window if w.frame_id != r.frame_id]
        if not ref:
            continue
        m, scale = _mutual_raw(r, ref, share)
        flat = m.reshape(-1)
        zs.append(scale.z(flat if r.keep is None else flat[r.keep.reshape(-1)]))
    return float(torch.cat(zs).median()) if zs else math.nan


def gate_bank(
    candidate: MemoryBank,
    serving: MemoryBank | None,
    normals: Sequence[FrameRecord],
    positives: Sequence[BankPositive],
    scorer: MemoryScorer,
    rule: BankGateRule | None = None,
    *,
    window: Sequence[FrameRecord] = (),
) -> GateResult:
    """Judge a candidate bank on frames it has never seen; refuse it, with reasons, if it is unsafe.

    `normals`: held-out admitted frames (the newest of the build, kept out of the bank and its calibration);
    `positives`: synthetic defects pasted into them (`make_positives`). The reference is the serving bank, or,
    before the line has one, what serves it now: mutual scoring against `window` (the line's last frames, without
    the positive's own source frame; an empty window leaves the zero-shot map). Refusals:

    * pixel AUROC of the fused map on the positives below the reference's minus `auroc_margin` (the candidate
      learned something like the pasted defects as normal, or lost coverage);
    * the normals' median memory z farther than `max_normal_z` from 0: a bank's scales promise that a new normal
      patch sits at z ~ 0; far above, normal frames raise alarms; far below, the scale widened until defects
      look normal too (AUROC alone misses that: it does not see where the threshold falls).
    """
    r = rule or BankGateRule()
    reasons: list[str] = []
    figures: dict[str, Any] = {"holdout_frames": len(normals), "positives": len(positives),
                               "reference": f"bank:{serving.version}" if serving is not None else "mutual"}
    med_c = normal_median_z(candidate, normals)
    med_s = normal_median_z(serving, normals) if serving is not None else _mutual_median_z(
        normals, window, scorer.params.mutual_share)
    figures.update({"normal_median_z_candidate": med_c, "normal_median_z_serving": med_s})
    if not math.isfinite(med_c) and normals:
        reasons.append("the held-out normal frames have no admitted patch to judge the candidate on")
    elif abs(med_c) > r.max_normal_z:
        what = "normal frames look abnormal" if med_c > 0 else "everything looks normal"
        reasons.append(f"held-out normal frames' median z is {med_c:+.2f} under the candidate (bound "
                       f"±{r.max_normal_z}): {what}")
    if positives:
        raws, recs = [p.raw for p in positives], [p.record for p in positives]
        y = torch.cat([p.mask.reshape(-1) for p in positives])
        cand = torch.cat([m.anomaly_map.reshape(-1) for m in scorer.with_bank_batch(raws, recs, candidate)])
        if serving is not None:
            ref_maps = [m.anomaly_map for m in scorer.with_bank_batch(raws, recs, serving)]
        else:
            ref_maps = [score_mutual(scorer, p.raw, p.record, [w for w in window if w.frame_id != p.source_frame])
                        .anomaly_map for p in positives]
        ref = torch.cat([m.reshape(-1) for m in ref_maps])
        auc_c, auc_s = pixel_auroc(cand, y), pixel_auroc(ref, y)
        figures.update({"labelled_pixels": int(y.sum()), "pixel_auroc_candidate": auc_c,
                        "pixel_auroc_serving": auc_s})
        if not bool(torch.isfinite(cand).all()):
            reasons.append("the candidate produces non-finite maps on the pasted positives")
        elif math.isfinite(auc_c) and math.isfinite(auc_s) and auc_c < auc_s - r.auroc_margin:
            reasons.append(f"pixel AUROC on {len(positives)} pasted positives fell to {auc_c:.3f} from the "
                           f"{figures['reference']} reference's {auc_s:.3f} (margin {r.auroc_margin})")
    return GateResult(not reasons, reasons, figures)


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

    def __init__(self, inspector: Inspector, line_id: str, params: MemoryParams) -> None:
        self.inspector = inspector
        self.line_id = line_id
        self.params = params
        self.target = bank_target(inspector, line_id, params)
        self.scorer = MemoryScorer(inspector.model, params)
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
    def observe(self, rec: FrameRecord, result: MemoryScore, image: np.ndarray | None = None) -> Admission:
        """Admission of a scored frame; the frame joins the mutual window either way. `image` (the frame): an
        admitted frame keeps it, at model input size, while it is among the newest (the bank gate's held-out
        frames paste their synthetic defects into it)."""
        kind, _, n = result.source.partition(":")
        if kind == "mutual" and int(n) < self.params.admit_min_window:
            keep, adm = None, Admission(False, 0, float("nan"), f"cold-start window of {n} frames is too small")
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
    inspector: Inspector,
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
