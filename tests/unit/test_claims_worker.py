"""Worker claims checked without a broker or Redis (issue 14, item 1), each against the code that makes it:

- a frame that breaks inspection goes to the DLQ at stage `inspect`, the rest of its batch is published;
- a DLQ record whose value is too large to re-send carries a `value-dropped` header and no value;
- partitions pause once `max_in_flight` frames are in flight and resume only below half of it;
- a calibration in Redis is resumed after a restart only when model, prompts and quantile match.
"""

from __future__ import annotations

import io
import queue
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka import TopicPartition
from PIL import Image

from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.observability.telemetry import Health, WorkerTelemetry
from pipeline.settings import Settings
from pipeline.streaming import envelope
from pipeline.streaming.worker import InspectionWorker
from pipeline.streaming.worker.dead_letters import DLQ_VALUE_MARGIN, DeadLetters
from pipeline.streaming.worker.frames import Batch, DlqFailed, Done, Frame
from pipeline.streaming.worker.housekeeping import Housekeeping
from pipeline.streaming.worker.publishing import RedisStatus
from pipeline.streaming.worker.scoring import BatchScorer
from tests.conftest import make_tiny_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TP0, TP1 = TopicPartition("frames", 0), TopicPartition("frames", 1)


def _png(h: int, w: int, value: int = 120) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _frame(offset: int, value: bytes, line: str = "bottle", tp: TopicPartition = TP0) -> Frame:
    headers = envelope.build_headers(f"f-{offset}", line, "cam-1", time.time_ns(), "image/png")
    f = Frame(tp, 1, offset, line.encode(), value, list(headers))
    f.meta = envelope.parse_meta(f.headers)
    return f


@pytest.fixture(scope="module")
def inspector(text_cache_dir: Path) -> FrameScorer:
    return FrameScorer.from_settings(make_tiny_settings(text_cache_dir))


# --- the DLQ `inspect` stage -----------------------------------------------------------------------
class _Poisoned:
    """The real FrameScorer, except that any batch holding a 40x40 frame raises (a model/shape bug)."""

    def __init__(self, real: FrameScorer) -> None:
        self.real = real

    def score_raw(self, line: str, images: list[np.ndarray], *a: Any, **k: Any) -> Any:
        if any(img.shape[:2] == (40, 40) for img in images):
            raise ValueError("poisoned frame")
        return self.real.score_raw(line, images, *a, **k)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def _scorer(inspector: Any, settings: Settings) -> tuple[BatchScorer, list[tuple[int, str, str]], queue.Queue]:
    dead: list[tuple[int, str, str]] = []
    published: queue.Queue = queue.Queue()
    scorer = BatchScorer(settings, "w-test", inspector, None, WorkerTelemetry(),
                         lambda f, reason, stage: dead.append((f.offset, reason, stage)), published)
    return scorer, dead, published


def test_frame_breaking_inspection_is_dead_lettered_at_stage_inspect(inspector: FrameScorer) -> None:
    scorer, dead, published = _scorer(_Poisoned(inspector), inspector.settings)
    frames = [_frame(0, _png(64, 64)), _frame(1, _png(40, 40)), _frame(2, _png(48, 80)), _frame(3, b"junk")]
    scorer.score_batch(Batch("bottle", frames))
    assert [(o, s) for o, _, s in dead] == [(3, envelope.STAGE_DECODE), (1, envelope.STAGE_INSPECT)]
    assert dead[1][1] == "inspection failed: ValueError: poisoned frame"
    outputs = published.get_nowait()
    assert [f.offset for f, _ in outputs] == [0, 2], "the other frames of the batch are still published"
    assert [(o.result.width, o.result.height) for _, o in outputs] == [(64, 64), (80, 48)]
    assert published.empty()


def test_an_unexpected_error_dead_letters_the_batch_at_stage_inspect_and_the_thread_lives_on(
    inspector: FrameScorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    scorer, dead, published = _scorer(inspector, inspector.settings)

    def broken_output(*a: Any, **k: Any) -> Any:
        raise KeyError("render bug")

    monkeypatch.setattr(scorer, "output", broken_output)
    batches: queue.Queue = queue.Queue()
    batches.put(Batch("bottle", [_frame(0, _png(64, 64)), _frame(1, _png(64, 64))]))
    batches.put(None)
    scorer.run(batches)  # returns (does not raise) once None arrives
    assert [(o, s) for o, _, s in dead] == [(0, envelope.STAGE_INSPECT), (1, envelope.STAGE_INSPECT)]
    assert all(r == "internal error while scoring: KeyError: 'render bug'" for _, r, _ in dead)
    assert published.get_nowait() is None, "the publisher is still told to finish"


# --- value-dropped ---------------------------------------------------------------------------------
class _Future:
    def __init__(self, ok: bool = True) -> None:
        self.ok = ok

    def add_callback(self, fn: Any) -> None:
        if self.ok:
            fn(None)

    def add_errback(self, fn: Any) -> None:
        if not self.ok:
            fn(RuntimeError("broker said no"))


class _Producer:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, topic: str, *, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> _Future:
        self.sent.append({"topic": topic, "key": key, "value": value, "headers": headers})
        return _Future()


def test_a_value_too_large_to_resend_is_dropped_and_says_so(tiny_settings: Settings) -> None:
    kafka = tiny_settings.kafka.model_copy(update={"max_request_size": DLQ_VALUE_MARGIN + 1000})
    telemetry = WorkerTelemetry()
    completions: queue.Queue = queue.Queue()
    dl = DeadLetters(kafka, telemetry, completions, 0.1, producer=_Producer())
    small, limit, big = (_frame(i, b"x" * n) for i, n in enumerate((999, 1000, 1001)))
    for f in (small, limit, big):
        dl.send(f, "undecodable image", envelope.STAGE_DECODE)
    sent = dl.producer.sent
    assert [s["topic"] for s in sent] == [kafka.dlq_topic] * 3
    assert [len(s["value"]) for s in sent] == [999, 1000, 0]
    dropped = [dict(s["headers"]).get("value-dropped") for s in sent]
    assert dropped == [None, None, b"original value of 1001 bytes is too large to re-send"]
    h = dict(sent[2]["headers"])
    assert h[envelope.H_ERROR_STAGE] == b"decode" and h[envelope.H_FRAME_ID] == b"f-2", "the reason still travels"
    done = [completions.get_nowait() for _ in range(3)]
    assert all(isinstance(d, Done) for d in done) and [d.frame.offset for d in done] == [0, 1, 2]
    assert telemetry.frames_dead_lettered.labels("bottle", "decode")._value.get() == 3


def test_a_refused_dlq_send_is_retried_only_while_the_partition_is_owned(tiny_settings: Settings) -> None:
    completions: queue.Queue = queue.Queue()
    dl = DeadLetters(tiny_settings.kafka, WorkerTelemetry(), completions, 0.0, producer=_Producer())
    dl.producer.send = lambda *a, **k: _Future(ok=False)  # type: ignore[method-assign]
    f0, f1 = _frame(0, b"a"), _frame(1, b"b", tp=TP1)
    dl.send(f0, "r0", envelope.STAGE_DECODE)
    dl.send(f1, "r1", envelope.STAGE_SIZE)
    for _ in range(2):
        item = completions.get_nowait()
        assert isinstance(item, DlqFailed)
        dl.failed(item)
    resent: list[int] = []
    dl.send = lambda f, r, s: resent.append(f.offset)  # type: ignore[method-assign]
    dl.retry_due(lambda f: f.tp == TP0)
    assert resent == [0] and dl._retry == []


# --- backpressure: pause at max_in_flight ------------------------------------------------------------
class _Consumer:
    def __init__(self, assigned: set[TopicPartition]) -> None:
        self.assigned = set(assigned)
        self._paused: set[TopicPartition] = set()
        self.polls: list[int] = []
        self.stop_after: tuple[int, InspectionWorker] | None = None

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def pause(self, *tps: TopicPartition) -> None:
        self._paused |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self._paused -= set(tps)

    def poll(self, timeout_ms: int, max_records: int) -> dict:
        self.polls.append(max_records)
        if self.stop_after and len(self.polls) >= self.stop_after[0]:
            self.stop_after[1].stop()
        return {}

    def commit(self, offsets: dict) -> None:
        pass

    def highwater(self, tp: TopicPartition) -> int | None:
        return None


def _backpressure_worker(text_cache_dir: Path, max_in_flight: int) -> tuple[InspectionWorker, _Consumer]:
    s = make_tiny_settings(text_cache_dir, worker={"max_in_flight": max_in_flight, "max_batch": 64,
                                                   "max_wait_ms": 60_000}, kafka={"max_poll_records": 500})
    w = InspectionWorker(s, worker_id="t")
    c = _Consumer({TP0, TP1})
    w.consumer = c
    w.rebalancer.assign([TP0, TP1])
    return w, c


def test_partitions_pause_at_max_in_flight_and_resume_below_half(text_cache_dir: Path) -> None:
    w, c = _backpressure_worker(text_cache_dir, max_in_flight=6)
    frames = []
    for off in range(6):
        tp = (TP0, TP1)[off % 2]
        w.offsets.partitions[tp].add(off)
        frames.append(Frame(tp, w.offsets.partitions[tp].epoch, off, None, b"x", []))
        w._apply_pause()
        assert c.paused() == (set() if off < 5 else {TP0, TP1}), f"{off + 1} frames in flight"
    assert w.telemetry.paused._value.get() == 1
    for n_done, still_paused in ((1, True), (2, True), (3, False)):  # 5, 4 in flight: still paused; 3 = half
        f = frames[n_done - 1]
        w.completions.put(Done(f))
        w.process_completions()
        w._apply_pause()
        assert bool(c.paused()) is still_paused, f"{6 - n_done} frames in flight"
    assert w.telemetry.paused._value.get() == 0


def test_poll_asks_only_for_what_fits_under_max_in_flight(text_cache_dir: Path) -> None:
    w, c = _backpressure_worker(text_cache_dir, max_in_flight=10)
    for off in range(7):
        w.offsets.partitions[TP0].add(off)
    c.stop_after = (1, w)
    w._poll_loop()
    assert c.polls == [3]
    for off in range(7, 12):  # past the limit: paused, and a poll asks for at most one record
        w.offsets.partitions[TP0].add(off)
    w._stop.clear()
    c.stop_after = (2, w)
    w._poll_loop()
    assert c.polls[1:] == [1] and c.paused() == {TP0, TP1}


# --- resuming a calibration from Redis after a restart -------------------------------------------------
class _Publisher:
    """The slice of ResultPublisher that housekeeping uses, over a dict of threshold hashes."""

    def __init__(self, state: dict[str, dict[str, str]]) -> None:
        self.hashes = state
        self.heartbeats = 0

    def ping(self) -> bool:
        return True

    def read_threshold(self, line: str) -> dict[str, str]:
        return dict(self.hashes.get(line, {}))

    def write_threshold(self, line: str, state: dict[str, Any]) -> None:
        self.hashes.setdefault(line, {}).update({k: str(v) for k, v in state.items()})

    def heartbeat(self, fields: dict[str, Any]) -> None:
        self.heartbeats += 1


def _housekeeping(text_cache_dir: Path, state: dict[str, dict[str, str]],
                  quantile: float = 0.5) -> tuple[Housekeeping, FrameScorer, WorkerTelemetry, _Publisher]:
    lines = [{"id": "pcb1", "class_name": "pcb1", "threshold": {"warmup_frames": 4, "quantile": quantile}}]
    s = make_tiny_settings(text_cache_dir, lines=lines)
    insp = FrameScorer.from_settings(s)
    telemetry = WorkerTelemetry()
    pub = _Publisher(state)
    hk = Housekeeping(s, insp, pub, telemetry, RedisStatus(Health(), telemetry), lambda: {"worker": "t"})  # type: ignore[arg-type]
    return hk, insp, telemetry, pub


def test_housekeeping_publishes_the_served_versions_thresholds(text_cache_dir: Path) -> None:
    hk, insp, telemetry, pub = _housekeeping(text_cache_dir, {})
    insp.thresholds("pcb1").set_version("v2", {"pixel": 0.42, "pixel_median": 0.4})
    hk.once()
    h = pub.hashes["pcb1"]
    assert (h["version"], h["version_pixel"], h["pixel"], h["source"]) == ("v2", "0.42", "0.42", "version")
    assert h["image_source"] == "default"
    assert telemetry.threshold.labels("pcb1", "default")._value.get() == 0.5  # the image threshold's source
    pub.hashes["pcb1"]["manual_pixel"] = "0.77"
    hk.once()
    assert pub.hashes["pcb1"]["pixel"] == "0.77" and pub.hashes["pcb1"]["source"] == "manual"


def _calibrated_state(hk: Housekeeping, **over: str) -> dict[str, str]:
    d = {"image": "0.61", "pixel": "0.7", "source": "calibrated", "calibrated_image": "0.61",
         "calibrated_pixel": "0.7", "pixel_median": "0.4", "calibration_frames": "4",
         **hk.calibration_identity("pcb1")}
    d.update(over)
    return d


def test_a_restarted_worker_resumes_a_matching_calibration(text_cache_dir: Path) -> None:
    hk, insp, telemetry, pub = _housekeeping(text_cache_dir, {})
    pub.hashes["pcb1"] = _calibrated_state(hk)
    hk.once()
    th = insp.thresholds("pcb1")
    assert th.source == "calibrated" and not th.calibrating
    assert (th.image, th.pixel, th.calibration.pixel_median, th.calibration.frames) == (0.61, 0.7, 0.4, 4)
    assert telemetry.threshold.labels("pcb1", "calibrated")._value.get() == 0.61
    assert pub.hashes["pcb1"]["calibrated_model"] == "anoclip-tiny/none/fp32" and pub.heartbeats == 1


@pytest.mark.parametrize("stale", ["calibrated_model", "calibrated_prompts", "calibrated_quantile"])
def test_a_calibration_made_with_another_model_prompt_set_or_quantile_is_not_resumed(
    text_cache_dir: Path, stale: str
) -> None:
    hk, insp, telemetry, pub = _housekeeping(text_cache_dir, {})
    pub.hashes["pcb1"] = _calibrated_state(hk, **{stale: "something-else"})
    hk.once()
    th = insp.thresholds("pcb1")
    assert th.calibration is None and th.calibrating and th.source == "default"
    assert pub.hashes["pcb1"]["source"] == "default", "the worker's own view replaces the stale one"
    assert telemetry.threshold.labels("pcb1", "default")._value.get() == 0.5


def test_a_quantile_change_alone_refuses_the_old_calibration(text_cache_dir: Path) -> None:
    old, _, _, _ = _housekeeping(text_cache_dir, {}, quantile=0.5)
    state = _calibrated_state(old)
    hk, insp, _, _ = _housekeeping(text_cache_dir, {"pcb1": state}, quantile=0.9)
    hk.once()
    assert insp.thresholds("pcb1").calibration is None


def test_an_unreadable_or_late_calibration_is_ignored(text_cache_dir: Path) -> None:
    hk, insp, _, pub = _housekeeping(text_cache_dir, {})
    pub.hashes["pcb1"] = _calibrated_state(hk, calibrated_image="not-a-number")
    hk.once()
    assert insp.thresholds("pcb1").calibration is None, "garbage is not resumed"
    assert pub.hashes["pcb1"]["source"] == "default" and pub.heartbeats == 1, "...and the cycle goes on"
    pub.hashes["pcb1"] = _calibrated_state(hk, pixel_median="x")
    hk.once()
    assert insp.thresholds("pcb1").calibration is None, "a calibration that does not parse whole is not resumed"


def test_workers_sharing_a_line_converge_on_one_calibration(text_cache_dir: Path) -> None:
    """One line over two workers (frames keyed by frame id) is judged by one threshold, whoever calibrated it."""
    state: dict[str, dict[str, str]] = {}
    ha, ia, _, pub = _housekeeping(text_cache_dir, state)
    hb, ib, _, _ = _housekeeping(text_cache_dir, state)  # the same Redis hash
    ha.once(), hb.once()  # both calibrating: nothing to adopt yet
    assert ia.thresholds("pcb1").calibrating and ib.thresholds("pcb1").calibrating
    rng = np.random.default_rng(0)
    for score in (0.1, 0.2, 0.3, 0.4):  # A saw four frames first
        ia.thresholds("pcb1").observe(score, rng.random((8, 8)) * 0.1)
    ha.once()
    a_image = ia.thresholds("pcb1").image
    assert float(pub.hashes["pcb1"]["calibrated_image"]) == pytest.approx(a_image)
    hb.once()  # B, still warming up, adopts the line's calibration instead of making its own
    assert not ib.thresholds("pcb1").calibrating and ib.thresholds("pcb1").image == pytest.approx(a_image)

    ib.thresholds("pcb1").calibration = None  # B finishing its own warm-up after A published gives it up
    for score in (0.7, 0.8, 0.9, 0.95):
        ib.thresholds("pcb1").observe(score, rng.random((8, 8)))
    assert ib.thresholds("pcb1").image != pytest.approx(a_image)
    hb.once()
    assert ib.thresholds("pcb1").image == pytest.approx(a_image)
    assert float(pub.hashes["pcb1"]["calibrated_image"]) == pytest.approx(a_image)

    pub.hashes["pcb1"]["calibrated_image"] = "0.6"  # two finished in one heartbeat: the last write wins...
    ha.once(), hb.once()  # ...and the other adopts it on its next heartbeat
    assert ia.thresholds("pcb1").image == ib.thresholds("pcb1").image == pytest.approx(0.6)
