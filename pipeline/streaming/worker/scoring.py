"""The scorer thread: decode each batch's frames, score and judge them with the line's adapter, render
mask and heatmap, and hand the results to the publisher. Frames that cannot be scored go to the DLQ."""

from __future__ import annotations

import dataclasses
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipeline.adaptation.memory.service import MemoryService
from pipeline.adaptation.tta.service import AdapterService
from pipeline.errors import ImageError
from pipeline.inspection.imaging import GeometryLimits, decode_image
from pipeline.inspection.inspector import Inspection, Inspector
from pipeline.inspection.render import bounded_size, heatmap_png, mask_png
from pipeline.observability.telemetry import WorkerTelemetry
from pipeline.settings import Settings
from pipeline.streaming import envelope
from pipeline.streaming.records import FrameResult
from pipeline.streaming.redis_io import FrameOutput
from pipeline.streaming.worker.frames import Batch, Frame

log = logging.getLogger("anoclip.worker")

DeadLetter = Callable[[Frame, str, str], None]
"""(frame, reason, stage): send a frame to the DLQ."""


@dataclass
class BatchScorer:
    """Turns batches of frames into published outputs (scorer thread only)."""

    settings: Settings
    worker_id: str
    inspector: Inspector
    adapters: AdapterService | None
    telemetry: WorkerTelemetry
    dead_letter: DeadLetter
    publish: queue.Queue[list[tuple[Frame, FrameOutput]] | None]
    memory: MemoryService | None = None
    """The patch memory of `memory: stream` lines (`pipeline.adaptation.memory.service`); None: none has it."""
    limits: GeometryLimits = field(init=False)
    """Frame geometry checked from the header before decoding (refused frames go to the DLQ, stage decode)."""

    def __post_init__(self) -> None:
        self.limits = GeometryLimits.from_settings(self.settings.worker, self.inspector.model.image_size,
                                                   self.settings.model.resize)

    def run(self, batches: queue.Queue[Batch | None]) -> None:
        """Score batches until None arrives, then tell the publisher to finish."""
        while True:
            batch = batches.get()
            if batch is None:
                self.publish.put(None)
                return
            try:
                self.score_batch(batch)
            except Exception as e:  # a bug must not kill the thread and stall every partition
                log.exception("scoring a batch of %d %s frames failed", len(batch.frames), batch.line)
                for f in batch.frames:
                    self.dead_letter(f, f"internal error while scoring: {type(e).__name__}: {e}",
                                     envelope.STAGE_INSPECT)

    def adapter_for(self, line: str) -> tuple[object, str | None]:
        """The line's current adapter and its version (None, None: the base model)."""
        return self.adapters.adapter_for(line) if self.adapters is not None else (None, None)

    def inspect(self, line: str, frames: list[Frame], images: list[np.ndarray]) -> list[Inspection]:
        """Score and judge frames of one line with its adapter; feed the line's TTA buffer."""
        return [insp for insp, _ in self.inspect_banks(line, frames, images)]

    def inspect_banks(self, line: str, frames: list[Frame],
                      images: list[np.ndarray]) -> list[tuple[Inspection, str | None]]:
        """`inspect`, with the memory bank version that scored each frame (None: memory off or cold start).

        A `memory: stream` line's frames are judged on the memory's fused map and score (z units), with the
        thresholds of the bank that scored them; the zero-shot outputs still feed the TTA buffer."""
        adapter, version = self.adapter_for(line)
        tta = "per_frame" if self.settings.tta.mode == "per_frame" else None
        memory = self.memory if self.memory is not None and self.memory.serves(line) else None
        t0 = time.perf_counter()
        raws = self.inspector.score_raw(line, images, adapter, tta,
                                        hidden_layers=memory.hidden_layers if memory is not None else ())
        if memory is not None:
            ids = [f.meta.frame_id if f.meta is not None else "" for f in frames]
            outcomes = memory.score(line, raws, ids)
            judged = [(o.raw, o.threshold_key, o.bank_version) for o in outcomes]
        else:
            judged = [(r, "per_frame" if tta else version, None) for r in raws]
        per_frame_s = (time.perf_counter() - t0) / max(1, len(images))
        # Judged (map, mask, regions) at a bounded size, not at the frame's: the map comes from a grid of a
        # few hundred pixels, and a 50 Mpx copy of it cost seconds and gigabytes per frame.
        cap = self.settings.worker.render_max_side
        out = []
        for r, key, bank in judged:
            insp = self.inspector.judge(line, dataclasses.replace(r, frame_hw=bounded_size(*r.frame_hw, cap)), key)
            if memory is not None:  # judged with the bank's thresholds; the result still names the adapter
                insp = dataclasses.replace(insp, adapter_version="per_frame" if tta else version)
            out.append((insp, bank))
        if self.adapters is not None:
            for f, r in zip(frames, raws, strict=True):
                assert f.meta is not None
                self.adapters.observe(line, f.meta.frame_id, r, per_frame_s, f.meta.capture_ts_ns / 1e9)
        return out

    def score_batch(self, batch: Batch) -> None:
        good: list[tuple[Frame, np.ndarray]] = []
        for f in batch.frames:
            assert f.meta is not None and f.value is not None
            try:
                img = decode_image(f.value, content_type=f.meta.content_type, limits=self.limits)
            except ImageError as e:
                self.dead_letter(f, str(e), envelope.STAGE_DECODE)
                continue
            good.append((f, img))
        if not good:
            return
        t0 = time.perf_counter()
        try:
            inspections = list(zip(good, self.inspect_banks(batch.line, [f for f, _ in good],
                                                            [img for _, img in good]), strict=True))
        except Exception:  # find the frame that breaks the batch, score the others
            log.exception("batch inspection failed; scoring %d frames one by one", len(good))
            inspections = []
            for f, img in good:
                try:
                    (judged,) = self.inspect_banks(batch.line, [f], [img])
                    inspections.append(((f, img), judged))
                except (ImageError, ValueError, RuntimeError) as e:
                    self.dead_letter(f, f"inspection failed: {type(e).__name__}: {e}", envelope.STAGE_INSPECT)
        model_s = time.perf_counter() - t0
        self.telemetry.inference_seconds.labels(batch.line).observe(model_s)
        self.telemetry.batch_size.labels(batch.line).observe(len(good))
        outputs = [(f, self.output(f, img, insp, bank)) for (f, img), (insp, bank) in inspections]
        if outputs:
            self.publish.put(outputs)

    def output(self, f: Frame, img: np.ndarray, insp: Inspection, bank_version: str | None = None) -> FrameOutput:
        assert f.meta is not None and f.value is not None
        lo, hi = insp.heatmap_range
        result = FrameResult.from_inspection(insp, f.meta, width=int(img.shape[1]), height=int(img.shape[0]),
                                             partition=f.tp.partition, offset=f.offset, worker=self.worker_id,
                                             bank_version=bank_version)
        return FrameOutput(result, mask_png(insp.mask), heatmap_png(img, insp.anomaly_map, lo, hi, insp.mask),
                           image=f.value)
