"""Detection-metric paths the other metric tests did not reach; added after mutation testing: a histogram
bin alone larger than the memory budget, the table row of a class, and the undefined cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from pipeline.evaluation.metrics import (
    METRIC_KEYS,
    PixelAccumulator,
    PixelMetrics,
    class_row,
    f1_max,
    image_metrics,
    mean_over_classes,
)


@pytest.mark.parametrize("budget", [50, 10**9])
def test_scores_packed_into_one_histogram_bin_are_still_exact(budget: int) -> None:
    rng = np.random.default_rng(0)
    # every score in [0.5, 0.5039): one bin of the key's upper 16 bits, here larger than a budget of 50
    maps = [(0.5 + 0.0039 * rng.random((12, 12))).astype(np.float32) for _ in range(4)]
    masks = [rng.random((12, 12)) < 0.3 for _ in range(4)]
    for m, g in zip(maps, masks, strict=True):
        m[g] += np.float32(0.001)
    y = np.concatenate([g.ravel() for g in masks])
    s = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    with PixelAccumulator(memory_budget=budget) as acc:
        for m, g in zip(maps, masks, strict=True):
            acc.add(m, g)
        r = acc.result()
        assert acc.spilled == (budget == 50)
    assert r.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert r.ap == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert r.f1_max == pytest.approx(f1_max(y, s), abs=1e-12)


def test_class_row_has_every_metric_key() -> None:
    im = image_metrics([0, 1, 0, 1], [0.1, 0.9, 0.3, 0.7])
    with PixelAccumulator() as acc:
        acc.add(np.array([[0.1, 0.9]], np.float32), np.array([[False, True]]))
        px = acc.result()
    row = class_row(im, px)
    assert list(row) == list(METRIC_KEYS)
    assert row == {"image_auroc": im.auroc, "image_ap": im.ap, "image_pr_auc": im.pr_auc, "image_f1_max": im.f1_max,
                   "pixel_auroc": px.auroc, "pixel_ap": px.ap, "pixel_f1_max": px.f1_max, "aupro": px.aupro}
    no_pixels = class_row(im, None)
    assert no_pixels["image_auroc"] == 1.0
    assert all(math.isnan(no_pixels[k]) for k in METRIC_KEYS if not k.startswith("image_"))


def test_undefined_cases_are_nan_and_bad_input_is_named() -> None:
    one_class = image_metrics([1, 1, 1], [0.2, 0.4, 0.3])
    assert math.isnan(one_class.auroc) and math.isnan(one_class.pr_auc) and math.isnan(one_class.f1_max)
    assert (one_class.n_images, one_class.n_anomalous, one_class.roc_fpr.size, one_class.roc_tpr.size) == (3, 3, 0, 0)
    assert math.isnan(f1_max(np.array([0, 0]), np.array([0.1, 0.2])))
    ok = image_metrics([0, 1, 0, 1, 1], [0.1, 0.9, 0.35, 0.3, 0.8])
    fpr, tpr, _ = roc_curve([0, 1, 0, 1, 1], [0.1, 0.9, 0.35, 0.3, 0.8])
    assert np.array_equal(ok.roc_fpr, fpr) and np.array_equal(ok.roc_tpr, tpr)
    with pytest.raises(ValueError, match="^3 labels but 2 scores$"):
        image_metrics([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="^image scores contain NaN or infinity$"):
        image_metrics([0, 1], [0.1, float("inf")])
    means, counts = mean_over_classes({"a": {"x": float("nan"), "y": 0.5}, "b": {"x": float("nan"), "y": 1.0}})
    assert math.isnan(means["x"]) and counts == {"x": 0, "y": 2} and means["y"] == 0.75


def test_a_bin_larger_than_the_budget_keeps_its_scores_for_aupro_and_the_roc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Added after mutation testing: the exact-bin path must return the scores themselves (AUPRO's thresholds
    compare them), and count a bin spread over several reads of the spill file."""
    rng = np.random.default_rng(1)
    maps = [(0.5 + 0.0039 * rng.random((16, 16))).astype(np.float32) for _ in range(3)]
    masks = [np.zeros((16, 16), bool) for _ in range(3)]
    for m, g in zip(maps, masks, strict=True):
        g[4:9, 3:10] = True
        m[g] += np.float32(0.0015)

    def run(budget: int) -> PixelMetrics:
        with PixelAccumulator(memory_budget=budget) as acc:
            for m, g in zip(maps, masks, strict=True):
                acc.add(m, g)
            assert acc.spilled == (budget < 3 * 256)
            return acc.result()

    in_memory = run(10**9)
    monkeypatch.setattr("pipeline.evaluation.metrics._READ_CHUNK", 97)  # the spill file read in many pieces
    spilled = run(40)  # the single 16-bit bin (768 scores) is far above the budget: counted exactly
    for name in ("auroc", "ap", "f1_max", "aupro", "aupro_unrescaled"):
        assert getattr(spilled, name) == pytest.approx(getattr(in_memory, name), abs=1e-12), name
    assert np.array_equal(spilled.pro_fpr, in_memory.pro_fpr)
    assert np.array_equal(spilled.roc_fpr, in_memory.roc_fpr) and np.array_equal(spilled.roc_tpr, in_memory.roc_tpr)
    assert (spilled.n_pixels_anomalous, spilled.n_pixels_normal) == (3 * 35, 3 * (256 - 35))
    assert 0 < spilled.pro_fpr[100] < 1, "AUPRO's thresholds fall inside the bin: the scores matter, not only order"


def test_any_nonzero_label_is_anomalous_and_empty_means_warn_nothing() -> None:
    """Added after mutation testing: labels are truthiness (0/255 masks, counts), and a metric no class
    defines averages to NaN without numpy's 'mean of empty slice' warning."""
    ref = image_metrics([0, 1, 0, 1, 0], [0.2, 0.9, 0.4, 0.3, 0.1])
    odd = image_metrics([0, 255, 0, 7, 0], [0.2, 0.9, 0.4, 0.3, 0.1])
    assert (odd.auroc, odd.ap, odd.pr_auc, odd.f1_max, odd.n_anomalous) == (
        ref.auroc, ref.ap, ref.pr_auc, ref.f1_max, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        means, counts = mean_over_classes({"a": {"x": float("nan")}, "b": {"x": float("inf")}})
    assert math.isnan(means["x"]) and counts == {"x": 0}
