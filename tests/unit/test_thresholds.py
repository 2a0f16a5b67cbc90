"""Per-line thresholds: precedence, calibration from warm-up frames, heatmap range, restore."""

from __future__ import annotations

import numpy as np

from pipeline.inspection.thresholds import LineThresholds
from pipeline.settings import ThresholdSettings


def test_default_until_calibrated_then_quantile() -> None:
    th = LineThresholds(ThresholdSettings(warmup_frames=50, quantile=0.9, pixel_quantile=0.99))
    assert (th.image, th.source) == (0.5, "default")
    rng = np.random.default_rng(0)
    scores = rng.normal(0.48, 0.005, 50)
    done = [th.observe(s, rng.normal(0.49, 0.002, (16, 16))) for s in scores]
    assert done[-1] and not any(done[:-1])
    assert th.source == "calibrated"
    assert abs(th.image - np.quantile(scores, 0.9)) < 1e-9
    assert 0.49 < th.pixel < 0.50
    lo, hi = th.heatmap_range()
    assert lo < th.pixel < hi and abs((hi - th.pixel) - (th.pixel - lo)) < 1e-9
    assert not th.observe(0.9, np.zeros((4, 4)))  # calibration is done once


def test_precedence_manual_over_config_over_calibrated() -> None:
    th = LineThresholds(ThresholdSettings(image=0.7, warmup_frames=1))
    th.observe(0.1, np.zeros((2, 2)))
    assert (th.image, th.source) == (0.7, "config")
    th.set_override(image=0.9)
    assert (th.image, th.source) == (0.9, "manual")
    th.set_override()
    assert th.image == 0.7


def test_restore_resumes_calibration() -> None:
    a = LineThresholds(ThresholdSettings(warmup_frames=3))
    for s in (0.4, 0.5, 0.6):
        a.observe(s, np.full((2, 2), s))
    b = LineThresholds(ThresholdSettings(warmup_frames=3))
    b.restore(a.to_dict())
    assert not b.calibrating and b.image == a.image and b.pixel == a.pixel
