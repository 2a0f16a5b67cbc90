"""`anoclip eval --memory`: the patch-memory scorers the evaluation loop streams a class through.

* `off` — zero-shot, the loop's own scorer (not here).
* `train` — a bank from the class's normal training images (`--shots K` of them, default all).
* `mutual` — no training images: the class's test images mutually scored against each other (MuSc).
* `stream` — causal, as a worker runs it (`pipeline.adaptation.memory.stream.StreamMemory`): each frame is
  scored with a bank built only from earlier frames of the stream, or by mutual scoring over the
  frames just before it while the line has no bank.

Every scorer returns the fused map and image score (docs/memory.md) and records what it did per class
in `scorer.memory[line]` (bank versions, patches, bytes, refreshes), which lands in report.json.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.adaptation.memory.params import MemoryParams
from pipeline.adaptation.memory.records import score_frames
from pipeline.adaptation.memory.scoring import bank_from_images, mutual_batch, score_with_bank
from pipeline.adaptation.memory.stream import StreamMemory
from pipeline.inspection.frame_scorer import FrameScorer

MEMORY_MODES = ("off", "train", "mutual", "stream")

ClassImages = Callable[[str, str], list[np.ndarray]]
"""(line id, `train` | `test`) -> that class's images at the protocol resolution (test: in stream order)."""


def _as_result(ms: Any) -> tuple[float, np.ndarray]:
    return ms.score, ms.anomaly_map.numpy()


def _digest(image: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).hexdigest()


class MemoryEvalScorer:
    """The eval scorer of one memory mode (`train`, `mutual` or `stream`)."""

    def __init__(
        self,
        mode: str,
        inspector: FrameScorer,
        params: MemoryParams,
        class_images: ClassImages,
        *,
        shots: int | None = None,
        tta: str | None = None,
    ) -> None:
        if mode not in MEMORY_MODES[1:]:
            raise ValueError(f"no memory scorer for mode {mode!r} (train | mutual | stream)")
        self.name = f"memory-{mode}"
        self.mode = mode
        self.inspector = inspector
        self.params = params
        self.class_images = class_images
        self.shots = shots
        self.tta = None if tta in (None, "off") else tta
        self.memory: dict[str, dict[str, Any]] = {}
        self._bank: Any = None
        self._queue: list[tuple[str, tuple[float, np.ndarray]]] = []
        self._stream: StreamMemory | None = None
        self._n = 0
        self._sources: dict[str, int] = {}

    def begin_class(self, line_id: str) -> None:
        self.inspector.prepare_line(line_id)
        self._n = 0
        self._sources = {}
        info: dict[str, Any] = {"mode": self.mode}
        if self.mode == "train":
            images = self.class_images(line_id, "train")
            used = images if self.shots is None else images[: self.shots]
            self._bank = bank_from_images(self.inspector, line_id, used, self.params,
                                          ids=[f"train-{i}" for i in range(len(used))])
            info.update(shots=len(used), train_images=len(images), bank_version=self._bank.version,
                        patches=self._bank.patches, bytes=self._bank.nbytes,
                        coreset_radius=self._bank.meta["coreset_radius"])
        elif self.mode == "mutual":
            images = self.class_images(line_id, "test")
            raws = score_frames(self.inspector, line_id, images, self.params, self.tta)
            results = mutual_batch(self.inspector, line_id, raws, self.params)
            self._queue = [(_digest(img), _as_result(m)) for img, m in zip(images, results, strict=True)]
            info.update(frames=len(images))
        else:
            self._stream = StreamMemory(self.inspector, line_id, self.params)
        self.memory[line_id] = info

    def score(self, line_id: str, images: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        if self.mode == "train":
            out = [_as_result(m) for m in score_with_bank(self.inspector, line_id, images, self._bank, self.params,
                                                          self.tta)]
        elif self.mode == "mutual":
            head, self._queue = self._queue[: len(images)], self._queue[len(images) :]
            if [d for d, _ in head] != [_digest(img) for img in images]:
                raise RuntimeError("mutual scoring: the stream's frames differ from the class's test images")
            out = [r for _, r in head]
        else:
            assert self._stream is not None
            raws = score_frames(self.inspector, line_id, images, self.params, self.tta)
            ids = [f"{line_id}:{self._n + i}" for i in range(len(raws))]
            self._n += len(raws)
            out = []
            for step in self._stream.step_batch(raws, ids):
                kind = step.result.source.split(":")[0]
                self._sources[kind] = self._sources.get(kind, 0) + 1
                out.append(_as_result(step.result))
        return out

    def end_class(self, line_id: str) -> None:
        if self.mode == "stream" and self._stream is not None:
            self.memory[line_id].update(self._stream.summary(), scored_by=dict(self._sources))
            self._stream = None
        self._bank = None
        self._queue = []
