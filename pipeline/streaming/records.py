"""The typed records that cross the stream: one scored frame as the worker, the Redis publisher and the
dashboard all see it.

`FrameResult` is built once by the worker's scorer from an `Inspection` and the frame's envelope; the
publisher stores it as JSON (per frame and as the line's latest) and flattens parts of it into the
results and alerts streams; the dashboard reads the JSON back into the same record. A new field is
added here, once, with its default (see docs/contracts.md).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.operators.describe import verdict_note
from pipeline.streaming.envelope import FrameMeta

if TYPE_CHECKING:  # the dashboard reads records without loading torch
    from pipeline.inspection.frame_scorer import Inspection

ANOMALOUS, NORMAL = "anomalous", "normal"
"""The two spellings of a verdict on the wire."""


def is_anomalous_verdict(value: Any) -> bool:
    """A verdict as stored (`"anomalous"` / `"normal"`, or a flag) read back as a bool."""
    if isinstance(value, bool | int | float):
        return bool(value)
    return str(value).strip().lower() in (ANOMALOUS, "1", "true")


def _to_frame_pixels(region: dict[str, Any], sx: float, sy: float, width: int, height: int) -> dict[str, Any]:
    """A region found on a mask drawn at 1/sx x 1/sy of the frame, in frame pixels (box ends exclusive)."""
    if sx == 1 and sy == 1:
        return region
    x0, y0, x1, y1 = region["box"]
    box = [math.floor(x0 * sx), math.floor(y0 * sy), min(width, math.ceil(x1 * sx)), min(height, math.ceil(y1 * sy))]
    return {**region, "area": round(region["area"] * sx * sy), "box": box}


@dataclass
class FrameResult:
    """One scored frame, JSON-ready (no arrays: masks and heatmaps travel as PNG beside it)."""

    frame_id: str
    line: str
    capture_ts_ns: int
    score: float
    anomalous: bool
    threshold: float
    pixel_threshold: float
    threshold_source: str = ""
    max_pixel_score: float = 0.0
    defect_area: int = 0
    regions: list[dict[str, Any]] = field(default_factory=list)
    adapter_version: str | None = None
    bank_version: str | None = None
    """The memory bank version that scored the frame (`lines[].memory: stream`); None with the memory off or
    before the line has a bank (cold start)."""
    timings_ms: dict[str, float] = field(default_factory=dict)
    camera: str = ""
    content_type: str = ""
    width: int = 0
    height: int = 0
    partition: int | None = None
    offset: int | None = None
    worker: str = ""
    synthetic_defect: str | None = None
    published_ts_ns: int | None = None
    """Set by the publisher when the result reaches Redis."""

    @property
    def verdict(self) -> str:
        return ANOMALOUS if self.anomalous else NORMAL

    @classmethod
    def from_inspection(cls, insp: Inspection, meta: FrameMeta, *, width: int, height: int, partition: int,
                        offset: int, worker: str, bank_version: str | None = None) -> FrameResult:
        """The worker's record of a frame it scored. A mask rendered smaller than the frame (`worker.
        render_max_side`) has its regions and defect area scaled back to frame pixels."""
        mh, mw = insp.mask.shape[:2]
        sx, sy = width / mw, height / mh
        return cls(
            frame_id=meta.frame_id, line=meta.line, capture_ts_ns=meta.capture_ts_ns,
            score=round(insp.score, 6), anomalous=bool(insp.verdict), threshold=round(insp.image_threshold, 6),
            pixel_threshold=round(insp.pixel_threshold, 6), threshold_source=insp.threshold_source,
            max_pixel_score=round(insp.max_pixel_score, 6), defect_area=round(int(insp.mask.sum()) * sx * sy),
            regions=[_to_frame_pixels(r.to_dict(), sx, sy, width, height) for r in insp.regions],
            adapter_version=insp.adapter_version, bank_version=bank_version,
            timings_ms={k: round(v, 3) for k, v in insp.timings.items()}, camera=meta.camera,
            content_type=meta.content_type, width=width, height=height, partition=partition, offset=offset,
            worker=worker, synthetic_defect=meta.synthetic_defect,
        )

    # --- the stored JSON ---------------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        """What Redis stores per frame and as the line's latest result."""
        d = {
            "line": self.line, "score": self.score, "verdict": self.verdict, "threshold": self.threshold,
            "pixel_threshold": self.pixel_threshold, "threshold_source": self.threshold_source,
            "max_pixel_score": self.max_pixel_score, "defect_area": self.defect_area, "regions": self.regions,
            "adapter_version": self.adapter_version, "bank_version": self.bank_version,
            "timings_ms": self.timings_ms, "frame_id": self.frame_id,
            "camera": self.camera, "content_type": self.content_type, "width": self.width, "height": self.height,
            "partition": self.partition, "offset": self.offset, "worker": self.worker,
            "capture_ts": self.capture_ts_ns, "published_ts": self.published_ts_ns,
        }
        if self.synthetic_defect is not None:
            d["synthetic_defect"] = self.synthetic_defect
        note = verdict_note(self.anomalous, self.defect_area, self.width, self.height)
        if note:  # the image score decides; a mask that disagrees is said so (pipeline/operators/describe.py)
            d["verdict_note"] = note
        return d

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> FrameResult:
        """Read a stored result back (unknown keys ignored, missing ones defaulted)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["frame_id"] = str(d.get("frame_id", ""))
        kw["line"] = str(d.get("line", ""))
        kw["capture_ts_ns"] = int(d.get("capture_ts") or 0)
        kw["published_ts_ns"] = int(d["published_ts"]) if d.get("published_ts") is not None else None
        kw["score"] = float(d.get("score") or 0.0)
        kw["anomalous"] = is_anomalous_verdict(d.get("verdict", False))
        kw["threshold"] = float(d.get("threshold") or 0.0)
        kw["pixel_threshold"] = float(d.get("pixel_threshold") or 0.0)
        return cls(**kw)

    # --- the stream entries ------------------------------------------------------------------------
    def _common(self) -> dict[str, Any]:
        return {"frame_id": self.frame_id, "line": self.line, "camera": self.camera, "score": self.score,
                "verdict": self.verdict, "threshold": self.threshold, "capture_ts": self.capture_ts_ns,
                "published_ts": self.published_ts_ns}

    def results_entry(self, *, result_key: str, mask_key: str) -> dict[str, Any]:
        """The line's results-stream entry (the dashboard's history and throughput read it)."""
        latency = (self.published_ts_ns - self.capture_ts_ns) / 1e6 if self.published_ts_ns else None
        return {
            **self._common(), "pixel_threshold": self.pixel_threshold, "threshold_source": self.threshold_source,
            "adapter_version": self.adapter_version, "bank_version": self.bank_version,
            "defect_area": self.defect_area,
            "latency_ms": None if latency is None else round(latency, 3), "timings_ms": self.timings_ms,
            "partition": "" if self.partition is None else self.partition,
            "offset": "" if self.offset is None else self.offset, "worker": self.worker,
            "result_key": result_key, "mask_key": mask_key,
        }

    def alert_entry(self, *, mask_key: str, heatmap_key: str, image_key: str) -> dict[str, Any]:
        """The alerts-stream entry of an anomalous frame."""
        return {**self._common(), "regions": self.regions, "defect_area": self.defect_area, "mask_key": mask_key,
                "heatmap_key": heatmap_key, "image_key": image_key, "content_type": self.content_type,
                "width": self.width, "height": self.height}

    def live_event(self) -> dict[str, Any]:
        """The pub/sub notification the dashboard's live feed receives."""
        return {"type": "result", "frame_id": self.frame_id, "line": self.line, "score": self.score,
                "verdict": self.verdict, "alert": self.anomalous, "published_ts": self.published_ts_ns}
