"""The AnoCLIP scorer (docs/algorithm.md §4): anomaly maps and image scores from a dual-path CLIP.

Pure torch. Input images are already resized and normalised (see `pipeline.inspection.imaging`): one side equals
the model's image size and the other is at least as long. Frames that are not square are cut into
overlapping square tiles along the long side whose maps are merged by averaging the overlaps; with
two tiles this is exactly the official VisA scheme.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.augment import N_VIEWS, multiview
from pipeline.model.backbone import DualPathViT
from pipeline.model.prompts import PromptSet
from pipeline.model.text import TextFeatures, encode_sentences, text_features_from_embeddings

TokenAdapter = Callable[[torch.Tensor], torch.Tensor]
"""Maps raw projected tokens (..., C) to adapted tokens (..., C); the TTA adapters are such modules."""


@dataclass
class AnomalyOutput:
    anomaly_maps: torch.Tensor
    """(B, H, W) float32 p(abnormal) per pixel at the input size."""
    image_scores: torch.Tensor
    """(B,) float32 image-level p(abnormal) from the CLS embedding (mean over tiles and views)."""
    tokens: torch.Tensor
    """(B, n_tiles, n_layers, P, C) float32 raw V-V tokens, before any adapter: what TTA trains on."""
    tile_starts: list[int]
    """Offsets of the tiles along the long side (needed to rebuild maps from tokens)."""
    hidden: torch.Tensor | None = None
    """(B, n_tiles, n_hidden, P, D) float32 original-path patch tokens after the asked `hidden_layers`
    (raw ViT width), for patch memories; None unless asked."""


@dataclass(frozen=True)
class TileLayout:
    """Where the square tiles of a (H, W) input lie."""

    height: int
    width: int
    size: int

    @property
    def axis(self) -> int:
        return 3 if self.width >= self.height else 2

    @property
    def length(self) -> int:
        return max(self.height, self.width)

    @property
    def starts(self) -> list[int]:
        n = math.ceil(self.length / self.size)
        if n <= 1:
            return [0]
        span = self.length - self.size
        return [round(i * span / (n - 1)) for i in range(n)]


class AnoCLIP(nn.Module):
    """Frozen CLIP + V-V path + text features -> per-pixel and per-image anomaly probabilities."""

    def __init__(
        self,
        clip: nn.Module,
        tokenize: Callable[[Sequence[str]], torch.Tensor],
        *,
        arch: str,
        weights_id: str,
        vv_start_block: int = 1,
        feature_layers: list[int] | None = None,
        temperature: float = 1.0,
        image_score: str = "cls",
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.tokenize = tokenize
        self.arch = arch
        self.weights_id = weights_id
        self.encoder = DualPathViT(clip.visual, vv_start_block, feature_layers)
        self.temperature = float(temperature)
        if image_score not in ("cls", "multiview"):
            raise ValueError(f"image_score must be 'cls' or 'multiview', got {image_score!r}")
        self.image_score_mode = image_score
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.precision = precision

    # -- properties ---------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.encoder.image_size

    @property
    def grid_size(self) -> int:
        return self.encoder.grid_size

    @property
    def embed_dim(self) -> int:
        return int(self.encoder.visual.proj.shape[1])

    @property
    def device(self) -> torch.device:
        return self.encoder.visual.proj.device

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # -- text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: PromptSet, batch_size: int = 128) -> TextFeatures:
        """Text features of a line's prompt set (costly on real models: cache them outside the model).

        Always fp32, whatever `precision`: once per line, and emulated bf16 took minutes on AVX2-only CPUs.
        """
        enc = [
            encode_sentences(self.clip.encode_text, self.tokenize, s, self.device, batch_size)
            for s in (prompts.normal, prompts.abnormal)
        ]
        return text_features_from_embeddings(*enc)

    # -- scoring ------------------------------------------------------------------------------
    def probabilities(self, unit_vectors: torch.Tensor, text: TextFeatures) -> torch.Tensor:
        """(..., 2) softmax over [normal, abnormal] of temperature * cosine; inputs must be unit norm."""
        logits = self.temperature * unit_vectors @ text.class_embeddings.to(unit_vectors).T
        return logits.softmax(-1)

    def patch_probabilities(
        self, tokens: torch.Tensor, text: TextFeatures, adapter: TokenAdapter | None = None
    ) -> torch.Tensor:
        """(..., 2) per-token probabilities from raw tokens (..., C), through the adapter if given."""
        if adapter is not None:
            tokens = adapter(tokens)
        return self.probabilities(F.normalize(tokens.float(), dim=-1), text)

    def tile_maps(
        self, tokens: torch.Tensor, text: TextFeatures, adapter: TokenAdapter | None = None
    ) -> torch.Tensor:
        """(N, n_layers, P, C) tokens -> (N, S, S) maps: p_abn, mean over layers, 3x3 box filter, bilinear up."""
        g = self.grid_size
        p = self.patch_probabilities(tokens, text, adapter)[..., 1].mean(1)  # (N, P)
        p = p.reshape(-1, 1, g, g)
        p = F.avg_pool2d(F.pad(p, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        size = self.image_size
        return F.interpolate(p, size=(size, size), mode="bilinear", align_corners=True)[:, 0]

    def merge_tiles(self, tile_maps: torch.Tensor, layout: TileLayout) -> torch.Tensor:
        """(B * n_tiles, S, S) -> (B, H, W): average where tiles overlap."""
        starts = layout.starts
        n = len(starts)
        b = tile_maps.shape[0] // n
        s = layout.size
        out = tile_maps.new_zeros((b, layout.height, layout.width))
        count = tile_maps.new_zeros((layout.height, layout.width))
        maps = tile_maps.view(b, n, s, s)
        for i, st in enumerate(starts):
            if layout.axis == 3:
                out[:, :, st : st + s] += maps[:, i]
                count[:, st : st + s] += 1
            else:
                out[:, st : st + s, :] += maps[:, i]
                count[st : st + s, :] += 1
        return out / count

    def maps_from_tokens(
        self,
        tokens: torch.Tensor,
        text: TextFeatures,
        out_hw: tuple[int, int],
        adapter: TokenAdapter | None = None,
    ) -> torch.Tensor:
        """Rebuild (B, H, W) maps from `AnomalyOutput.tokens`, e.g. after adapting on them."""
        b, n_tiles = tokens.shape[:2]
        layout = TileLayout(out_hw[0], out_hw[1], self.image_size)
        if len(layout.starts) != n_tiles:
            raise ValueError(f"tokens hold {n_tiles} tiles but a {out_hw} input has {len(layout.starts)}")
        flat = tokens.reshape(b * n_tiles, *tokens.shape[2:])
        return self.merge_tiles(self.tile_maps(flat, text, adapter), layout)

    def _tiles(self, images: torch.Tensor, layout: TileLayout) -> torch.Tensor:
        s = layout.size
        tiles = [images.narrow(layout.axis, st, s) for st in layout.starts]
        return torch.stack(tiles, dim=1).flatten(0, 1)  # (B * n_tiles, 3, S, S), image-major

    @torch.no_grad()
    def image_scores_multiview(
        self, tiles: torch.Tensor, cls_embedding: torch.Tensor, text: TextFeatures
    ) -> torch.Tensor:
        """(N,) mean p_abn over the original view (given) and the 21 augmented ones."""
        with self._autocast():
            aug = self.encoder(multiview(tiles), with_patches=False).cls_embedding.float()
        g = torch.cat([cls_embedding, aug]).view(N_VIEWS, tiles.shape[0], -1)
        return self.probabilities(F.normalize(g, dim=-1), text)[..., 1].mean(0)

    @torch.no_grad()
    def forward(
        self,
        images: torch.Tensor,
        text: TextFeatures,
        adapter: TokenAdapter | None = None,
        hidden_layers: Sequence[int] = (),
    ) -> AnomalyOutput:
        """Score a batch of same-sized, normalised images (B, 3, H, W) with min(H, W) == image size.

        `hidden_layers` (1-based blocks) also returns intermediate original-path patch tokens in
        `AnomalyOutput.hidden`, from the same forward; maps and scores are unchanged by it.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        b, _, h, w = images.shape
        if min(h, w) != self.image_size:
            raise ValueError(f"the short side must be {self.image_size} px (see pipeline.inspection.imaging), "
                             f"got {h}x{w}")
        layout = TileLayout(h, w, self.image_size)
        n_tiles = len(layout.starts)
        tiles = self._tiles(images.to(self.device), layout)
        with self._autocast():
            feats = self.encoder(tiles, hidden_layers=hidden_layers)
        cls = feats.cls_embedding.float()
        tokens = feats.patch_tokens.float()
        if self.image_score_mode == "multiview":
            tile_scores = self.image_scores_multiview(tiles, cls, text)
        else:
            tile_scores = self.probabilities(F.normalize(cls, dim=-1), text)[..., 1]
        maps = self.merge_tiles(self.tile_maps(tokens, text, adapter), layout)
        return AnomalyOutput(
            anomaly_maps=maps,
            image_scores=tile_scores.view(b, n_tiles).mean(1),
            tokens=tokens.view(b, n_tiles, *tokens.shape[1:]),
            tile_starts=layout.starts,
            hidden=None if feats.hidden is None else feats.hidden.float().view(b, n_tiles, *feats.hidden.shape[1:]),
        )
