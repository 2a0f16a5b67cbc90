"""Calibration details the property tests cannot see (their maps are small); added after mutation testing:
bounded, deterministic pixel sampling of large maps, and restoring only a complete calibration."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.inspection.thresholds import Calibration, LineThresholds, ThresholdView, VersionThresholds
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


# --- per-version thresholds: added after mutation testing ---------------------------------------------
def _line(**cfg: object) -> LineThresholds:
    th = LineThresholds(ThresholdSettings(warmup_frames=2, **cfg))  # type: ignore[arg-type]
    for s in (0.4, 0.6):
        th.observe(s, np.full((4, 4), s))
    return th  # calibrated: image 0.594 (quantile 0.99 of 0.4, 0.6), pixel ~0.6, pixel median 0.5


def test_the_last_eight_versions_keep_their_thresholds_and_a_re_served_one_is_newest() -> None:
    th = _line()
    for i in range(1, 9):
        th.set_version(f"v{i}", {"pixel": i / 100})
    th.set_version("v1", {"pixel": 0.01})  # served again: now the newest, so v2 is the oldest
    th.set_version("v9", {"pixel": 0.09})
    assert [v for v in (f"v{i}" for i in range(1, 10)) if th.has_version(v)] == ["v1", *(f"v{i}" for i in range(3, 10))]
    assert th.view("v2").pixel == th.view(None).pixel and th.view("v2").pixel_source == "calibrated"
    assert th.view("v1").pixel == 0.01 and th.view("v3").pixel == 0.03


def test_re_serving_a_version_without_thresholds_forgets_the_old_ones() -> None:
    th = _line()
    th.set_version("v1", {"pixel": 0.2, "image": 0.3})
    th.set_version("v1", {"frames": 3})
    assert not th.has_version("v1") and th.version_thresholds("v1") is None
    assert th.view("v1") == th.view(None), "v1's frames fall back to the line's thresholds"
    assert not th.has_version(None) and th.version_thresholds(None) is None


def test_numeric_strings_count_and_either_threshold_alone_is_enough() -> None:
    vt = VersionThresholds.from_meta("v2", {"image": "0.42", "pixel": None, "pixel_median": "bad"})
    assert vt == VersionThresholds("v2", 0.42, None, None)
    assert VersionThresholds.from_meta("v3", {"pixel": 0.7}) == VersionThresholds("v3", None, 0.7, None)
    assert VersionThresholds.from_meta("v4", {"pixel_median": 0.1}) is None, "a median alone is no threshold"
    assert VersionThresholds.from_meta("v5", {"pixel": ["0.3"]}) is None, "a non-number is ignored, never raised"


def test_a_view_names_the_version_only_when_its_thresholds_take_part() -> None:
    th = _line()
    th.set_version("v1", {"image": 0.45})
    v = th.view("v1")
    assert (v.image, v.image_source, v.pixel_source, v.version, v.source) == (0.45, "version", "calibrated", "v1",
                                                                             "version")
    th.set_override(image=0.9)
    v = th.view("v1")
    assert (v.image, v.source, v.version) == (0.9, "manual", None), "overridden: v1's threshold plays no part"
    assert th.view(None).version is None
    d = th.to_dict()
    assert (d["version"], d["version_image"], d["version_pixel"], d["source"]) == ("v1", 0.45, "", "manual")


@pytest.mark.parametrize(("image_src", "pixel_src", "word"), [
    ("manual", "version", "manual"), ("version", "manual", "manual"), ("config", "version", "config"),
    ("calibrated", "version", "version"), ("default", "calibrated", "calibrated"), ("default", "default", "default"),
])
def test_the_one_word_source_is_the_stronger_of_the_two(image_src: str, pixel_src: str, word: str) -> None:
    assert ThresholdView(0.5, 0.5, image_src, pixel_src, (0.4, 0.6)).source == word


def test_the_heatmap_median_comes_with_the_pixel_threshold_it_belongs_to() -> None:
    th = _line(heatmap_span=0.05)
    cal = th.calibration
    assert cal is not None and cal.pixel_median < cal.pixel
    th.set_version("v1", {"pixel": 0.3, "pixel_median": 0.2})
    assert th.view("v1").heatmap_range == pytest.approx((0.2, 0.4))
    th.set_version("v2", {"pixel": 0.3})  # no median of its own: the line's median (0.5) is above 0.3
    assert th.view("v2").heatmap_range == pytest.approx((0.25, 0.35)), "median above the threshold: the span"
    th.set_version("v3", {"pixel": 0.5, "pixel_median": 0.5})
    assert th.view("v3").heatmap_range == pytest.approx((0.45, 0.55)), "median equal to the threshold: the span"
    th.set_override(pixel=0.7)  # the pixel threshold is manual now: the version's median is not its median
    assert th.view("v1").heatmap_range == pytest.approx((cal.pixel_median, 0.7 + (0.7 - cal.pixel_median)))
    plain = LineThresholds(ThresholdSettings(warmup_frames=0, heatmap_span=0.05))
    assert plain.heatmap_range() == pytest.approx((0.45, 0.55)) and not plain.calibrating


def test_published_state_names_both_sources_and_restores_the_whole_calibration() -> None:
    th = _line()
    d = th.to_dict()
    assert (d["version"], d["version_image"], d["version_pixel"]) == ("", "", ""), "the base model: no version"
    assert (d["image_source"], d["pixel_source"]) == ("calibrated", "calibrated")
    th.set_version("v1", {"pixel": 0.3})
    d = th.to_dict()
    assert (d["image_source"], d["pixel_source"], d["source"]) == ("calibrated", "version", "version")
    cal = th.calibration
    assert cal is not None and cal.pixel_median != cal.pixel and cal.frames == 2
    again = LineThresholds(ThresholdSettings(warmup_frames=2))
    again.restore(th.to_dict())
    assert again.calibration == cal, "median and frame count come back too, not only the two thresholds"


def test_only_one_frame_completes_a_calibration_even_when_another_thread_finished_it_first() -> None:
    th = LineThresholds(ThresholdSettings(warmup_frames=2))
    th.observe(0.4, np.full((4, 4), 0.4, np.float32))
    done_elsewhere = Calibration(image=0.9, pixel=0.9, pixel_median=0.1, frames=2)

    class OtherThreadFinishes:
        """The lock, taken just after another thread completed the calibration."""

        def __enter__(self) -> None:
            th.calibration = done_elsewhere

        def __exit__(self, *exc: object) -> None:
            return None

    th._lock = OtherThreadFinishes()  # type: ignore[assignment]
    assert th.observe(0.6, np.full((4, 4), 0.6, np.float32)) is False, "this frame did not complete it"
    assert th.calibration is done_elsewhere and len(th._scores) == 1, "...and was not added to it"


def test_warm_up_pixels_are_kept_as_float32() -> None:
    th = LineThresholds(ThresholdSettings(warmup_frames=3))
    th.observe(0.5, np.random.default_rng(0).random((8, 8)))  # float64 map
    assert th._pixels[0].dtype == np.float32 and th._pixels[0].shape == (64,), "4 bytes per kept pixel"
