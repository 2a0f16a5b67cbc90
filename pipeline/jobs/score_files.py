"""The job of `anoclip score`: score image files or folders for one line.

Writes, per image, a binary defect mask PNG and a heatmap overlay PNG (under `masks/` and `heatmaps/`,
keeping the inputs' folder structure below their common folder), and one JSON line to `results.jsonl`.
Each run replaces what the previous run in the same `out` wrote (the files listed in its
`results.jsonl`; nothing else there is touched). Paths are checked before the model loads; an input
without images is an error. Unreadable images are reported by name and skipped; the summary's exit code
is 1 when any image was skipped, so scripts notice.

The line: `line` from the config, or `class_name` (with `domain`) for a class no line describes;
with both, `class_name` replaces the line's class name in the prompts. Thresholds: `threshold` /
`pixel_threshold` set them; `calibrate` (known-good images) derives them (the line's quantiles, or
`quantile`); else the config's, else the defaults. The image score decides each verdict; a mask that
disagrees is reported in `pixel_verdict` / `verdict_note` (pipeline/operators/describe.py).

`adapter` scores through a trained TTA adapter (checked against the model and line) and judges with
the thresholds the file carries (calibrated on its held-out frames, as a registry version's; docs/tta.md):
an adapter rescales p(abnormal), so the line's base-model pixel threshold would give wrong masks. Per
threshold, `threshold` / `pixel_threshold` and the config's fixed values still win, and `calibrate`
(on good images scored through the adapter) replaces them. `tta="per_frame"` adapts a fresh adapter on
every image.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.errors import AnoclipError, ConfigError, ImageError
from pipeline.inspection.imaging import IMAGE_SUFFIXES, list_images
from pipeline.observability.log_format import log_context
from pipeline.operators.describe import verdict_agreement, verdict_note
from pipeline.settings import LineSettings, Settings, load_settings

log = logging.getLogger("anoclip.score")


@dataclass(frozen=True)
class ScoreSummary:
    """What one `score_files` run did."""

    line: str  # the line scored (an ad-hoc line's id with --class-name alone)
    scored: int  # images scored and written
    anomalous: int  # of them, judged anomalous
    skipped: int  # unreadable images, reported by name and left out
    disagree: int  # images whose mask disagrees with the verdict (the image score decides)
    out: Path  # the output folder

    @property
    def results(self) -> Path:
        return self.out / "results.jsonl"

    @property
    def exit_code(self) -> int:
        """1 when any image was skipped, so scripts notice; else 0."""
        return 1 if self.skipped else 0


def output_names(paths: list[Path], roots: list[str]) -> list[str]:
    """Unique output names (no suffix) that keep each file's folders below the inputs' common folder:
    `score data/good data/scratch` gives `good/000` and `scratch/000`, never `000` and `000_2`."""
    bases = [Path(r).resolve() if Path(r).is_dir() else Path(r).resolve().parent for r in roots]
    try:
        common = Path(os.path.commonpath(bases)) if bases else Path.cwd().resolve()
    except ValueError:  # different drives
        common = None
    names, seen = [], set()
    for p in paths:
        rp = p.resolve()
        rel = rp.relative_to(common) if common is not None and rp.is_relative_to(common) else Path(p.name)
        stem = rel.with_suffix("").as_posix()
        name = stem if stem not in seen else f"{stem}_{rel.suffix.lstrip('.').lower()}"  # a.png and a.jpg
        k = 1
        while name in seen:
            k += 1
            name = f"{stem}_{k}"
        seen.add(name)
        names.append(name)
    return names


def check_inputs(paths: list[str], what: str) -> list[Path]:
    """The image files under `paths`; an error naming the first missing path or an input without images."""
    for raw in paths:
        if not Path(raw).exists():
            raise AnoclipError(f"{what}: no such file or folder: {raw}")
    files = list_images(paths)
    if not files:
        raise AnoclipError(f"{what}: no images in {', '.join(paths)} (looked for {' '.join(IMAGE_SUFFIXES)})")
    return files


def resolve_line(settings: Settings, line_id: str | None, class_name: str | None, domain: str | None) -> Settings:
    """Settings holding the line to score: configured, configured with another class name, or ad hoc."""
    if line_id is None and class_name is None:
        raise AnoclipError("give --line (a configured line) or --class-name (what the parts are)")
    if line_id is not None:
        if any(x.id == line_id for x in settings.lines):
            line = settings.line(line_id)
            if class_name is None and domain is None:
                return settings
            line = line.model_copy(update={k: v for k, v in (("class_name", class_name), ("domain", domain)) if v})
        elif class_name is None:
            settings.line(line_id)  # UnknownLineError naming the configured lines
            raise AssertionError("unreachable")
        else:
            line = LineSettings(id=line_id, class_name=class_name, domain=domain or "object")
    else:
        assert class_name is not None
        ad_hoc = re.sub(r"[^A-Za-z0-9_.\-]+", "-", class_name.strip()).strip("-") or "adhoc"
        line = LineSettings(id=ad_hoc, class_name=class_name.strip(), domain=domain or "object")
    lines = [x for x in settings.lines if x.id != line.id] + [line]
    return settings.model_copy(update={"lines": lines})


def clear_previous_run(out: Path) -> int:
    """Remove what the previous run in `out` wrote (the files its results.jsonl lists); returns how many."""
    results = out / "results.jsonl"
    if not results.exists():
        return 0
    removed = 0
    for raw in results.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        for key in ("mask", "heatmap"):
            p = Path(str(rec.get(key, "")))
            if p.suffix == ".png" and p.is_file() and out.resolve() in p.resolve().parents:
                p.unlink()
                removed += 1
    results.unlink()
    for sub in ("masks", "heatmaps"):  # folders left empty by the removal
        for d in sorted((out / sub).glob("**/"), key=lambda x: len(x.parts), reverse=True):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    return removed


def score_files(
    paths: list[str],
    *,
    line: str | None = None,
    class_name: str | None = None,
    domain: str | None = None,
    config: str | None = None,
    out: str | Path = "out/score",
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    calibrate: list[str] | None = None,
    quantile: float | None = None,
    adapter: str | None = None,
    tta: str | None = None,
) -> ScoreSummary:
    """Score `paths` (files or folders) for one line into `out`; per-image problems and progress go to stderr.
    `tta`: "off", "per_frame" or None (per_frame if the config's tta.mode is per_frame)."""
    settings = resolve_line(load_settings(config), line, class_name, domain)
    line_id = line or settings.lines[-1].id
    files = check_inputs(paths, "score")  # before the model loads: a typo fails in a second
    calib = check_inputs(calibrate, "--calibrate") if calibrate else []
    if adapter is not None and not Path(adapter).is_file():
        raise AnoclipError(f"--adapter: no such file: {adapter}")
    if quantile is not None and not 0 < quantile < 1:
        raise AnoclipError("--quantile must be between 0 and 1")
    tta = tta or ("per_frame" if settings.tta.mode == "per_frame" else "off")
    if adapter is not None and tta == "per_frame":
        raise ConfigError("--adapter and --tta per_frame exclude each other: per-frame TTA trains its own adapters")

    from pipeline.adaptation.tta.files import load_adapter, target_for
    from pipeline.inspection.frame_scorer import FrameScorer
    from pipeline.inspection.imaging import load_image
    from pipeline.inspection.render import heatmap_png, mask_png
    from pipeline.model.tta_params import TTAParams
    from pipeline.verdicts.following import start_following
    from pipeline.verdicts.inspector import Inspector

    # No warm-up calibration on the scored images: the verdict of image 1 must not depend on image 150.
    th_cfg = settings.line(line_id).threshold
    th_cfg.warmup_frames = 0
    if calib:  # calibrated thresholds replace the config's fixed ones (manual flags still win)
        th_cfg.warmup_frames, th_cfg.image, th_cfg.pixel = len(calib), None, None
        if quantile is not None:
            th_cfg.quantile = quantile
    inspector = FrameScorer.from_settings(settings)
    thresholds = inspector.thresholds(line_id)
    text = inspector.prepare_line(line_id)
    tta_adapter, adapter_version = None, None
    if adapter is not None:
        dtype = TTAParams.from_settings(settings.tta).compute_dtype
        tta_adapter, meta = load_adapter(adapter, target_for(inspector, line_id), text, dtype)
        adapter_version = f"file-{meta['id']}"
        own = None if calib else (meta.get("thresholds") or None)  # calibrating through it replaces them
        thresholds.set_version(adapter_version, own)
        log.info("using %s adapter %s from %s (its thresholds: %s)", meta["kind"], adapter_version, adapter,
                 "replaced by --calibrate" if calib else own or "none, the line's apply")
    # A configured line is judged as its workers judge it (their adapter, bank and published thresholds) unless
    # this run makes its own state: an adapter file, a calibration, an ad hoc class, thresholds on the command line.
    follow = adapter is None and not calib and class_name is None and domain is None
    if follow:
        path = Inspector.over(inspector, start_following(settings, inspector))
        if threshold is not None or pixel_threshold is not None:
            path.published = None  # the flags win over what the workers published
    else:
        path = Inspector(inspector)
    batch = settings.model.batch_size
    if calib:
        good = []
        for f in calib:
            try:
                good.append(load_image(f, max_pixels=settings.worker.max_pixels))
            except ImageError as e:
                print(f"--calibrate: skipped {e}", file=sys.stderr)
        for start in range(0, len(good), batch):
            path.inspect(line_id, good[start:start + batch], adapter=tta_adapter, adapter_version=adapter_version,
                         tta=tta)
        if thresholds.calibration is None:
            raise AnoclipError(f"--calibrate: only {len(good)} of {len(calib)} images could be read")
        th_cfg.warmup_frames = 0
        cal = thresholds.calibration
        print(f"calibrated on {cal.frames} good image(s): image threshold {cal.image:.4f} (quantile "
              f"{th_cfg.quantile}), pixel threshold {cal.pixel:.4f} (quantile {th_cfg.pixel_quantile})",
              file=sys.stderr)
    thresholds.set_override(threshold, pixel_threshold)

    names = output_names(files, paths)
    out = Path(out)
    if clear_previous_run(out):
        print(f"replaced the results of the previous run in {out}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    skipped = scored = anomalous = disagree = 0
    with (out / "results.jsonl").open("w") as results, tqdm(
        total=len(files), desc=f"scoring {line_id}", unit="img", disable=len(files) < 2, file=sys.stderr
    ) as bar:
        for start in range(0, len(files), batch):
            chunk, chunk_names, images = [], [], []
            for f, name in zip(files[start : start + batch], names[start : start + batch], strict=True):
                try:
                    images.append(load_image(f, max_pixels=settings.worker.max_pixels))
                    chunk.append(f)
                    chunk_names.append(name)
                except ImageError as e:
                    skipped += 1
                    print(f"skipped {e}", file=sys.stderr)
                    bar.update(1)
            if not images:
                continue
            t0 = time.perf_counter()
            inspections = path.inspect(line_id, images, adapter=tta_adapter, adapter_version=adapter_version, tta=tta)
            total_ms = (time.perf_counter() - t0) * 1e3 / len(images)
            for f, name, img, ins in zip(chunk, chunk_names, images, inspections, strict=True):
                mask_path = out / "masks" / f"{name}.png"
                heat_path = out / "heatmaps" / f"{name}.png"
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                heat_path.parent.mkdir(parents=True, exist_ok=True)
                mask_path.write_bytes(mask_png(ins.mask))
                lo, hi = ins.heatmap_range
                heat_path.write_bytes(heatmap_png(img, ins.anomaly_map, lo, hi, ins.mask))
                area = int(ins.mask.sum())
                h, w = img.shape[:2]
                rec = {"image": str(f), **ins.summary(), "pixel_verdict": "anomalous" if area else "normal",
                       "verdict_note": verdict_note(bool(ins.verdict), area, w, h),
                       "mask": str(mask_path), "heatmap": str(heat_path)}
                rec["timings_ms"]["total"] = round(total_ms, 3)
                results.write(json.dumps(rec) + "\n")
                scored += 1
                anomalous += int(ins.verdict)
                disagree += int(bool(verdict_agreement(bool(ins.verdict), area)))
                with log_context(line=line_id, frame_id=str(f)):
                    log.debug("scored %.4f: %s", ins.score, rec["verdict"])
                bar.update(1)
    path.close()
    return ScoreSummary(line=line_id, scored=scored, anomalous=anomalous, skipped=skipped, disagree=disagree,
                        out=out)
