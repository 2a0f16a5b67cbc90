"""`anoclip adapt --line LINE --out FILE PATH...`: train a buffered TTA adapter from images.

The images are scored zero-shot, offered to the line's token buffer (admission: only confidently
normal frames; abnormal-looking patches are never labelled normal), and one adapter is trained on the
buffer within the `tta` budget, then checked by the validation gate on held-out frames. Writes

* FILE              the adapter (safetensors + metadata), only when the gate accepts it;
* FILE.report.json  the training report (steps, loss curve, time, admission, gate figures, verdict);
* FILE.loss.png     the loss curve.

Exit code 0 = adapter written, 1 = the gate refused it (reasons printed and in the report) or too few
frames were admitted. Use the adapter with `anoclip score --adapter FILE`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from tqdm import tqdm

from pipeline.adaptation.tta.buffered import BufferedTTA, input_resizer
from pipeline.adaptation.tta.files import TrainingMeta, build_meta, save_adapter, target_for
from pipeline.errors import ConfigError, ImageError
from pipeline.inspection.imaging import list_images, load_image
from pipeline.inspection.inspector import Inspector
from pipeline.model.self_training import TrainingReport
from pipeline.settings import TTASettings, load_settings

log = logging.getLogger("anoclip.adapt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--line", required=True, help="product line id from the config")
    p.add_argument("--out", required=True, metavar="FILE", help="adapter file to write (.safetensors)")
    p.add_argument("--config", default=None, help="config file (default: $ANOCLIP_CONFIG or ./config.yaml)")
    p.add_argument("--steps", type=int, default=None, help="step budget (default tta.train_steps)")
    p.add_argument("--seconds", type=float, default=None, help="time budget (default tta.train_seconds)")
    p.add_argument("--seed", type=int, default=None, help="seed of split, init, minibatches, noise (default tta.seed)")
    p.add_argument("--min-frames", type=int, default=None, help="admitted frames needed (default tta.min_frames)")


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


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    line = settings.line(args.line)
    line.threshold.warmup_frames = 0  # scoring here must not calibrate anything
    updates = {k: v for k, v in (("train_steps", args.steps), ("train_seconds", args.seconds), ("seed", args.seed),
                                 ("min_frames", args.min_frames)) if v is not None}
    try:
        tta = TTASettings.model_validate({**settings.tta.model_dump(), **updates})
    except ValidationError as e:
        raise ConfigError(f"invalid option: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from e
    settings = settings.model_copy(update={"tta": tta})
    inspector = Inspector.from_settings(settings)
    inspector.prepare_line(args.line)
    out = Path(args.out)
    report_path, png_path = report_paths(out)

    files = list_images(args.paths)
    batch = settings.model.batch_size
    scored: list[tuple[str, torch.Tensor, float, float, tuple[int, int], np.ndarray | None]] = []
    # the gate pastes synthetic defects into the newest held-out frames: keep the last files' images only
    keep_from = len(files) - 4 * max(1, settings.tta.gate_positives)
    to_input = input_resizer(inspector)
    skipped: list[str] = []
    t_score = time.perf_counter()
    with tqdm(total=len(files), desc=f"scoring {args.line}", unit="img", disable=len(files) < 2,
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
                for f, raw in zip(chunk, inspector.score_raw(args.line, images), strict=True):
                    image = to_input(raw.image) if raw.image is not None and len(scored) >= keep_from else None
                    scored.append((str(f), raw.tokens.to(torch.float16), raw.score, time.time(), raw.input_hw, image))
    score_seconds = time.perf_counter() - t_score

    state = BufferedTTA.for_line(inspector, args.line)  # ceiling: the line's fixed image threshold, if any
    state.buffer.prime([s for _, _, s, _, _, _ in scored])
    admissions = []
    for name, tokens, score, ts, input_hw, image in scored:
        a = state.observe(name, tokens.float(), score, ts, input_hw=input_hw, image=image)
        share = None if math.isnan(a.abnormal_share) else round(a.abnormal_share, 4)
        admissions.append({"image": name, "score": round(score, 6), "admitted": a.admitted, "reason": a.reason,
                           "abnormal_share": share})
    n_admitted = sum(a["admitted"] for a in admissions)
    print(f"{n_admitted} of {len(scored)} image(s) admitted to the buffer", file=sys.stderr)

    with tqdm(total=state.budget.max_steps, desc=f"training {line.adapter_kind} adapter", unit="step",
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
        target = target_for(inspector, args.line)
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
    if report.losses:
        print(report.summary(), file=sys.stderr)
    else:  # nothing was trained: no step count, no "loss - -> -"
        print(f"{report.kind} adapter not trained: {'; '.join(report.reasons) or 'no frames'}", file=sys.stderr)
    if not report.accepted:
        print(f"no adapter written to {out}; report in {report_path}", file=sys.stderr)
        return 1
    print(f"adapter written to {out} (id {report.extra['adapter_id']}); report in {report_path}; training took "
          f"{report.seconds:.1f} s for {report.steps} steps, scoring the {len(scored)} image(s) {score_seconds:.1f} s",
          file=sys.stderr)
    return 0
