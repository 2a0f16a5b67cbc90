"""Issue 15, findings 1 and 2: a frame's cost is bounded whatever its geometry.

Extreme aspect ratios are refused from the header (DLQ stage `decode`, reason naming the limit), and a
large frame is judged, masked and rendered at `worker.render_max_side`, never at its own 49 Mpx, while
its result (size, regions, defect area) stays in frame pixels.
"""

from __future__ import annotations

import io
import queue
import time
from pathlib import Path

import numpy as np
import pytest
from kafka import TopicPartition
from PIL import Image

from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.observability.telemetry import WorkerTelemetry
from pipeline.settings import Settings
from pipeline.streaming import envelope
from pipeline.streaming.worker.frames import Batch, Frame
from pipeline.streaming.worker.scoring import BatchScorer
from tests.conftest import make_tiny_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _png(width: int, height: int, value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (value, value, value)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _frame(offset: int, value: bytes) -> Frame:
    headers = envelope.build_headers(f"f-{offset}", "bottle", "cam-1", time.time_ns(), "image/png")
    f = Frame(TopicPartition("frames", 0), 1, offset, b"k", value, list(headers))
    f.meta = envelope.parse_meta(f.headers)
    return f


@pytest.fixture(scope="module")
def settings(text_cache_dir: Path) -> Settings:
    # pixel threshold 0: every pixel is "defect", so the mask and its one region cover the whole frame
    return make_tiny_settings(text_cache_dir, lines=[{"id": "bottle", "class_name": "bottle",
                                                      "threshold": {"image": 0.0, "pixel": 0.0}}])


def _scorer(settings: Settings) -> tuple[BatchScorer, list[tuple[int, str, str]], queue.Queue]:
    dead: list[tuple[int, str, str]] = []
    published: queue.Queue = queue.Queue()
    scorer = BatchScorer(settings, "w-test", FrameScorer.from_settings(settings), None, WorkerTelemetry(),
                         lambda f, reason, stage: dead.append((f.offset, reason, stage)), published)
    return scorer, dead, published


def test_strips_are_dead_lettered_at_decode_naming_the_limit(settings: Settings) -> None:
    scorer, dead, published = _scorer(settings)
    strip = _png(1, 6000)
    assert len(strip) < 20_000  # the 18 KB PNG that held a scorer 28 s
    scorer.score_batch(Batch("bottle", [_frame(0, strip), _frame(1, _png(6000, 1)), _frame(2, _png(64, 64))]))
    assert [(o, s) for o, _, s in dead] == [(0, envelope.STAGE_DECODE), (1, envelope.STAGE_DECODE)]
    assert all("worker.max_aspect_ratio (8)" in reason for _, reason, _ in dead)
    assert [f.offset for f, _ in published.get_nowait()] == [2], "the good frame of the batch is still scored"


def test_a_49_mpx_frame_is_rendered_at_the_bounded_size(settings: Settings) -> None:
    scorer, dead, published = _scorer(settings)
    big = _png(7000, 7000, 90)
    assert len(big) < 300_000  # a small file: decoding it is what costs
    scorer.score_batch(Batch("bottle", [_frame(0, big)]))
    assert not dead
    ((_, out),) = published.get_nowait()
    cap = settings.worker.render_max_side
    mask = Image.open(io.BytesIO(out.mask_png))
    heat = Image.open(io.BytesIO(out.heatmap_png))
    assert mask.size == heat.size == (cap, cap), "mask and heatmap at render_max_side, not 7000 x 7000"
    r = out.result
    assert (r.width, r.height) == (7000, 7000), "the result still describes the frame"
    assert r.regions[0]["box"] == [0, 0, 7000, 7000], "regions in frame pixels"
    assert r.defect_area == 7000 * 7000


def test_the_worker_limits_are_configurable(text_cache_dir: Path) -> None:
    s = make_tiny_settings(text_cache_dir, worker={"max_side": 4096, "render_max_side": 256})
    scorer, dead, published = _scorer(s)
    scorer.score_batch(Batch("bottle", [_frame(0, _png(7000, 7000)), _frame(1, _png(600, 300))]))
    assert [(o, s) for o, _, s in dead] == [(0, envelope.STAGE_DECODE)]
    assert "long side of 7000 px exceeds worker.max_side (4096)" in dead[0][1]
    ((_, out),) = published.get_nowait()
    assert Image.open(io.BytesIO(out.mask_png)).size == (256, 128)
    assert (out.result.width, out.result.height) == (600, 300)
    assert np.asarray(Image.open(io.BytesIO(out.heatmap_png))).shape == (128, 256, 3)
