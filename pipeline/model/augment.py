"""The 22 views of the official MVTec image score (docs/algorithm.md §4.3); off by default."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_ANGLES = (math.pi / 4, 3 * math.pi / 16, math.pi / 8, math.pi / 16)
_SHIFTS = ((0.2, 0.2), (0.1, 0.1))
N_VIEWS = 22


def _affine(x: torch.Tensor, thetas: list[torch.Tensor]) -> torch.Tensor:
    n = x.shape[0]
    out = []
    for theta in thetas:
        t = theta.to(x).unsqueeze(0).expand(n, 2, 3)
        grid = F.affine_grid(t, list(x.shape), align_corners=True)
        out.append(F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True))
    return torch.cat(out)


def multiview(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) normalised images -> (21 * N, 3, S, S): every view but the original, view-major."""
    thetas = []
    for a in _ANGLES:
        for s in (1, -1):
            c, si = math.cos(s * a), math.sin(s * a)
            thetas.append(torch.tensor([[c, -si, 0.0], [si, c, 0.0]]))
    for dx, dy in _SHIFTS:
        for sx in (1, -1):
            for sy in (1, -1):
                thetas.append(torch.tensor([[1.0, 0.0, sx * dx], [0.0, 1.0, sy * dy]]))
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    gray = (x * weights).sum(1, keepdim=True).expand_as(x)  # on the normalised tensor, as the official code
    views = [_affine(x, thetas), x.flip(-1), gray]
    views += [torch.rot90(x, k, dims=(-2, -1)) for k in (1, 2, 3)]
    return torch.cat(views)
