"""Words for operators: where the defect regions are, and what it means when image and pixel verdicts differ.

One implementation for every output (`anoclip score`, the demo, the dashboard) so they never disagree.

The stance on image vs pixel verdicts: the **image score decides** the verdict (alerts, yield, pass/fail).
The mask marks pixels above the pixel threshold; it says *where* a frame looks abnormal, never *whether*.
The two come from different parts of the model (CLS token vs patch tokens) and can disagree; when they
do, the verdict stands and the outputs carry a note saying so instead of hiding either side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

PIXEL_ONLY = "pixel_only"
"""Verdict normal, but some pixels are above the pixel threshold: the mask marks suspicious areas only."""
IMAGE_ONLY = "image_only"
"""Verdict anomalous, but no pixel is above the pixel threshold: the model cannot say where."""


def _where(cx: float, cy: float) -> str:
    """Thirds of the frame: 'upper left' ... 'centre' ... 'lower right'."""
    row = "upper" if cy < 1 / 3 else ("lower" if cy > 2 / 3 else "middle")
    col = "left" if cx < 1 / 3 else ("right" if cx > 2 / 3 else "centre")
    if row == "middle" and col == "centre":
        return "centre"
    if row == "middle":
        return f"middle {col}"
    return f"{row} {col}" if col != "centre" else f"{row} centre"


def describe_regions(regions: Sequence[Mapping[str, Any]] | None, width: int = 0, height: int = 0) -> str:
    """E.g. '2 regions, largest 3.1% of frame, upper left'; the pixel size when the frame size is unknown."""
    regs = [r for r in (regions or []) if isinstance(r, Mapping)]
    if not regs:
        return "no region above the pixel threshold"
    big = max(regs, key=lambda r: float(r.get("area") or 0))
    n = f"{len(regs)} region{'s' if len(regs) != 1 else ''}"
    area = float(big.get("area") or 0)
    box = big.get("box")
    if width > 0 and height > 0:
        share = 100.0 * area / (width * height)
        size = f"{share:.1f}% of frame" if share >= 0.1 else "under 0.1% of frame"
        if isinstance(box, Sequence) and len(box) == 4:
            x0, y0, x1, y1 = (float(v) for v in box)
            return f"{n}, largest {size}, {_where((x0 + x1) / 2 / width, (y0 + y1) / 2 / height)}"
        return f"{n}, largest {size}"
    return f"{n}, largest {int(area)} px"


def verdict_agreement(anomalous: bool, defect_area: int) -> str:
    """'' when the image verdict and the mask agree, else `PIXEL_ONLY` or `IMAGE_ONLY`."""
    if not anomalous and defect_area > 0:
        return PIXEL_ONLY
    if anomalous and defect_area == 0:
        return IMAGE_ONLY
    return ""


def verdict_note(anomalous: bool, defect_area: int, width: int = 0, height: int = 0) -> str:
    """A sentence for outputs when the verdicts disagree ('' when they agree)."""
    kind = verdict_agreement(anomalous, defect_area)
    if kind == PIXEL_ONLY:
        share = f" ({100.0 * defect_area / (width * height):.1f}% of the frame)" if width > 0 and height > 0 else ""
        return (f"verdict normal by image score; {defect_area} px{share} are above the pixel threshold and are "
                "marked as suspicious only")
    if kind == IMAGE_ONLY:
        return "verdict anomalous by image score; no pixel is above the pixel threshold, so there is no location"
    return ""
