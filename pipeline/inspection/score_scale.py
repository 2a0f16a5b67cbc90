"""The one score scale every line is judged, published and shown on: the anomaly score, 0 to 1.

A zero-shot or adapter line scores p(abnormal) (the abnormal prompts' share, 0.5 where they start to win).
A line with a patch memory scores in z units of its own normal frames (0 = a typical normal frame, each unit
one spread of normal frames' upper half; unbounded above). Both leave the model as they are and meet here:
memory z is mapped onto 0..1 by a logistic with its midpoint at `Z_MID` and slope 1/`Z_SPREAD`, so

* 0.5 is the default decision point on every line: p(abnormal) = 0.5, or z = 3 (the memory's cold-start
  threshold, three spreads above the normal frames);
* the map is strictly increasing, so a quantile of mapped scores is the mapped quantile: thresholds
  calibrated in z and in the anomaly score pick the same frames, and AUROC and every ranking are unchanged;
* a threshold, a Prometheus histogram bucket, a dashboard column or an operator's override means the same
  kind of number on every line, whatever the line runs (zero-shot, adapter, memory, or adapter and memory).

`Z_SPREAD` = 2 keeps float32 maps distinct where it matters: scores 0.01 z apart stay apart up to z = 20 and
whole z units apart up to z = 34 (still below 1.0), far past any normal frame, so masks and rankings of strong
defects do not collapse to ties.
Internals that compare memories (the bank gate, bank thresholds, `anoclip eval --memory`) stay in z.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeVar

import torch

Z_MID = 3.0
"""z that maps to 0.5."""
Z_SPREAD = 2.0
"""z units per logistic unit."""

T = TypeVar("T", float, torch.Tensor)


def from_z(z: T) -> T:
    """Memory z units -> anomaly score in (0, 1)."""
    if isinstance(z, torch.Tensor):
        return torch.sigmoid((z.float() - Z_MID) / Z_SPREAD)
    x = (float(z) - Z_MID) / Z_SPREAD
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def to_z(score: float) -> float:
    """Anomaly score in (0, 1) -> memory z units (the inverse of `from_z`; for reading old z thresholds)."""
    if not 0.0 < score < 1.0:
        raise ValueError(f"an anomaly score lies strictly between 0 and 1, got {score}")
    return Z_MID + Z_SPREAD * math.log(score / (1.0 - score))


def thresholds_from_z(d: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A version's `thresholds` block written in z units (a memory bank's metadata) on the anomaly scale.

    Keys that are not thresholds pass unchanged; values that are not numbers are dropped."""
    if not d:
        return None
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k in ("image", "pixel", "pixel_median"):
            try:
                f = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(f):
                out[k] = from_z(f)
        else:
            out[k] = v
    return out
