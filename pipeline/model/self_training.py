"""Test-time adaptation (docs/algorithm.md §5): loss, per-frame TTA, buffered training, admission, gate.

Pure torch, no file I/O; deterministic given the seeds in `TTAParams` (and a step budget rather than a
time budget for buffered training).

Two procedures share one loss:

* `adapt_per_frame` — the paper's procedure: for every frame a fresh adapter and a fresh AdamW, k steps
  on that frame's own tokens, then score. Frames of a batch are trained together as a *stack* of
  independent adapters (batched matmuls, one optimiser over stacked tensors). AdamW is elementwise and
  the summed loss keeps each frame's gradient to its own slice, so this equals k separate runs; nothing
  survives the call (the official code's leaked optimiser state is deliberately not reproduced).
* `refresh_adapter` — the streaming variant: one adapter trained on tokens of many admitted frames in
  token minibatches under a step/time budget, then checked by `validate_adapter` on held-out frames.

The loss labels every real token "normal". Over a buffer that would teach a recurring defect to be
normal, hence `admit` (only confidently normal frames, abnormal-looking patches left out of the
clean -> normal term) and the validation gate (non-finite values, flipped confident verdicts, collapsed
score spread). See docs/tta.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.model.adapters import ResidualAdapter, create_adapter
from pipeline.model.text import TextFeatures

MAD_TO_STD = 1.4826
"""Scale of the median absolute deviation that estimates a normal distribution's standard deviation."""


# ------------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TTAParams:
    """Optimisation constants; the defaults are the official code's (docs/algorithm.md §5.1, §5.3, §5.4)."""

    steps: int = 5
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    noise_std: float = 0.055
    entropy_weight: float = 1.0
    hard_weight: float = 0.5
    residual: float = 0.5
    seed: int = 0
    precision: str = "fp32"
    """Adapter matmuls in fp32 (official) or under bf16 autocast (faster on AMX CPUs and GPUs)."""

    @property
    def compute_dtype(self) -> torch.dtype | None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"TTA precision must be fp32 or bf16, got {self.precision!r}")
        return torch.bfloat16 if self.precision == "bf16" else None

    @classmethod
    def from_settings(cls, s: Any) -> TTAParams:
        """From `TTASettings` (or anything with the same attribute names)."""
        return cls(**{k: getattr(s, k) for k in cls.__dataclass_fields__ if hasattr(s, k)})


@dataclass(frozen=True)
class BufferedBudget:
    """How much one buffered refresh may train: whichever limit comes first ends it."""

    max_steps: int = 100
    max_seconds: float = 20.0
    batch_tokens: int = 2048
    """Clean tokens per minibatch (each also gets a noisy copy), drawn from all training frames."""

    @classmethod
    def from_settings(cls, s: Any) -> BufferedBudget:
        return cls(s.train_steps, s.train_seconds, s.batch_tokens)


@dataclass(frozen=True)
class AdmissionRule:
    """Which frames and patches may teach the adapter what "normal" is (judged with the base model)."""

    max_image_score: float | None = None
    """Refuse frames whose image score is at or above this (e.g. the line's threshold minus a margin)."""
    image_z: float | None = 2.0
    """Refuse frames whose image score is this many robust SDs above the recent frames' median."""
    patch_z: float = 3.0
    """Patches this many robust SDs above their frame's median patch score look abnormal: no clean -> normal."""
    max_abnormal_share: float = 0.05
    """Refuse frames with a larger share of abnormal-looking patches: they are confidently abnormal."""

    @classmethod
    def from_settings(cls, s: Any, max_image_score: float | None = None) -> AdmissionRule:
        return cls(
            max_image_score if max_image_score is not None else s.admit_max_image_score,
            s.admit_image_z,
            s.admit_patch_z,
            s.admit_max_abnormal_share,
        )


@dataclass(frozen=True)
class GateRule:
    """When a candidate adapter is refused. Verdicts are judged in robust z units of each model's own
    validation scores, because an adapter legitimately rescales p(abnormal)."""

    confident_z: float = 3.0
    """A patch is confidently abnormal at or above this z."""
    normal_z: float = 1.0
    """A patch is confidently normal at or below this z; a confidently abnormal patch that falls below it flips."""
    max_flip_share: float = 0.2
    """Refuse if more than this share of either kind of confident verdict flips."""
    min_spread_ratio: float = 0.25
    """Refuse if the candidate's SD of p(abnormal) is below this multiple of the base model's."""
    min_confident: int = 10
    """Flip shares are judged only over at least this many confident patches."""

    @classmethod
    def from_settings(cls, s: Any) -> GateRule:
        return cls(s.gate_confident_z, s.gate_normal_z, s.gate_max_flip_share, s.gate_min_spread_ratio,
                   s.gate_min_confident)


# ------------------------------------------------------------------------------------------------
# scoring helpers and the loss
# ------------------------------------------------------------------------------------------------
def token_logits(tokens: torch.Tensor, class_embeddings: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(..., 2) logits [normal, abnormal] of raw tokens (..., C): temperature * cosine, as the scorer."""
    return temperature * F.normalize(tokens.float(), dim=-1) @ class_embeddings.to(tokens.device).float().T


def patch_scores(
    tokens: torch.Tensor,
    text: TextFeatures,
    adapter: Callable[[torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 1.0,
    chunk: int = 65536,
) -> torch.Tensor:
    """(..., N) p(abnormal) per token of (..., N, C) raw tokens, through `adapter` if given; bounded memory."""
    flat = tokens.reshape(-1, tokens.shape[-1])
    out = []
    with torch.no_grad():
        for i in range(0, flat.shape[0], chunk):
            x = flat[i : i + chunk].float()
            if adapter is not None:
                x = adapter(x)
            out.append(token_logits(x, text.class_embeddings, temperature).softmax(-1)[..., 1])
    return torch.cat(out).reshape(tokens.shape[:-1]) if out else flat.new_zeros(tokens.shape[:-1]).float()


def tta_loss(
    clean_logits: torch.Tensor,
    noisy_logits: torch.Tensor,
    entropy_weight: float = 1.0,
    hard_weight: float = 0.5,
    clean_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss per sample over (..., N, 2) logits: w_e * entropy(clean) + w_h * (CE(clean, normal) + CE(noisy, abnormal)).

    Means are over the N positions. `clean_mask` (..., N) keeps abnormal-looking patches out of the
    clean -> normal term (buffered mode); the entropy and noisy -> abnormal terms use every position.
    Returns the (...,) loss and its parts (detached).
    """
    lc = clean_logits.float().log_softmax(-1)
    lz = noisy_logits.float().log_softmax(-1)
    entropy = -(lc.exp() * lc).sum(-1).mean(-1)
    noisy_abnormal = -lz[..., 1].mean(-1)
    if clean_mask is None:
        clean_normal = -lc[..., 0].mean(-1)
    else:
        m = clean_mask.to(lc.dtype)
        clean_normal = -(lc[..., 0] * m).sum(-1) / m.sum(-1).clamp_min(1.0)
    loss = entropy_weight * entropy + hard_weight * (clean_normal + noisy_abnormal)
    parts = {"entropy": entropy.detach(), "clean_normal": clean_normal.detach(),
             "noisy_abnormal": noisy_abnormal.detach()}
    return loss, parts


def _adamw(params: list[torch.nn.Parameter], p: TTAParams) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=p.lr, betas=p.betas, eps=p.eps, weight_decay=p.weight_decay, fused=True)


# ------------------------------------------------------------------------------------------------
# per-frame TTA
# ------------------------------------------------------------------------------------------------
@dataclass
class PerFrameResult:
    adapter: ResidualAdapter
    """Stack of one trained adapter per frame (frozen); pass it to `AnoCLIP.maps_from_tokens`."""
    losses: torch.Tensor
    """(steps, frames) loss of each frame at each step, before that step's update."""


def adapt_per_frame(
    tokens: torch.Tensor,
    text: TextFeatures,
    kind: str,
    params: TTAParams | None = None,
    *,
    temperature: float = 1.0,
    seeds: Sequence[int] | None = None,
) -> PerFrameResult:
    """Train one fresh adapter per frame on that frame's own tokens (the paper's TTA); returns them stacked.

    tokens: (B, ..., C) raw tokens, e.g. `AnomalyOutput.tokens` (B, n_tiles, n_layers, P, C); the loss is
    taken at token resolution over all of a frame's tiles and layers. Each frame's init and noise come
    from its own seed (default `params.seed` for every frame), so a frame's result does not depend on
    the other frames of the batch or on what was scored before.
    """
    p = params or TTAParams()
    b = tokens.shape[0]
    seeds = [p.seed] * b if seeds is None else [int(s) for s in seeds]
    if len(seeds) != b:
        raise ValueError(f"{len(seeds)} seeds for {b} frames")
    # Callers may hold tensors made under inference_mode/no_grad (the scorer's); training needs autograd.
    with torch.inference_mode(False), torch.enable_grad():
        return _adapt_per_frame(tokens, _grad_safe(text), kind, p, temperature, seeds)


def _grad_safe(text: TextFeatures) -> TextFeatures:
    """Copies that autograd may save (inference-mode tensors cannot be)."""
    return TextFeatures(text.class_embeddings.clone(), text.normal_sentences.clone(), text.abnormal_sentences.clone())


def _adapt_per_frame(
    tokens: torch.Tensor, text: TextFeatures, kind: str, p: TTAParams, temperature: float, seeds: list[int]
) -> PerFrameResult:
    b, c = tokens.shape[0], tokens.shape[-1]
    dev = tokens.device
    x = tokens.detach().reshape(b, -1, c).float().clone()
    n = x.shape[1]
    adapter = create_adapter(kind, text, p.residual, stack=b, init=False)
    adapter.compute_dtype = p.compute_dtype
    shared = len(set(seeds)) == 1
    noise: torch.Tensor | None = None
    with torch.no_grad():
        for i, s in enumerate([seeds[0]] if shared else seeds):
            one = create_adapter(kind, text, p.residual, generator=torch.Generator().manual_seed(s))
            sl = slice(None) if shared else i
            adapter.weight[sl] = one.weight
            adapter.bias[sl] = one.bias
        if p.steps > 0 and p.noise_std > 0:
            gens = [torch.Generator(device=dev).manual_seed(s) for s in ([seeds[0]] if shared else seeds)]
            noise = torch.stack([torch.randn(p.steps, n, c, generator=g, device=dev) for g in gens], dim=1)
            noise.mul_(p.noise_std)  # (steps, B or 1, N, C)
    losses = torch.zeros(p.steps, b)
    if p.steps > 0:
        emb = text.class_embeddings.to(dev).float()
        opt = _adamw([adapter.weight, adapter.bias], p)
        for step in range(p.steps):
            noisy = x + noise[step] if noise is not None else x
            logits = token_logits(adapter(torch.cat([x, noisy], dim=1)), emb, temperature)
            loss, _ = tta_loss(logits[:, :n], logits[:, n:], p.entropy_weight, p.hard_weight)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            losses[step] = loss.detach().cpu()
    adapter.requires_grad_(False)
    return PerFrameResult(adapter, losses)


# ------------------------------------------------------------------------------------------------
# token sets, admission
# ------------------------------------------------------------------------------------------------
@dataclass
class TokenSet:
    """Tokens of many frames, flattened: what buffered training and validation read."""

    tokens: torch.Tensor
    """(T, C) raw tokens, any float dtype (the buffer keeps fp16)."""
    clean: torch.Tensor
    """(T,) bool: may be labelled normal (False for abnormal-looking patches)."""
    offsets: torch.Tensor
    """(F + 1,) int64: frame i owns rows offsets[i]:offsets[i+1]."""

    @property
    def n_frames(self) -> int:
        return int(self.offsets.numel() - 1)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @classmethod
    def from_frames(cls, tokens: Sequence[torch.Tensor], clean: Sequence[torch.Tensor] | None = None) -> TokenSet:
        """Each frame's tokens (..., C) are flattened to (N_i, C); `clean` masks default to all True."""
        if not tokens:
            raise ValueError("no frames")
        c = tokens[0].shape[-1]
        flat = [t.reshape(-1, c) for t in tokens]
        masks = [torch.ones(f.shape[0], dtype=torch.bool) for f in flat] if clean is None else [
            m.reshape(-1).bool().cpu() for m in clean
        ]
        sizes = torch.tensor([0] + [f.shape[0] for f in flat])
        return cls(torch.cat(flat), torch.cat(masks), sizes.cumsum(0))

    def select(self, frames: torch.Tensor) -> TokenSet:
        """The frames with these indices (in this order)."""
        starts, ends = self.offsets[frames], self.offsets[frames + 1]
        idx = torch.cat([torch.arange(int(s), int(e)) for s, e in zip(starts, ends, strict=True)])
        sizes = torch.cat([torch.zeros(1, dtype=torch.long), (ends - starts).long()])
        return TokenSet(self.tokens[idx.to(self.tokens.device)], self.clean[idx], sizes.cumsum(0))

    def split(self, holdout: float, generator: torch.Generator) -> tuple[TokenSet, TokenSet]:
        """(train, validation) by whole frames, so validation frames are never trained on."""
        f = self.n_frames
        if f < 2:
            raise ValueError("need at least 2 frames to hold some out")
        n_val = min(f - 1, max(1, round(holdout * f)))
        perm = torch.randperm(f, generator=generator)
        return self.select(perm[n_val:].sort().values), self.select(perm[:n_val].sort().values)


@dataclass
class Admission:
    admitted: bool
    reason: str
    """Empty when admitted; otherwise why not, in words."""
    clean: torch.Tensor | None
    """(N,) bool: patches that may be labelled normal (only when admitted)."""
    abnormal_share: float
    rule: str = ""
    """Which rule refused: image_score, image_z, abnormal_patches, non_finite ('' when admitted)."""


def robust_z(values: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """(values - median) / (1.4826 * MAD) of `reference` (default: the values themselves); robust to outliers."""
    ref = (values if reference is None else reference).float().reshape(-1)
    med = ref.median()
    mad = (ref - med).abs().median() * MAD_TO_STD
    return (values.float() - med) / mad.clamp_min(1e-12)


def admit(
    image_score: float,
    scores: torch.Tensor,
    rule: AdmissionRule,
    image_reference: torch.Tensor | None = None,
) -> Admission:
    """Decide whether a frame enters the buffer and which of its patches may be labelled normal.

    scores: (N,) base-model p(abnormal) of the frame's tokens. image_reference: recent image scores for
    the relative image rule (ignored when fewer than 20).
    """
    s = scores.reshape(-1).float()
    if not (math.isfinite(image_score) and bool(torch.isfinite(s).all())):
        return Admission(False, "non-finite scores", None, 1.0, "non_finite")
    if rule.max_image_score is not None and image_score >= rule.max_image_score:
        return Admission(False, f"image score {image_score:.4g} >= ceiling {rule.max_image_score:.4g}", None,
                         float("nan"), "image_score")
    if rule.image_z is not None and image_reference is not None and image_reference.numel() >= 20:
        z = float(robust_z(torch.tensor([image_score]), image_reference)[0])
        if z >= rule.image_z:
            return Admission(False, f"image score z {z:.2f} >= {rule.image_z} against recent frames", None,
                             float("nan"), "image_z")
    abnormal = robust_z(s) >= rule.patch_z
    share = float(abnormal.float().mean())
    if share > rule.max_abnormal_share:
        return Admission(False, f"{share:.1%} of patches look abnormal (> {rule.max_abnormal_share:.1%})", None,
                         share, "abnormal_patches")
    return Admission(True, "", ~abnormal, share)


# ------------------------------------------------------------------------------------------------
# buffered training and the validation gate
# ------------------------------------------------------------------------------------------------
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

    Minibatches are `batch_tokens` tokens drawn without replacement (epoch-wise permutation) from all
    training frames; each step adds fresh noise. `progress(step, loss)` is called after every step.
    """
    p = params or TTAParams()
    bud = budget or BufferedBudget()
    g = generator or torch.Generator().manual_seed(p.seed)
    with torch.inference_mode(False), torch.enable_grad():
        return _train_buffered(train, _grad_safe(text), kind, p, bud, temperature, g, progress)


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
    noise_gen = torch.Generator(device=dev).manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
    opt = _adamw([adapter.weight, adapter.bias], p)
    t = train.n_tokens
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
        idx = perm[pos : pos + bs]
        pos += bs
        x = train.tokens[idx.to(train.tokens.device)].to(dev, torch.float32).clone()
        mask = train.clean[idx].to(dev)
        noisy = x + p.noise_std * torch.randn(x.shape, generator=noise_gen, device=dev) if p.noise_std > 0 else x
        logits = token_logits(adapter(torch.cat([x, noisy])), emb, temperature)
        loss, lp = tta_loss(logits[:bs], logits[bs:], p.entropy_weight, p.hard_weight, mask)
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
class GateResult:
    accepted: bool
    reasons: list[str]
    figures: dict[str, float]


def _quantiles(s: torch.Tensor) -> dict[str, float]:
    q = torch.tensor([0.5, 0.99, 0.999])
    sample = s if s.numel() <= 1_000_000 else s[torch.linspace(0, s.numel() - 1, 1_000_000).long()]
    v = torch.quantile(sample.double(), q.double()).tolist()
    return {"p50": v[0], "p99": v[1], "p999": v[2]}


def validate_adapter(
    candidate: Callable[[torch.Tensor], torch.Tensor],
    val: TokenSet,
    text: TextFeatures,
    rule: GateRule | None = None,
    *,
    temperature: float = 1.0,
) -> GateResult:
    """Check a candidate on held-out frames against the base model; refuse it with reasons if it is unsafe.

    Refusals: non-finite outputs; more than `max_flip_share` of confidently abnormal patches (base z >=
    confident_z) no longer standing out (candidate z < normal_z), or of confidently normal patches
    (base z <= normal_z) becoming confidently abnormal; the spread of p(abnormal) collapsing.
    """
    r = rule or GateRule()
    base = patch_scores(val.tokens, text, None, temperature)
    cand = patch_scores(val.tokens, text, candidate, temperature)
    reasons: list[str] = []
    figures: dict[str, float] = {"tokens": float(val.n_tokens), "frames": float(val.n_frames)}
    finite = bool(torch.isfinite(cand).all())
    figures["finite"] = float(finite)
    if not finite:
        reasons.append("the candidate produces non-finite scores")
        return GateResult(False, reasons, figures)
    base_sd, cand_sd = float(base.std()), float(cand.std())
    ratio = cand_sd / base_sd if base_sd > 0 else (1.0 if cand_sd == 0 else math.inf)
    figures.update({"base_sd": base_sd, "candidate_sd": cand_sd, "spread_ratio": ratio})
    if ratio < r.min_spread_ratio:
        reasons.append(f"score spread collapsed: SD {cand_sd:.3g} is {ratio:.2f}x the base model's "
                       f"(< {r.min_spread_ratio})")
    z0, z1 = robust_z(base), robust_z(cand)
    conf_abn, conf_norm = z0 >= r.confident_z, z0 <= r.normal_z
    n_abn, n_norm = int(conf_abn.sum()), int(conf_norm.sum())
    flip_abn = float((z1[conf_abn] < r.normal_z).float().mean()) if n_abn else 0.0
    flip_norm = float((z1[conf_norm] >= r.confident_z).float().mean()) if n_norm else 0.0
    figures.update({"confident_abnormal": float(n_abn), "abnormal_flip_share": flip_abn,
                    "confident_normal": float(n_norm), "normal_flip_share": flip_norm})
    if n_abn >= r.min_confident and flip_abn > r.max_flip_share:
        reasons.append(f"{flip_abn:.1%} of {n_abn} confidently abnormal patches no longer stand out "
                       f"(> {r.max_flip_share:.0%}): the candidate learned them as normal")
    if n_norm >= r.min_confident and flip_norm > r.max_flip_share:
        reasons.append(f"{flip_norm:.1%} of {n_norm} confidently normal patches became abnormal "
                       f"(> {r.max_flip_share:.0%})")
    for name, s in (("base", base), ("candidate", cand)):
        for k, v in _quantiles(s).items():
            figures[f"{name}_{k}"] = v
    return GateResult(not reasons, reasons, figures)


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
) -> tuple[ResidualAdapter | None, TrainingReport]:
    """Split the buffered frames, train a candidate on the training part, gate it on the held-out part.

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
    train, val = frames.split(holdout, g)
    adapter, log = train_buffered(train, text, kind, p, bud, temperature=temperature, generator=g, progress=progress)
    t0 = time.perf_counter()
    if log.stopped_by == "non-finite":
        result = GateResult(False, ["training produced a non-finite loss"], {"finite": 0.0})
    else:
        result = validate_adapter(adapter, val, text, gr, temperature=temperature)
    rep = report(accepted=result.accepted, reasons=result.reasons, steps=log.steps, seconds=log.seconds,
                 gate_seconds=time.perf_counter() - t0, stopped_by=log.stopped_by, losses=log.losses,
                 loss_parts=log.parts, frames_train=train.n_frames, frames_val=val.n_frames,
                 tokens_train=train.n_tokens, tokens_masked=int((~train.clean).sum()), tokens_seen=log.tokens_seen,
                 validation=result.figures)
    return adapter, rep
