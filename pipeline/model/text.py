"""Text features of a prompt set (docs/algorithm.md §3.4)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TextFeatures:
    """One line's text side, computed once and cached."""

    class_embeddings: torch.Tensor
    """(2, C) unit rows [normal, abnormal]: the mean of the *un-normalised* sentence embeddings, then normalised."""
    normal_sentences: torch.Tensor
    """(S_n, C) unit rows: every normal sentence, kept for the text-space TTA adapter."""
    abnormal_sentences: torch.Tensor
    """(S_a, C) unit rows."""

    def to(self, device: torch.device | str) -> TextFeatures:
        return TextFeatures(
            self.class_embeddings.to(device), self.normal_sentences.to(device), self.abnormal_sentences.to(device)
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "class_embeddings": self.class_embeddings.contiguous(),
            "normal_sentences": self.normal_sentences.contiguous(),
            "abnormal_sentences": self.abnormal_sentences.contiguous(),
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> TextFeatures:
        return cls(d["class_embeddings"], d["normal_sentences"], d["abnormal_sentences"])


@torch.no_grad()
def encode_sentences(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenize: Callable[[Sequence[str]], torch.Tensor],
    sentences: Sequence[str],
    device: torch.device,
    batch_size: int = 128,
) -> torch.Tensor:
    """(S, C) raw (un-normalised) sentence embeddings, in batches to bound memory."""
    out = []
    for i in range(0, len(sentences), batch_size):
        tokens = tokenize(list(sentences[i : i + batch_size])).to(device)
        out.append(encode_text(tokens).float())
    return torch.cat(out)


def text_features_from_embeddings(normal: torch.Tensor, abnormal: torch.Tensor) -> TextFeatures:
    """Apply the official ensemble: mean of raw embeddings, then L2-normalise."""
    class_embeddings = torch.stack([F.normalize(normal.mean(0), dim=-1), F.normalize(abnormal.mean(0), dim=-1)])
    return TextFeatures(class_embeddings, F.normalize(normal, dim=-1), F.normalize(abnormal, dim=-1))
