"""What an evaluation is asked to do (`EvalOptions`, checked by `validate`), the choices its options take,
and `EvalError`. Shared by the evaluation loop that runs it and the report that records it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import AnoclipError
from pipeline.evaluation.datasets import PROTOCOL_SIDE
from pipeline.evaluation.memory_eval import MEMORY_MODES
from pipeline.evaluation.metrics import AUPRO_VARIANTS, DEFAULT_MEMORY_BUDGET

TTA_MODES = ("off", "per_frame", "buffered")
IMAGE_SCORE_CHOICES = ("protocol", "cls", "multiview")
ORDERS = ("dataset", "shuffled")


class EvalError(AnoclipError):
    """The evaluation cannot run as asked (e.g. a TTA mode that is not available)."""


@dataclass
class EvalOptions:
    """What to evaluate and how; defaults follow the official protocol (docs/algorithm.md §6)."""

    out: Path
    classes: list[str] | None = None
    tta: str = "off"
    image_score: str = "protocol"
    """`protocol`: MVTec 22-view multiview, VisA/folder CLS (mean over tiles); or force `cls` / `multiview`."""
    aupro: str = "rescaled"
    order: str = "dataset"
    seed: int = 0
    resolution: int = PROTOCOL_SIDE
    examples: int = 4
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    memory: str = "off"
    """Patch memory (docs/memory.md): `off` (zero-shot), `train`, `mutual` or `stream`."""
    shots: int | None = None
    """`memory: train`: normal training images per class in the bank (None = all)."""
    progress: bool = True
    figures: bool = True

    def validate(self) -> None:
        if self.tta not in TTA_MODES:
            raise EvalError(f"unknown TTA mode {self.tta!r} (use one of {', '.join(TTA_MODES)})")
        if self.image_score not in IMAGE_SCORE_CHOICES:
            raise EvalError(f"image score must be one of {', '.join(IMAGE_SCORE_CHOICES)}")
        if self.aupro not in AUPRO_VARIANTS:
            raise EvalError(f"AUPRO variant must be one of {', '.join(AUPRO_VARIANTS)}")
        if self.order not in ORDERS:
            raise EvalError(f"order must be one of {', '.join(ORDERS)}")
        if self.resolution < 16:
            raise EvalError("resolution must be at least 16")
        if self.memory not in MEMORY_MODES:
            raise EvalError(f"unknown memory mode {self.memory!r} (use one of {', '.join(MEMORY_MODES)})")
        if self.shots is not None and (self.shots < 1 or self.memory != "train"):
            raise EvalError("--shots takes a count >= 1 and goes with --memory train")
        if self.memory != "off" and self.tta == "buffered":
            raise EvalError("--memory and --tta buffered do not combine (use --tta off or per_frame)")
