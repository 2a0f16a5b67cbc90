"""TTA cost: per-frame TTA per frame against zero-shot scoring, and a buffered refresh of 1,000 frames.

    python bench/bench_tta.py                                  # ViT-B-16-plus-240 shapes, fp32, CPU
    python bench/bench_tta.py --precision bf16 --batch 1 8 --frames 1000 --json out/bench_tta.json

Per-frame: the zero-shot forward (`AnoCLIP.forward`: maps + image score) and per-frame TTA on its
tokens (`adapt_per_frame`, 5 AdamW steps, then `maps_from_tokens`) are timed interleaved in one
process, same batch, so host noise hits both alike. TTA cost is reported in ms per frame and as a
multiple of zero-shot scoring.

Buffered: `--frames` frames of tokens at the model's shape (fp16 in the buffer, as the worker keeps
them) go through admission (base-model patch scores + rule), then one `refresh_adapter` with the
stream's budget (train_steps, minibatch, and a time cap of train_share x the scoring time, at most
train_seconds) and the validation gate. Its time is compared with the time those frames took to
score (frames x zero-shot ms/frame at the fastest batch measured).
Target: refresh < 10% of that scoring time. Weights and text features are random (cost does not
depend on values); text features have the real prompt count (462 + 462 sentences).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.model import TextFeatures, create_anoclip  # noqa: E402
from pipeline.model.tta_admission import admit
from pipeline.model.tta_params import AdmissionRule, BufferedBudget, GateRule, TTAParams  # noqa: E402
from pipeline.model.tta_per_frame import adapt_per_frame  # noqa: E402
from pipeline.model.tta_scoring import patch_scores  # noqa: E402
from pipeline.model.tta_train import (
    TokenSet,  # noqa: E402
    refresh_adapter,  # noqa: E402
)
from pipeline.settings import ModelSettings, TTASettings  # noqa: E402


def _random_text(c: int, dev: torch.device, n: int = 462) -> TextFeatures:
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1).to(dev)  # noqa: E731
    return TextFeatures(unit(2, c), unit(n, c), unit(n, c))


def per_frame(model, text, kinds, batch, iters, warmup, params: dict[str, TTAParams]) -> dict:
    dev = model.device
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, model.image_size, model.image_size, generator=g).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    hw = (model.image_size, model.image_size)
    tokens = model(x, text).tokens

    def zero_shot() -> None:
        model(x, text)

    def tta(kind: str, p: TTAParams):
        def run() -> None:
            res = adapt_per_frame(tokens, text, kind, p, temperature=model.temperature)
            with torch.no_grad():
                model.maps_from_tokens(tokens, text, hw, res.adapter)
        return run

    runs = {"zero_shot": zero_shot}
    names = []
    for k in kinds:
        for prec, p in params.items():
            names.append(f"{k}/{prec}")
            runs[f"tta_{k}/{prec}"] = tta(k, p)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(warmup + iters):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
        print(f"\r  per-frame b{batch}: iter {i + 1}/{warmup + iters}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    ms = {k: 1e3 * statistics.median(v) / batch for k, v in times.items()}
    out = {"batch": batch, "zero_shot_ms_per_frame": ms["zero_shot"]}
    for n in names:
        out[f"tta_{n}_ms_per_frame"] = ms[f"tta_{n}"]
        out[f"tta_{n}_x_zero_shot"] = ms[f"tta_{n}"] / ms["zero_shot"]
    return out


def buffered(model, text, kinds, frames, settings: TTASettings, score_ms_per_frame: float) -> list[dict]:
    dev = model.device
    p, c = model.grid_size**2, model.embed_dim
    g = torch.Generator().manual_seed(2)
    # tokens like the scorer's: a shared mean plus per-patch variation, raw (not unit) norm
    mean = 8 * F.normalize(torch.randn(c, generator=g), dim=-1)
    rows = []
    t0 = time.perf_counter()
    rule = AdmissionRule.from_settings(settings)
    kept, masks = [], []
    for i in range(frames):
        tok = (mean + torch.randn(p, c, generator=g)).to(dev)
        a = admit(0.5, patch_scores(tok, text, None, model.temperature), rule)
        if a.admitted:
            kept.append(tok.to(torch.float16).cpu())
            masks.append(a.clean)
        if (i + 1) % 100 == 0:
            print(f"\r  admission: {i + 1}/{frames}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    admission_s = time.perf_counter() - t0
    ts = TokenSet.from_frames(kept, masks)
    ts.tokens = ts.tokens.to(dev)
    params = TTAParams.from_settings(settings)
    score_s = frames * score_ms_per_frame / 1e3
    # the stream's budget: steps, and at most train_share of the scoring time (and train_seconds)
    seconds = min(settings.train_seconds, settings.train_share * score_s)
    budget = BufferedBudget(settings.train_steps, seconds, settings.batch_tokens)
    for kind in kinds:
        t0 = time.perf_counter()
        _, rep = refresh_adapter(ts, text, kind, params, budget, GateRule.from_settings(settings),
                                 holdout=settings.holdout, min_frames=settings.min_frames,
                                 temperature=model.temperature,
                                 progress=lambda s, loss, k=kind: print(f"\r  {k}: step {s}", end="", file=sys.stderr))
        total = time.perf_counter() - t0
        print(file=sys.stderr)
        rows.append({
            "kind": kind, "frames": frames, "admitted": ts.n_frames, "tokens": ts.n_tokens,
            "steps": rep.steps, "stopped_by": rep.stopped_by, "batch_tokens": budget.batch_tokens,
            "epochs": rep.tokens_seen / max(1, rep.tokens_train),
            "admission_s": admission_s, "train_s": rep.seconds, "gate_s": rep.gate_seconds, "refresh_s": total,
            "scoring_s": score_s, "refresh_share_of_scoring": (admission_s + total) / score_s,
            "ms_per_step": 1e3 * rep.seconds / max(1, rep.steps), "accepted": rep.accepted,
            "time_budget_s": seconds, "full_steps_s": rep.seconds / max(1, rep.steps) * settings.train_steps,
        })
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-16-plus-240")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="scoring precision")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--kinds", nargs="+", default=["text", "linear"])
    ap.add_argument("--tta-precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                    help="adapter compute precision(s) for per-frame TTA; buffered uses the first")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=None, help="refresh step budget (default tta.train_steps)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="absolute refresh time cap (default tta.train_seconds; train_share also applies)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = create_anoclip(ModelSettings(arch=args.arch, pretrained="none", device=args.device,
                                         precision=args.precision))
    text = _random_text(model.embed_dim, model.device)
    budget = {k: v for k, v in (("train_steps", args.steps), ("train_seconds", args.seconds)) if v is not None}
    settings = TTASettings(**budget, precision=args.tta_precision[0])
    params = {p: TTAParams.from_settings(settings.model_copy(update={"precision": p})) for p in args.tta_precision}
    print(f"{args.arch} ({model.grid_size}x{model.grid_size} tokens of {model.embed_dim}), scoring {args.precision}, "
          f"{args.device}, {torch.get_num_threads()} threads", file=sys.stderr)
    pf = [per_frame(model, text, args.kinds, b, args.iters, args.warmup, params) for b in args.batch]
    best = min(r["zero_shot_ms_per_frame"] for r in pf)
    buf = buffered(model, text, args.kinds, args.frames, settings, best)

    names = [f"{k}/{p}" for k in args.kinds for p in params]
    print(f"\nper-frame TTA ({settings.steps} steps), ms per frame (median), x = multiple of zero-shot:")
    print(f"{'batch':>5} {'zero-shot':>10} " + " ".join(f"{n:>12} {'x':>5}" for n in names))
    for r in pf:
        print(f"{r['batch']:>5} {r['zero_shot_ms_per_frame']:>10.1f} " + " ".join(
            f"{r[f'tta_{n}_ms_per_frame']:>12.1f} {r[f'tta_{n}_x_zero_shot']:>5.2f}" for n in names))
    print(f"\nbuffered refresh of {args.frames} frames, adapter {settings.precision} (scoring them: "
          f"{buf[0]['scoring_s']:.1f} s at {best:.1f} ms/frame):")
    for r in buf:
        print(f"  {r['kind']:>6}: admission {r['admission_s']:.1f} s + train {r['train_s']:.1f} s "
              f"({r['steps']} steps, {r['ms_per_step']:.0f} ms/step, {r['epochs']:.2f} epochs, {r['stopped_by']}) "
              f"+ gate {r['gate_s']:.1f} s = {r['refresh_share_of_scoring']:.1%} of scoring (target < 10%); "
              f"time budget {r['time_budget_s']:.1f} s, all {settings.train_steps} steps would take "
              f"{r['full_steps_s']:.1f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "per_frame": pf, "buffered": buf}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
