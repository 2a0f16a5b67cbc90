"""The `memory:` settings as the code uses them (`MemoryParams`), what a bank must fit (`BankTarget`), and the
bank format's identity (docs/memory.md).

Pure-torch math lives in `pipeline.model.memory`; this package wires it to lines, frames and settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pipeline.errors import AnoclipError, ConfigError
from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.model import AnoCLIP
from pipeline.settings import MemorySettings

FORMAT = "anoclip-memory"
FORMAT_VERSION = 1
BYTES_PER_VALUE = 2  # banks hold fp16


class MemoryBankError(AnoclipError):
    """A memory bank cannot be used: not a bank, damaged, or made for another model, line or feature choice."""



@dataclass(frozen=True)
class MemoryParams:
    """The `memory:` settings (pipeline.settings.MemorySettings) as plain values."""

    layers: tuple[int, ...] = (6,)
    neighbourhood: int = 1
    budget_bytes: int = 16 << 20
    image_top_k: int = 5
    fusion_weight: float = 0.8
    mutual_share: float = 0.5
    window_frames: int = 16
    min_bank_frames: int = 4
    refresh_max_frames: int = 1000
    admit_patch_z: float = 2.5
    admit_min_window: int = 8
    admit_max_abnormal_share: float = 0.25
    calibration_frames: int = 8
    gate_holdout_frames: int = 8
    gate_auroc_margin: float = 0.05
    gate_max_normal_z: float = 1.0
    projection_dim: int = 128
    seed: int = 0

    @classmethod
    def from_settings(cls, s: MemorySettings) -> MemoryParams:
        d = s.model_dump()
        d["layers"] = tuple(d["layers"])
        return cls(**d)

    def max_patches(self, feature_dim: int) -> int:
        """Rows of `feature_dim` fp16 values that fit the byte budget."""
        return max(1, self.budget_bytes // (BYTES_PER_VALUE * feature_dim))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d


@dataclass(frozen=True)
class BankTarget:
    """What a bank must fit: the model's exact weights, the line, and how features are made."""

    arch: str
    weights_id: str
    line: str
    layers: tuple[int, ...]
    neighbourhood: int
    feature_dim: int


def check_layers(model: AnoCLIP, params: MemoryParams) -> None:
    """`memory.layers` must name blocks the model has; fails at start-up, naming the key."""
    n = len(model.encoder.blocks)
    bad = [i for i in params.layers if not 1 <= i <= n]
    if bad:
        raise ConfigError(f"memory.layers: block(s) {bad} do not exist in {model.arch} ({n} blocks)")


def bank_target(inspector: FrameScorer, line_id: str, params: MemoryParams) -> BankTarget:
    """The target of a line's bank as the FrameScorer serves it."""
    m = inspector.model
    check_layers(m, params)
    width = int(m.encoder.visual.conv1.out_channels) * len(params.layers)
    return BankTarget(m.arch, m.weights_id, line_id, tuple(params.layers), params.neighbourhood, width)
