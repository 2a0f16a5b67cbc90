"""Worker claims end to end on the real broker and a real Redis (issue 14, item 1; the unit versions of
these are in tests/unit/test_claims_worker.py):

- a dead letter whose value is too large to re-send arrives with no value and a `value-dropped` header;
- the worker never holds more than `max_in_flight` frames and pauses its partitions at that mark;
- a restarted worker resumes a line's calibration from Redis, unless the quantile it was made with changed.
"""

from __future__ import annotations

import time

import pytest

from pipeline.model import build_prompt_set
from pipeline.streaming import envelope as env
from pipeline.streaming.producer import FrameProducer
from pipeline.streaming.worker.dead_letters import DLQ_VALUE_MARGIN
from tests.integration.conftest import Pipeline, synthetic_frame, wait_for

pytestmark = pytest.mark.integration


def test_dead_letter_too_large_to_resend_keeps_headers_and_drops_the_value(pipeline: Pipeline) -> None:
    producer = FrameProducer(pipeline.settings)  # sends with the default 16 MiB request limit
    pipeline.config["kafka"]["max_request_size"] = DLQ_VALUE_MARGIN + 1000  # the worker's DLQ producer: 1000 B
    worker = pipeline.start_worker("w1")
    cases = {"small": b"\x00not an image" * 40, "large": b"\x00not an image" * 400}  # 560 and 5600 bytes
    for case, value in cases.items():
        headers = env.build_headers(f"big-{case}", "bottle", "cam-1", time.time_ns(), "image/jpeg")
        producer.send_raw(b"bottle", value, [*headers, ("test-case", case.encode())])
    good = producer.send("bottle", synthetic_frame("bottle", 1))
    producer.close()
    worker.wait_ready()

    def dlq() -> dict | None:
        got = {dict(r.headers)["test-case"].decode(): r for r in pipeline.dlq_records()}
        return got if len(got) == 2 else None

    records = wait_for(dlq, 45, "2 DLQ records")
    small, large = records["small"], records["large"]
    assert small.value == cases["small"] and "value-dropped" not in dict(small.headers)
    h = dict(large.headers)
    assert large.value in (b"", None)
    assert h["value-dropped"] == f"original value of {len(cases['large'])} bytes is too large to re-send".encode()
    assert h[env.H_FRAME_ID] == b"big-large" and h[env.H_ERROR_STAGE] == b"decode"
    assert b"undecodable" in h[env.H_ERROR]
    wait_for(lambda: [r["frame_id"] for r in pipeline.results()] == [good], 30, "the good frame's result")
    wait_for(lambda: sum(pipeline.committed().values()) == 3, 15, "all 3 offsets committed")


def test_in_flight_frames_never_exceed_max_in_flight_and_partitions_pause_there(pipeline: Pipeline) -> None:
    # Frames wait up to 2.5 s for a batch that never fills, so polled frames stay in flight that long.
    worker = pipeline.start_worker("w1", max_in_flight=4, max_batch=64, max_wait_ms=2500)
    worker.wait_ready()
    producer = FrameProducer(pipeline.settings)
    ids = [producer.send(("bottle", "wood")[i % 2], synthetic_frame("bottle", i)) for i in range(12)]
    producer.close()
    seen_in_flight, seen_paused = [], []
    end = time.monotonic() + 60
    while len(pipeline.results()) < 12 and time.monotonic() < end:
        seen_in_flight.append(worker.metric("anoclip_frames_in_flight"))
        seen_paused.append(worker.metric("anoclip_consumer_paused"))
        time.sleep(0.1)
    assert sorted(r["frame_id"] for r in pipeline.results()) == sorted(ids), "every frame was scored"
    assert max(seen_in_flight) == 4, f"in flight peaked at {max(seen_in_flight)} with max_in_flight 4"
    assert 1 in seen_paused, "the partitions were paused at the mark"
    wait_for(lambda: worker.metric("anoclip_consumer_paused") == 0, 10, "the partitions to be resumed")
    assert worker.metric("anoclip_frames_in_flight") == 0


def _threshold(p: Pipeline) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in p.redis().hgetall(p.keys.threshold("pcb1")).items()}


def _seed_calibration(p: Pipeline, quantile: float) -> float:
    """pcb1's threshold hash as a worker that calibrated at `quantile` leaves it (see Housekeeping)."""
    s = p.settings
    line = s.line("pcb1")
    prompts = build_prompt_set(line.class_name, line.domain, line.extra_normal_states, line.extra_abnormal_states)
    image = 0.4321
    p.redis().hset(p.keys.threshold("pcb1"), mapping={
        "image": image, "pixel": 0.6, "source": "calibrated", "calibrated_image": image, "calibrated_pixel": 0.6,
        "pixel_median": 0.45, "calibration_frames": 4, "worker": "before-restart",
        "calibrated_model": f"{s.model.arch}/{s.model.pretrained}/{s.model.precision}",
        "calibrated_prompts": prompts.hash, "calibrated_quantile": str(quantile)})
    return image


def test_a_restarted_worker_resumes_the_calibration_in_redis(pipeline: Pipeline) -> None:
    assert pipeline.config["lines"][2]["threshold"]["quantile"] == 0.5
    image = _seed_calibration(pipeline, 0.5)
    w = pipeline.start_worker("w")  # pcb1 would otherwise calibrate afresh over its first 4 frames
    w.wait_ready()
    assert w.metric("anoclip_line_threshold", line="pcb1", source="calibrated") == image
    assert _threshold(pipeline)["worker"] == "w" and _threshold(pipeline)["calibration_frames"] == "4"
    producer = FrameProducer(pipeline.settings)
    fid = producer.send("pcb1", synthetic_frame("pcb1", 0))
    producer.close()
    (result,) = wait_for(lambda: pipeline.results(["pcb1"]), 30, "the pcb1 result")
    assert result["frame_id"] == fid
    assert float(result["threshold"]) == image, "the first frame after the restart is judged by the old calibration"
    assert "resumed calibrated thresholds from Redis" in w.log()


def test_a_calibration_made_at_another_quantile_is_not_resumed(pipeline: Pipeline) -> None:
    _seed_calibration(pipeline, 0.9)  # the config says 0.5 now
    w = pipeline.start_worker("w")
    w.wait_ready()
    assert _threshold(pipeline)["worker"] == "w" and _threshold(pipeline)["source"] == "default"
    assert w.metric("anoclip_line_threshold", line="pcb1", source="default") == 0.5
    assert w.metric("anoclip_line_threshold", line="pcb1", source="calibrated") != 0.4321
    assert "not resuming the calibration in Redis" in w.log()
