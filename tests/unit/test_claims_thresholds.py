"""Calibration details the property tests cannot see (their maps are small); added after mutation testing:
bounded, deterministic pixel sampling of large maps, and restoring only a complete calibration."""

from __future__ import annotations

import numpy as np

from pipeline.inspection.thresholds import LineThresholds
from pipeline.settings import ThresholdSettings


def _calibrated(maps: list[np.ndarray]) -> LineThresholds:
    th = LineThresholds(ThresholdSettings(warmup_frames=len(maps), quantile=0.5, pixel_quantile=0.999))
    for i, m in enumerate(maps):
        th.observe(0.1 * i, m)
    return th


def test_a_map_of_exactly_1024_pixels_is_kept_whole() -> None:
    maps = [np.random.default_rng(i).permutation(1024).reshape(32, 32).astype(np.float32) for i in range(3)]
    th = _calibrated(maps)
    assert th.pixel == float(np.quantile(np.concatenate([m.ravel() for m in maps]), 0.999))
    assert th.calibration.pixel_median == float(np.median(np.concatenate([m.ravel() for m in maps])))


def test_larger_maps_are_sampled_to_1024_pixels_the_same_way_every_time() -> None:
    maps = [np.random.default_rng(i).random((64, 96)).astype(np.float32) for i in range(3)]
    th = LineThresholds(ThresholdSettings(warmup_frames=4))
    th.observe(0.5, maps[0])
    assert [p.size for p in th._pixels] == [1024], "memory per warm-up frame is bounded"
    a, b = _calibrated(maps), _calibrated(maps)
    assert (a.pixel, a.calibration.pixel_median) == (b.pixel, b.calibration.pixel_median), "deterministic"
    everything = np.concatenate([m.ravel() for m in maps])
    assert a.pixel != float(np.quantile(everything, 0.999)) and abs(a.pixel - np.quantile(everything, 0.999)) < 0.01


def test_only_a_complete_calibration_is_restored() -> None:
    th = LineThresholds(ThresholdSettings(warmup_frames=3))
    th.restore({"calibrated_image": 0.3})
    th.restore({"calibrated_pixel": 0.3})
    assert th.calibration is None and th.calibrating
    th.restore({"calibrated_image": "0.3", "calibrated_pixel": "0.6"})
    assert (th.image, th.pixel, th.calibration.pixel_median, th.calibration.frames) == (0.3, 0.6, 0.6, 0)
