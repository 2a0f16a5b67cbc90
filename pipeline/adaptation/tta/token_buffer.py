"""A bounded per-line ring buffer of fp16 patch tokens for buffered TTA, with admission.

The streaming worker offers every scored frame; only frames the base model calls confidently normal
get in (see `pipeline.model.tta_admission.admit`), with their abnormal-looking patches marked so the trainer
never reads them. The buffer is bounded by frame count and by bytes, evicting the oldest frames, and
is thread-safe: the poll thread offers while a trainer thread takes snapshots.

The image-score history behind the relative admission rule holds *admitted* frames only: with refused
frames in it, a persistent defect raised the median frame by frame until its own frames passed. The
newest admitted frames also keep their image (at model input size): the gate pastes synthetic defects
into them.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.model.tta_admission import Admission, admit
from pipeline.model.tta_params import AdmissionRule
from pipeline.model.tta_train import TokenSet


@dataclass
class BufferedFrame:
    frame_id: str
    tokens: torch.Tensor
    """(..., C) fp16 on CPU: raw V-V tokens in the shape they were scored in, e.g. (n_tiles, n_layers, P, C)."""
    clean: torch.Tensor
    """(N,) bool over the flattened tokens: may be trained on (False = abnormal-looking, never read)."""
    image_score: float
    timestamp: float
    input_hw: tuple[int, int] | None = None
    """The model input size the tokens were scored at (maps are rebuilt at it)."""

    @property
    def nbytes(self) -> int:
        return self.tokens.numel() * self.tokens.element_size() + self.clean.numel()


class TokenBuffer:
    """Admitted frames of one line, oldest first, within `max_frames` and `max_bytes`."""

    def __init__(
        self,
        line: str,
        rule: AdmissionRule | None = None,
        *,
        max_frames: int = 1000,
        max_bytes: int = 512 << 20,
        score_history: int = 1000,
        max_images: int = 16,
    ) -> None:
        if max_frames < 1 or max_bytes < 1:
            raise ValueError("max_frames and max_bytes must be positive")
        self.line = line
        self.rule = rule or AdmissionRule()
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._frames: deque[BufferedFrame] = deque()
        self._bytes = 0
        self._scores: deque[float] = deque(maxlen=score_history)
        """Image scores of admitted frames only (see the module docstring)."""
        self.max_images = max(0, int(max_images))
        self._images: OrderedDict[str, np.ndarray] = OrderedDict()
        """Images of the newest admitted frames (at most `max_images`), for the gate's synthetic positives."""
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        """offered, admitted, evicted and refused:<rule> counts since creation."""

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def prime(self, image_scores: list[float]) -> None:
        """Seed the image-score history behind the relative image rule (e.g. a batch scored up front)."""
        with self._lock:
            self._scores.extend(float(s) for s in image_scores)

    def offer(
        self,
        frame_id: str,
        tokens: torch.Tensor,
        image_score: float,
        scores: torch.Tensor,
        timestamp: float | None = None,
        *,
        input_hw: tuple[int, int] | None = None,
        image: np.ndarray | Callable[[], np.ndarray] | None = None,
    ) -> Admission:
        """Judge a scored frame and keep it if admitted.

        tokens: the frame's raw tokens (..., C), e.g. `RawScore.tokens`; scores: their base-model
        p(abnormal) with the same leading shape (`pipeline.model.tta_scoring.patch_scores(tokens, text)`).
        input_hw: the model input size; image: the frame at that size (HxWx3 uint8), or a function making
        it (called only for admitted frames), kept for the newest admitted frames only.
        """
        with self._lock:
            history = torch.tensor(list(self._scores)) if self._scores else None
        c = tokens.shape[-1]
        flat = tokens.detach().reshape(-1, c)
        if scores.numel() != flat.shape[0]:
            raise ValueError(f"{scores.numel()} patch scores for {flat.shape[0]} tokens")
        decision = admit(float(image_score), scores, self.rule, history)
        if decision.admitted and not bool(torch.isfinite(flat).all()):
            decision = Admission(False, "non-finite tokens", None, decision.abnormal_share, "non_finite")
        with self._lock:
            self.counts["offered"] += 1
            if self._frames and self._frames[0].tokens.shape[-1] != c and decision.admitted:
                decision = Admission(False, f"token width {c} differs from the buffer's "
                                     f"{self._frames[0].tokens.shape[-1]}", None, decision.abnormal_share, "shape")
            if not decision.admitted:
                self.counts[f"refused:{decision.rule}"] += 1
                return decision
            assert decision.clean is not None
            frame = BufferedFrame(
                str(frame_id),
                tokens.detach().to("cpu", torch.float16).contiguous(),
                decision.clean.reshape(-1).cpu().clone(),
                float(image_score),
                time.time() if timestamp is None else float(timestamp),
                None if input_hw is None else (int(input_hw[0]), int(input_hw[1])),
            )
            if frame.nbytes > self.max_bytes:
                self.counts["refused:too_large"] += 1
                return Admission(False, f"frame of {frame.nbytes} bytes exceeds the buffer's {self.max_bytes}",
                                 None, decision.abnormal_share, "too_large")
            self._frames.append(frame)
            self._bytes += frame.nbytes
            self._scores.append(float(image_score))
            self.counts["admitted"] += 1
            if image is not None and self.max_images:
                self._images[frame.frame_id] = image() if callable(image) else image
                while len(self._images) > self.max_images:
                    self._images.popitem(last=False)
            while len(self._frames) > self.max_frames or self._bytes > self.max_bytes:
                old = self._frames.popleft()
                self._bytes -= old.nbytes
                self._images.pop(old.frame_id, None)
                self.counts["evicted"] += 1
        return decision

    def snapshot(self, device: torch.device | str | None = None) -> TokenSet:
        """A copy of the buffered frames as one `TokenSet` (the buffer keeps filling meanwhile)."""
        return self.snapshot_with_window(device)[0]

    def snapshot_with_window(self, device: torch.device | str | None = None) -> tuple[TokenSet, dict[str, object]]:
        """`snapshot` and the `window` of exactly those frames, taken together."""
        ts, window, _, _ = self.snapshot_full(device)
        return ts, window

    def snapshot_full(
        self, device: torch.device | str | None = None
    ) -> tuple[TokenSet, dict[str, object], list[str], dict[str, np.ndarray]]:
        """The buffered frames (oldest first) as a `TokenSet`, their window, their ids and the images kept
        for the newest of them, all taken together."""
        with self._lock:
            frames = list(self._frames)
            images = dict(self._images)
        if not frames:
            raise ValueError(f"token buffer of line {self.line!r} is empty")
        ts = TokenSet.from_frames([f.tokens for f in frames], [f.clean for f in frames],
                                  input_hw=[f.input_hw for f in frames], image_scores=[f.image_score for f in frames])
        if device is not None:
            ts.tokens = ts.tokens.to(device)
        return ts, self._window(frames), [f.frame_id for f in frames], images

    def window(self) -> dict[str, object]:
        """Which frames a snapshot taken now would hold: the adapter's training window."""
        with self._lock:
            frames = list(self._frames)
        return self._window(frames)

    @staticmethod
    def _window(frames: list[BufferedFrame]) -> dict[str, object]:
        if not frames:
            return {"frames": 0}
        return {
            "frames": len(frames),
            "first_frame": frames[0].frame_id,
            "last_frame": frames[-1].frame_id,
            "first_time": frames[0].timestamp,
            "last_time": frames[-1].timestamp,
        }

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self.counts)
            out.update(frames=len(self._frames), bytes=self._bytes, images=len(self._images))
        return out

    def frame_ids(self) -> list[str]:
        """Ids of the buffered frames, oldest first."""
        with self._lock:
            return [f.frame_id for f in self._frames]

    def clear(self) -> None:
        with self._lock:
            self._frames.clear()
            self._images.clear()
            self._bytes = 0
