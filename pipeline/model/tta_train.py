"""Buffered TTA, the streaming variant (docs/tta.md): the buffered frames' tokens (`TokenSet`, split by time with
`holdout_count`); `refresh_adapter` trains one adapter on tokens of many
admitted frames in token minibatches under a step/time budget (`train_buffered`), then checks it with
`tta_gate.validate_adapter` on the newest frames, held out (a time split), and on labelled positives
(synthetic defects pasted into held-out frames, operator labels when present).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pipeline.model.adapters import ResidualAdapter, create_adapter
from pipeline.model.text import TextFeatures
from pipeline.model.tta_gate import GateFrame, GateResult, calibrate_thresholds, validate_adapter
from pipeline.model.tta_params import NOISE_STREAM, BufferedBudget, GateRule, TTAParams, stream_seed
from pipeline.model.tta_scoring import MapFn, TokenAdapterFn, adamw, grad_safe, grid_map_fn, token_logits, tta_loss


@dataclass
class TokenSet:
    """Tokens of many frames, flattened: what buffered training and validation read."""

    tokens: torch.Tensor
    """(T, C) raw tokens, any float dtype (the buffer keeps fp16)."""
    clean: torch.Tensor
    """(T,) bool: may be labelled normal (False for abnormal-looking patches)."""
    offsets: torch.Tensor
    """(F + 1,) int64: frame i owns rows offsets[i]:offsets[i+1]."""
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    """Each frame's token shape before flattening, e.g. (n_tiles, n_layers, P, C): what maps are rebuilt from."""
    input_hw: list[tuple[int, int] | None] = field(default_factory=list)
    """Each frame's model input size (None where unknown)."""
    image_scores: list[float] = field(default_factory=list)
    """Each frame's base-model image score (NaN where unknown)."""

    @property
    def n_frames(self) -> int:
        return int(self.offsets.numel() - 1)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @classmethod
    def from_frames(
        cls,
        tokens: Sequence[torch.Tensor],
        clean: Sequence[torch.Tensor] | None = None,
        *,
        input_hw: Sequence[tuple[int, int] | None] | None = None,
        image_scores: Sequence[float] | None = None,
    ) -> TokenSet:
        """Each frame's tokens (..., C) are flattened to (N_i, C) (their shape is kept); `clean` masks default
        to all True, in frame order (oldest first)."""
        if not tokens:
            raise ValueError("no frames")
        c = tokens[0].shape[-1]
        flat = [t.reshape(-1, c) for t in tokens]
        masks = [torch.ones(f.shape[0], dtype=torch.bool) for f in flat] if clean is None else [
            m.reshape(-1).bool().cpu() for m in clean
        ]
        sizes = torch.tensor([0] + [f.shape[0] for f in flat])
        n = len(flat)
        hw = list(input_hw) if input_hw is not None else [None] * n
        scores = [float(x) for x in image_scores] if image_scores is not None else [math.nan] * n
        if len(hw) != n or len(scores) != n:
            raise ValueError(f"{n} frames but {len(hw)} input sizes and {len(scores)} image scores")
        return cls(torch.cat(flat), torch.cat(masks), sizes.cumsum(0), [tuple(t.shape) for t in tokens], hw, scores)

    def frame(self, i: int) -> torch.Tensor:
        """Frame i's tokens in their original shape."""
        rows = self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])]
        return rows.reshape(self.shapes[i]) if self.shapes else rows

    def select(self, frames: torch.Tensor) -> TokenSet:
        """The frames with these indices (in this order)."""
        starts, ends = self.offsets[frames], self.offsets[frames + 1]
        idx = torch.cat([torch.arange(int(s), int(e)) for s, e in zip(starts, ends, strict=True)])
        sizes = torch.cat([torch.zeros(1, dtype=torch.long), (ends - starts).long()])
        pick = [int(i) for i in frames]
        return TokenSet(self.tokens[idx.to(self.tokens.device)], self.clean[idx], sizes.cumsum(0),
                        [self.shapes[i] for i in pick] if self.shapes else [],
                        [self.input_hw[i] for i in pick] if self.input_hw else [],
                        [self.image_scores[i] for i in pick] if self.image_scores else [])

    def split(self, holdout: float) -> tuple[TokenSet, TokenSet]:
        """(train, validation) by whole frames and by time: the newest `holdout` share is held out.

        Consecutive frames of a line are near-duplicates, so a random split would validate on copies of
        training frames; the newest frames are also the ones the next version will serve.
        """
        f = self.n_frames
        n_val = holdout_count(f, holdout)
        order = torch.arange(f)
        return self.select(order[: f - n_val]), self.select(order[f - n_val :])


def holdout_count(n_frames: int, holdout: float) -> int:
    """How many of `n_frames` (oldest first) `TokenSet.split` holds out: the newest ones."""
    if n_frames < 2:
        raise ValueError("need at least 2 frames to hold some out")
    return min(n_frames - 1, max(1, round(holdout * n_frames)))


@dataclass
class TrainLog:
    steps: int
    seconds: float
    stopped_by: str
    """steps | time | non-finite"""
    losses: list[float]
    parts: dict[str, list[float]]
    tokens_seen: int


def train_buffered(
    train: TokenSet,
    text: TextFeatures,
    kind: str,
    params: TTAParams | None = None,
    budget: BufferedBudget | None = None,
    *,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[ResidualAdapter, TrainLog]:
    """One fresh adapter trained on token minibatches of `train` until the step or time budget ends.

    Minibatches are `batch_tokens` tokens drawn without replacement (epoch-wise permutation) from the
    clean tokens of all training frames: tokens masked at admission are never read. Each step adds fresh
    noise. `progress(step, loss)` is called after every step.
    """
    p = params or TTAParams()
    bud = budget or BufferedBudget()
    g = generator or torch.Generator().manual_seed(p.seed)
    with torch.inference_mode(False), torch.enable_grad():
        return _train_buffered(train, grad_safe(text), kind, p, bud, temperature, g, progress)


def _train_buffered(
    train: TokenSet,
    text: TextFeatures,
    kind: str,
    p: TTAParams,
    bud: BufferedBudget,
    temperature: float,
    g: torch.Generator,
    progress: Callable[[int, float], None] | None,
) -> tuple[ResidualAdapter, TrainLog]:
    dev = text.class_embeddings.device
    emb = text.class_embeddings.float()
    adapter = create_adapter(kind, text, p.residual, generator=g)
    adapter.compute_dtype = p.compute_dtype
    noise_seed = stream_seed(int(torch.randint(0, 2**62, (1,), generator=g)), NOISE_STREAM)
    noise_gen = torch.Generator(device=dev).manual_seed(noise_seed)
    opt = adamw([adapter.weight, adapter.bias], p)
    pool = train.clean.nonzero().reshape(-1)  # masked (abnormal-looking) tokens take no part at all
    t = int(pool.numel())
    if t == 0:
        adapter.requires_grad_(False)
        return adapter, TrainLog(0, 0.0, "no-clean-tokens", [], {}, 0)
    bs = max(1, min(bud.batch_tokens, t))
    perm, pos = torch.randperm(t, generator=g), 0
    losses: list[float] = []
    parts: dict[str, list[float]] = {"entropy": [], "clean_normal": [], "noisy_abnormal": []}
    stopped, seen = "steps", 0
    t0 = time.perf_counter()
    for step in range(bud.max_steps):
        if time.perf_counter() - t0 >= bud.max_seconds:
            stopped = "time"
            break
        if pos + bs > t:
            perm, pos = torch.randperm(t, generator=g), 0
        idx = pool[perm[pos : pos + bs]]
        pos += bs
        x = train.tokens[idx.to(train.tokens.device)].to(dev, torch.float32).clone()
        noisy = x + p.noise_std * torch.randn(x.shape, generator=noise_gen, device=dev) if p.noise_std > 0 else x
        logits = token_logits(adapter(torch.cat([x, noisy])), emb, temperature)
        loss, lp = tta_loss(logits[:bs], logits[bs:], p.entropy_weight, p.hard_weight)
        if not bool(torch.isfinite(loss)):
            stopped = "non-finite"
            losses.append(float("nan"))
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += bs
        losses.append(float(loss.detach()))
        for k, v in lp.items():
            parts[k].append(float(v))
        if progress is not None:
            progress(step + 1, losses[-1])
    adapter.requires_grad_(False)
    n_steps = sum(1 for v in losses if math.isfinite(v))
    return adapter, TrainLog(n_steps, time.perf_counter() - t0, stopped, losses, parts, seen)


@dataclass
class TrainingReport:
    """What one buffered refresh did and decided; JSON-ready through `to_dict`."""

    kind: str
    accepted: bool
    reasons: list[str]
    steps: int
    seconds: float
    """Training time (budgeted)."""
    gate_seconds: float
    stopped_by: str
    losses: list[float]
    loss_parts: dict[str, list[float]]
    frames_train: int
    frames_val: int
    tokens_train: int
    tokens_masked: int
    """Training tokens left out of the clean -> normal term by admission."""
    tokens_seen: int
    validation: dict[str, float]
    params: dict[str, Any]
    budget: dict[str, Any]
    gate: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    """Filled by callers: line, training window, admission statistics, files written."""
    thresholds: dict[str, Any] = field(default_factory=dict)
    """The candidate's own thresholds, calibrated on the held-out frames (`calibrate_thresholds`); the
    version carries them, so the worker's masks follow the version it serves."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (an unlimited time budget becomes None)."""
        d = asdict(self)
        finite = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
        d["budget"] = {k: finite(v) for k, v in d["budget"].items()}
        return d

    def summary(self) -> str:
        verdict = "accepted" if self.accepted else "REFUSED: " + "; ".join(self.reasons)
        first = f"{self.losses[0]:.4f}" if self.losses else "-"
        last = f"{self.losses[-1]:.4f}" if self.losses else "-"
        return (f"{self.kind} adapter, {self.steps} steps in {self.seconds:.1f}s ({self.stopped_by}), loss {first} -> "
                f"{last}, {self.frames_train} train / {self.frames_val} validation frames: {verdict}")


def refresh_adapter(
    frames: TokenSet,
    text: TextFeatures,
    kind: str,
    params: TTAParams | None = None,
    budget: BufferedBudget | None = None,
    gate: GateRule | None = None,
    *,
    holdout: float = 0.2,
    min_frames: int = 20,
    temperature: float = 1.0,
    progress: Callable[[int, float], None] | None = None,
    serving: TokenAdapterFn | None = None,
    positives: Sequence[GateFrame] = (),
    map_fn: MapFn | None = None,
    quantiles: tuple[float, float] = (0.99, 0.999),
) -> tuple[ResidualAdapter | None, TrainingReport]:
    """Split the buffered frames by time, train a candidate on the older part, gate it on the newest part.

    `positives`: labelled frames for the gate (synthetic defects pasted into the held-out frames, operator
    labels); `serving`: the version the candidate would replace (None = the base model); `map_fn`: how a
    frame's map is built from its tokens (default `grid_map_fn`); `quantiles`: (image, pixel) quantiles of
    the candidate's own thresholds, calibrated on the held-out frames (`report.thresholds`).
    Returns (candidate, report); the candidate is None when there was nothing to train. Callers must
    promote it only when `report.accepted`.
    """
    p = params or TTAParams()
    bud = budget or BufferedBudget()
    gr = gate or GateRule()
    g = torch.Generator().manual_seed(p.seed)

    def report(**kw: Any) -> TrainingReport:
        base = dict(kind=kind, accepted=False, reasons=[], steps=0, seconds=0.0, gate_seconds=0.0,
                    stopped_by="", losses=[], loss_parts={}, frames_train=0, frames_val=0, tokens_train=0,
                    tokens_masked=0, tokens_seen=0, validation={}, params=asdict(p), budget=asdict(bud),
                    gate=asdict(gr))
        base.update(kw)
        return TrainingReport(**base)

    if frames.n_frames < max(2, min_frames):
        return None, report(reasons=[f"only {frames.n_frames} admitted frames (need {max(2, min_frames)})"])
    train, val = frames.split(holdout)
    adapter, log = train_buffered(train, text, kind, p, bud, temperature=temperature, generator=g, progress=progress)
    t0 = time.perf_counter()
    fn = map_fn or grid_map_fn(text, temperature)
    thresholds: dict[str, Any] = {}
    if log.stopped_by == "non-finite":
        result = GateResult(False, ["training produced a non-finite loss"], {"finite": 0.0})
    elif log.stopped_by == "no-clean-tokens":
        result = GateResult(False, ["no clean tokens to train on: admission masked every patch"], {})
    else:
        result = validate_adapter(adapter, val, text, gr, temperature=temperature, serving=serving,
                                  positives=positives, map_fn=fn)
        if result.figures.get("finite", 0.0):
            thresholds = calibrate_thresholds(adapter, val, fn, quantile=quantiles[0], pixel_quantile=quantiles[1],
                                              seed=p.seed)
    rep = report(accepted=result.accepted, reasons=result.reasons, steps=log.steps, seconds=log.seconds,
                 gate_seconds=time.perf_counter() - t0, stopped_by=log.stopped_by, losses=log.losses,
                 loss_parts=log.parts, frames_train=train.n_frames, frames_val=val.n_frames,
                 tokens_train=train.n_tokens, tokens_masked=int((~train.clean).sum()), tokens_seen=log.tokens_seen,
                 validation=result.figures, thresholds=thresholds)
    return adapter, rep
