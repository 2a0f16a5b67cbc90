"""Defect regions of a binary mask: what an alert says about where the defect is and how big."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Region:
    area: int
    """Pixels in the connected component."""
    box: tuple[int, int, int, int]
    """x0, y0, x1, y1 in frame pixels; x1 and y1 are exclusive."""
    peak: float = 0.0
    """Highest anomaly probability inside the region."""

    def to_dict(self) -> dict[str, object]:
        return {"area": self.area, "box": list(self.box), "peak": round(self.peak, 6)}


def defect_regions(mask: np.ndarray, anomaly_map: np.ndarray | None = None, max_regions: int = 32) -> list[Region]:
    """8-connected components of `mask`, largest first, at most `max_regions`."""
    if not mask.any():
        return []
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    peaks = (
        ndimage.maximum(anomaly_map, labels, index=np.arange(1, n + 1))
        if anomaly_map is not None
        else np.zeros(n)
    )
    regions = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        ys, xs = sl
        regions.append(Region(int(areas[i]), (xs.start, ys.start, xs.stop, ys.stop), float(peaks[i - 1])))
    regions.sort(key=lambda r: r.area, reverse=True)
    return regions[:max_regions]
