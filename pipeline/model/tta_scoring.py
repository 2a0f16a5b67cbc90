"""How TTA scores tokens (per-patch p(abnormal), maps of a token grid) and the loss it trains on
(docs/algorithm.md §5). Training, the gate and both procedures (`tta_per_frame.adapt_per_frame`,
`tta_train.refresh_adapter`) score through these functions, so a candidate is judged as it was trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline.model.text import TextFeatures
from pipeline.model.tta_params import TTAParams


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


def adamw(params: list[torch.nn.Parameter], p: TTAParams) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=p.lr, betas=p.betas, eps=p.eps, weight_decay=p.weight_decay, fused=True)


def grad_safe(text: TextFeatures) -> TextFeatures:
    """Copies that autograd may save (inference-mode tensors cannot be)."""
    return TextFeatures(text.class_embeddings.clone(), text.normal_sentences.clone(), text.abnormal_sentences.clone())


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
