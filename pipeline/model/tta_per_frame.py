"""Per-frame TTA, the paper's procedure (docs/algorithm.md §5).

`adapt_per_frame`: for every frame a fresh adapter and a fresh AdamW, k steps on that frame's own tokens,
then score. Frames of a batch are trained together as a *stack* of independent adapters (batched matmuls,
one optimiser over stacked tensors). AdamW is elementwise and the summed loss keeps each frame's gradient
to its own slice, so this equals k separate runs; nothing survives the call (the official code's leaked
optimiser state is deliberately not reproduced).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.model.adapters import ResidualAdapter, create_adapter
from pipeline.model.text import TextFeatures
from pipeline.model.tta_params import NOISE_STREAM, TTAParams, stream_seed
from pipeline.model.tta_scoring import adamw, grad_safe, token_logits, tta_loss


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
        return _adapt_per_frame(tokens, grad_safe(text), kind, p, temperature, seeds)


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
        opt = adamw([adapter.weight, adapter.bias], p)
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
