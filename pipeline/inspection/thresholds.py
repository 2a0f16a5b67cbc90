"""Per-line thresholds: zero-shot scores are not calibrated, so each line learns its own.

Order of precedence: a manual override (set at run time) > a fixed value in the config > the value
calibrated from the line's first `warmup_frames` frames (a high quantile) > the default 0.5, where
the abnormal prompt starts to win. Heatmaps are scaled with the line's normal-score statistics.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from pipeline.settings import ThresholdSettings

_PIXELS_PER_FRAME = 1024  # sampled per warm-up frame: bounded memory, plenty for a 0.999 quantile


@dataclass
class Calibration:
    image: float
    pixel: float
    pixel_median: float
    frames: int


@dataclass
class LineThresholds:
    """Thread-safe threshold state of one line."""

    cfg: ThresholdSettings
    calibration: Calibration | None = None
    override_image: float | None = None
    override_pixel: float | None = None
    _scores: list[float] = field(default_factory=list)
    _pixels: list[np.ndarray] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def image(self) -> float:
        if self.override_image is not None:
            return self.override_image
        if self.cfg.image is not None:
            return self.cfg.image
        return self.calibration.image if self.calibration else self.cfg.default_image

    @property
    def pixel(self) -> float:
        if self.override_pixel is not None:
            return self.override_pixel
        if self.cfg.pixel is not None:
            return self.cfg.pixel
        return self.calibration.pixel if self.calibration else self.cfg.default_pixel

    @property
    def source(self) -> str:
        if self.override_image is not None or self.override_pixel is not None:
            return "manual"
        if self.cfg.image is not None or self.cfg.pixel is not None:
            return "config"
        return "calibrated" if self.calibration else "default"

    @property
    def calibrating(self) -> bool:
        return self.calibration is None and self.cfg.warmup_frames > 0

    def heatmap_range(self) -> tuple[float, float]:
        """Colour range: from the median normal pixel score to as far above the threshold as it is below."""
        thr = self.pixel
        if self.calibration is not None and self.calibration.pixel_median < thr:
            lo = self.calibration.pixel_median
            return lo, thr + (thr - lo)
        return thr - self.cfg.heatmap_span, thr + self.cfg.heatmap_span

    def observe(self, score: float, anomaly_map: np.ndarray, rng: np.random.Generator | None = None) -> bool:
        """Feed one warm-up frame; True when this frame completed the calibration."""
        if not self.calibrating:
            return False
        rng = rng or np.random.default_rng(len(self._scores))
        flat = anomaly_map.reshape(-1)
        sample = flat if flat.size <= _PIXELS_PER_FRAME else flat[rng.integers(0, flat.size, _PIXELS_PER_FRAME)]
        with self._lock:
            if self.calibration is not None:
                return False
            self._scores.append(float(score))
            self._pixels.append(sample.astype(np.float32))
            if len(self._scores) < self.cfg.warmup_frames:
                return False
            pixels = np.concatenate(self._pixels)
            self.calibration = Calibration(
                image=float(np.quantile(self._scores, self.cfg.quantile)),
                pixel=float(np.quantile(pixels, self.cfg.pixel_quantile)),
                pixel_median=float(np.median(pixels)),
                frames=len(self._scores),
            )
            self._scores, self._pixels = [], []
            return True

    def set_override(self, image: float | None = None, pixel: float | None = None) -> None:
        """Manual thresholds at run time; None clears that override."""
        self.override_image, self.override_pixel = image, pixel

    def to_dict(self) -> dict[str, object]:
        """State for publishing (e.g. the Redis threshold hash)."""
        d: dict[str, object] = {"image": self.image, "pixel": self.pixel, "source": self.source}
        if self.calibration is not None:
            d.update(
                calibrated_image=self.calibration.image,
                calibrated_pixel=self.calibration.pixel,
                pixel_median=self.calibration.pixel_median,
                calibration_frames=self.calibration.frames,
            )
        return d

    def restore(self, d: dict[str, object]) -> None:
        """Resume from published state so a restarted worker does not recalibrate from scratch."""
        if "calibrated_image" in d and "calibrated_pixel" in d:
            self.calibration = Calibration(
                image=float(d["calibrated_image"]),
                pixel=float(d["calibrated_pixel"]),
                pixel_median=float(d.get("pixel_median", d["calibrated_pixel"])),
                frames=int(d.get("calibration_frames", 0)),
            )
