"""Per-line thresholds: zero-shot scores are not calibrated, so each line learns its own.

Order of precedence, per threshold: a manual override (set at run time) > a fixed value in the config >
the served version's own (an adapter rescales pixel probabilities, so each promoted version carries
thresholds calibrated on its held-out frames) > the value calibrated from the line's first
`warmup_frames` frames (a high quantile) > the default 0.5, where the abnormal prompt starts to win.
Heatmaps are scaled with the normal-score statistics of whatever supplies the pixel threshold.

A frame is judged with the thresholds of the version that scored it (`view(version)`), so a swap between
scoring and judging can never pair one version's map with another's threshold.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.settings import Settings, ThresholdSettings

log = logging.getLogger("anoclip.thresholds")

_PIXELS_PER_FRAME = 1024  # sampled per warm-up frame: bounded memory, plenty for a 0.999 quantile


@dataclass
class Calibration:
    image: float
    pixel: float
    pixel_median: float
    frames: int


@dataclass(frozen=True)
class VersionThresholds:
    """The thresholds a served version carries (its registry metadata's `thresholds`); None = the line's."""

    version: str
    image: float | None
    pixel: float | None
    pixel_median: float | None = None

    @classmethod
    def from_meta(cls, version: str, d: Mapping[str, Any] | None) -> VersionThresholds | None:
        """From a version's `thresholds` block; None when it carries no usable threshold."""

        def num(key: str) -> float | None:
            v = (d or {}).get(key)
            try:
                f = float(v) if v is not None else None
            except (TypeError, ValueError):
                return None
            return f if f is not None and math.isfinite(f) else None

        vt = cls(version, num("image"), num("pixel"), num("pixel_median"))
        return vt if vt.image is not None or vt.pixel is not None else None


@dataclass(frozen=True)
class ThresholdView:
    """The thresholds a frame is judged with, and where each comes from."""

    image: float
    pixel: float
    image_source: str
    pixel_source: str
    heatmap_range: tuple[float, float]
    version: str | None = None
    """The version whose own thresholds take part (None: none do)."""

    @property
    def source(self) -> str:
        """One word for both: manual > config > version > calibrated > default."""
        order = ("manual", "config", "version", "calibrated", "default")
        return min((self.image_source, self.pixel_source), key=order.index)


_KEEP_VERSIONS = 8
"""Version thresholds remembered per line (the served one and a few before it, for frames still in flight)."""


@dataclass
class LineThresholds:
    """Thread-safe threshold state of one line."""

    cfg: ThresholdSettings
    calibration: Calibration | None = None
    override_image: float | None = None
    override_pixel: float | None = None
    serving: str | None = None
    """The version served now (whose thresholds `image`, `pixel`, `source` report); None = the base model."""
    _versions: OrderedDict[str, VersionThresholds] = field(default_factory=OrderedDict)
    _scores: list[float] = field(default_factory=list)
    _pixels: list[np.ndarray] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- versions -------------------------------------------------------------------------------
    def set_version(self, version: str | None, thresholds: Mapping[str, Any] | None = None) -> None:
        """Serve `version` from now on, with its own `thresholds` (its metadata block; None or empty: the
        line's apply to it). None goes back to the base model."""
        with self._lock:
            self.serving = version
            if version is None:
                return
            vt = VersionThresholds.from_meta(version, thresholds)
            if vt is None:
                self._versions.pop(version, None)
                return
            self._versions[version] = vt
            self._versions.move_to_end(version)
            while len(self._versions) > _KEEP_VERSIONS:
                self._versions.popitem(last=False)

    def has_version(self, version: str | None) -> bool:
        """Whether `version` carries thresholds of its own (its maps then never calibrate the line's)."""
        return version is not None and version in self._versions

    def version_thresholds(self, version: str | None) -> VersionThresholds | None:
        return self._versions.get(version) if version is not None else None

    def view(self, version: str | None = None) -> ThresholdView:
        """The thresholds for a frame scored by `version` (None = the base model), by precedence."""
        vt = self.version_thresholds(version)
        cal = self.calibration

        def pick(override: float | None, fixed: float | None, own: float | None, calibrated: float | None,
                 default: float) -> tuple[float, str]:
            for value, src in ((override, "manual"), (fixed, "config"), (own, "version"), (calibrated, "calibrated")):
                if value is not None:
                    return value, src
            return default, "default"

        image, image_src = pick(self.override_image, self.cfg.image, vt.image if vt else None,
                                cal.image if cal else None, self.cfg.default_image)
        pixel, pixel_src = pick(self.override_pixel, self.cfg.pixel, vt.pixel if vt else None,
                                cal.pixel if cal else None, self.cfg.default_pixel)
        if pixel_src == "version" and vt is not None and vt.pixel_median is not None:
            median: float | None = vt.pixel_median
        else:
            median = cal.pixel_median if cal is not None else None
        if median is not None and median < pixel:
            hm = (median, pixel + (pixel - median))
        else:
            hm = (pixel - self.cfg.heatmap_span, pixel + self.cfg.heatmap_span)
        own = vt.version if vt is not None and "version" in (image_src, pixel_src) else None
        return ThresholdView(image, pixel, image_src, pixel_src, hm, own)

    # -- what the served version is judged with ---------------------------------------------------
    @property
    def image(self) -> float:
        return self.view(self.serving).image

    @property
    def pixel(self) -> float:
        return self.view(self.serving).pixel

    @property
    def source(self) -> str:
        return self.view(self.serving).source

    @property
    def image_source(self) -> str:
        return self.view(self.serving).image_source

    @property
    def calibrating(self) -> bool:
        return self.calibration is None and self.cfg.warmup_frames > 0

    def heatmap_range(self) -> tuple[float, float]:
        """Colour range: from the median normal pixel score to as far above the threshold as it is below."""
        return self.view(self.serving).heatmap_range

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
        """State for publishing (e.g. the Redis threshold hash): what the served version is judged with."""
        v = self.view(self.serving)
        vt = self.version_thresholds(self.serving)
        d: dict[str, object] = {"image": v.image, "pixel": v.pixel, "source": v.source,
                                "image_source": v.image_source, "pixel_source": v.pixel_source,
                                "version": self.serving or "",
                                "version_image": "" if vt is None or vt.image is None else vt.image,
                                "version_pixel": "" if vt is None or vt.pixel is None else vt.pixel}
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


# -- the line's published state (the Redis threshold hash): what workers share and followers serve ----------
def manual_override(state: Mapping[str, str]) -> tuple[float | None, float | None]:
    """The operator's run-time override from a threshold hash: `manual_image` / `manual_pixel` fields.

    Set with e.g. `HSET anoclip:threshold:bottle manual_image 0.62`; delete the field to go back. Values that are
    not numbers, or not on the anomaly scale (0 to 1: an override written in z units for a memory line before
    every line shared that scale), are ignored and logged, never reinterpreted."""

    def num(name: str) -> float | None:
        v = state.get(name)
        if v is None or v == "":
            return None
        try:
            f = float(v)
        except ValueError:
            return None
        if not 0.0 <= f <= 1.0:
            log.error("ignoring %s=%s: thresholds are anomaly scores from 0 to 1 on every line (a memory line's "
                      "z threshold z converts to 1 / (1 + exp(-(z - 3) / 2)))", name, v)
            return None
        return f

    return num("manual_image"), num("manual_pixel")


def calibration_identity(settings: Settings, line: str, prompt_hash: str) -> dict[str, str]:
    """What a calibration depends on: one made with another model, prompt set or quantile is not resumed."""
    m = settings.model
    return {"calibrated_model": f"{m.arch}/{m.pretrained}/{m.precision}",
            "calibrated_prompts": prompt_hash,
            "calibrated_quantile": str(settings.line(line).threshold.quantile)}


def follow_published(line: str, th: LineThresholds, state: Mapping[str, str], ident: Mapping[str, str],
                     first: bool) -> None:
    """Bring `th` in step with the line's published state: its calibration (when made with the same model, prompt
    set and quantile: `ident`) and the operator's override. What workers do at each heartbeat, and what every
    follower (`anoclip serve`, `anoclip score`, the Python API following a running line) does instead of
    calibrating on the frames it is given.

    A line spread over several workers (frames keyed by frame id) must be judged by one threshold, not one per
    worker: a worker still calibrating adopts the one published, and one that finished its own calibration after
    another worker had published gives its own up (when two finish in the same heartbeat, the last write wins and
    the other adopts it on its next heartbeat). A restarted worker resumes it the same way."""
    if "calibrated_image" in state:
        _adopt_calibration(line, th, state, ident, first)
    image, pixel = manual_override(state)
    if (image, pixel) != (th.override_image, th.override_pixel):
        log.info("line %s: manual threshold override image=%s pixel=%s", line, image, pixel)
        th.set_override(image, pixel)


def _adopt_calibration(line: str, th: LineThresholds, state: Mapping[str, str], ident: Mapping[str, str],
                       first: bool) -> None:
    stale = {k: state.get(k) for k, v in ident.items() if state.get(k) != v}
    if stale:  # calibrated with another model, prompt set or quantile: its numbers do not apply
        if first and th.calibration is None:
            log.info("line %s: not resuming the calibration in Redis, it was made with %s", line, stale)
        return
    try:
        image, pixel = float(state["calibrated_image"]), float(state["calibrated_pixel"])
    except (ValueError, KeyError) as e:
        if first:
            log.warning("line %s: ignoring unreadable calibration in Redis: %s", line, e)
        return
    own = th.calibration
    if own is not None and math.isclose(own.image, image, rel_tol=1e-6, abs_tol=1e-9) and math.isclose(
            own.pixel, pixel, rel_tol=1e-6, abs_tol=1e-9):
        return
    try:
        th.restore(dict(state))
    except (ValueError, KeyError) as e:
        log.warning("line %s: ignoring unreadable calibration in Redis: %s", line, e)
        return
    if own is None:
        how = "resumed" if first else "adopted"
        log.info("line %s: %s calibrated thresholds from Redis (image %.4f, published by worker %s)",
                 line, how, image, state.get("worker", "?"))
    else:
        log.info("line %s: using the line's calibration in Redis (image %.4f, published by worker %s) "
                 "instead of this worker's (image %.4f)", line, image, state.get("worker", "?"), own.image)
