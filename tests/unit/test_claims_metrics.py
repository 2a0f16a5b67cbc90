"""Detection-metric paths the other metric tests did not reach; added after mutation testing: a histogram
bin alone larger than the memory budget, the table row of a class, and the undefined cases."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from pipeline.evaluation.metrics import (
    METRIC_KEYS,
    PixelAccumulator,
    PixelMetrics,
    class_row,
    f1_max,
    float_keys,
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


def test_aupro_on_hand_worked_curves() -> None:
    """Added after mutation testing: both AUPRO variants on PRO curves worked by hand (threshold order, FPR
    non-increasing), including the interpolation at FPR 0.3 and the closing point (1, 1)."""
    from pipeline.evaluation.metrics import _aupro

    # rescaled: kept FPRs 0.25, 0.15, 0.05 -> 1, 0.5, 0: 0.5 * (0.8 + 0.5) / 2 + 0.5 * (0.5 + 0.1) / 2 = 0.475
    # unrescaled: (0,0) (.05,.1) (.15,.5) (.25,.8), then .84 at .3 on the way to (.5, 1): 0.1385 / 0.3
    r, u = _aupro(np.array([0.5, 0.25, 0.15, 0.05]), np.array([1.0, 0.8, 0.5, 0.1]))
    assert r == pytest.approx(0.475, abs=1e-12) and u == pytest.approx(0.1385 / 0.3, abs=1e-12)
    # every FPR below 0.3: the segment crossing 0.3 ends at the closing point (1, 1): 0.205625 / 0.3
    r, u = _aupro(np.array([0.2, 0.1, 0.0]), np.array([0.9, 0.6, 0.2]))
    assert u == pytest.approx(0.205625 / 0.3, abs=1e-12)
    # two kept points are enough for the rescaled variant; non-finite points are dropped, not propagated
    r, _ = _aupro(np.array([0.5, 0.2, float("nan"), 0.1]), np.array([1.0, 0.7, 0.5, 0.4]))
    assert r == pytest.approx(0.55, abs=1e-12)
    r, u = _aupro(np.array([0.2, 0.1]), np.array([float("nan"), 0.3]))
    assert math.isnan(r) and u == pytest.approx((0.1 * 0.3 / 2 + 0.2 * (0.3 + (0.3 + 0.7 * 2 / 9)) / 2) / 0.3,
                                                abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r, _ = _aupro(np.array([0.1, 0.1]), np.array([0.2, 0.4]))  # no FPR spread: undefined, not 0/0
    assert math.isnan(r)
    r, u = _aupro(np.zeros(0), np.zeros(0))
    assert math.isnan(r) and math.isnan(u)


def test_f1_max_equals_the_best_threshold_found_by_brute_force_quietly() -> None:
    """Added after mutation testing: F1-max against every threshold tried by hand (ties across labels),
    labels taken as truthiness and any shape, as `image_metrics` takes them, and the PR point with
    precision = recall = 0 (a normal image scored highest) skipped without numpy's 0/0 warning."""
    rng = np.random.default_rng(11)
    y = rng.random(80) < 0.4
    s = np.round(rng.random(80) + 0.3 * y, 1)  # ties, some across labels
    brute = max(2 * (y & (s >= t)).sum() / (y.sum() + (s >= t).sum()) for t in np.unique(s))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f1_max(y, s) == pytest.approx(brute, abs=1e-12)
        assert f1_max(np.where(y, 255, 0), s) == f1_max(y, s)  # 0/255 masks, not class ids
        assert f1_max(y.reshape(8, 10), s.reshape(8, 10)) == f1_max(y, s)
        # top score on a normal image: the curve has a (precision 0, recall 0) point; best is 2/3 at t=0.1
        assert f1_max(np.array([0, 1]), np.array([0.9, 0.1])) == pytest.approx(2 / 3)


def test_sorted_unique_and_merge_counts_on_duplicates_and_ties() -> None:
    """Added after mutation testing: the helpers behind every pixel group: distinct keys with integer
    counts, a key present in both labels counted on each side, empty inputs giving empty int64 counts."""
    from pipeline.evaluation.metrics import _merge_counts, _sorted_unique

    vals, counts = _sorted_unique(np.array([7, 3, 7, 7, 0, 3, 9], np.uint32))
    assert vals.tolist() == [0, 3, 7, 9] and counts.tolist() == [1, 2, 3, 1] and counts.dtype == np.int64
    vals, counts = _sorted_unique(np.zeros(0, np.uint32))
    assert (vals.size, counts.size, counts.dtype) == (0, 0, np.int64)
    keys, npos, nneg = _merge_counts(np.array([5, 9, 5, 2], np.uint32), np.array([5, 1, 1, 8, 5, 5], np.uint32))
    assert keys.tolist() == [9, 8, 5, 2, 1]
    assert npos.tolist() == [1, 0, 2, 1, 0] and nneg.tolist() == [0, 1, 3, 0, 2]
    assert keys.dtype == np.uint32 and npos.dtype == nneg.dtype == np.int64
    keys, npos, nneg = _merge_counts(np.zeros(0, np.uint32), np.array([4, 4], np.uint32))
    assert keys.tolist() == [4] and npos.tolist() == [0] and nneg.tolist() == [2] and npos.dtype == np.int64


def test_budget_boundary_and_several_adds_that_spill(tmp_path: Path) -> None:
    """Added after mutation testing: exactly `memory_budget` scores stay in RAM, one more spills (a budget
    below 1 counts as 1); several adds spilling more than once give the in-memory figures, count every
    image, and take any float map as its float32 values."""
    for budget, pixels, spills in ((16, 16, False), (15, 16, True), (1, 2, True), (0, 2, True), (2, 2, False)):
        with PixelAccumulator(memory_budget=budget) as acc:
            acc.add(np.linspace(0, 1, pixels).reshape(1, pixels), np.arange(pixels).reshape(1, pixels) % 2 == 0)
            assert acc.spilled is spills, (budget, pixels)
    rng = np.random.default_rng(5)
    maps = [rng.random((6, 7)) for _ in range(5)]  # float64, not float32-exact
    masks = [np.zeros((6, 7), bool) for _ in range(5)]
    for i, g in enumerate(masks):
        if i % 2 == 0:
            g[1:3, 1:4] = True
            g[4:, 5:] = True  # a second region
            maps[i][g] += 0.5

    def run(budget: int, as_float32: bool) -> PixelMetrics:
        with PixelAccumulator(memory_budget=budget, spill_dir=tmp_path) as acc:
            for m, g in zip(maps, masks, strict=True):
                acc.add(m.astype(np.float32) if as_float32 else m, g)
            assert acc.spilled == (budget < 5 * 42)
            return acc.result()

    ref = run(10**9, True)
    y = np.concatenate([g.ravel() for g in masks])
    s = np.concatenate([m.astype(np.float32).ravel() for m in maps]).astype(np.float64)
    for r in (run(10**9, False), run(50, False), run(50, True)):  # 50: spills on the 2nd add, again later
        assert r.n_images == 5 and r.n_regions == 6
        assert r.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert r.ap == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert (r.score_min, r.score_max) == (float(s.min()), float(s.max()))  # the float32 values
        assert np.array_equal(r.pro_thresholds, ref.pro_thresholds)
        assert np.array_equal(r.pro_overlap, ref.pro_overlap) and np.array_equal(r.pro_fpr, ref.pro_fpr)
        assert r.aupro == ref.aupro and r.f1_max == pytest.approx(ref.f1_max, abs=1e-12)
    assert not any(tmp_path.iterdir())
    with PixelAccumulator() as acc, pytest.raises(ValueError, match="^anomaly map contains NaN or infinity$"):
        acc.add(np.array([[0.0, np.inf]]), np.zeros((1, 2), bool))


def test_as_many_anomalous_as_normal_pixels_in_memory() -> None:
    """Added after mutation testing: equal anomalous and normal counts (the in-RAM walk must not skip them)."""
    amap = np.array([[0.1, 0.9], [0.6, 0.4]], np.float32)
    gt = np.array([[False, True], [False, True]])
    with PixelAccumulator() as acc:
        acc.add(amap, gt)
        r = acc.result()
    assert r.auroc == pytest.approx(roc_auc_score(gt.ravel(), amap.ravel()), abs=1e-12) and r.auroc == 0.75
    assert r.ap == pytest.approx(average_precision_score(gt.ravel(), amap.ravel()), abs=1e-12)


def test_pro_overlap_counts_a_region_pixel_only_strictly_above_the_threshold() -> None:
    """Added after mutation testing: a region pixel at exactly a threshold (here the class minimum, which is
    threshold 0) is not found there; the whole curve equals the definition read literally."""
    amap = np.array([[0.0, 1.0, 0.5], [0.25, 0.75, 0.2]], np.float32)
    gt = np.array([[True, True, False], [True, True, False]])  # one region holding the minimum
    other = np.round(0.1 + 0.9 * np.random.default_rng(3).random((5, 5)), 1).astype(np.float32)  # ties, >= 0.1
    with PixelAccumulator() as acc:
        acc.add(amap, gt)
        acc.add(other, np.eye(5, dtype=bool))  # the diagonal: one 8-connected region
        r = acc.result()
    assert r.pro_thresholds[0] == 0.0 and r.pro_overlap[0] == pytest.approx((3 / 4 + 5 / 5) / 2)
    regions = [amap[gt].astype(np.float64), other[np.eye(5, dtype=bool)].astype(np.float64)]
    literal = [np.mean([(reg > t).mean() for reg in regions]) for t in r.pro_thresholds]
    assert r.n_regions == 2 and np.allclose(r.pro_overlap, literal, rtol=0, atol=1e-15)


def test_spill_store_reads_back_exactly_in_budget_sized_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Added after mutation testing: the spill store holds any uint32 key (0 and 2**32-1 included) and walks
    them highest first in greedy groups of histogram bins of at most `budget` keys (a fuller group would
    not fit, a bin alone over the budget is its own group), reads its files in `_READ_CHUNK` pieces, and
    removes them on close (twice, or after someone else did, without error)."""
    import shutil

    from pipeline.evaluation.metrics import _ScoreStore

    def at(b: int, lows: list[int]) -> np.ndarray:
        return ((np.uint32(b) << np.uint32(16)) | np.array(lows, np.uint32)).astype(np.uint32)

    layout = [  # (upper 16 bits, anomalous low bits, normal low bits); budget 10 keys
        (0xFFFF, [], [0xFFFF]), (0xC000, [5, 5], [5, 9]), (0xBFFF, [1], [1, 2, 3, 3]),  # group of 10
        (0xBFF0, [7, 7, 7], []), (0xB000, [], [0, 1, 2, 3, 4, 5, 6]),  # group of 10
        (0xA000, [4, 4, 4, 10, 11], [4, 4, 11, 20, 21, 22, 23]),  # 12 keys in one bin: alone, counted exactly
        (0x9000, [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]),  # exactly the budget: alone
        (0x8000, [], list(range(8))), (0x0001, [3], []), (0x0000, [], [0]),  # group of 10
    ]
    store = _ScoreStore(10, tmp_path)
    assert list(store.groups_desc()) == []  # nothing added: nothing to walk
    for b, p, n in layout:
        store.add(at(b, p), at(b, n))
    assert store.spilled and len(list(tmp_path.iterdir())) == 1
    pos = np.concatenate([at(b, p) for b, p, _ in layout])
    neg = np.concatenate([at(b, n) for b, _, n in layout])
    monkeypatch.setattr("pipeline.evaluation.metrics._READ_CHUNK", 4)
    groups = list(store.groups_desc())
    assert [int(cp.sum() + cn.sum()) for _, cp, cn in groups] == [10, 10, 12, 10, 10]
    keys = np.concatenate([k for k, _, _ in groups])
    assert all(k.dtype == np.uint32 and cp.dtype == cn.dtype == np.int64 for k, cp, cn in groups)
    ref = np.unique(np.concatenate((pos, neg)))[::-1]
    assert np.array_equal(keys, ref)
    assert np.concatenate([cp for _, cp, _ in groups]).tolist() == [int((pos == k).sum()) for k in ref]
    assert np.concatenate([cn for _, _, cn in groups]).tolist() == [int((neg == k).sum()) for k in ref]
    chunks = list(store._read(1))
    assert max(c.size for c in chunks) == 4 and np.array_equal(np.concatenate(chunks), neg)
    store.close()
    assert not any(tmp_path.iterdir())
    store.close()

    only_normal = _ScoreStore(3, tmp_path)  # spilled with no anomalous key at all: two groups of bins
    only_normal.add(np.zeros(0, np.uint32), np.concatenate((at(0x8000, [9, 1, 9]), at(0x7000, [5]))))
    assert only_normal.spilled
    (k1, cp1, cn1), (k2, cp2, cn2) = only_normal.groups_desc()
    assert k1.dtype == k2.dtype == np.uint32 and cp1.dtype == cp2.dtype == np.int64
    assert k1.tolist() == at(0x8000, [9, 1]).tolist() and k2.tolist() == at(0x7000, [5]).tolist()
    assert (cp1.tolist(), cn1.tolist(), cp2.tolist(), cn2.tolist()) == ([0, 0], [2, 1], [0], [1])
    shutil.rmtree(next(tmp_path.iterdir()))  # e.g. a tmp cleaner got there first
    only_normal.close()


def test_spilled_class_without_anomalous_pixels_is_undefined_not_an_error() -> None:
    """Added after mutation testing: the spilled walk with an empty anomalous-pixel file."""
    maps = [np.random.default_rng(i).random((6, 6)).astype(np.float32) for i in range(3)]
    out = []
    for budget in (10**9, 20):
        with PixelAccumulator(memory_budget=budget) as acc:
            for m in maps:
                acc.add(m, np.zeros((6, 6), bool))
            assert acc.spilled == (budget == 20)
            out.append(acc.result())
    for r in out:
        assert math.isnan(r.auroc) and math.isnan(r.ap) and math.isnan(r.f1_max) and r.n_pixels_normal == 108
    assert np.array_equal(out[0].pro_fpr, out[1].pro_fpr) and out[1].pro_fpr[0] == pytest.approx(107 / 108)


def test_an_accumulator_with_no_images_measured_nothing() -> None:
    """Added after the second mutation run: every figure undefined, every count 0, every curve empty, and the
    variant as asked; an unknown variant is named."""
    acc = PixelAccumulator()
    r = acc.result("unrescaled")
    for name in ("auroc", "ap", "f1_max", "aupro", "aupro_rescaled", "aupro_unrescaled", "score_min", "score_max"):
        assert math.isnan(getattr(r, name)), name
    assert r.aupro_variant == "unrescaled"
    counts = (r.n_images, r.n_pixels_anomalous, r.n_pixels_normal, r.n_regions)
    assert counts == (0, 0, 0, 0) and all(type(c) is int for c in counts)
    curves = (r.roc_fpr, r.roc_tpr, r.pro_fpr, r.pro_overlap, r.pro_thresholds)
    assert all(isinstance(c, np.ndarray) and c.size == 0 for c in curves)
    with pytest.raises(ValueError, match=r"^aupro_variant must be one of \('rescaled', 'unrescaled'\)$"):
        acc.result("exact")


@pytest.mark.parametrize("anomalous", [False, True], ids=["all normal", "all anomalous"])
def test_a_class_of_one_kind_of_pixel_is_undefined_quietly(anomalous: bool) -> None:
    """Only normal pixels (a class whose test images have no defect masks) or only anomalous ones: ROC-based
    figures are undefined, the plotted ROC is empty and the PRO curve's false-positive rates are NaN when
    there are no normal pixels, all without numpy's division warnings."""
    rng = np.random.default_rng(5)
    maps = [rng.random((8, 8)).astype(np.float32) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with PixelAccumulator() as acc:
            for m in maps:
                acc.add(m, np.full((8, 8), anomalous))
            r = acc.result()
    assert math.isnan(r.auroc) and r.roc_fpr.size == 0 and r.roc_tpr.size == 0
    assert (r.n_pixels_anomalous, r.n_pixels_normal) == ((128, 0) if anomalous else (0, 128))
    assert r.pro_fpr.shape == (200,)
    if anomalous:
        assert np.isnan(r.pro_fpr).all() and math.isnan(r.aupro) and r.n_regions == 2
        assert not math.isnan(r.ap) and r.ap == pytest.approx(1.0)
    else:
        assert np.isfinite(r.pro_fpr).all() and r.n_regions == 0


def _decimated_roc(y: np.ndarray, s: np.ndarray, points: int) -> tuple[np.ndarray, np.ndarray]:
    """The plotted ROC, rebuilt from scikit-learn's full curve: (0, 0), then at each distinct score (highest
    first) the point where the count of pixels at or above it enters a new 1/`points` of all pixels, and the
    last point."""
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    fpr, tpr = fpr[1:], tpr[1:]  # sklearn's own (0, 0) at +inf
    P, N = int(y.sum()), int((~y).sum())
    level = (np.rint(tpr * P + fpr * N).astype(np.int64) * points) // (P + N)
    keep = np.concatenate(([True], level[1:] != level[:-1]))
    keep[-1] = True
    return np.concatenate(([0.0], fpr[keep])), np.concatenate(([0.0], tpr[keep]))


@pytest.mark.parametrize("budget", [10**9, 700], ids=["in memory", "spilled"])
def test_the_plotted_roc_is_the_exact_curve_decimated_by_pixel_count(budget: int) -> None:
    """Added after the second mutation run: the ROC points kept for plots lie on the exact curve, one per
    1/2000 of the pixels (never more), the same whether the scores were spilled to disk (read back in groups)
    or not, and the first distinct score is kept even when its pixels already fill a whole step (here two
    pixels tie at the top of 4000: step 1)."""
    rng = np.random.default_rng(11)
    maps = [rng.random((40, 50)).astype(np.float32) for _ in range(2)]
    masks = [rng.random((40, 50)) < 0.2 for _ in range(2)]
    maps[0][0, 0] = maps[1][0, 0] = np.float32(2.0)
    with PixelAccumulator(memory_budget=budget) as acc:
        for m, g in zip(maps, masks, strict=True):
            acc.add(m, g)
        assert acc.spilled == (budget == 700)
        r = acc.result()
        assert (r.aupro_variant, acc.result("unrescaled").aupro_variant) == ("rescaled", "unrescaled")
    y = np.concatenate([g.ravel() for g in masks])
    s = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    want_f, want_t = _decimated_roc(y, s, 2000)
    assert r.roc_fpr.shape == want_f.shape and r.roc_fpr.size <= 2002
    np.testing.assert_allclose(r.roc_fpr, want_f, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r.roc_tpr, want_t, rtol=0, atol=1e-12)
    assert (r.roc_fpr[1], r.roc_tpr[1]) == (np.count_nonzero(~y[[0, 2000]]) / (~y).sum(),
                                             np.count_nonzero(y[[0, 2000]]) / y.sum()), "the tie at the top"


def test_float64_values_get_the_keys_of_their_float32_rounding() -> None:
    """Maps arrive as float64 from some scorers: their keys are those of the float32 values, one per value."""
    v = np.random.default_rng(2).normal(size=50)
    assert np.array_equal(float_keys(v), float_keys(v.astype(np.float32))) and float_keys(v).shape == (50,)
