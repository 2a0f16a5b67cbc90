"""The job of `anoclip adapt`: train a buffered TTA adapter from images.

The images are scored zero-shot, offered to the line's token buffer (admission: only confidently
normal frames; abnormal-looking patches are never labelled normal), and one adapter is trained on the
buffer within the `tta` budget, then checked by the validation gate on held-out frames. Writes

* FILE              the adapter (safetensors + metadata), only when the gate accepts it;
* FILE.report.json  the training report (steps, loss curve, time, admission, gate figures, verdict);
* FILE.loss.png     the loss curve.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from tqdm import tqdm

from pipeline.adaptation.tta.buffered import BufferedTTA, input_resizer
from pipeline.adaptation.tta.files import TrainingMeta, build_meta, save_adapter, target_for
from pipeline.errors import ConfigError, ImageError
from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.inspection.imaging import list_images, load_image
from pipeline.model.tta_train import TrainingReport
from pipeline.settings import TTASettings, load_settings

log = logging.getLogger("anoclip.adapt")


@dataclass(frozen=True)
class AdaptSummary:
    """What one `adapt_files` run did."""

    report: TrainingReport  # steps, losses, time, gate verdict and reasons; `extra` holds admission and paths
    out: Path  # the adapter file (written only when the gate accepted it)
    report_path: Path  # FILE.report.json
    images_scored: int  # images scored (readable ones)
    score_seconds: float  # time spent scoring them

    @property
    def accepted(self) -> bool:
        return bool(self.report.accepted)

    @property
    def adapter_id(self) -> str | None:
        return self.report.extra.get("adapter_id")

    @property
    def exit_code(self) -> int:
        """0 = adapter written, 1 = the gate refused it or too few frames were admitted."""
        return 0 if self.accepted else 1


def report_paths(out: Path) -> tuple[Path, Path]:
    """FILE.report.json and FILE.loss.png next to the adapter file."""
    stem = out.with_suffix("") if out.suffix == ".safetensors" else out
    return Path(f"{stem}.report.json"), Path(f"{stem}.loss.png")


def plot_losses(report: TrainingReport, path: Path) -> None:
    """The loss curve (and its parts) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), dpi=100, sharex=True)
    steps = range(1, len(report.losses) + 1)
    ax.plot(steps, report.losses, color="black", linewidth=1.5)
    verdict = "accepted" if report.accepted else "refused"
    ax.set_title(f"{report.extra.get('line', '')}: {report.kind} adapter, {report.steps} steps, {verdict}")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    for name, values in report.loss_parts.items():
        if values:
            ax2.plot(range(1, len(values) + 1), values, label=name, linewidth=1.0)
    ax2.set_xlabel("step")
    ax2.set_ylabel("loss terms (unweighted)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def adapt_files(
    paths: list[str],
    *,
    line: str,
    out: str | Path,
    config: str | None = None,
    steps: int | None = None,
    seconds: float | None = None,
    seed: int | None = None,
    min_frames: int | None = None,
) -> AdaptSummary:
    """Train an adapter for `line` on the images under `paths` and write it (if accepted), its report and loss
    curve next to `out`; progress and per-image problems go to stderr. None budgets: the config's `tta`."""
    settings = load_settings(config)
    line_settings = settings.line(line)
    line_settings.threshold.warmup_frames = 0  # scoring here must not calibrate anything
    updates = {k: v for k, v in (("train_steps", steps), ("train_seconds", seconds), ("seed", seed),
                                 ("min_frames", min_frames)) if v is not None}
    try:
        tta = TTASettings.model_validate({**settings.tta.model_dump(), **updates})
    except ValidationError as e:
        raise ConfigError(f"invalid option: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from e
    settings = settings.model_copy(update={"tta": tta})
    inspector = FrameScorer.from_settings(settings)
    inspector.prepare_line(line)
    out = Path(out)
    report_path, png_path = report_paths(out)

    files = list_images(paths)
    batch = settings.model.batch_size
    scored: list[tuple[str, torch.Tensor, float, float, tuple[int, int], np.ndarray | None]] = []
    # the gate pastes synthetic defects into the newest held-out frames: keep the last files' images only
    keep_from = len(files) - 4 * max(1, settings.tta.gate_positives)
    to_input = input_resizer(inspector)
    skipped: list[str] = []
    t_score = time.perf_counter()
    with tqdm(total=len(files), desc=f"scoring {line}", unit="img", disable=len(files) < 2,
              file=sys.stderr) as bar:
        for start in range(0, len(files), batch):
            chunk, images = [], []
            for f in files[start : start + batch]:
                try:
                    images.append(load_image(f, max_pixels=settings.worker.max_pixels))
                    chunk.append(f)
                except ImageError as e:
                    skipped.append(str(e))
                    print(f"skipped {e}", file=sys.stderr)
                bar.update(1)
            if images:
                for f, raw in zip(chunk, inspector.score_raw(line, images), strict=True):
                    image = to_input(raw.image) if raw.image is not None and len(scored) >= keep_from else None
                    scored.append((str(f), raw.tokens.to(torch.float16), raw.score, time.time(), raw.input_hw, image))
    score_seconds = time.perf_counter() - t_score

    state = BufferedTTA.for_line(inspector, line)  # ceiling: the line's fixed image threshold, if any
    state.buffer.prime([s for _, _, s, _, _, _ in scored])
    admissions = []
    for name, tokens, score, ts, input_hw, image in scored:
        a = state.observe(name, tokens.float(), score, ts, input_hw=input_hw, image=image)
        share = None if math.isnan(a.abnormal_share) else round(a.abnormal_share, 4)
        admissions.append({"image": name, "score": round(score, 6), "admitted": a.admitted, "reason": a.reason,
                           "abnormal_share": share})
    n_admitted = sum(a["admitted"] for a in admissions)
    print(f"{n_admitted} of {len(scored)} image(s) admitted to the buffer", file=sys.stderr)

    with tqdm(total=state.budget.max_steps, desc=f"training {line_settings.adapter_kind} adapter", unit="step",
              file=sys.stderr, disable=len(scored) < 2 or n_admitted < tta.min_frames) as bar:  # no 0/100 bar

        def progress(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.5f}")

        adapter, report = state.train_candidate(progress)

    report.extra.update(
        score_seconds=score_seconds,
        images=len(files),
        skipped=skipped,
        admission_ceiling=state.buffer.rule.max_image_score,
        admissions=admissions,
        report=str(report_path),
        loss_curve=str(png_path),
    )
    if adapter is not None and report.accepted:
        target = target_for(inspector, line)
        meta = build_meta(
            adapter, target,
            training_window=report.extra.get("training_window"),
            validation=report.validation,
            training=TrainingMeta.from_report(report),
            thresholds=report.thresholds,
        )
        save_adapter(out, adapter, meta)
        report.extra.update(adapter=str(out), adapter_id=meta["id"])
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report.to_dict(), indent=2, default=str))
    if report.losses:
        plot_losses(report, png_path)
    return AdaptSummary(report=report, out=out, report_path=report_path, images_scored=len(scored),
                        score_seconds=score_seconds)
