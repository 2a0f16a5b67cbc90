"""The two TTA token adapters of the official code (docs/algorithm.md §5.2). Pure torch.

Both act on raw projected V-V tokens x (before L2 normalisation) and keep a residual to them:

    text   (MVTec in the paper):  x' = r·x + (1-r)·( tanh(W x̂ + b) @ T )    T = the line's unit sentence embeddings
    linear (VisA in the paper):   x' = r·x + (1-r)·( W x̂ + b )              W: C x C

with x̂ = x / ‖x‖ and r = `residual` (0.5 in the official code, where both halves get 0.5).

An adapter may hold a *stack* of A independent adapters (weights with a leading A dimension): per-frame
TTA trains one fresh adapter per frame of a batch in one set of batched matmuls instead of A Python
loops. A stacked adapter takes input whose leading dimension is sample-major with A groups (e.g.
`(A * n_tiles, n_layers, P, C)` as `AnoCLIP.maps_from_tokens` passes it) and applies adapter i to group i.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.text import TextFeatures
from pipeline.settings import ADAPTER_KINDS


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class ResidualAdapter(nn.Module):
    """Common part: normalise, project, optionally squash onto a fixed basis, mix with the raw token."""

    kind: str = ""

    def __init__(
        self,
        embed_dim: int,
        out_dim: int,
        residual: float,
        *,
        stack: int | None = None,
        generator: torch.Generator | None = None,
        init: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= residual <= 1.0:
            raise ValueError(f"residual must lie in [0, 1], got {residual}")
        if stack is not None and stack < 1:
            raise ValueError(f"stack must be >= 1, got {stack}")
        self.embed_dim = int(embed_dim)
        self.out_dim = int(out_dim)
        self.residual = float(residual)
        self.stack = stack
        self.compute_dtype: torch.dtype | None = None
        """Run the projection and branch under autocast to this dtype (e.g. torch.bfloat16: ~2.5x faster
        on CPUs with AMX); None = float32. A serving choice, not part of the trained adapter."""
        lead = () if stack is None else (stack,)
        # nn.Linear's default init (Kaiming-uniform with a=sqrt(5)): U(±1/sqrt(fan_in)) for weight and bias,
        # which is what the official `reset_parameters()` gives; drawn from `generator` so it is reproducible.
        # `init=False` gives zeros (to be filled or loaded) and draws nothing from any RNG.
        bound = 1.0 / math.sqrt(embed_dim)
        if init:
            self.weight = nn.Parameter(_uniform((*lead, out_dim, embed_dim), bound, generator))
            self.bias = nn.Parameter(_uniform((*lead, out_dim), bound, generator))
        else:
            self.weight = nn.Parameter(torch.zeros((*lead, out_dim, embed_dim)))
            self.bias = nn.Parameter(torch.zeros((*lead, out_dim)))

    def _branch(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw tokens (..., C) -> adapted raw tokens (..., C) in float32."""
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"adapter expects tokens of width {self.embed_dim}, got {x.shape[-1]}")
        x = x.float()
        xn = F.normalize(x, dim=-1)
        if self.stack is not None and x.shape[0] % self.stack:
            raise ValueError(f"a stack of {self.stack} adapters needs a leading dim divisible by it, got {x.shape[0]}")
        ctx = (torch.autocast(x.device.type, dtype=self.compute_dtype) if self.compute_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            if self.stack is None:
                h = F.linear(xn, self.weight, self.bias)
            else:
                flat = xn.reshape(self.stack, -1, self.embed_dim)
                h = torch.baddbmm(self.bias.unsqueeze(1), flat, self.weight.transpose(1, 2))
                h = h.reshape(*x.shape[:-1], self.out_dim)
            branch = self._branch(h)
        r = self.residual
        return r * x + (1.0 - r) * branch.float()

    def unstack(self, i: int) -> ResidualAdapter:
        """Adapter i of a stack as a plain (unstacked) adapter, e.g. to save one frame's adapter."""
        if self.stack is None:
            raise ValueError("not a stacked adapter")
        single = self._empty_like().to(self.weight.device)
        with torch.no_grad():
            single.weight.copy_(self.weight[i])
            single.bias.copy_(self.bias[i])
        return single

    def _empty_like(self) -> ResidualAdapter:
        raise NotImplementedError

    def extra_repr(self) -> str:
        s = f"kind={self.kind}, embed_dim={self.embed_dim}, out_dim={self.out_dim}, residual={self.residual}"
        return s + (f", stack={self.stack}" if self.stack is not None else "")


class TextAdapter(ResidualAdapter):
    """Text-space adapter: the branch is a tanh-weighted sum of the line's prompt sentence embeddings."""

    kind = "text"

    def __init__(
        self,
        sentences: torch.Tensor,
        residual: float = 0.5,
        *,
        stack: int | None = None,
        generator: torch.Generator | None = None,
        init: bool = True,
    ) -> None:
        if sentences.ndim != 2:
            raise ValueError(f"sentences must be (S, C), got {tuple(sentences.shape)}")
        super().__init__(sentences.shape[1], sentences.shape[0], residual, stack=stack, generator=generator, init=init)
        # Fixed, not trained, and not saved: it is rebuilt from the line's prompts (their hash is checked).
        self.register_buffer("basis", sentences.detach().float().clone(), persistent=False)

    def _branch(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h) @ self.basis

    def _empty_like(self) -> ResidualAdapter:
        return TextAdapter(self.basis, self.residual, init=False)


class LinearAdapter(ResidualAdapter):
    """Plain C -> C linear adapter on the normalised token."""

    kind = "linear"

    def __init__(
        self,
        embed_dim: int,
        residual: float = 0.5,
        *,
        stack: int | None = None,
        generator: torch.Generator | None = None,
        init: bool = True,
    ) -> None:
        super().__init__(embed_dim, embed_dim, residual, stack=stack, generator=generator, init=init)

    def _empty_like(self) -> ResidualAdapter:
        return LinearAdapter(self.embed_dim, self.residual, init=False)


def text_basis(text: TextFeatures) -> torch.Tensor:
    """(S_n + S_a, C) unit sentence embeddings, normal ones first, as the official `Tcat`."""
    return torch.cat([text.normal_sentences, text.abnormal_sentences]).float()


def create_adapter(
    kind: str,
    text: TextFeatures,
    residual: float = 0.5,
    *,
    stack: int | None = None,
    generator: torch.Generator | None = None,
    init: bool = True,
) -> ResidualAdapter:
    """A freshly initialised adapter of `kind` ('text' or 'linear') for a line's text features.

    Initialised like nn.Linear from `generator` (the global RNG if None); `init=False` gives zeros and
    touches no RNG (for tensors that are filled or loaded afterwards).
    """
    device = text.class_embeddings.device
    if kind == "text":
        adapter: ResidualAdapter = TextAdapter(text_basis(text).cpu(), residual, stack=stack, generator=generator,
                                               init=init)
    elif kind == "linear":
        dim = int(text.class_embeddings.shape[1])
        adapter = LinearAdapter(dim, residual, stack=stack, generator=generator, init=init)
    else:
        raise ValueError(f"unknown adapter kind {kind!r}; expected one of {ADAPTER_KINDS}")
    return adapter.to(device)
