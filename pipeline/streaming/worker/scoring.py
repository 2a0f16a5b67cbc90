"""The scorer thread: decode each batch's frames, score and judge them with the line's adapter, render
mask and heatmap, and hand the results to the publisher. Frames that cannot be scored go to the DLQ."""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipeline.adaptation.memory.service import MemoryService
from pipeline.adaptation.tta.service import AdapterService
from pipeline.errors import ImageError
from pipeline.inspection.frame_scorer import FrameScorer, Inspection
from pipeline.inspection.imaging import GeometryLimits, decode_image
from pipeline.inspection.render import heatmap_png, mask_png
from pipeline.observability.telemetry import WorkerTelemetry
from pipeline.settings import Settings
from pipeline.streaming import envelope
from pipeline.streaming.records import FrameResult
from pipeline.streaming.redis_io import FrameOutput
from pipeline.streaming.worker.frames import Batch, Frame
from pipeline.verdicts.inspector import Inspector, Verdict

log = logging.getLogger("anoclip.worker")

DeadLetter = Callable[[Frame, str, str], None]
"""(frame, reason, stage): send a frame to the DLQ."""


@dataclass
class BatchScorer:
    """Turns batches of frames into published outputs (scorer thread only)."""

    settings: Settings
    worker_id: str
    inspector: FrameScorer
    adapters: AdapterService | None
    telemetry: WorkerTelemetry
    dead_letter: DeadLetter
    publish: queue.Queue[list[tuple[Frame, FrameOutput]] | None]
    memory: MemoryService | None = None
    """The patch memory of `memory: stream` lines (`pipeline.adaptation.memory.service`); None: none has it."""
    limits: GeometryLimits = field(init=False)
    """Frame geometry checked from the header before decoding (refused frames go to the DLQ, stage decode)."""
    path: Inspector = field(init=False)
    """The one verdict path, with this worker's adapters and memory; the line's thresholds are calibrated here."""

    def __post_init__(self) -> None:
        self.path = Inspector(self.inspector, adapters=self.adapters.adapter_for if self.adapters else None,
                              memory=self.memory, render_max_side=self.settings.worker.render_max_side)
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

    def inspect(self, line: str, frames: list[Frame], images: list[np.ndarray]) -> list[Verdict]:
        """Score and judge frames of one line on the one verdict path (its adapter, its memory bank, its
        thresholds), then offer each frame to the line's TTA buffer."""
        t0 = time.perf_counter()
        ids = [f.meta.frame_id if f.meta is not None else "" for f in frames]
        verdicts = self.path.inspect_frames(line, images, ids)
        per_frame_s = (time.perf_counter() - t0) / max(1, len(images))
        if self.adapters is not None:
            for f, v in zip(frames, verdicts, strict=True):
                assert f.meta is not None
                self.adapters.observe(line, f.meta.frame_id, v.raw, per_frame_s, f.meta.capture_ts_ns / 1e9,
                                      judged_anomalous=v.inspection.verdict)
        return verdicts

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
            inspections = list(zip(good, self.inspect(batch.line, [f for f, _ in good], [img for _, img in good]),
                                   strict=True))
        except Exception:  # find the frame that breaks the batch, score the others
            log.exception("batch inspection failed; scoring %d frames one by one", len(good))
            inspections = []
            for f, img in good:
                try:
                    (judged,) = self.inspect(batch.line, [f], [img])
                    inspections.append(((f, img), judged))
                except (ImageError, ValueError, RuntimeError) as e:
                    self.dead_letter(f, f"inspection failed: {type(e).__name__}: {e}", envelope.STAGE_INSPECT)
        model_s = time.perf_counter() - t0
        self.telemetry.inference_seconds.labels(batch.line).observe(model_s)
        self.telemetry.batch_size.labels(batch.line).observe(len(good))
        outputs = [(f, self.output(f, img, v.inspection)) for (f, img), v in inspections]
        if outputs:
            self.publish.put(outputs)

    def output(self, f: Frame, img: np.ndarray, insp: Inspection) -> FrameOutput:
        assert f.meta is not None and f.value is not None
        lo, hi = insp.heatmap_range
        result = FrameResult.from_inspection(insp, f.meta, width=int(img.shape[1]), height=int(img.shape[0]),
                                             partition=f.tp.partition, offset=f.offset, worker=self.worker_id,
                                             bank_version=insp.bank_version)
        return FrameOutput(result, mask_png(insp.mask), heatmap_png(img, insp.anomaly_map, lo, hi, insp.mask),
                           image=f.value)
