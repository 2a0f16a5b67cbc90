"""Test-time adaptation's constants as plain values (docs/algorithm.md §5, docs/tta.md): the optimisation
parameters, a buffered refresh's budget, the admission and gate rules, and the seed streams.

The TTA modules (`tta_scoring`, `tta_per_frame`, `tta_admission`, `tta_gate`, `tta_train`) are pure torch, no
file I/O; deterministic given the seeds in `TTAParams` (and a step budget rather than a time budget for
buffered training).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

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
