"""The evaluation loop behind `anoclip eval`, and the report it writes.

For each class the test images are replayed in a fixed stream order, resized to the protocol
resolution (MVTec 240x240 squash; VisA and folders 240 on the short side, aspect kept), scored
through a `Scorer`, and streamed into exact, memory-bounded metrics (`pipeline.metrics`). Image I/O
runs in a prefetch thread so it overlaps the model. The report is a Markdown and a JSON table (per
class and the unweighted mean over classes), per-image scores as CSV, ROC and PRO curves and a grid
of example overlays as PNG.

A `Scorer` is the hook for test-time adaptation: `off` scores frames with the Inspector as they
are; `per_frame` and `buffered` come from the TTA module's `eval_scorer` (`pipeline.tta`, see
`make_scorer`) and see the same stream, class by class, through `begin_class` / `score` / `end_class`.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.datasets import (
    PROTOCOL_SIDE,
    DatasetIndex,
    DatasetIssue,
    LoadedSample,
    Sample,
    load_pair,
    protocol_size,
)
from pipeline.errors import AnoclipError, ImageError
from pipeline.metrics import (
    AUPRO_VARIANTS,
    DEFAULT_MEMORY_BUDGET,
    DEFINITIONS,
    ImageMetrics,
    PixelAccumulator,
    PixelMetrics,
    as_percent,
    class_row,
    image_metrics,
    mean_over_classes,
)
from pipeline.settings import LineSettings, Settings

TTA_MODES = ("off", "per_frame", "buffered")
IMAGE_SCORE_CHOICES = ("protocol", "cls", "multiview")
ORDERS = ("dataset", "shuffled")
TTA_MODULES = ("pipeline.tta", "pipeline.model.tta")
"""Where `make_scorer` looks for the TTA scorers: a module exposing `eval_scorer(mode, inspector, settings)`."""


class EvalError(AnoclipError):
    """The evaluation cannot run as asked (e.g. a TTA mode that is not available)."""


# --------------------------------------------------------------------------------------------------
# scorers: the TTA hook


class Scorer(Protocol):
    """Turns one class's frames, given in stream order, into (image score, anomaly map) pairs.

    `score` receives HxWx3 uint8 frames at the protocol resolution and returns, per frame, the image
    score and a float anomaly map of the same aspect (any resolution; eval resizes it to the protocol's).
    """

    name: str

    def begin_class(self, line_id: str) -> None: ...

    def score(self, line_id: str, images: list[np.ndarray]) -> list[tuple[float, np.ndarray]]: ...

    def end_class(self, line_id: str) -> None: ...


class InspectorScorer:
    """`--tta off`: the Inspector's model scores as they are (no adapter, no calibration side effects)."""

    name = "off"

    def __init__(self, inspector: Any) -> None:
        self.inspector = inspector

    def begin_class(self, line_id: str) -> None:
        self.inspector.prepare_line(line_id)

    def score(self, line_id: str, images: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        return [(r.score, r.anomaly_map.numpy()) for r in self.inspector.score_raw(line_id, images)]

    def end_class(self, line_id: str) -> None:
        return None


def _tta_module() -> Any | None:
    for name in TTA_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
                continue  # the module (or its package) is not there; anything else missing is a real error
            raise
        if hasattr(module, "eval_scorer"):
            return module
    return None


def check_tta(mode: str) -> None:
    """Fail fast (before any model is loaded) when `mode` cannot be evaluated."""
    if mode not in TTA_MODES:
        raise EvalError(f"unknown TTA mode {mode!r} (use one of {', '.join(TTA_MODES)})")
    if mode != "off" and _tta_module() is None:
        raise EvalError(
            f"--tta {mode} is not available yet: no TTA module with eval_scorer() is installed "
            f"(looked for {', '.join(TTA_MODULES)}); use --tta off"
        )


def make_scorer(mode: str, inspector: Any, settings: Settings) -> Scorer:
    """The scorer for a TTA mode: `off` here, `per_frame` / `buffered` from the TTA module."""
    check_tta(mode)
    if mode == "off":
        return InspectorScorer(inspector)
    module = _tta_module()
    assert module is not None
    return module.eval_scorer(mode, inspector, settings)


# --------------------------------------------------------------------------------------------------
# options and settings


@dataclass
class EvalOptions:
    """What to evaluate and how; defaults follow the official protocol (anoclip-algorithm.md §6)."""

    out: Path
    classes: list[str] | None = None
    tta: str = "off"
    image_score: str = "protocol"
    """`protocol`: MVTec 22-view multiview, VisA/folder CLS (mean over tiles); or force `cls` / `multiview`."""
    aupro: str = "rescaled"
    order: str = "dataset"
    seed: int = 0
    resolution: int = PROTOCOL_SIDE
    examples: int = 4
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    progress: bool = True
    figures: bool = True

    def validate(self) -> None:
        if self.tta not in TTA_MODES:
            raise EvalError(f"unknown TTA mode {self.tta!r} (use one of {', '.join(TTA_MODES)})")
        if self.image_score not in IMAGE_SCORE_CHOICES:
            raise EvalError(f"image score must be one of {', '.join(IMAGE_SCORE_CHOICES)}")
        if self.aupro not in AUPRO_VARIANTS:
            raise EvalError(f"AUPRO variant must be one of {', '.join(AUPRO_VARIANTS)}")
        if self.order not in ORDERS:
            raise EvalError(f"order must be one of {', '.join(ORDERS)}")
        if self.resolution < 16:
            raise EvalError("resolution must be at least 16")


def _line_id(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_.-" else "_" for ch in name) or "class"


def eval_settings(settings: Settings, index: DatasetIndex, opts: EvalOptions) -> tuple[Settings, dict[str, str]]:
    """Settings for the run and the line used for each class.

    A class uses the configured line of the same id (or class name) so custom prompts apply; other
    classes get a line with the folder name as class name (macaroni1/2 -> macaroni, as the official
    code), MVTec's textures in the texture domain, and VisA's linear adapter.
    """
    image_score = opts.image_score
    if image_score == "protocol":
        image_score = "multiview" if index.name == "mvtec" else "cls"
    model = settings.model.model_copy(
        update={"image_score": image_score, "resize": "tile" if index.keep_aspect else "squash"}
    )
    lines = list(settings.lines)
    by_id = {ln.id: ln for ln in lines}
    by_class = {ln.class_name: ln for ln in lines}
    mapping: dict[str, str] = {}
    for cls in index.classes:
        line = by_id.get(cls) or by_class.get(cls)
        if line is None:
            class_name = "macaroni" if cls in ("macaroni1", "macaroni2") else cls
            line = LineSettings(
                id=_line_id(cls),
                class_name=class_name,
                domain="texture" if index.domain(cls) == "texture" else "object",
                adapter_kind="linear" if index.name == "visa" else "text",
            )
            if line.id in by_id:
                raise EvalError(f"class {cls!r} maps to line id {line.id!r}, which is configured for another class")
            lines.append(line)
            by_id[line.id] = line
        mapping[cls] = line.id
    tta = settings.tta.model_copy(update={"mode": opts.tta})
    return settings.model_copy(update={"model": model, "lines": lines, "tta": tta}), mapping


def stream_order(samples: Sequence[Sample], order: str, seed: int) -> list[Sample]:
    """The fixed order a class is replayed in: dataset order, or a permutation fixed by `seed`."""
    if order == "dataset":
        return list(samples)
    perm = np.random.default_rng(seed).permutation(len(samples))
    return [samples[int(i)] for i in perm]


# --------------------------------------------------------------------------------------------------
# results


@dataclass
class Example:
    """One image kept for the overlay grid, at the protocol resolution."""

    name: str
    defect: str
    label: int
    score: float
    image: np.ndarray
    anomaly_map: np.ndarray
    mask: np.ndarray | None


@dataclass
class ClassResult:
    """Everything measured on one class."""

    name: str
    line_id: str
    image: ImageMetrics
    pixel: PixelMetrics | None
    row: dict[str, float]
    n_images: int
    n_anomalous: int
    n_pixel_images: int
    n_failed: int
    examples: list[Example] = field(default_factory=list)


@dataclass
class ImageRecord:
    cls: str
    defect: str
    label: int
    score: float
    path: str
    pixel_truth: bool


@dataclass
class EvalReport:
    """A finished evaluation: per-class results, the mean, issues, timing and run metadata."""

    dataset: str
    root: str
    options: EvalOptions
    meta: dict[str, Any]
    classes: list[ClassResult]
    mean: dict[str, float]
    mean_counts: dict[str, int]
    issues: list[DatasetIssue]
    records: list[ImageRecord]
    timing: dict[str, float]


class _Examples:
    """Greedy pick in stream order: one good image and one image per defect type, up to `n`."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.items: list[Example] = []
        self._defects: set[str] = set()
        self._good = False

    def wants(self, sample: Sample) -> bool:
        if len(self.items) >= self.n:
            return False
        if sample.label == 0:
            return not self._good
        anomalous = sum(1 for e in self.items if e.label)
        return sample.defect not in self._defects and anomalous < max(self.n - 1, 1)

    def add(self, ex: Example) -> None:
        self.items.append(ex)
        if ex.label:
            self._defects.add(ex.defect)
        else:
            self._good = True


_END = object()


def _prefetch(
    samples: Sequence[Sample], keep_aspect: bool, side: int, max_pixels: int, depth: int
) -> Iterator[LoadedSample | tuple[Sample, str]]:
    """Load samples in a background thread (decode + resize overlap the model); errors come as (sample, reason)."""
    q: queue.Queue[Any] = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for s in samples:
                try:
                    item: Any = load_pair(s, keep_aspect, side, max_pixels)
                except ImageError as e:
                    item = (s, str(e))
                if not put(item):
                    return
        except BaseException as e:  # surfaced in the consumer
            put(e)
            return
        put(_END)

    thread = threading.Thread(target=work, name="eval-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _to_protocol(amap: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """The scorer's map at the protocol resolution (bilinear, as the Inspector resizes maps)."""
    m = np.asarray(amap, dtype=np.float32)
    if m.shape == hw:
        return m
    t = torch.from_numpy(np.array(m, copy=True))[None, None]  # own, writable memory for torch
    return F.interpolate(t, size=hw, mode="bilinear", align_corners=False)[0, 0].numpy()


def _batches(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for it in items:
        batch.append(it)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------------
# the loop


class _ClassState:
    """One class's running results; only the metrics thread touches it once scoring has started."""

    def __init__(self, cls: str, line_id: str, index: DatasetIndex, opts: EvalOptions) -> None:
        self.cls, self.line_id, self.index, self.opts = cls, line_id, index, opts
        self.labels: list[int] = []
        self.scores: list[float] = []
        self.records: list[ImageRecord] = []
        self.issues: list[DatasetIssue] = []
        self.pix = PixelAccumulator(opts.memory_budget)
        self.examples = _Examples(opts.examples)
        self.n_pixel = 0

    def consume(self, loaded: list[LoadedSample], out: list[tuple[float, np.ndarray]]) -> None:
        """Fold one scored batch into the metrics (runs on the metrics thread, overlapping the model)."""
        for ls, (score, raw_map) in zip(loaded, out, strict=True):
            s = ls.sample
            amap = _to_protocol(raw_map, ls.image.shape[:2])
            self.labels.append(s.label)
            self.scores.append(float(score))
            if ls.mask is not None:
                self.pix.add(amap, ls.mask)
                self.n_pixel += 1
            self.records.append(
                ImageRecord(self.cls, s.defect, s.label, float(score), str(s.image_path), ls.mask is not None)
            )
            if self.index.name == "visa":
                _check_visa_aspect(ls, self.index.root, self.issues)
            if self.examples.wants(s):
                self.examples.add(Example(s.image_path.name, s.defect, s.label, float(score), ls.image, amap, ls.mask))

    def finish(self) -> ClassResult:
        """Final metrics of the class; frees the pixel store."""
        try:
            img = image_metrics(self.labels, self.scores)
            pixel = self.pix.result(self.opts.aupro) if self.n_pixel else None
        finally:
            self.pix.close()
        row = class_row(img, pixel)
        if pixel is not None:
            row["aupro_rescaled"] = pixel.aupro_rescaled
            row["aupro_unrescaled"] = pixel.aupro_unrescaled
        return ClassResult(
            self.cls,
            self.line_id,
            img,
            pixel,
            row,
            len(self.labels),
            int(sum(self.labels)),
            self.n_pixel,
            0,
            self.examples.items,
        )


_MAX_PENDING_BATCHES = 4
"""Scored batches waiting for the metrics thread before scoring waits (bounds memory)."""


def evaluate(
    settings: Settings,
    index: DatasetIndex,
    opts: EvalOptions,
    inspector: Any | None = None,
    scorer: Scorer | None = None,
) -> EvalReport:
    """Score every class of `index` in stream order and compute its metrics.

    Three stages overlap: a prefetch thread reads and resizes images and masks, the calling thread
    runs the scorer, and a metrics thread folds scored batches into the class's metrics (and
    finalises a class while the next one is scored). Within a class, frames reach the scorer in the
    fixed stream order.

    `settings` must already be the eval settings (`eval_settings`). Without a `scorer`, the one for
    `opts.tta` is made around `inspector`, which is built from the settings when not given (pass one to
    reuse a loaded model, as the benchmark does).
    """
    opts.validate()
    check_tta(opts.tta)
    classes = opts.classes or index.classes
    missing = [c for c in classes if c not in index.classes]
    if missing:
        raise EvalError(f"class(es) {', '.join(missing)} have no samples in {index.root}")
    _, line_of = eval_settings(settings, index, opts)
    if scorer is None:
        if inspector is None:
            from pipeline.inspector import Inspector

            inspector = Inspector.from_settings(settings)
        scorer = make_scorer(opts.tta, inspector, settings)

    issues = list(index.issues)
    batch = settings.model.batch_size
    total = sum(len(index.of_class(c)) for c in classes)
    states: list[_ClassState] = []
    finals: list[tuple[Future[ClassResult], int]] = []
    t_start = time.perf_counter()
    t_model = 0.0
    with (
        tqdm(total=total, unit="img", desc="eval", disable=not opts.progress, dynamic_ncols=True) as bar,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-metrics") as metrics,
    ):
        pending: deque[Future[None]] = deque()
        try:
            for cls in classes:
                bar.set_description(f"eval {cls}")
                state = _ClassState(cls, line_of[cls], index, opts)
                states.append(state)
                n_failed = 0
                t0 = time.perf_counter()
                scorer.begin_class(state.line_id)
                t_model += time.perf_counter() - t0
                samples = stream_order(index.of_class(cls), opts.order, opts.seed)
                loader = _prefetch(samples, index.keep_aspect, opts.resolution, settings.worker.max_pixels, 2 * batch)
                try:
                    for chunk in _batches(loader, batch):
                        loaded = [it for it in chunk if isinstance(it, LoadedSample)]
                        for item in chunk:
                            if not isinstance(item, LoadedSample):
                                s, reason = item
                                issues.append(DatasetIssue(_rel(s.image_path, index.root), f"skipped: {reason}"))
                                n_failed += 1
                        bar.update(len(chunk) - len(loaded))
                        if not loaded:
                            continue
                        t0 = time.perf_counter()
                        out = scorer.score(state.line_id, [ls.image for ls in loaded])
                        t_model += time.perf_counter() - t0
                        if len(out) != len(loaded):
                            raise EvalError(
                                f"scorer {scorer.name!r} returned {len(out)} results for {len(loaded)} images"
                            )
                        pending.append(metrics.submit(state.consume, loaded, out))
                        while len(pending) > _MAX_PENDING_BATCHES:
                            pending.popleft().result()
                        bar.update(len(loaded))
                finally:
                    loader.close()
                t0 = time.perf_counter()
                scorer.end_class(state.line_id)
                t_model += time.perf_counter() - t0
                finals.append((metrics.submit(state.finish), n_failed))
            while pending:
                pending.popleft().result()
            results = []
            for future, n_failed in finals:
                res = future.result()
                res.n_failed = n_failed
                results.append(res)
        finally:
            for f in pending:
                f.cancel()
            for f, _ in finals:
                f.cancel()
            metrics.shutdown(wait=True)
            for st in states:
                st.pix.close()
    elapsed = time.perf_counter() - t_start
    records = [r for st in states for r in st.records]
    issues += [i for st in states for i in st.issues]
    mean, counts = mean_over_classes({r.name: r.row for r in results})
    n_scored = len(records)
    timing = {
        "images": float(n_scored),
        "seconds": elapsed,
        "images_per_s": n_scored / elapsed if elapsed > 0 else float("nan"),
        "model_seconds": t_model,
        "model_images_per_s": n_scored / t_model if t_model > 0 else float("nan"),
        "overhead_pct": 100.0 * (elapsed - t_model) / t_model if t_model > 0 else float("nan"),
    }
    meta = _meta(settings, index, opts)
    return EvalReport(index.name, str(index.root), opts, meta, results, mean, counts, issues, records, timing)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _check_visa_aspect(ls: LoadedSample, root: Path, issues: list[DatasetIssue]) -> None:
    """The official two-tile VisA scheme assumes landscape images with W' < 480 (spec §4.5)."""
    w, h = ls.original_size
    pw, _ = protocol_size(w, h, True)
    if h > w or pw >= 2 * PROTOCOL_SIDE:
        issues.append(
            DatasetIssue(
                _rel(ls.sample.image_path, root),
                f"{w}x{h} is outside the VisA two-tile assumption (landscape, W' < 480); scored with overlapping tiles",
            )
        )


def _meta(settings: Settings, index: DatasetIndex, opts: EvalOptions) -> dict[str, Any]:
    m = settings.model
    side = opts.resolution
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "arch": m.arch,
            "pretrained": m.pretrained,
            "precision": m.precision,
            "temperature": m.temperature,
            "vv_start_block": m.vv_start_block,
            "feature_layers": m.feature_layers,
            "image_score": m.image_score,
            "resize": m.resize,
            "device": m.device,
        },
        "protocol": {
            "resolution": (
                f"{side}x{side} (squash)" if not index.keep_aspect else f"{side} on the shorter side, aspect kept"
            ),
            "masks": "binarised (>0), resized bilinear like the image, then > 0.5",
            "tta": opts.tta,
            "order": opts.order if opts.order == "dataset" else f"shuffled (seed {opts.seed})",
            "aupro_variant": opts.aupro,
            "mean": "unweighted mean over classes; a class where a metric is undefined is left out of that mean",
        },
    }


# --------------------------------------------------------------------------------------------------
# report writing

_COLUMNS = (
    ("image_auroc", "I-AUROC"),
    ("image_ap", "I-AP"),
    ("image_pr_auc", "I-PR-AUC"),
    ("image_f1_max", "I-F1max"),
    ("pixel_auroc", "P-AUROC"),
    ("pixel_ap", "P-AP"),
    ("pixel_f1_max", "P-F1max"),
    ("aupro", "AUPRO@30"),
)


def _fmt(v: float) -> str:
    p = as_percent(v)
    return "n/a" if p is None else f"{p:.1f}"


def _jsonable(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return _jsonable(v.item())
    if isinstance(v, Path):
        return str(v)
    return v


def report_dict(report: EvalReport) -> dict[str, Any]:
    """The JSON form of a report: fractions in `metrics`, ×100 rounded to 0.1 in `percent`, null = undefined."""
    per_class: dict[str, Any] = {}
    for r in report.classes:
        entry: dict[str, Any] = {
            "line": r.line_id,
            "images": r.n_images,
            "anomalous": r.n_anomalous,
            "images_with_pixel_truth": r.n_pixel_images,
            "skipped": r.n_failed,
            "metrics": dict(r.row),
            "percent": {k: as_percent(v) for k, v in r.row.items()},
        }
        if r.pixel is not None:
            entry["pixels"] = {
                "anomalous": r.pixel.n_pixels_anomalous,
                "normal": r.pixel.n_pixels_normal,
                "regions": r.pixel.n_regions,
                "score_min": r.pixel.score_min,
                "score_max": r.pixel.score_max,
            }
        per_class[r.name] = entry
    return _jsonable(
        {
            "dataset": report.dataset,
            "root": report.root,
            "classes": [r.name for r in report.classes],
            **report.meta,
            "definitions": {**DEFINITIONS, "aupro_variant_reported": report.options.aupro},
            "per_class": per_class,
            "mean": {
                "metrics": report.mean,
                "percent": {k: as_percent(v) for k, v in report.mean.items()},
                "classes_in_mean": report.mean_counts,
            },
            "issues": [str(i) for i in report.issues],
            "timing": report.timing,
        }
    )


def report_markdown(report: EvalReport) -> str:
    """The human-readable table with the definitions used, issues and files."""
    meta = report.meta
    lines = [
        f"# AnoCLIP evaluation: {report.dataset}",
        "",
        f"- root: `{report.root}`",
        f"- model: `{meta['model']['arch']}` weights `{meta['model']['pretrained']}`, "
        f"image score `{meta['model']['image_score']}`, temperature {meta['model']['temperature']}",
        f"- protocol resolution: {meta['protocol']['resolution']}; masks {meta['protocol']['masks']}",
        f"- TTA: `{meta['protocol']['tta']}`; stream order: {meta['protocol']['order']}",
        f"- AUPRO variant in the table: **{report.options.aupro}** (both variants are in report.json)",
        f"- {meta['created']}; {int(report.timing['images'])} images in {report.timing['seconds']:.1f} s "
        f"({report.timing['images_per_s']:.2f} img/s; model {report.timing['model_images_per_s']:.2f} img/s)",
        "",
        "All figures ×100, per class, and the unweighted mean over classes. n/a = undefined "
        "(e.g. no anomalous image or no mask).",
        "",
        "| class | images | " + " | ".join(h for _, h in _COLUMNS) + " |",
        "|---|---:|" + "---:|" * len(_COLUMNS),
    ]
    for r in report.classes:
        cells = " | ".join(_fmt(r.row.get(k, float("nan"))) for k, _ in _COLUMNS)
        lines.append(f"| {r.name} | {r.n_images} | {cells} |")
    cells = " | ".join(f"**{_fmt(report.mean.get(k, float('nan')))}**" for k, _ in _COLUMNS)
    lines.append(f"| **mean** | {len(report.records)} | {cells} |")
    lines += ["", "## Metric definitions (anoclip-algorithm.md §6.3)", ""]
    for key, header in _COLUMNS:
        lines.append(f"- **{header}**: {DEFINITIONS[key]}.")
    lines.append(f"- AUPRO reported as **{report.options.aupro}**: {DEFINITIONS['aupro_' + report.options.aupro]}.")
    lines += ["", f"## Issues ({len(report.issues)})", ""]
    lines += [f"- `{i.path}`: {i.problem}" for i in report.issues] or ["None."]
    lines += [
        "",
        "## Files",
        "",
        "- `report.json`: the same table with full precision, both AUPRO variants, pixel counts, timing",
        "- `per_image.csv`: class, defect, label, score and path of every scored image",
        "- `roc_image.png`, `roc_pixel.png`, `pro_curve.png`: curves per class",
        "- `overlays.png`: example heatmaps (per-class colour range; white outline = ground truth)",
        "",
    ]
    return "\n".join(lines)


def write_report(report: EvalReport, out: Path | str) -> list[Path]:
    """Write report.md, report.json, per_image.csv and (unless disabled) the figures; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.md", out / "report.json", out / "per_image.csv"]
    paths[0].write_text(report_markdown(report))
    paths[1].write_text(json.dumps(report_dict(report), indent=2) + "\n")
    with open(paths[2], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "defect", "label", "score", "pixel_truth", "path"])
        for r in report.records:
            w.writerow([r.cls, r.defect, r.label, f"{r.score:.8g}", int(r.pixel_truth), r.path])
    if report.options.figures:
        paths += write_figures(report, out)
    return paths


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state: safe in servers and threads

    return Figure(figsize=(width, height), dpi=100)


def _curve_plot(
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    curves: list[tuple[str, np.ndarray, np.ndarray]],
    vline: float | None = None,
) -> Path:
    fig = _figure(6.0, 5.0)
    ax = fig.add_subplot()
    for label, x, y in curves:
        ax.plot(x, y, linewidth=1.2, label=label)
    if vline is not None:
        ax.axvline(vline, color="grey", linestyle="--", linewidth=0.8)
    else:
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel=xlabel, ylabel=ylabel, title=title)
    if curves:
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "undefined (no anomalous images or masks)", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_figures(report: EvalReport, out: Path) -> list[Path]:
    """ROC (image, pixel) and PRO curves per class, and the example overlay grid."""
    img_curves = [
        (f"{r.name} ({_fmt(r.image.auroc)})", r.image.roc_fpr, r.image.roc_tpr)
        for r in report.classes
        if r.image.roc_fpr.size
    ]
    pix_curves = [
        (f"{r.name} ({_fmt(r.pixel.auroc)})", r.pixel.roc_fpr, r.pixel.roc_tpr)
        for r in report.classes
        if r.pixel is not None and r.pixel.roc_fpr.size
    ]
    pro_curves = []
    for r in report.classes:
        p = r.pixel
        if p is not None and p.pro_fpr.size and np.isfinite(p.pro_overlap).any():
            order = np.argsort(p.pro_fpr, kind="stable")
            pro_curves.append((f"{r.name} ({_fmt(p.aupro)})", p.pro_fpr[order], p.pro_overlap[order]))
    paths = [
        _curve_plot(out / "roc_image.png", "Image ROC (AUROC ×100)", "FPR", "TPR", img_curves),
        _curve_plot(out / "roc_pixel.png", "Pixel ROC (AUROC ×100)", "FPR", "TPR", pix_curves),
        _curve_plot(
            out / "pro_curve.png",
            f"PRO curve, 200 thresholds (AUPRO@30 {report.options.aupro} ×100)",
            "FPR (normal pixels)",
            "mean per-region overlap",
            pro_curves,
            vline=0.3,
        ),
        _overlay_grid(out / "overlays.png", report.classes),
    ]
    return paths


def _overlay_grid(path: Path, classes: Sequence[ClassResult]) -> Path:
    from pipeline.render import overlay

    rows = [r for r in classes if r.examples]
    n_cols = max((len(r.examples) for r in rows), default=1)
    fig = _figure(2.4 * n_cols, 2.4 * max(len(rows), 1))
    if not rows:
        fig.text(0.5, 0.5, "no examples", ha="center")
    for i, r in enumerate(rows):
        if r.pixel is not None:
            lo, hi = r.pixel.score_min, r.pixel.score_max
        else:
            lo = min(float(e.anomaly_map.min()) for e in r.examples)
            hi = max(float(e.anomaly_map.max()) for e in r.examples)
        for j, ex in enumerate(r.examples):
            ax = fig.add_subplot(len(rows), n_cols, i * n_cols + j + 1)
            ax.imshow(overlay(ex.image, ex.anomaly_map, lo, hi, ex.mask))
            ax.set_title(f"{r.name}/{ex.defect}\n{ex.name} s={ex.score:.4f}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    return path


def run_eval(
    settings: Settings,
    index: DatasetIndex,
    opts: EvalOptions,
    *,
    inspector: Any | None = None,
    scorer: Scorer | None = None,
) -> tuple[EvalReport, list[Path]]:
    """`eval_settings` + `evaluate` + `write_report` in one call (what the CLI and the benchmark run)."""
    run_settings, _ = eval_settings(settings, index, opts)
    report = evaluate(run_settings, index, opts, inspector=inspector, scorer=scorer)
    return report, write_report(report, opts.out)
