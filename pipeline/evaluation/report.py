"""The report of an evaluation: its records, and the files it writes.

`report.md` and `report.json` (per class and the unweighted mean over classes), `per_image.csv`, ROC
and PRO curves and a grid of example overlays as PNG. Metric definitions are in
`pipeline.evaluation.metrics` (see docs/algorithm.md §6.3).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.evaluation.datasets import DatasetIssue
from pipeline.evaluation.metrics import DEFINITIONS, ImageMetrics, PixelMetrics, as_percent

if TYPE_CHECKING:
    from pipeline.evaluation.options import EvalOptions



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
    adaptation: dict[str, Any] | None = None
    """What buffered TTA did on the class (refreshes, promotions, schedule); None without it."""
    memory: dict[str, Any] | None = None
    """What the patch memory did on the class (bank versions, patches, bytes, refreshes); None when off."""


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
        if r.adaptation is not None:
            entry["adaptation"] = r.adaptation
        if r.memory is not None:
            entry["memory"] = r.memory
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


def _memory_note(report: EvalReport) -> str:
    """Per class, what the memory was built from (docs/memory.md)."""
    notes = []
    for r in report.classes:
        m = r.memory
        if not m:
            continue
        if m.get("mode") == "train":
            notes.append(f"{r.name}: bank of {m['shots']} train images, {m['patches']} patches")
        elif m.get("mode") == "mutual":
            notes.append(f"{r.name}: {m['frames']} frames scored mutually")
        elif m.get("mode") == "stream":
            notes.append(f"{r.name}: {m['refreshes']} bank refreshes, {m['admitted']} frames admitted, "
                         f"{m['patches']} patches")
    return " (" + "; ".join(notes) + ")" if notes else ""


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
        f"- TTA: `{meta['protocol']['tta']}`; stream order: {meta['protocol']['order']}"
        + "".join(f"; {r.name}: {r.adaptation['refreshes']} refreshes ({r.adaptation['promoted']} promoted)"
                  for r in report.classes if r.adaptation is not None),
        f"- memory: `{meta['protocol'].get('memory', 'off')}`" + _memory_note(report),
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
    lines += ["", "## Metric definitions (docs/algorithm.md §6.3)", ""]
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
    from pipeline.inspection.render import overlay

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

