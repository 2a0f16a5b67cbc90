"""Metrics against scikit-learn where it has them, against hand-computed cases and a brute-force
reading of the definition where it does not (AUPRO)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from skimage.measure import label, regionprops
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from pipeline.evaluation.metrics import (
    AUPRO_STEPS,
    PixelAccumulator,
    as_percent,
    f1_max,
    float_keys,
    image_metrics,
    keys_to_float,
    mean_over_classes,
)


def _f1_from_pr(y: np.ndarray, s: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = 2 * p * r / (p + r)
    return float(np.nanmax(f))


def _maps(seed: int, n: int = 12, hw: tuple[int, int] = (40, 48), decimals: int | None = None):
    """Noisy maps with brighter blobs on the GT regions (several regions per image, some images normal)."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(n):
        m = np.zeros(hw, bool)
        if i % 3:
            for _ in range(int(rng.integers(1, 4))):
                y, x = rng.integers(0, hw[0] - 6), rng.integers(0, hw[1] - 6)
                m[y : y + int(rng.integers(2, 7)), x : x + int(rng.integers(2, 7))] = True
        a = rng.normal(size=hw) + 1.5 * m * rng.uniform(0.2, 1.0)
        if decimals is not None:
            a = np.round(a, decimals)  # many ties
        maps.append(a.astype(np.float32))
        masks.append(m)
    return maps, masks


def _brute_aupro(maps: list[np.ndarray], masks: list[np.ndarray], limit: float = 0.3) -> float:
    """The cflow-ad / APRIL-GAN definition read literally: dense thresholds, regionprops, sklearn auc."""
    amaps = np.stack(maps).astype(np.float64)
    gts = np.stack(masks)
    lo, hi = amaps.min(), amaps.max()
    pros, fprs = [], []
    for i in range(AUPRO_STEPS):
        th = lo + i * (hi - lo) / AUPRO_STEPS
        binary = amaps > th
        overlaps = []
        for b, g in zip(binary, gts, strict=True):
            for region in regionprops(label(g, connectivity=2)):
                rr, cc = region.coords[:, 0], region.coords[:, 1]
                overlaps.append(b[rr, cc].sum() / region.area)
        fprs.append(np.logical_and(~gts, binary).sum() / (~gts).sum())
        pros.append(np.mean(overlaps))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < limit
    f = fprs[keep]
    f = (f - f.min()) / (f.max() - f.min())
    return float(auc(f, pros[keep]))


# -- image level ---------------------------------------------------------------------------------


def test_image_metrics_match_sklearn_with_ties() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + 0.8 * y, 1)  # ties across labels
    m = image_metrics(y, s)
    assert m.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m.ap == pytest.approx(average_precision_score(y, s), abs=1e-12)
    p, r, _ = precision_recall_curve(y, s)
    assert m.pr_auc == pytest.approx(auc(r, p), abs=1e-12)
    assert m.pr_auc != pytest.approx(m.ap, abs=1e-6)  # the two definitions really differ
    assert m.f1_max == pytest.approx(_f1_from_pr(y, s), abs=1e-12)
    assert (m.n_images, m.n_anomalous) == (300, int(y.sum()))


def test_image_metrics_hand_case() -> None:
    # scores: normals 0.1, 0.4; anomalies 0.35, 0.8 -> pairs ranked right: 3 of 4 -> AUROC 0.75
    m = image_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert m.auroc == pytest.approx(0.75)
    # thresholds 0.8: P=1 R=.5; 0.4: P=.5 R=.5; 0.35: P=2/3 R=1 -> AP = .5*1 + .5*2/3
    assert m.ap == pytest.approx(0.5 + 0.5 * 2 / 3)
    # F1 at 0.35: 2*(2/3)*1/(2/3+1) = 0.8
    assert m.f1_max == pytest.approx(0.8)


def test_image_metrics_undefined_with_one_label() -> None:
    m = image_metrics([0, 0, 0], [0.2, 0.3, 0.4])
    assert math.isnan(m.auroc) and math.isnan(m.ap) and math.isnan(m.f1_max)
    with pytest.raises(ValueError, match="NaN"):
        image_metrics([0, 1], [0.1, float("nan")])


# -- pixel level ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "decimals", "spills"),
    [
        (10**9, None, False),  # all in RAM
        (3000, None, True),  # spilled, walked in groups of histogram bins
        (700, 2, True),  # spilled with heavy ties: single bins exceed the budget -> exact low-bit count
    ],
)
def test_pixel_metrics_equal_sklearn(budget: int, decimals: int | None, spills: bool) -> None:
    maps, masks = _maps(3, decimals=decimals)
    with PixelAccumulator(memory_budget=budget) as acc:
        for a, m in zip(maps, masks, strict=True):
            acc.add(a, m)
        assert acc.spilled is spills
        r = acc.result()
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([a.ravel() for a in maps])
    assert r.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert r.ap == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert r.f1_max == pytest.approx(_f1_from_pr(y, s), abs=1e-12)
    assert r.n_pixels_anomalous == int(y.sum()) and r.n_pixels_normal == int((~y).sum())
    assert r.n_regions == sum(int(label(m, connectivity=2).max()) for m in masks)
    assert r.roc_fpr[0] == 0 and r.roc_tpr[-1] == pytest.approx(1.0) and np.all(np.diff(r.roc_fpr) >= 0)


def test_aupro_matches_brute_force_definition() -> None:
    maps, masks = _maps(7, n=9)
    with PixelAccumulator(memory_budget=2000) as acc:  # spilled path too
        for a, m in zip(maps, masks, strict=True):
            acc.add(a, m)
        r = acc.result()
    assert r.aupro == pytest.approx(_brute_aupro(maps, masks), abs=1e-9)
    assert r.pro_fpr.shape == r.pro_overlap.shape == (AUPRO_STEPS,)


def test_aupro_hand_computed_case() -> None:
    """One all-normal image and one with two separate regions; thresholds t_i = i/200 (min 0, max 1).

    Normal pixels: 60 at 0, 10 each at .1025, .2025, .4025, .6025  ->  FPR = .4 (i<=20), .3 (21-40),
    .2 (41-80), .1 (81-120), 0 (121-199). Region R1 (4 px at 1.0) always found; R2 (4 px at .5025)
    found for i <= 100  ->  PRO = 1 (i<=100), .5 (i>=101).
    Kept (FPR < .3): i >= 41. Rescaled by .2: (1,1) .. (.5,1), (.5,.5) .. (0,.5)
        -> .5*1 + .5*.5 = 0.75.
    Unrescaled: .1*.5 (0->.1) + .1*1 (.1->.2) + .1*1 (.2->.3, the i<=40 points sit at .3) = .25 / .3.
    """
    normal = np.zeros((8, 12), np.float32)  # 96 px; with row 1 of the second image: 100 normal pixels
    flat = normal.ravel()
    flat[56:66], flat[66:76], flat[76:86], flat[86:96] = 0.1025, 0.2025, 0.4025, 0.6025  # 56 + 4 at 0
    img = np.zeros((3, 4), np.float32)
    gt = np.zeros((3, 4), bool)
    img[0], gt[0] = 1.0, True
    img[2], gt[2] = 0.5025, True
    with PixelAccumulator() as acc:
        acc.add(normal, np.zeros_like(normal, bool))
        acc.add(img, gt)
        r = acc.result()
    assert r.n_regions == 2 and r.n_pixels_normal == 100
    assert r.aupro_rescaled == pytest.approx(0.75, abs=1e-12)
    assert r.aupro_unrescaled == pytest.approx(0.25 / 0.3, abs=1e-12)
    with PixelAccumulator() as acc:
        acc.add(normal, np.zeros_like(normal, bool))
        acc.add(img, gt)
        assert acc.result("unrescaled").aupro == pytest.approx(0.25 / 0.3, abs=1e-12)


def test_aupro_interpolates_at_the_limit() -> None:
    """Normal pixels: 50 at 0, 50 at .5025 -> FPR .5 (i<=100), 0 (i>=101). Regions R1 (row 0, at 1.0)
    and R2 (row 2, at `r2`); thresholds t_i = i/200.

    No point has 0 < FPR < .3, so the rescaled variant is undefined (the reference divides 0 by 0).
    r2 = 1.0: PRO 1 everywhere -> unrescaled 1.
    r2 = .5025: PRO .5 at FPR 0, 1 at FPR .5 -> at .3 the curve is .5 + .5 * .3/.5 = .8
        -> area (.5 + .8)/2 * .3 = .195 -> .65.
    """
    normal = np.zeros((8, 12), np.float32)
    normal.ravel()[46:] = 0.5025  # 50 pixels; with row 1 below, 50 normal pixels sit at 0
    for r2, expected in ((1.0, 1.0), (0.5025, 0.65)):
        img = np.zeros((3, 4), np.float32)
        gt = np.zeros((3, 4), bool)
        img[0], gt[0] = 1.0, True
        img[2], gt[2] = r2, True
        with PixelAccumulator() as acc:
            acc.add(normal, np.zeros_like(normal, bool))
            acc.add(img, gt)
            r = acc.result()
        assert r.n_pixels_normal == 100 and r.n_regions == 2
        assert math.isnan(r.aupro_rescaled)
        assert r.aupro_unrescaled == pytest.approx(expected, abs=1e-12)


def test_perfect_and_inverted_maps() -> None:
    maps, masks = _maps(5, n=6)
    with PixelAccumulator() as acc:
        for m in masks:
            acc.add(m.astype(np.float32), m)
        good = acc.result()
    with PixelAccumulator() as acc:
        for m in masks:
            acc.add(1.0 - m.astype(np.float32), m)
        bad = acc.result()
    assert good.auroc == 1.0 and good.ap == 1.0 and good.f1_max == 1.0 and good.aupro_unrescaled == 1.0
    assert bad.auroc == 0.0 and bad.aupro_unrescaled == 0.0


def test_pixel_accumulator_rejects_bad_input_and_cleans_up(tmp_path: Path) -> None:
    acc = PixelAccumulator(memory_budget=10, spill_dir=tmp_path)
    with pytest.raises(ValueError, match="shapes"):
        acc.add(np.zeros((4, 4)), np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="NaN"):
        acc.add(np.full((4, 4), np.nan), np.zeros((4, 4), bool))
    acc.add(np.arange(16, dtype=np.float32).reshape(4, 4), np.eye(4, dtype=bool))
    assert acc.spilled and any(tmp_path.iterdir())
    r = acc.result()
    assert r.auroc == pytest.approx(roc_auc_score(np.eye(4).ravel(), np.arange(16)))
    acc.close()
    assert not any(tmp_path.iterdir())


def test_no_anomalous_pixels_is_undefined_not_an_error() -> None:
    with PixelAccumulator() as acc:
        acc.add(np.random.default_rng(0).random((8, 8)), np.zeros((8, 8), bool))
        r = acc.result()
    assert math.isnan(r.auroc) and math.isnan(r.ap) and math.isnan(r.aupro) and r.n_regions == 0


def test_float_keys_preserve_order_and_round_trip() -> None:
    rng = np.random.default_rng(2)
    v = np.concatenate(
        [rng.normal(size=1000) * 10.0 ** rng.integers(-30, 30, 1000), [0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45]]
    ).astype(np.float32)
    k = float_keys(v)
    order = np.argsort(k, kind="stable")
    assert np.all(np.diff(v[order].astype(np.float64)) >= 0)
    assert np.array_equal(keys_to_float(k), v + np.float32(0))  # -0.0 comes back as +0.0
    assert float_keys(np.array([-0.0], np.float32))[0] == float_keys(np.array([0.0], np.float32))[0]


def test_f1_max_helper_and_aggregation() -> None:
    y = np.array([0, 1, 1, 0, 1])
    s = np.array([0.1, 0.9, 0.4, 0.5, 0.8])
    assert f1_max(y, s) == pytest.approx(_f1_from_pr(y, s))
    means, counts = mean_over_classes(
        {"a": {"x": 0.5, "y": float("nan")}, "b": {"x": 1.0, "y": 0.25}, "c": {"x": 0.0, "y": 0.75}}
    )
    assert means == {"x": pytest.approx(0.5), "y": pytest.approx(0.5)}
    assert counts == {"x": 3, "y": 2}
    assert as_percent(0.91234) == 91.2 and as_percent(float("nan")) is None
