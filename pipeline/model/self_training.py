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
  token minibatches under a step/time budget, then checked by `validate_adapter` on the newest frames,
  held out (a time split), and on labelled positives (synthetic defects pasted into held-out frames,
  operator labels when present).

The loss labels every real token "normal". Over a buffer that would teach a recurring defect to be
normal, hence `admit` (only confidently normal frames; abnormal-looking patches left out of the loss)
and the validation gate (non-finite values, flipped confident verdicts, collapsed score spread, pixel
AUROC and contrast on labelled positives against the serving version; never passed unchecked). The gate
also calibrates the candidate's own pixel threshold on the held-out frames. See docs/tta.md.
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

NOISE_STREAM = 1
"""Stream id of the noise generator derived from a seed (the init uses the seed itself)."""


def stream_seed(seed: int, stream: int) -> int:
    """A seed for random stream `stream` derived from `seed` (splitmix64 of both).

    The adapter's init and its noise must not come from generators seeded alike: the uniform init and
    the Gaussian noise drawn from one seed are correlated (W·ε ≈ −0.33 where independent draws give ±0.03).
    """
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(stream) + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


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
    """Flip shares are judged only over at least this many confident patches; a candidate with neither that
    many confidently abnormal patches nor labelled positives to judge it on is refused, never passed unchecked."""
    auroc_margin: float = 0.02
    """Refuse if the candidate's pixel AUROC on the labelled positives is below the serving version's minus this."""
    min_contrast_ratio: float = 0.5
    """Refuse if the candidate's contrast (median p(abnormal) of labelled-abnormal pixels minus that of the other
    pixels) is below this multiple of the serving version's: everything shifted towards one side. 0 = off."""

    @classmethod
    def from_settings(cls, s: Any) -> GateRule:
        return cls(s.gate_confident_z, s.gate_normal_z, s.gate_max_flip_share, s.gate_min_spread_ratio,
                   s.gate_min_confident, s.gate_auroc_margin, s.gate_min_contrast_ratio)


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

    Means are over the N positions. `clean_mask` (..., N) leaves abnormal-looking patches (admission)
    out of *every* term: entropy minimisation would sharpen whatever the patch looks like now, and its
    noisy copy's "abnormal" label says nothing about the patch itself. Returns the (...,) loss and its
    parts (detached).
    """
    lc = clean_logits.float().log_softmax(-1)
    lz = noisy_logits.float().log_softmax(-1)
    h = -(lc.exp() * lc).sum(-1)
    if clean_mask is None:
        entropy = h.mean(-1)
        noisy_abnormal = -lz[..., 1].mean(-1)
        clean_normal = -lc[..., 0].mean(-1)
    else:
        m = clean_mask.to(lc.dtype)
        n = m.sum(-1).clamp_min(1.0)
        # where() rather than a product: a masked position's values (even NaN) never reach loss or gradient
        keep = clean_mask.bool()
        entropy = torch.where(keep, h, 0.0).sum(-1) / n
        noisy_abnormal = -torch.where(keep, lz[..., 1], 0.0).sum(-1) / n
        clean_normal = -torch.where(keep, lc[..., 0], 0.0).sum(-1) / n
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
            # a stream of its own: noise drawn from the init's seed is correlated with the init
            gens = [torch.Generator(device=dev).manual_seed(stream_seed(s, NOISE_STREAM))
                    for s in ([seeds[0]] if shared else seeds)]
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

    Minibatches are `batch_tokens` tokens drawn without replacement (epoch-wise permutation) from the
    clean tokens of all training frames: tokens masked at admission are never read. Each step adds fresh
    noise. `progress(step, loss)` is called after every step.
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
    noise_seed = stream_seed(int(torch.randint(0, 2**62, (1,), generator=g)), NOISE_STREAM)
    noise_gen = torch.Generator(device=dev).manual_seed(noise_seed)
    opt = _adamw([adapter.weight, adapter.bias], p)
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
class GateResult:
    accepted: bool
    reasons: list[str]
    figures: dict[str, float]


def _quantiles(s: torch.Tensor) -> dict[str, float]:
    q = torch.tensor([0.5, 0.99, 0.999])
    sample = s if s.numel() <= 1_000_000 else s[torch.linspace(0, s.numel() - 1, 1_000_000).long()]
    v = torch.quantile(sample.double(), q.double()).tolist()
    return {"p50": v[0], "p99": v[1], "p999": v[2]}


TokenAdapterFn = Callable[[torch.Tensor], torch.Tensor]

MapFn = Callable[[torch.Tensor, "tuple[int, int] | None", "TokenAdapterFn | None"], torch.Tensor]
"""(one frame's raw tokens, e.g. (n_tiles, n_layers, P, C); its model input size or None; an adapter or None)
-> its (h, w) anomaly map. The worker passes `AnoCLIP.maps_from_tokens`; `grid_map_fn` stands in without a model."""


def grid_map_fn(text: TextFeatures, temperature: float = 1.0) -> MapFn:
    """Maps of single-tile frames at token-grid resolution: p(abnormal) per patch, mean over the leading dims
    (layers), bilinearly resized to the input size. The model's own maps add a 3x3 box filter and merge tiles."""

    def fn(tokens: torch.Tensor, hw: tuple[int, int] | None, adapter: TokenAdapterFn | None) -> torch.Tensor:
        p = patch_scores(tokens, text, adapter, temperature)
        n = p.shape[-1]
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"{n} patches are not a square grid; pass the model's map function")
        m = p.reshape(-1, n).mean(0).reshape(1, 1, g, g)
        if hw is not None and tuple(hw) != (g, g):
            m = F.interpolate(m, size=tuple(hw), mode="bilinear", align_corners=False)
        return m[0, 0]

    return fn


@dataclass
class LabelledFrame:
    """A validation frame with labelled abnormal pixels: a synthetic defect pasted into a held-out frame, or
    (a later issue) an operator-confirmed alert with its mask. Its tokens come from the base model."""

    tokens: torch.Tensor
    """Raw tokens of the frame as scored, e.g. (n_tiles, n_layers, P, C)."""
    mask: torch.Tensor
    """(h, w) bool at the model input size: True = labelled abnormal."""
    source: str = "synthetic"
    """synthetic | operator"""

    @property
    def input_hw(self) -> tuple[int, int]:
        return int(self.mask.shape[0]), int(self.mask.shape[1])


_MAX_AUROC_PIXELS = 2_000_000


def pixel_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of `scores` against boolean `labels` (ties count half); NaN when one class is absent."""
    s = scores.reshape(-1).double()
    y = labels.reshape(-1).bool()
    n_pos = int(y.sum())
    n_neg = int(y.numel()) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = torch.argsort(s)
    _, inverse, counts = torch.unique_consecutive(s[order], return_inverse=True, return_counts=True)
    avg_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # 1-based mean rank of each tie group
    ranks = torch.empty_like(s)
    ranks[order] = avg_rank[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _labelled_maps(
    adapter: TokenAdapterFn | None, positives: Sequence[LabelledFrame], map_fn: MapFn
) -> tuple[torch.Tensor, torch.Tensor]:
    """All pixels of the labelled frames under `adapter`: (scores, labels), at most ~2M (even stride)."""
    scores, labels = [], []
    for f in positives:
        m = map_fn(f.tokens, f.input_hw, adapter).float().cpu()
        if tuple(m.shape) != f.input_hw:
            raise ValueError(f"map of shape {tuple(m.shape)} for a mask of {f.input_hw}")
        scores.append(m.reshape(-1))
        labels.append(f.mask.reshape(-1).bool().cpu())
    s, y = torch.cat(scores), torch.cat(labels)
    if s.numel() > _MAX_AUROC_PIXELS:
        keep = torch.arange(0, s.numel(), math.ceil(s.numel() / _MAX_AUROC_PIXELS))
        s, y = s[keep], y[keep]
    return s, y


def _contrast(s: torch.Tensor, y: torch.Tensor) -> float:
    """Median p(abnormal) of the labelled-abnormal pixels minus the median of the others."""
    return float(s[y].median() - s[~y].median())


def validate_adapter(
    candidate: TokenAdapterFn,
    val: TokenSet,
    text: TextFeatures,
    rule: GateRule | None = None,
    *,
    temperature: float = 1.0,
    serving: TokenAdapterFn | None = None,
    positives: Sequence[LabelledFrame] = (),
    map_fn: MapFn | None = None,
) -> GateResult:
    """Check a candidate on held-out frames and labelled positives; refuse it with reasons if it is unsafe.

    Refusals: non-finite outputs; the spread of p(abnormal) on the held-out frames collapsing against the
    base model's; more than `max_flip_share` of confidently abnormal patches (base z >= confident_z) no
    longer standing out (candidate z < normal_z), or of confidently normal patches (base z <= normal_z)
    becoming confidently abnormal; on the labelled positives (`positives`, e.g. synthetic defects pasted
    into held-out frames), a pixel AUROC below the serving version's (`serving`, None = the base model)
    minus `auroc_margin`, or a contrast below `min_contrast_ratio` of the serving version's (every pixel
    shifted towards one side); and a candidate with nothing abnormal to judge it on (fewer than
    `min_confident` confidently abnormal patches and no labelled positives) is refused, never passed.
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
    base_mad = float((base - base.median()).abs().median()) * MAD_TO_STD
    figures["normal_shift_z"] = float(cand.median() - base.median()) / max(base_mad, 1e-12)
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
    n_labelled = 0
    if positives:
        fn = map_fn or grid_map_fn(text, temperature)
        sc, y = _labelled_maps(candidate, positives, fn)
        ss, _ = _labelled_maps(serving, positives, fn)
        n_labelled = int(y.sum())
        figures.update({"labelled_frames": float(len(positives)), "labelled_pixels": float(n_labelled),
                        "operator_frames": float(sum(f.source == "operator" for f in positives))})
        if not bool(torch.isfinite(sc).all()):
            reasons.append("the candidate produces non-finite maps on the labelled frames")
            return GateResult(False, reasons, figures)
        if n_labelled and n_labelled < y.numel():
            auc_c, auc_s = pixel_auroc(sc, y), pixel_auroc(ss, y)
            con_c, con_s = _contrast(sc, y), _contrast(ss, y)
            figures.update({"pixel_auroc_candidate": auc_c, "pixel_auroc_serving": auc_s,
                            "contrast_candidate": con_c, "contrast_serving": con_s,
                            "contrast_ratio": con_c / con_s if con_s > 0 else math.nan})
            if auc_c < auc_s - r.auroc_margin:
                reasons.append(f"pixel AUROC on {len(positives)} labelled frames fell to {auc_c:.3f} from the "
                               f"serving version's {auc_s:.3f} (margin {r.auroc_margin})")
            if r.min_contrast_ratio > 0 and con_s > 0 and con_c < r.min_contrast_ratio * con_s:
                reasons.append(f"contrast of the labelled defects collapsed: {con_c:.3g} vs the serving version's "
                               f"{con_s:.3g} (< {r.min_contrast_ratio}x): every pixel shifted towards one side")
    if n_abn < r.min_confident and n_labelled < r.min_confident:
        reasons.append(f"nothing abnormal to validate against: {n_abn} confidently abnormal patches and "
                       f"{n_labelled} labelled abnormal pixels (need {r.min_confident}); a candidate is never "
                       "promoted unchecked")
    for name, sv in (("base", base), ("candidate", cand)):
        for k, v in _quantiles(sv).items():
            figures[f"{name}_{k}"] = v
    return GateResult(not reasons, reasons, figures)


_CALIBRATION_PIXELS = 4096
"""Pixels sampled per held-out frame for the pixel threshold (enough for a 0.999 quantile over many frames)."""
_CALIBRATION_FRAMES = 64
"""The newest held-out frames the pixel threshold is calibrated on: 262k sampled pixels, ~260 above a 0.999
quantile; a map costs about a tenth of a frame's scoring, so all 200 of a 1,000-frame refresh would add ~2%."""


def calibrate_thresholds(
    adapter: TokenAdapterFn | None,
    val: TokenSet,
    map_fn: MapFn,
    *,
    quantile: float = 0.99,
    pixel_quantile: float = 0.999,
    image_changes: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """The thresholds a version carries, calibrated on held-out normal frames (as the line calibrates its own).

    pixel: the `pixel_quantile` of the version's map pixels on the newest (at most 64) frames of `val`;
    pixel_median colours heatmaps.
    image: the `quantile` of the held-out image scores when the version changes image scores
    (`image_changes`); an adapter never does, and admission truncates the held-out image scores (a
    recalibrated image threshold would be biased low), so for adapters it is None (the line's applies)
    and the held-out quantile is kept as `image_heldout` for the record.
    """
    g = torch.Generator().manual_seed(seed)
    samples = []
    first = max(0, val.n_frames - _CALIBRATION_FRAMES)
    for i in range(first, val.n_frames):
        hw = val.input_hw[i] if val.input_hw else None
        m = map_fn(val.frame(i), hw, adapter).float().reshape(-1).cpu()
        if m.numel() > _CALIBRATION_PIXELS:
            m = m[torch.randint(0, m.numel(), (_CALIBRATION_PIXELS,), generator=g)]
        samples.append(m)
    px = torch.cat(samples).double()
    qs = torch.quantile(px, torch.tensor([pixel_quantile, 0.5], dtype=torch.float64)).tolist()
    scores = torch.tensor([v for v in (val.image_scores or []) if math.isfinite(v)], dtype=torch.float64)
    heldout = float(torch.quantile(scores, quantile)) if scores.numel() else None
    return {"pixel": qs[0], "pixel_median": qs[1], "image": heldout if image_changes else None,
            "image_heldout": heldout, "frames": val.n_frames - first, "quantile": quantile,
            "pixel_quantile": pixel_quantile}


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
    positives: Sequence[LabelledFrame] = (),
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
