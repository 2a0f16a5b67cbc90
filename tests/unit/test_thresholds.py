"""Per-line thresholds: precedence, calibration from warm-up frames, heatmap range, restore."""

from __future__ import annotations

import numpy as np
import pytest

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


# --- thresholds per version (issue 11, item 3) --------------------------------------------------------
def _calibrated() -> LineThresholds:
    th = LineThresholds(ThresholdSettings(warmup_frames=2))
    for s in (0.4, 0.6):
        th.observe(s, np.full((4, 4), s))
    return th


def test_a_served_version_brings_its_own_pixel_threshold_and_heatmap_range() -> None:
    th = _calibrated()
    base_pixel, base_image = th.pixel, th.image
    th.set_version("v3", {"pixel": 0.31, "pixel_median": 0.29, "image": None, "frames": 40})
    assert th.serving == "v3" and th.has_version("v3")
    assert (th.pixel, th.image) == (0.31, base_image)  # an adapter keeps the line's image threshold
    assert th.source == "version" and th.image_source == "calibrated"
    assert th.heatmap_range() == pytest.approx((0.29, 0.33))
    # frames still in flight from the base model are judged with the base thresholds
    assert th.view(None).pixel == base_pixel and th.view(None).source == "calibrated"
    d = th.to_dict()
    assert d["version"] == "v3" and d["version_pixel"] == 0.31 and d["version_image"] == "" and d["pixel"] == 0.31
    th.set_version("v4", {"pixel": 0.2, "image": 0.7})
    assert th.view("v3").pixel == 0.31 and (th.pixel, th.image) == (0.2, 0.7)  # v3's frames keep v3's
    th.set_version(None)
    assert (th.pixel, th.image, th.source) == (base_pixel, base_image, "calibrated")


def test_manual_and_config_thresholds_win_over_a_versions() -> None:
    th = _calibrated()
    th.set_version("v1", {"pixel": 0.31, "image": 0.41})
    th.set_override(pixel=0.9)
    assert (th.pixel, th.image, th.source) == (0.9, 0.41, "manual")
    assert th.view("v1").pixel == 0.9
    fixed = LineThresholds(ThresholdSettings(pixel=0.8))
    fixed.set_version("v1", {"pixel": 0.31})
    assert (fixed.pixel, fixed.source) == (0.8, "config")


def test_a_version_without_usable_thresholds_leaves_the_lines() -> None:
    th = _calibrated()
    for junk in (None, {}, {"pixel": "nan"}, {"pixel": None, "image": "x"}, {"pixel": float("inf")}):
        th.set_version("v9", junk)
        assert not th.has_version("v9") and th.source == "calibrated" and th.serving == "v9"
