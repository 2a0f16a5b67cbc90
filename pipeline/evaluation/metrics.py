"""Anomaly-detection metrics computed the way the field reports them (docs/algorithm.md §6.3).

Image level (a few thousand scores at most, kept exactly): AUROC, AP (`average_precision_score`),
the official code's "pr_sp" (trapezoidal area under the PR curve, *not* AP) and F1-max.

Pixel level, per class: AUROC, AP, F1-max and AUPRO up to 30 % FPR. A full class is 10-20 M pixels,
so `PixelAccumulator` keeps memory bounded without giving up exactness:

- every pixel score is kept as its exact float32 value, encoded as an order-preserving uint32 key;
- up to `memory_budget` keys are held in RAM; beyond that they are spilled to two temporary files
  (anomalous / normal pixels) and a 65 536-bin histogram of the keys' upper 16 bits is kept;
- at the end, the distinct score values are walked from the highest down, in groups of histogram bins
  that fit the budget (one re-read of the spill files per group; a single oversized bin is resolved
  with a second 65 536-bin count of the lower 16 bits, which is already exact). Each group yields
  (distinct value, #anomalous, #normal), which is all that ROC, AP, F1 and the FPR part of PRO need.

So the pixel AUROC/AP/F1-max equal scikit-learn's on the same float32 maps (up to float summation
order), with RAM bounded by the budget plus the scores of the anomalous pixels, which PRO needs per
ground-truth region (a few percent of the pixels on MVTec AD and VisA).

AUPRO follows the cflow-ad / APRIL-GAN implementation (the one AnoCLIP's code uses): 200 thresholds
`min + i·(max−min)/200` (i = 0…199) over the class's maps, a pixel is positive when `score > t`,
per-region overlap averaged over all regions (8-connected components of every GT mask) of all
images, FPR over all normal pixels, points with FPR < 0.3 kept, **their FPRs rescaled to [0, 1] by
their own min and max**, trapezoidal area. The unrescaled variant (same 200 points, integrated over
the raw FPR up to 0.3 with the curve interpolated at 0.3, divided by 0.3, the curve's true end points
(0, 0) above the maximum and (1, 1) below the minimum included) is computed alongside.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from skimage.measure import label as label_regions
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

AUPRO_FPR_LIMIT = 0.3
AUPRO_STEPS = 200
AUPRO_VARIANTS = ("rescaled", "unrescaled")

METRIC_KEYS = (
    "image_auroc",
    "image_ap",
    "image_pr_auc",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "aupro",
)

DEFINITIONS: dict[str, str] = {
    "image_auroc": "sklearn roc_auc_score over the class's image scores",
    "image_ap": "sklearn average_precision_score over the class's image scores",
    "image_pr_auc": (
        "trapezoidal area under the PR curve, auc(recall, precision) - the official AnoCLIP code's 'pr_sp' (not AP)"
    ),
    "image_f1_max": "max of 2PR/(P+R) over the PR-curve thresholds, NaNs ignored",
    "pixel_auroc": "roc_auc_score over all pixels of all images of the class, exact (streamed, float32 maps)",
    "pixel_ap": "average_precision_score over all pixels of the class, exact (streamed)",
    "pixel_f1_max": "max of 2PR/(P+R) over all distinct pixel thresholds",
    "aupro": (
        "AUPRO@30%: 200 thresholds min+i*(max-min)/200 over the class's maps, positive = score > t, mean"
        " overlap over all 8-connected GT regions of all images, FPR over all normal pixels, points with"
        " FPR < 0.3"
    ),
    "aupro_rescaled": "kept FPRs rescaled to [0,1] by their own min and max, then trapezoid (cflow-ad / APRIL-GAN)",
    "aupro_unrescaled": (
        "same points plus the curve's ends (0,0) and (1,1), trapezoid over the raw FPR up to 0.3 (interpolated"
        " at 0.3), divided by 0.3"
    ),
}

DEFAULT_MEMORY_BUDGET = 8_000_000
"""Pixel scores held in RAM per class before spilling to disk (32 MB of keys)."""

_BINS = 1 << 16
_READ_CHUNK = 1 << 22
_ROC_POINTS = 2000


# --------------------------------------------------------------------------------------------------
# image level


@dataclass
class ImageMetrics:
    """Exact image-level figures of one class, plus the ROC curve for plotting."""

    auroc: float
    ap: float
    pr_auc: float
    f1_max: float
    n_images: int
    n_anomalous: int
    roc_fpr: np.ndarray = field(repr=False)
    roc_tpr: np.ndarray = field(repr=False)


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Max of 2PR/(P+R) over the PR curve, as the AnoCLIP/APRIL-GAN code does; NaN without positives."""
    labels = np.asarray(labels).astype(bool).ravel()
    if not labels.any():
        return float("nan")
    precision, recall, _ = precision_recall_curve(labels, np.asarray(scores).ravel())
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    f1 = f1[np.isfinite(f1)]
    return float(f1.max()) if f1.size else float("nan")


def image_metrics(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> ImageMetrics:
    """Image AUROC, AP, trapezoidal PR-AUC and F1-max; NaN where one label is absent (undefined)."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if not np.isfinite(s).all():
        raise ValueError("image scores contain NaN or infinity")
    n_pos = int(y.sum())
    nan = float("nan")
    if n_pos == 0 or n_pos == y.size:
        return ImageMetrics(nan, nan, nan, nan, int(y.size), n_pos, np.zeros(0), np.zeros(0))
    precision, recall, _ = precision_recall_curve(y, s)
    fpr, tpr, _ = roc_curve(y, s)
    return ImageMetrics(
        auroc=float(roc_auc_score(y, s)),
        ap=float(average_precision_score(y, s)),
        pr_auc=_trapezoid(recall, precision),
        f1_max=f1_max(y, s),
        n_images=int(y.size),
        n_anomalous=n_pos,
        roc_fpr=fpr,
        roc_tpr=tpr,
    )


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    """Area under y(x) for x monotonic in either direction (as sklearn.metrics.auc)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    area = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))
    return abs(area)


# --------------------------------------------------------------------------------------------------
# exact, bounded-memory store of pixel scores


def float_keys(values: np.ndarray) -> np.ndarray:
    """Order-preserving uint32 keys of float32 values (key order == value order, -0.0 merged into +0.0)."""
    v = np.ascontiguousarray(values, dtype=np.float32) + np.float32(0.0)  # -0.0 + 0.0 == +0.0
    bits = v.view(np.uint32)
    return np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def keys_to_float(keys: np.ndarray) -> np.ndarray:
    """Inverse of `float_keys`."""
    k = np.asarray(keys, dtype=np.uint32)
    bits = np.where(k >> 31, k & np.uint32(0x7FFFFFFF), ~k).astype(np.uint32)
    return bits.view(np.float32)


class _ScoreStore:
    """Exact multiset of float32 keys split by label, in RAM up to `budget` keys, then on disk."""

    def __init__(self, budget: int, spill_dir: str | os.PathLike[str] | None) -> None:
        self.budget = max(int(budget), 1)
        self._spill_parent = spill_dir
        self._buf: list[tuple[np.ndarray, np.ndarray]] = []
        self._n_buf = 0
        self._dir: str | None = None
        self._hist = np.zeros((2, _BINS), dtype=np.int64)
        self.n_pos = 0
        self.n_neg = 0

    @property
    def spilled(self) -> bool:
        return self._dir is not None

    def add(self, pos: np.ndarray, neg: np.ndarray) -> None:
        self._buf.append((pos, neg))
        self._n_buf += pos.size + neg.size
        self.n_pos += pos.size
        self.n_neg += neg.size
        if self._n_buf > self.budget:
            self._flush()

    def _paths(self) -> tuple[Path, Path]:
        assert self._dir is not None
        return Path(self._dir, "pos.u32"), Path(self._dir, "neg.u32")

    def _flush(self) -> None:
        if not self._buf:
            return
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="anoclip-pixels-", dir=self._spill_parent)
        for i, path in enumerate(self._paths()):
            with open(path, "ab") as f:
                for chunk in self._buf:
                    keys = chunk[i]
                    if keys.size:
                        keys.tofile(f)
                        self._hist[i] += np.bincount(keys >> 16, minlength=_BINS)
        self._buf = []
        self._n_buf = 0

    def _read(self, which: int) -> Iterator[np.ndarray]:
        path = self._paths()[which]
        if not path.exists():
            return
        with open(path, "rb") as f:
            while True:
                chunk = np.fromfile(f, dtype=np.uint32, count=_READ_CHUNK)
                if chunk.size == 0:
                    return
                yield chunk

    def groups_desc(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(distinct keys, #pos, #neg) in descending key order, in groups of at most ~budget keys."""
        if not self.spilled:
            pos = np.concatenate([b[0] for b in self._buf]) if self._buf else np.zeros(0, np.uint32)
            neg = np.concatenate([b[1] for b in self._buf]) if self._buf else np.zeros(0, np.uint32)
            if pos.size + neg.size:
                yield _merge_counts(pos, neg)
            return
        self._flush()
        total = self._hist.sum(axis=0)
        group: list[int] = []
        size = 0
        for b in range(_BINS - 1, -1, -1):
            n = int(total[b])
            if n == 0:
                continue
            if group and size + n > self.budget:
                yield from self._load_group(group[-1], group[0])
                group, size = [], 0
            if n > self.budget:
                yield self._load_bin_exact(b)
                continue
            group.append(b)
            size += n
        if group:
            yield from self._load_group(group[-1], group[0])

    def _load_group(self, lo_bin: int, hi_bin: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        parts: list[np.ndarray] = []
        for which in (0, 1):
            sel = []
            for chunk in self._read(which):
                top = chunk >> 16
                sel.append(chunk[(top >= lo_bin) & (top <= hi_bin)])
            parts.append(np.concatenate(sel) if sel else np.zeros(0, np.uint32))
        yield _merge_counts(parts[0], parts[1])

    def _load_bin_exact(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        counts = np.zeros((2, _BINS), dtype=np.int64)
        for which in (0, 1):
            for chunk in self._read(which):
                inside = chunk[(chunk >> 16) == b]
                counts[which] += np.bincount(inside & np.uint32(0xFFFF), minlength=_BINS)
        nz = np.flatnonzero(counts.sum(axis=0))[::-1]
        keys = (np.uint32(b) << np.uint32(16)) | nz.astype(np.uint32)
        return keys, counts[0, nz], counts[1, nz]

    def close(self) -> None:
        self._buf = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _sorted_unique(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of `a` (ascending) and their counts, by one sort (np.unique's hash path is slower here)."""
    a = np.sort(a, kind="stable")  # radix sort for integer keys
    if a.size == 0:
        return a, np.zeros(0, dtype=np.int64)
    first = np.empty(a.size, dtype=bool)
    first[0] = True
    np.not_equal(a[1:], a[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    return a[starts], np.diff(np.append(starts, a.size))


def _merge_counts(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct keys (descending) with their positive and negative counts."""
    up, cp = _sorted_unique(pos)
    un, cn = _sorted_unique(neg)
    keys, _ = _sorted_unique(np.concatenate((up, un)))
    npos = np.zeros(keys.size, dtype=np.int64)
    nneg = np.zeros(keys.size, dtype=np.int64)
    npos[np.searchsorted(keys, up)] = cp
    nneg[np.searchsorted(keys, un)] = cn
    return keys[::-1], npos[::-1], nneg[::-1]


# --------------------------------------------------------------------------------------------------
# pixel level


@dataclass
class PixelMetrics:
    """Pixel-level figures of one class with the curves behind them (decimated ROC, 200-point PRO)."""

    auroc: float
    ap: float
    f1_max: float
    aupro: float
    """AUPRO in the variant asked for (see `aupro_variant`)."""
    aupro_rescaled: float
    aupro_unrescaled: float
    aupro_variant: str
    n_images: int
    n_pixels_anomalous: int
    n_pixels_normal: int
    n_regions: int
    score_min: float
    score_max: float
    roc_fpr: np.ndarray = field(repr=False)
    roc_tpr: np.ndarray = field(repr=False)
    pro_fpr: np.ndarray = field(repr=False)
    pro_overlap: np.ndarray = field(repr=False)
    pro_thresholds: np.ndarray = field(repr=False)


class PixelAccumulator:
    """Streams (anomaly map, GT mask) pairs of one class; `result()` gives exact pixel metrics.

    Memory: at most `memory_budget` pixel scores in RAM (the rest spilled to a temporary directory
    under `spill_dir`), plus the scores of anomalous pixels grouped by GT region for PRO.
    """

    def __init__(
        self, memory_budget: int = DEFAULT_MEMORY_BUDGET, spill_dir: str | os.PathLike[str] | None = None
    ) -> None:
        self._store = _ScoreStore(memory_budget, spill_dir)
        self._regions: list[np.ndarray] = []  # sorted float32 scores of each GT region
        self._lo = math.inf
        self._hi = -math.inf
        self.n_images = 0

    @property
    def spilled(self) -> bool:
        """Whether scores went to disk (the budget was exceeded)."""
        return self._store.spilled

    def add(self, anomaly_map: np.ndarray, mask: np.ndarray) -> None:
        """Add one image: `anomaly_map` float HxW, `mask` bool HxW at the same (protocol) resolution."""
        amap = np.asarray(anomaly_map, dtype=np.float32)
        gt = np.asarray(mask).astype(bool)
        if amap.ndim != 2 or amap.shape != gt.shape:
            raise ValueError(f"anomaly map {amap.shape} and mask {gt.shape} must be equal 2-D shapes")
        if not np.isfinite(amap).all():
            raise ValueError("anomaly map contains NaN or infinity")
        keys = float_keys(amap.ravel())
        flat = gt.ravel()
        self._store.add(keys[flat], keys[~flat])
        self._lo = min(self._lo, float(amap.min()))
        self._hi = max(self._hi, float(amap.max()))
        self.n_images += 1
        if flat.any():
            lab = label_regions(gt, connectivity=2)
            ids = lab.ravel()
            inside = ids > 0
            vals = amap.ravel()[inside]
            rid = ids[inside]
            order = np.lexsort((vals, rid))
            vals, rid = vals[order], rid[order]
            bounds = np.flatnonzero(np.diff(rid)) + 1
            self._regions.extend(np.split(vals, bounds))

    def result(self, aupro_variant: str = "rescaled") -> PixelMetrics:
        """Compute every pixel metric in one walk over the distinct scores, highest first."""
        if aupro_variant not in AUPRO_VARIANTS:
            raise ValueError(f"aupro_variant must be one of {AUPRO_VARIANTS}")
        P, N = self._store.n_pos, self._store.n_neg
        nan = float("nan")
        empty = np.zeros(0)
        if self.n_images == 0:
            return PixelMetrics(
                nan, nan, nan, nan, nan, nan, aupro_variant, 0, 0, 0, 0, nan, nan, empty, empty, empty, empty, empty
            )
        lo, hi = self._lo, self._hi
        thresholds = lo + np.arange(AUPRO_STEPS, dtype=np.float64) * ((hi - lo) / AUPRO_STEPS)

        tp = fp = 0
        auc2 = 0.0
        ap = 0.0
        best_f1 = 0.0
        fp_above = np.zeros(AUPRO_STEPS, dtype=np.int64)
        roc_f: list[np.ndarray] = [np.zeros(1)]
        roc_t: list[np.ndarray] = [np.zeros(1)]
        last_level = -1
        for keys, cp, cn in self._store.groups_desc():
            vals = keys_to_float(keys).astype(np.float64)
            ctp = tp + np.cumsum(cp)
            cfp = fp + np.cumsum(cn)
            prev_tp = np.concatenate(([tp], ctp[:-1]))
            prev_fp = np.concatenate(([fp], cfp[:-1]))
            auc2 += float(np.sum((cfp - prev_fp).astype(np.float64) * (ctp + prev_tp)))
            if P:
                ap += float(np.sum((ctp - prev_tp) * (ctp / (ctp + cfp)))) / P
                best_f1 = max(best_f1, float(np.max(2.0 * ctp / (P + ctp + cfp))))
            # negatives of this group strictly above each threshold (vals descending)
            asc_vals = vals[::-1]
            asc_neg = np.concatenate(([0], np.cumsum(cn[::-1])))
            n_le = np.searchsorted(asc_vals, thresholds, side="right")
            fp_above += asc_neg[-1] - asc_neg[n_le]
            # decimated ROC points for plots, the same however the scores were grouped (spilled or not); the
            # last point (all pixels: level _ROC_POINTS) always starts a level, so the curve ends at (1, 1)
            level = ((ctp + cfp) * _ROC_POINTS) // max(P + N, 1)
            keep = np.concatenate(([level[0] != last_level], level[1:] != level[:-1]))
            last_level = int(level[-1])
            if P and N:
                roc_f.append(cfp[keep] / N)
                roc_t.append(ctp[keep] / P)
            tp, fp = int(ctp[-1]), int(cfp[-1])

        auroc = auc2 / (2.0 * P * N) if P and N else nan
        pro_fpr = fp_above / N if N else np.full(AUPRO_STEPS, nan)
        overlap = self._pro_overlap(thresholds)
        rescaled, unrescaled = _aupro(pro_fpr, overlap)
        return PixelMetrics(
            auroc=auroc,
            ap=ap if P else nan,
            f1_max=best_f1 if P else nan,
            aupro=rescaled if aupro_variant == "rescaled" else unrescaled,
            aupro_rescaled=rescaled,
            aupro_unrescaled=unrescaled,
            aupro_variant=aupro_variant,
            n_images=self.n_images,
            n_pixels_anomalous=P,
            n_pixels_normal=N,
            n_regions=len(self._regions),
            score_min=lo,
            score_max=hi,
            roc_fpr=np.concatenate(roc_f) if P and N else empty,
            roc_tpr=np.concatenate(roc_t) if P and N else empty,
            pro_fpr=pro_fpr,
            pro_overlap=overlap,
            pro_thresholds=thresholds,
        )

    def _pro_overlap(self, thresholds: np.ndarray) -> np.ndarray:
        """Mean over all GT regions of the fraction of the region's pixels scoring > t, per threshold."""
        if not self._regions:
            return np.full(thresholds.size, float("nan"))
        total = np.zeros(thresholds.size, dtype=np.float64)
        for vals in self._regions:
            above = vals.size - np.searchsorted(vals.astype(np.float64), thresholds, side="right")
            total += above / vals.size
        return total / len(self._regions)

    def close(self) -> None:
        """Remove spill files; the accumulator cannot be used afterwards."""
        self._store.close()
        self._regions = []

    def __enter__(self) -> PixelAccumulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _aupro(fpr: np.ndarray, overlap: np.ndarray, limit: float = AUPRO_FPR_LIMIT) -> tuple[float, float]:
    """(rescaled, unrescaled) AUPRO from the PRO curve in threshold order; NaN when undefined.

    The points stay in threshold order (FPR non-increasing), as `sklearn.metrics.auc` sees them in the
    reference code, so vertical steps of the curve are integrated the same way.
    """
    nan = float("nan")
    ok = np.isfinite(fpr) & np.isfinite(overlap)
    fpr, overlap = fpr[ok], overlap[ok]
    keep = fpr < limit
    f, p = fpr[keep], overlap[keep]
    rescaled = nan
    if f.size >= 2 and f.max() > f.min():
        rescaled = _trapezoid((f - f.min()) / (f.max() - f.min()), p)
    unrescaled = nan
    if fpr.size:
        # ascending FPR (highest threshold first), opened by (0, 0) (above the max nothing is positive)
        # and closed by (1, 1) (below the min everything is). Integrate up to `limit`, interpolating
        # the segment that crosses it.
        xs = np.concatenate(([0.0], fpr[::-1], [1.0]))
        ys = np.concatenate(([0.0], overlap[::-1], [1.0]))
        n_in = int(np.searchsorted(xs, limit, side="right"))  # xs is non-decreasing
        cx, cy = xs[:n_in], ys[:n_in]
        if 0 < n_in < xs.size and cx[-1] < limit:
            x0, y0, x1, y1 = cx[-1], cy[-1], xs[n_in], ys[n_in]
            cx = np.append(cx, limit)
            cy = np.append(cy, y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
        if cx.size >= 2:
            unrescaled = _trapezoid(cx, cy) / limit
    return rescaled, unrescaled


# --------------------------------------------------------------------------------------------------
# aggregation


def class_row(image: ImageMetrics, pixel: PixelMetrics | None) -> dict[str, float]:
    """One table row (fractions in [0, 1], NaN where undefined) from a class's metrics."""
    nan = float("nan")
    return {
        "image_auroc": image.auroc,
        "image_ap": image.ap,
        "image_pr_auc": image.pr_auc,
        "image_f1_max": image.f1_max,
        "pixel_auroc": pixel.auroc if pixel else nan,
        "pixel_ap": pixel.ap if pixel else nan,
        "pixel_f1_max": pixel.f1_max if pixel else nan,
        "aupro": pixel.aupro if pixel else nan,
    }


def mean_over_classes(rows: Mapping[str, Mapping[str, float]]) -> tuple[dict[str, float], dict[str, int]]:
    """Unweighted mean over classes of each metric, skipping classes where it is undefined (NaN).

    Returns the means and, per metric, how many classes entered the mean.
    """
    means: dict[str, float] = {}
    counts: dict[str, int] = {}
    keys = sorted({k for r in rows.values() for k in r})
    for k in keys:
        vals = [float(r[k]) for r in rows.values() if k in r and math.isfinite(float(r[k]))]
        counts[k] = len(vals)
        means[k] = float(np.mean(vals)) if vals else float("nan")
    return means, counts


def as_percent(value: float) -> float | None:
    """×100 rounded to one decimal, as papers print it; None for undefined values (JSON null)."""
    if value is None or not math.isfinite(value):
        return None
    return round(100.0 * value, 1)
