"""Detection-metric paths the other metric tests did not reach; added after mutation testing: a histogram
bin alone larger than the memory budget, the table row of a class, and the undefined cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from pipeline.evaluation.metrics import (
    METRIC_KEYS,
    PixelAccumulator,
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
