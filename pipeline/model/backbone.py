"""CLIP vision tower with AnoCLIP's value-wise (V-V) dual path (docs/algorithm.md §2).

Our own loop over open_clip's weights, because stock open_clip has no V-V path and its
`nn.MultiheadAttention` is pathologically slow under CPU bf16 autocast at batch > 1. The original
path is ordinary CLIP; the V-V path is an accumulator that only adds V-V attention outputs computed
from the original path's hidden states:

    X_k = X_{k-1} + OutProj_k(softmax(V Vᵀ / sqrt(d_h)) V),   V from LN_1^k(O_{k-1})

starting from X_{s-1} = O_{s-1} at the first V-V block s, with no MLP on that path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VisualFeatures:
    """What one forward yields. Nothing here is L2-normalised."""

    cls_embedding: torch.Tensor
    """(N, C): CLIP's own image embedding, ln_post + proj of the original path's CLS token."""
    patch_tokens: torch.Tensor
    """(N, n_layers, P, C): V-V patch tokens after ln_post + proj (CLS dropped), one entry per fused layer."""
    hidden: torch.Tensor | None = None
    """(N, n_hidden, P, D): original-path patch tokens after the blocks asked for in `hidden_layers`, raw ViT
    width (no ln_post, no proj, CLS dropped): the intermediate features patch memories use. None unless asked."""


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d_h)) v. On CPU in bf16/fp16 plain matmuls beat the fused SDPA kernel ~2x."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ v
    return F.scaled_dot_product_attention(q, k, v)


class DualPathViT(nn.Module):
    """Wraps an open_clip `VisionTransformer` and runs both paths in one pass (weights are shared, not copied)."""

    def __init__(self, visual: nn.Module, vv_start_block: int = 1, feature_layers: list[int] | None = None) -> None:
        super().__init__()
        for attr in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj"):
            if not hasattr(visual, attr):
                name = type(visual).__name__
                raise TypeError(f"vision tower {name} has no {attr!r}: only open_clip ViTs are supported")
        if getattr(visual, "attn_pool", None) is not None:
            raise TypeError("vision towers with attentional pooling are not supported")
        if getattr(visual, "pool_type", "tok") != "tok" or getattr(visual, "final_ln_after_pool", False):
            raise TypeError("only CLS-token pooling ViTs are supported")
        self.visual = visual
        self.blocks = visual.transformer.resblocks
        n = len(self.blocks)
        if not 1 <= vv_start_block <= n:
            raise ValueError(f"vv_start_block must be in 1..{n}, got {vv_start_block}")
        layers = sorted(set(feature_layers or [n]))
        if any(not vv_start_block <= i <= n for i in layers):
            raise ValueError(f"feature_layers must lie in {vv_start_block}..{n} (V-V blocks), got {layers}")
        self.vv_start = vv_start_block - 1  # 0-based
        self.feature_layers = layers  # 1-based block numbers
        self.heads = self.blocks[0].attn.num_heads
        self.batch_first = getattr(visual.transformer, "batch_first", True)

    @property
    def grid_size(self) -> int:
        g = self.visual.grid_size
        return int(g[0] if isinstance(g, (tuple, list)) else g)

    @property
    def image_size(self) -> int:
        s = self.visual.image_size
        return int(s[0] if isinstance(s, (tuple, list)) else s)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + CLS + positions + ln_pre: O_0, shape (N, 1 + P, D)."""
        v = self.visual
        x = v.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(x)

    def _qkv(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = block.attn
        n, t, d = x.shape
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        qkv = qkv.view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]  # each (N, h, T, d_h)

    @staticmethod
    def _merge(block: nn.Module, a: torch.Tensor) -> torch.Tensor:
        n, h, t, dh = a.shape
        a = a.transpose(1, 2).reshape(n, t, h * dh)
        return F.linear(a, block.attn.out_proj.weight, block.attn.out_proj.bias)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post then proj: the map from ViT width into the joint space."""
        return self.visual.ln_post(tokens) @ self.visual.proj

    def check_hidden_layers(self, hidden_layers: Sequence[int]) -> list[int]:
        """Sorted, de-duplicated 1-based block numbers; ValueError outside 1..n_blocks."""
        n = len(self.blocks)
        layers = sorted(set(int(i) for i in hidden_layers))
        if any(not 1 <= i <= n for i in layers):
            raise ValueError(f"hidden layers must lie in 1..{n} (blocks of the original path), got {layers}")
        return layers

    def forward(
        self, images: torch.Tensor, with_patches: bool = True, hidden_layers: Sequence[int] = ()
    ) -> VisualFeatures:
        """Run both paths. `with_patches=False` is plain CLIP (used as the benchmark baseline).

        `hidden_layers` (1-based blocks) also returns the original path's patch tokens after those blocks
        (`VisualFeatures.hidden`); it changes nothing else.
        """
        want_hidden = self.check_hidden_layers(hidden_layers) if hidden_layers else []
        x = self.embed(images)
        vv: torch.Tensor | None = None
        kept: list[torch.Tensor] = []
        hidden: list[torch.Tensor] = []
        for k, block in enumerate(self.blocks):
            q, kk, v = self._qkv(block, x)
            a_ori = self._merge(block, attend(q, kk, v))
            if with_patches and k >= self.vv_start:
                a_vv = self._merge(block, attend(v, v, v))
                vv = (x if vv is None else vv) + block.ls_1(a_vv)  # a fresh tensor each block: no aliasing
                if k + 1 in self.feature_layers:
                    kept.append(vv[:, 1:])
            x = x + block.ls_1(a_ori)
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
            if k + 1 in want_hidden:
                hidden.append(x[:, 1:])
        cls_embedding = self.project(x[:, 0])
        hidden_t = torch.stack(hidden, dim=1) if hidden else None
        if not with_patches:
            empty = cls_embedding.new_zeros((x.shape[0], 0, 0, cls_embedding.shape[-1]))
            return VisualFeatures(cls_embedding, empty, hidden_t)
        patch_tokens = self.project(torch.stack(kept, dim=1))
        return VisualFeatures(cls_embedding, patch_tokens, hidden_t)
