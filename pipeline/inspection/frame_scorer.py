"""The model's side of judging a line's frames: the model, each line's text features and thresholds, frames
scored (`score_raw`) and one scored frame judged against a threshold view (`judge`).

Nothing calls `judge` but the one verdict path (`pipeline.verdicts.Inspector`), which decides what a frame is
scored with (adapter, memory bank) and whose thresholds judge it, for the worker, serve, score and the API alike.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.inspection.imaging import preprocess
from pipeline.inspection.regions import Region, defect_regions
from pipeline.inspection.text_cache import TextFeatureCache
from pipeline.inspection.thresholds import LineThresholds
from pipeline.model import AnoCLIP, TextFeatures, TokenAdapter, build_prompt_set
from pipeline.settings import LineSettings, Settings


@dataclass
class RawScore:
    """The model's view of one frame, at model input resolution."""

    anomaly_map: torch.Tensor
    """(h, w) float32 p(abnormal) at the model input size (e.g. 240 x 240, or 240 x W' when tiled)."""
    score: float
    tokens: torch.Tensor
    """(n_tiles, n_layers, P, C) raw V-V tokens, before any adapter."""
    frame_hw: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)
    hidden: torch.Tensor | None = None
    """(n_tiles, n_hidden, P, D) intermediate original-path patch tokens when `score_raw(hidden_layers=...)`
    asked for them (patch memories, docs/memory.md); None otherwise."""
    image: np.ndarray | None = None
    """The frame as given (a reference, not a copy): buffered TTA keeps the newest admitted frames to paste
    the gate's synthetic defects into (docs/tta.md)."""

    @property
    def input_hw(self) -> tuple[int, int]:
        return int(self.anomaly_map.shape[0]), int(self.anomaly_map.shape[1])


@dataclass
class Inspection:
    """The verdict on one frame, at the frame's own resolution."""

    line: str
    score: float
    verdict: bool
    """True = anomalous."""
    image_threshold: float
    pixel_threshold: float
    threshold_source: str
    max_pixel_score: float
    anomaly_map: np.ndarray
    mask: np.ndarray
    regions: list[Region]
    heatmap_range: tuple[float, float]
    adapter_version: str | None
    timings: dict[str, float]
    bank_version: str | None = None
    """The patch-memory bank that scored the frame (None: no memory, or its cold start)."""

    def summary(self) -> dict[str, object]:
        """JSON-ready result without the arrays."""
        return {
            "line": self.line,
            "score": round(self.score, 6),
            "verdict": "anomalous" if self.verdict else "normal",
            "threshold": round(self.image_threshold, 6),
            "pixel_threshold": round(self.pixel_threshold, 6),
            "threshold_source": self.threshold_source,
            "max_pixel_score": round(self.max_pixel_score, 6),
            "defect_area": int(self.mask.sum()),
            "regions": [r.to_dict() for r in self.regions],
            "adapter_version": self.adapter_version,
            "bank_version": self.bank_version,
            "timings_ms": {k: round(v, 3) for k, v in self.timings.items()},
        }


class FrameScorer:
    """Holds the model, each line's text features and thresholds (one per process, shared by every path)."""

    def __init__(self, settings: Settings, model: AnoCLIP, text_cache: TextFeatureCache | None = None) -> None:
        self.settings = settings
        self.model = model
        self.text_cache = text_cache or TextFeatureCache(settings.model.text_cache_dir)
        self._text: dict[str, TextFeatures] = {}
        self._thresholds: dict[str, LineThresholds] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> FrameScorer:
        """Load the model (nothing followed: `pipeline.verdicts.Inspector.from_settings` for the line's state)."""
        from pipeline.inspection.runtimes import build_model  # precision per CPU, exported runtimes

        return cls(settings, build_model(settings.model))

    def line(self, line_id: str) -> LineSettings:
        return self.settings.line(line_id)

    def prepare_line(self, line_id: str) -> TextFeatures:
        """The line's text features (encoded once, then cached in memory and on disk)."""
        tf = self._text.get(line_id)
        if tf is None:
            line = self.line(line_id)
            prompts = build_prompt_set(
                line.class_name, line.domain, line.extra_normal_states, line.extra_abnormal_states
            )
            tf = self._text[line_id] = self.text_cache.get_or_compute(self.model, prompts)
        return tf

    def prompt_hash(self, line_id: str) -> str:
        line = self.line(line_id)
        return build_prompt_set(line.class_name, line.domain, line.extra_normal_states, line.extra_abnormal_states).hash

    def thresholds(self, line_id: str) -> LineThresholds:
        th = self._thresholds.get(line_id)
        if th is None:
            th = self._thresholds[line_id] = LineThresholds(self.line(line_id).threshold)
        return th

    def score_raw(
        self,
        line_id: str,
        images: list[np.ndarray],
        adapter: TokenAdapter | None = None,
        tta: str | None = None,
        hidden_layers: tuple[int, ...] = (),
    ) -> list[RawScore]:
        """Run the model on frames of one line, batching frames whose model input sizes agree.

        `hidden_layers` (1-based blocks) also keeps the original path's patch tokens after those blocks
        in `RawScore.hidden`, from the same forward (what a patch memory compares).

        `tta="per_frame"` runs the paper's per-frame test-time adaptation (`settings.tta`, the line's
        adapter kind): each frame's map comes from a fresh adapter trained on its own tokens. It cannot
        be combined with a fixed `adapter`. The image score is never affected by TTA.
        """
        if tta not in (None, "off", "per_frame"):
            raise ValueError(f"tta must be 'off' or 'per_frame' here, got {tta!r}")
        per_frame = tta == "per_frame"
        if per_frame and adapter is not None:
            raise ValueError("per-frame TTA trains its own adapter per frame; do not pass a fixed adapter too")
        text = self.prepare_line(line_id)
        m = self.settings.model
        out: list[RawScore | None] = [None] * len(images)
        groups: dict[tuple[int, ...], list[tuple[int, torch.Tensor, float]]] = defaultdict(list)
        for i, img in enumerate(images):
            t0 = time.perf_counter()
            x = preprocess(img, self.model.image_size, m.resize)
            groups[tuple(x.shape)].append((i, x, (time.perf_counter() - t0) * 1e3))
        for items in groups.values():
            for start in range(0, len(items), m.batch_size):
                chunk = items[start : start + m.batch_size]
                t0 = time.perf_counter()
                res = self.model(torch.stack([x for _, x, _ in chunk]), text, adapter, hidden_layers)
                maps = res.anomaly_maps
                model_ms = (time.perf_counter() - t0) * 1e3 / len(chunk)
                timings = {"model": model_ms}
                if per_frame:
                    t0 = time.perf_counter()
                    maps = self._per_frame_maps(line_id, res.tokens, text, tuple(maps.shape[-2:]))
                    timings["tta"] = (time.perf_counter() - t0) * 1e3 / len(chunk)
                maps = maps.cpu()
                for j, (i, _, pre_ms) in enumerate(chunk):
                    out[i] = RawScore(
                        anomaly_map=maps[j],
                        score=float(res.image_scores[j]),
                        tokens=res.tokens[j],
                        frame_hw=(int(images[i].shape[0]), int(images[i].shape[1])),
                        timings={"preprocess": pre_ms, **timings},
                        hidden=None if res.hidden is None else res.hidden[j],
                        image=images[i],
                    )
        return [r for r in out if r is not None]

    def _per_frame_maps(
        self, line_id: str, tokens: torch.Tensor, text: TextFeatures, out_hw: tuple[int, int]
    ) -> torch.Tensor:
        """(B, H, W) maps of a batch after per-frame TTA on its (B, n_tiles, n_layers, P, C) tokens."""
        from pipeline.model.tta_params import TTAParams
        from pipeline.model.tta_per_frame import adapt_per_frame

        params = TTAParams.from_settings(self.settings.tta)
        result = adapt_per_frame(tokens, text, self.line(line_id).adapter_kind, params,
                                 temperature=self.model.temperature)
        with torch.no_grad():
            return self.model.maps_from_tokens(tokens, text, out_hw, result.adapter)

    def judge(self, line_id: str, raw: RawScore, threshold_key: str | None = None, *,
              calibrate: bool = True) -> Inspection:
        """Thresholds, map at `raw.frame_hw`, mask and regions for one scored frame (the combine step of the one
        verdict path, `pipeline.verdicts`). `threshold_key` names the version whose thresholds judge it (an
        adapter version, `bank:<version>`, None: the line's). `calibrate`: a frame judged by the line's own
        thresholds feeds their warm-up calibration (workers; never a follower, whose frames are untrusted)."""
        t0 = time.perf_counter()
        th = self.thresholds(line_id)
        view = th.view(threshold_key)  # the thresholds of the version that scored this frame
        image_thr, pixel_thr, source, hm_range = view.image, view.pixel, view.source, view.heatmap_range
        h, w = raw.frame_hw
        amap = raw.anomaly_map
        if (h, w) != raw.input_hw:
            amap = F.interpolate(amap[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        amap_np = amap.numpy()
        mask = amap_np >= pixel_thr
        regions = defect_regions(mask, amap_np)
        if calibrate and not th.has_version(threshold_key):  # a version's maps never calibrate the line's
            th.observe(raw.score, raw.anomaly_map.numpy())
        timings = dict(raw.timings)
        timings["post"] = (time.perf_counter() - t0) * 1e3
        return Inspection(
            line=line_id,
            score=raw.score,
            verdict=raw.score >= image_thr,
            image_threshold=image_thr,
            pixel_threshold=pixel_thr,
            threshold_source=source,
            max_pixel_score=float(amap_np.max()),
            anomaly_map=amap_np,
            mask=mask,
            regions=regions,
            heatmap_range=hm_range,
            adapter_version=threshold_key,
            timings=timings,
        )
