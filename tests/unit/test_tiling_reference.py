"""Tile merging against an independent per-pixel reference (issue 14, item 2).

The reference knows nothing of `merge_tiles`' slicing: for every pixel it walks the tiles, keeps those
whose square covers the pixel, and averages their values there. Checked for 1, 2, 3 and 5 tiles, in
landscape and portrait frames, on random tile maps and end to end through the model (each tile scored
on its own crop). A merge in which a later tile overwrites the overlap, or that mixes up the axes,
fails these checks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.model import TileLayout

S = 64
SHAPES = {  # name -> (H, W); tiles = ceil(long / S)
    "1 tile": (64, 64),
    "landscape 2": (64, 100),
    "portrait 2": (100, 64),
    "landscape 3": (64, 150),
    "portrait 3": (150, 64),
    "landscape 5": (64, 300),
    "portrait 5": (300, 64),
    "landscape 2, half overlap": (64, 96),
}


def reference_merge(tiles: np.ndarray, starts: list[int], height: int, width: int) -> np.ndarray:
    """(n, S, S) tile maps of one frame -> (H, W): per pixel, the mean over the tiles covering it."""
    size = tiles.shape[-1]
    portrait = height > width
    out = np.full((height, width), np.nan)
    for y in range(height):
        for x in range(width):
            along = y if portrait else x  # position along the tiled (long) side
            vals = []
            for tile, st in zip(tiles, starts, strict=True):
                if st <= along < st + size:
                    vals.append(tile[y - st, x] if portrait else tile[y, x - st])
            assert vals, f"pixel ({y}, {x}) is covered by no tile"
            out[y, x] = sum(vals) / len(vals)
    return out


@pytest.mark.parametrize("name", list(SHAPES))
def test_layout_covers_the_frame_with_the_fewest_evenly_spaced_tiles(name: str) -> None:
    h, w = SHAPES[name]
    lay = TileLayout(h, w, S)
    long = max(h, w)
    starts = lay.starts
    assert len(starts) == math.ceil(long / S)
    assert starts[0] == 0 and starts[-1] == long - S and starts == sorted(starts)
    gaps = np.diff(starts)
    assert (gaps <= S).all() and (gaps.max() - gaps.min() <= 1 if gaps.size else True)
    assert lay.axis == (3 if w >= h else 2)


@pytest.mark.parametrize("name", list(SHAPES))
def test_merge_tiles_equals_the_per_pixel_reference(model, name: str) -> None:
    h, w = SHAPES[name]
    lay = TileLayout(h, w, S)
    n = len(lay.starts)
    b = 2  # two frames, so the frame-major order of the tiles is checked too
    g = torch.Generator().manual_seed(sum(SHAPES[name]))
    tiles = torch.rand(b * n, S, S, generator=g, dtype=torch.float64)
    merged = model.merge_tiles(tiles, lay)
    assert merged.shape == (b, h, w)
    for i in range(b):
        expected = reference_merge(tiles[i * n : (i + 1) * n].numpy(), lay.starts, h, w)
        np.testing.assert_allclose(merged[i].numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(SHAPES))
def test_forward_maps_equal_the_reference_merge_of_each_tiles_own_map(model, text, name: str) -> None:
    h, w = SHAPES[name]
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))
    out = model(x, text)
    starts = TileLayout(h, w, S).starts
    assert out.tile_starts == starts
    crops = [x[..., st : st + S, :] if h > w else x[..., st : st + S] for st in starts]
    own = [model(c, text) for c in crops]  # each crop is a square frame: one tile, no merging involved
    expected = reference_merge(np.stack([o.anomaly_maps[0].numpy() for o in own]), starts, h, w)
    np.testing.assert_allclose(out.anomaly_maps[0].numpy(), expected, rtol=1e-5, atol=1e-6)
    image_score = np.mean([float(o.image_scores[0]) for o in own])
    assert float(out.image_scores[0]) == pytest.approx(image_score, rel=1e-5, abs=1e-6)
