"""The evaluation loop behind `anoclip eval`: stream a dataset through a scorer into exact metrics.

For each class the test images are replayed in a fixed stream order, resized to the protocol
resolution (MVTec 240x240 squash; VisA and folders 240 on the short side, aspect kept), scored
through a `Scorer`, and streamed into exact, memory-bounded metrics (`pipeline.evaluation.metrics`). Image I/O
runs in a prefetch thread so it overlaps the model. What is asked (`EvalOptions`) is in
`pipeline.evaluation.options`; the records and files of the result are in `pipeline.evaluation.report`.

A `Scorer` is the hook for test-time adaptation: `off` scores frames with the FrameScorer as they
are; `per_frame` and `buffered` come from `pipeline.adaptation.tta.eval_scorers.eval_scorer` (see `make_scorer`)
and see the same stream, class by class, through `begin_class` / `score` / `end_class`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.adaptation.memory.params import MemoryParams
from pipeline.adaptation.tta.eval_scorers import eval_scorer
from pipeline.errors import ImageError
from pipeline.evaluation.datasets import (
    PROTOCOL_SIDE,
    DatasetIndex,
    DatasetIssue,
    LoadedSample,
    Sample,
    load_pair,
    protocol_size,
    train_samples,
)
from pipeline.evaluation.memory_eval import ClassImages, MemoryEvalScorer
from pipeline.evaluation.metrics import (
    PixelAccumulator,
    class_row,
    image_metrics,
    mean_over_classes,
)
from pipeline.evaluation.options import TTA_MODES, EvalError, EvalOptions
from pipeline.evaluation.report import ClassResult, EvalReport, Example, ImageRecord, write_report
from pipeline.settings import LineSettings, Settings
from pipeline.verdicts.inspector import Inspector

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
    """`--tta off`: frames through the one verdict path (`pipeline.verdicts.Inspector`: the base model, no memory,
    nothing calibrated on test frames, judged at model input size); the metrics read the image score and the raw
    map at model input size, which the protocol resizes itself."""

    def __init__(self, inspector: Any) -> None:
        self.inspector = inspector
        self.path = Inspector(inspector, calibrate=False, render_max_side=inspector.model.image_size, tta="off")

    def begin_class(self, line_id: str) -> None:
        self.inspector.prepare_line(line_id)

    def score(self, line_id: str, images: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        return [(v.inspection.score, v.raw.anomaly_map.numpy()) for v in self.path.inspect_frames(line_id, images)]

    def end_class(self, line_id: str) -> None:
        return None


def check_tta(mode: str) -> None:
    """Fail fast (before any model is loaded) when `mode` cannot be evaluated."""
    if mode not in TTA_MODES:
        raise EvalError(f"unknown TTA mode {mode!r} (use one of {', '.join(TTA_MODES)})")


def make_scorer(mode: str, inspector: Any, settings: Settings) -> Scorer:
    """The scorer for a TTA mode: `off` here, `per_frame` / `buffered` from the TTA module."""
    check_tta(mode)
    if mode == "off":
        return InspectorScorer(inspector)
    return eval_scorer(mode, inspector, settings)


# --------------------------------------------------------------------------------------------------
# settings (the options: pipeline.evaluation.options)


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
    """The scorer's map at the protocol resolution (bilinear, as the FrameScorer resizes maps)."""
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
    if opts.memory == "train":  # before the model loads: a class without training images fails at once
        for cls in classes:
            train_samples(index, cls)
    _, line_of = eval_settings(settings, index, opts)
    if scorer is None:
        if inspector is None:
            from pipeline.inspection.frame_scorer import FrameScorer

            inspector = FrameScorer.from_settings(settings)
        if opts.memory == "off":
            scorer = make_scorer(opts.tta, inspector, settings)
        else:
            scorer = MemoryEvalScorer(opts.memory, inspector, MemoryParams.from_settings(settings.memory),
                                  class_images(index, opts, line_of, settings.worker.max_pixels),
                                  shots=opts.shots, tta=opts.tta)

    issues = list(index.issues)
    batch = settings.model.batch_size
    total = sum(len(index.of_class(c)) for c in classes)
    states: list[_ClassState] = []
    finals: list[tuple[Future[ClassResult], int]] = []
    t_start = time.perf_counter()
    t_model = 0.0
    with (
        tqdm(total=total, unit="img", desc="eval", disable=not opts.progress, dynamic_ncols=True) as bar,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-metrics") as metric_worker,
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
                expect = getattr(scorer, "expect_frames", None)
                if expect is not None:  # buffered TTA scales its refresh cadence to the class (docs/tta.md)
                    expect(state.line_id, len(samples))
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
                        pending.append(metric_worker.submit(state.consume, loaded, out))
                        while len(pending) > _MAX_PENDING_BATCHES:
                            pending.popleft().result()
                        bar.update(len(loaded))
                finally:
                    loader.close()
                t0 = time.perf_counter()
                scorer.end_class(state.line_id)
                t_model += time.perf_counter() - t0
                finals.append((metric_worker.submit(state.finish), n_failed))
            while pending:
                pending.popleft().result()
            results = []
            for future, n_failed in finals:
                res = future.result()
                res.n_failed = n_failed
                res.adaptation = getattr(scorer, "adaptation", {}).get(res.line_id)
                res.memory = getattr(scorer, "memory", {}).get(res.line_id)
                results.append(res)
        finally:
            for f in pending:
                f.cancel()
            for f, _ in finals:
                f.cancel()
            metric_worker.shutdown(wait=True)
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


def class_images(index: DatasetIndex, opts: EvalOptions, line_of: dict[str, str], max_pixels: int) -> ClassImages:
    """What memory scorers read beyond the stream: a class's training images, or its test images in stream
    order, at the protocol resolution (unreadable ones are left out, as the stream leaves them out)."""
    cls_of = {line: cls for cls, line in line_of.items()}

    def load(line_id: str, split: str) -> list[np.ndarray]:
        cls = cls_of[line_id]
        if split == "train":
            samples = train_samples(index, cls)
        else:
            samples = stream_order(index.of_class(cls), opts.order, opts.seed)
        images = []
        for s in samples:
            try:
                images.append(load_pair(s, index.keep_aspect, opts.resolution, max_pixels).image)
            except ImageError:
                continue
        return images

    return load


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _check_visa_aspect(ls: LoadedSample, root: Path, issues: list[DatasetIssue]) -> None:
    """The official two-tile VisA scheme assumes landscape images with W' < 480 (docs/algorithm.md §4.5)."""
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
            "memory": opts.memory,
            **({"shots": opts.shots} if opts.memory == "train" else {}),
            "order": opts.order if opts.order == "dataset" else f"shuffled (seed {opts.seed})",
            "aupro_variant": opts.aupro,
            "mean": "unweighted mean over classes; a class where a metric is undefined is left out of that mean",
        },
    }


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
