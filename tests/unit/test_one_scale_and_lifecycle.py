"""The one score scale, the threshold state a follower reads, and the lifecycle shared by adapters and banks
(pure logic: fakes stand in for Redis and the kinds)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch

from pipeline.adaptation.lifecycle import Candidate, Loaded, VersionFollower, settle
from pipeline.adaptation.registry import PromotionResult
from pipeline.inspection.score_scale import Z_MID, from_z, thresholds_from_z, to_z
from pipeline.inspection.thresholds import LineThresholds, manual_override
from pipeline.settings import ThresholdSettings


def test_z_three_is_the_shared_decision_point_and_the_map_is_increasing() -> None:
    assert from_z(Z_MID) == 0.5 == from_z(3.0)
    fine = from_z(torch.linspace(-20, 20, 4000))  # 0.01 z apart: distinct in float32 across normal and defect
    assert fine.dtype == torch.float32 and bool((fine[1:] > fine[:-1]).all())
    units = from_z(torch.arange(-20.0, 35.0))  # whole z units apart: distinct up to z = 34, still below 1.0
    assert bool((units[1:] > units[:-1]).all()) and float(units.max()) < 1.0 and float(units.min()) > 0.0
    for z in (-4.0, 0.0, 1.7, 3.0, 9.5):
        assert to_z(from_z(z)) == pytest.approx(z, abs=1e-9)
        assert from_z(z) == pytest.approx(float(from_z(torch.tensor(z))), abs=1e-6)  # one map for floats and maps
    assert 0.0 <= from_z(-3000.0) < 1e-300 and from_z(3000.0) == 1.0  # no overflow either way
    with pytest.raises(ValueError):
        to_z(1.0)


def test_quantiles_commute_with_the_map() -> None:
    z = np.random.default_rng(0).normal(1.0, 1.5, 501)
    assert from_z(float(np.quantile(z, 0.9))) == pytest.approx(float(np.quantile([from_z(float(v)) for v in z], 0.9)))


def test_a_banks_z_thresholds_are_served_on_the_anomaly_scale() -> None:
    out = thresholds_from_z({"image": 2.0, "pixel": 3.0, "pixel_median": 0.0, "frames": 4, "image_source": "x",
                             "bad": "nan?"})
    assert out is not None
    assert out["image"] == pytest.approx(from_z(2.0)) and out["pixel"] == 0.5 and out["pixel_median"] == from_z(0.0)
    assert out["frames"] == 4 and out["image_source"] == "x", "what is not a threshold passes unchanged"
    assert thresholds_from_z({"image": "x", "pixel": float("inf")}) == {}
    assert thresholds_from_z(None) is None and thresholds_from_z({}) is None


def test_an_override_off_the_anomaly_scale_is_ignored_not_reread(caplog: pytest.LogCaptureFixture) -> None:
    assert manual_override({"manual_image": "0.62", "manual_pixel": "1"}) == (0.62, 1.0)
    assert manual_override({"manual_image": "4.5"}) == (None, None), "a memory line's old z override"
    assert "manual_image=4.5" in caplog.text and "1 / (1 + exp(-(z - 3) / 2))" in caplog.text
    assert manual_override({"manual_pixel": "-0.1", "manual_image": ""}) == (None, None)


def test_a_follower_judges_with_published_thresholds_and_calibrates_nothing(tmp_path: Path) -> None:
    from pipeline.inspection.thresholds import calibration_identity, follow_published
    from tests.conftest import make_tiny_settings

    s = make_tiny_settings(tmp_path, lines=[{"id": "a", "class_name": "bottle",
                                                                "threshold": {"warmup_frames": 3}}])
    th = LineThresholds(s.line("a").threshold)
    ident = calibration_identity(s, "a", "hash-1")
    state = {"calibrated_image": "0.61", "calibrated_pixel": "0.7", "pixel_median": "0.4",
             "calibration_frames": "3", **ident}
    follow_published("a", th, state, ident, first=True)
    assert th.calibration is not None and th.image == 0.61 and th.source == "calibrated"
    other = {**state, "calibrated_image": "0.9", "calibrated_prompts": "hash-2"}
    follow_published("a", th, other, ident, first=False)
    assert th.image == 0.61, "a calibration made with another prompt set is not adopted"
    follow_published("a", th, {**state, "manual_image": "0.75"}, ident, first=False)
    assert th.image == 0.75 and th.source == "manual"


class _Registry:
    noun = "adapter"

    def __init__(self) -> None:
        self.cur: str | None = None
        self.records: list[dict[str, Any]] = []
        self.published: list[dict[str, Any]] = []
        self.promote = True

    def current(self, line: str) -> str | None:
        return self.cur

    def record(self, line: str, action: str, **kw: Any) -> None:
        self.records.append({"action": action, **kw})

    def publish(self, line: str, blob: bytes, meta: dict[str, Any], **kw: Any) -> PromotionResult:
        self.published.append({"blob": blob, **kw})
        return PromotionResult(self.promote, "v9" if self.promote else None, "ok" if self.promote else "moved")


def test_a_version_that_cannot_be_loaded_is_skipped_once_and_a_redis_outage_is_not_its_fault() -> None:
    reg = _Registry()
    loads: list[str] = []
    installed: list[tuple[str, str | None]] = []

    def load(line: str, version: str) -> Loaded:
        loads.append(version)
        if version == "v2":
            raise RecursionError("a hostile blob")  # not one of the kind's own errors: still no crash
        if version == "v3":
            raise redis.ConnectionError("Redis away")
        return Loaded(object(), {"image": 0.4})

    f = VersionFollower(reg, load, lambda line, loaded, v: installed.append((line, v)))  # type: ignore[arg-type]
    assert f.sync("a") is False and loads == [], "nothing current, nothing to do"
    reg.cur = "v1"
    assert f.sync("a") is True and installed == [("a", "v1")] and f.following("a") == "v1"
    reg.cur = "v2"
    assert f.sync("a") is False and f.sync("a") is False and loads.count("v2") == 1, "bad once, never re-read"
    assert f.bad_versions("a") == {"v2"} and f.following("a") == "v1"
    reg.cur = "v3"
    with pytest.raises(redis.ConnectionError):
        f.sync("a")
    assert "v3" not in f.bad_versions("a"), "an outage says nothing about the version"
    reg.cur = None
    assert f.sync("a") is True and installed[-1] == ("a", None)
    f.note("a", "v7")
    reg.cur = "v7"
    assert f.sync("a") is False and "v7" not in loads, "installed by its own refresh: not loaded back"


def test_settle_publishes_or_records_once_per_request() -> None:
    reg = _Registry()
    out = settle(reg, "a", Candidate(None, {}, "gate said no", refusal_audit={"report": {"x": 1}}),  # type: ignore[arg-type]
                 owner="w", base_version="v1", request_ids=["r1", "r2"])
    assert out.action == "refuse" and not out.promoted and reg.published == []
    assert [(r["request_id"], r["reason"], r["report"]) for r in reg.records] == [
        ("r1", "gate said no", {"x": 1}), ("r2", "gate said no", {"x": 1})]
    reg.records.clear()
    f = VersionFollower(reg, lambda line, v: Loaded(None, None), lambda line, loaded, v: None)  # type: ignore[arg-type]
    out = settle(reg, "a", Candidate(b"blob", {"k": 1}, "good", audit={"n": 3}), owner="w",  # type: ignore[arg-type]
                 base_version="v1", request_ids=["r1", "r2"], follower=f)
    assert out.promoted and out.version == "v9" and f.following("a") == "v9"
    assert reg.published[0]["request_id"] == "r1" and reg.published[0]["audit"] == {"n": 3}
    assert [(r["action"], r["request_id"]) for r in reg.records] == [("promote", "r2")]
    reg.promote = False
    out = settle(reg, "a", Candidate(b"blob", {}, "good"), owner="w", base_version="v1")  # type: ignore[arg-type]
    assert out.action == "refuse" and out.reason == "moved"


def test_thresholds_config_stays_unbounded_for_lines_without_memory() -> None:
    assert ThresholdSettings(image=1.01).image == 1.01  # "never an alert" on a zero-shot line
    assert math.isclose(from_z(2.0), 1 / (1 + math.exp(0.5)))
