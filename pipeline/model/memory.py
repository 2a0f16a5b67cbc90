"""Patch memories: what a line's normal frames look like, patch by patch (docs/memory.md).

Pure torch. A patch memory compares each patch of a frame with patches of known-normal frames of the
same line (PatchCore, WinCLIP+ few-shot) or, before a line has any, with the patches of the other
recent frames (MuSc mutual scoring). A patch unlike every stored patch is anomalous, whatever the
text prompts say. Everything here works on feature tensors; building banks from frames, budgets and
serialisation live in `pipeline.adaptation.memory`.

Shapes: P patches per tile on a g x g grid (row-major, as the model's tokens), D feature width.
Distances are Euclidean between L2-normalised features, so they lie in [0, 2].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

UPPER_Z = 1.2816
"""The 90th percentile of a normal distribution lies 1.2816 SDs above its median."""


# --------------------------------------------------------------------------------------------------
# features


def neighbourhood_mean(features: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """(N, P, D) -> (N, P, D): each patch replaced by the mean of its size x size neighbourhood on the grid.

    PatchCore's local aggregation: a patch feature then also describes its surroundings, so a defect
    changes several neighbouring features and a one-token fluke changes less. Edges are replicated.
    """
    if size <= 1:
        return features
    if size % 2 == 0:
        raise ValueError(f"neighbourhood size must be odd, got {size}")
    n, p, d = features.shape
    if p != grid * grid:
        raise ValueError(f"{p} patches do not fill a {grid}x{grid} grid")
    x = features.transpose(1, 2).reshape(n, d, grid, grid)
    pad = size // 2
    x = F.avg_pool2d(F.pad(x, (pad, pad, pad, pad), mode="replicate"), size, stride=1)
    return x.reshape(n, d, p).transpose(1, 2)


def patch_features(hidden: torch.Tensor, grid: int, neighbourhood: int = 1) -> torch.Tensor:
    """(N, n_layers, P, D) intermediate tokens -> (N, P, n_layers * D) unit memory features.

    Per layer: LayerNorm without affine (the residual stream's scale and offset vary by layer and by
    channel), neighbourhood mean, L2 normalisation; layers are concatenated and the whole vector
    normalised again, so every layer weighs the same and distances stay in [0, 2].
    """
    if hidden.ndim != 4:
        raise ValueError(f"expected (N, n_layers, P, D) tokens, got shape {tuple(hidden.shape)}")
    parts = []
    for i in range(hidden.shape[1]):
        x = hidden[:, i].float()
        x = F.layer_norm(x, x.shape[-1:])
        x = neighbourhood_mean(x, grid, neighbourhood)
        parts.append(F.normalize(x, dim=-1))
    return F.normalize(torch.cat(parts, dim=-1), dim=-1)


# --------------------------------------------------------------------------------------------------
# nearest neighbours


def pairwise_distances(query: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor | None = None) -> torch.Tensor:
    """(Q, D), (M, D) -> (Q, M) Euclidean distances via one matmul (|q|² + |b|² - 2 q·b, clamped at 0)."""
    q = query.float()
    b = bank.float()
    bsq = (b * b).sum(-1) if bank_sq is None else bank_sq
    d2 = (q * q).sum(-1, keepdim=True) + bsq[None, :] - 2.0 * (q @ b.T)
    return d2.clamp_min_(0.0).sqrt_()


def nearest_distances(
    query: torch.Tensor, bank: torch.Tensor, k: int = 1, *, bank_sq: torch.Tensor | None = None, chunk: int = 16384
) -> torch.Tensor:
    """(Q, D) against a (M, D) bank -> (Q, k) distances to the k nearest bank rows, ascending.

    The bank is walked in chunks of `chunk` rows, so memory stays at Q x chunk floats whatever its size;
    fp16 banks are upcast chunk by chunk. `bank_sq`: the rows' squared norms, if already known.
    """
    if bank.shape[0] == 0:
        raise ValueError("the memory bank is empty")
    if query.shape[-1] != bank.shape[-1]:
        raise ValueError(f"query width {query.shape[-1]} does not match the bank's {bank.shape[-1]}")
    k = min(k, bank.shape[0])
    best: torch.Tensor | None = None
    q = query.float()
    for start in range(0, bank.shape[0], chunk):
        sq = None if bank_sq is None else bank_sq[start : start + chunk]
        d = pairwise_distances(q, bank[start : start + chunk], sq)
        top = d.topk(min(k, d.shape[1]), dim=1, largest=False).values
        best = top if best is None else torch.cat([best, top], 1).topk(k, dim=1, largest=False).values
    assert best is not None
    return best.sort(dim=1).values


def _greedy(x: torch.Tensor, n: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy k-center on rows of x: (chosen indices, squared distance of every row to the chosen set)."""
    sq = (x * x).sum(-1)
    chosen = torch.empty(n, dtype=torch.long)
    keep = min(max(keep, 0), n)
    if keep > 0:
        chosen[:keep] = torch.arange(keep)
        mind = nearest_distances(x, x[:keep], k=1)[:, 0].square_()
    else:
        chosen[0] = 0
        mind = torch.addmv(sq + sq[0], x, x[0], alpha=-2.0)
        keep = 1
    buf = torch.empty_like(sq)
    for i in range(keep, n):  # squared distances, four in-place ops a step: the loop is the cost
        j = int(torch.argmax(mind))
        chosen[i] = j
        torch.addmv(sq, x, x[j], alpha=-2.0, out=buf)
        buf += sq[j]
        torch.minimum(mind, buf, out=mind)
    return chosen, mind.clamp_min_(0.0)


def _chunk_candidates(x: torch.Tensor, per_chunk: int, chunk_rows: int) -> tuple[torch.Tensor, float]:
    """Greedy k-center inside each block of `chunk_rows` consecutive rows, all blocks in one batched loop:
    `per_chunk` candidates per block, and the largest distance of any row to its block's candidates."""
    m, d = x.shape
    k = math.ceil(m / chunk_rows)
    size = math.ceil(m / k)
    pad = k * size - m
    xc = torch.cat([x, x.new_zeros((pad, d))]).view(k, size, d)
    xt = xc.transpose(1, 2).contiguous()  # (k, d, size): bmm of (k, 1, d) by it is a fast batched matvec
    sq = (xc * xc).sum(-1)
    valid = torch.arange(k * size).view(k, size) < m
    per_chunk = min(per_chunk, size)
    chosen = torch.zeros((k, per_chunk), dtype=torch.long)
    rows = torch.arange(k)

    def dist2(j: torch.Tensor) -> torch.Tensor:
        d2 = torch.bmm(xc[rows, j][:, None, :], xt)[:, 0]
        return d2.mul_(-2.0).add_(sq).add_(sq[rows, j][:, None])

    mind = dist2(torch.zeros(k, dtype=torch.long))
    mind.masked_fill_(~valid, -1.0)  # padding is never picked
    for i in range(1, per_chunk):
        j = mind.argmax(1)
        chosen[:, i] = j
        torch.minimum(mind, dist2(j), out=mind)
    idx = (chosen + (rows * size)[:, None]).flatten()
    idx = idx[idx < m].unique()
    return idx, float(mind.clamp_min(0.0).max().sqrt())


def greedy_coreset(
    features: torch.Tensor,
    n: int,
    *,
    projection_dim: int = 128,
    seed: int = 0,
    keep: int = 0,
    chunk_rows: int = 16384,
    oversample: float = 2.0,
) -> tuple[torch.Tensor, float]:
    """Indices of `n` rows of `features` (M, D) chosen by greedy k-center, and a bound on the coverage radius.

    PatchCore's coreset: repeatedly take the row farthest from everything chosen so far, so the kept
    rows cover the data (every row lies within the radius of a kept one) instead of following its
    density as a random subsample does. Distances are measured after a fixed Gaussian random
    projection to `projection_dim` (Johnson-Lindenstrauss: near-equal distances, far fewer flops).
    The first `keep` rows are always kept (and seed the cover).

    Plain greedy costs n x M row distances, which for a thousand frames (M ~ 225k) is minutes. Above
    `chunk_rows` rows (and 2 x `oversample` x n) it runs as a composable coreset: greedy inside blocks of
    `chunk_rows` rows (batched, cache-sized), `oversample` x n candidates in all, then greedy over the
    candidates; the radius returned is then the sum of both stages' radii, an upper bound.
    """
    m = features.shape[0]
    if n >= m:
        return torch.arange(m), 0.0
    if n < 1:
        raise ValueError("a coreset needs at least one row")
    x = features.float()
    if projection_dim and projection_dim < x.shape[1]:
        gen = torch.Generator().manual_seed(seed)
        proj = torch.randn(x.shape[1], projection_dim, generator=gen) / math.sqrt(projection_dim)
        x = x @ proj.to(x.device)
    if keep <= 0 and m > chunk_rows and m > 2 * oversample * n:
        per_chunk = math.ceil(oversample * n / math.ceil(m / chunk_rows))
        cand, r1 = _chunk_candidates(x, per_chunk, chunk_rows)
        idx, mind = _greedy(x[cand], n, 0)
        return cand[idx], r1 + float(mind.max().sqrt())
    idx, mind = _greedy(x, n, keep)
    return idx, float(mind.max().sqrt())


# --------------------------------------------------------------------------------------------------
# scores


def robust_stats(values: torch.Tensor) -> tuple[float, float]:
    """(median, upper-body SD) of all values: SD = (90th percentile - median) / 1.2816, floored at 1e-6.

    Equal to the SD for normal data; outliers (defect patches) can only push the 90th percentile up to
    the next normal values, so a few percent of them move it little (2% by ~5%), and under 10% never
    beyond the normal data. Patch distances of many parts are a mixture (a tight bulk
    of plain surface, a long tail of edges and prints); a MAD-based SD sees only the bulk and would call
    a quarter of every normal frame abnormal, the upper body includes the tail.
    """
    v = values.detach().float().flatten()
    if v.numel() == 0:
        raise ValueError("robust statistics of nothing")
    if v.numel() > 1 << 20:  # torch.quantile's limit; a strided sample of a large pool is as good
        v = v[:: v.numel() // (1 << 20) + 1]
    med = float(v.median())
    upper = float(torch.quantile(v, 0.9))
    return med, max((upper - med) / UPPER_Z, 1e-6)


def top_mean(patch_scores: torch.Tensor, k: int) -> torch.Tensor:
    """(..., P) -> (...): mean of the k highest patch scores (an image is as anomalous as its worst spot)."""
    k = max(1, min(k, patch_scores.shape[-1]))
    return patch_scores.topk(k, dim=-1).values.mean(-1)


def mutual_scores(
    features: torch.Tensor,
    reference: Sequence[torch.Tensor] | None = None,
    share: float = 0.5,
) -> torch.Tensor:
    """MuSc-style mutual scoring: (N, P, D) frames -> (N, P) patch scores, no normal images needed.

    Each patch of frame i is compared with every reference frame j: its distance to the nearest patch
    of j. These per-frame distances are sorted and the closest `share` of them averaged. A normal
    patch has close matches in nearly every frame of a line; a defect has close matches only in the
    frames that carry the same defect, so while those are at most `share` of the reference frames,
    frames without it enter its average and keep it high. With `share` = 0.5, a defect present in
    under half of the frames cannot score like a normal patch.

    `reference`: frames (P_j, D) to compare with; None = the frames themselves, each without itself.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    self_ref = reference is None
    refs = list(features) if self_ref else list(reference)
    n_ref = len(refs) - (1 if self_ref else 0)
    if n_ref < 1:
        raise ValueError("mutual scoring needs at least one other frame")
    k = max(1, math.ceil(share * n_ref))
    refs = [r.float() for r in refs]
    ref_sq = [(r * r).sum(-1) for r in refs]
    out = torch.empty(features.shape[:2], dtype=torch.float32, device=features.device)
    for i in range(features.shape[0]):
        q = features[i].float()
        d = torch.stack([pairwise_distances(q, r, rsq).min(1).values
                         for j, (r, rsq) in enumerate(zip(refs, ref_sq, strict=True)) if not (self_ref and j == i)])
        out[i] = d.topk(k, dim=0, largest=False).values.mean(0)
    return out


@dataclass(frozen=True)
class ScoreScale:
    """Robust location and scale of a score on normal frames (`robust_stats`), to put scores of different kinds in
    z units."""

    center: float
    scale: float

    @classmethod
    def of(cls, values: torch.Tensor) -> ScoreScale:
        return cls(*robust_stats(values))

    def z(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.center) / self.scale

    def to_dict(self) -> dict[str, float]:
        return {"center": self.center, "scale": self.scale}


def grid_to_map(patch_scores: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """(N, P) patch scores -> (N, size, size): 3x3 box filter and bilinear upsampling, as the zero-shot map
    (docs/algorithm.md §4.2), so both maps have the same smoothness before they are fused."""
    p = patch_scores.float().reshape(-1, 1, grid, grid)
    p = F.avg_pool2d(F.pad(p, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return F.interpolate(p, size=(size, size), mode="bilinear", align_corners=True)[:, 0]


def fuse(memory_z: torch.Tensor, zero_shot_z: torch.Tensor, weight: float) -> torch.Tensor:
    """weight x memory + (1 - weight) x zero-shot, both in z units of normal frames (docs/memory.md)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight must be in [0, 1], got {weight}")
    if weight == 1.0:
        return memory_z
    return weight * memory_z + (1.0 - weight) * zero_shot_z


def layers_key(layers: Sequence[int]) -> str:
    """How a feature-layer choice is named in metadata ('hidden:6,9')."""
    return "hidden:" + ",".join(str(int(i)) for i in layers)
