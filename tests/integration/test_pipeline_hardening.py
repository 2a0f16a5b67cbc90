"""Issue 15 through the real broker and Redis: bounded input, reused frame ids, lag while paused, the broker
in readiness, and one line scored by two workers."""

from __future__ import annotations

import io
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pipeline.streaming import envelope as env
from pipeline.streaming import local_stack as stack
from pipeline.streaming.kafka_io import ensure_topics
from pipeline.streaming.producer import FrameProducer
from tests.integration.conftest import (
    TANSU_CACHE,
    Broker,
    Pipeline,
    RedisServer,
    make_pipeline_config,
    synthetic_frame,
    wait_for,
)

pytestmark = pytest.mark.integration


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (40, 40, 40)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _headers(fid: str, line: str = "bottle", ctype: str = "image/png") -> list[tuple[str, bytes]]:
    return env.build_headers(fid, line, "cam-1", time.time_ns(), ctype) + [("test-case", fid.encode())]


def test_bad_geometry_bad_ids_and_reused_ids_are_dead_lettered(pipeline: Pipeline) -> None:
    worker = pipeline.start_worker("w1", max_side=4096)
    worker.wait_ready()
    producer = FrameProducer(pipeline.settings)
    first = synthetic_frame("bottle", 1)
    reused_id = producer.send("bottle", first)
    producer.flush()
    wait_for(lambda: len(pipeline.results()) >= 1, 30, "the first frame's result")

    # case -> (record value, headers, expected stage, words in the reason)
    bad = {
        "strip": (_png(1, 6000), _headers("strip"), "decode", "worker.max_aspect_ratio"),
        "huge": (_png(7000, 7000), _headers("huge"), "decode", "exceeds worker.max_side (4096)"),
        "slash": (first.data, _headers("cam/1"), "headers", "it contains '/'"),
        "dots": (first.data, _headers("a..b"), "headers", "it contains '..'"),
        "ascii": (first.data, _headers("fr\u00e4me"), "headers", "not ASCII"),
        "conflict": (synthetic_frame("bottle", 2).data, _headers(reused_id, ctype="image/jpeg"), "conflict",
                     f"frame id {reused_id!r} was already published with other content"),
    }
    for value, headers, _, _ in bad.values():
        producer.send_raw(b"k", value, headers)
    replay = env.build_headers(reused_id, "bottle", "cam-1", time.time_ns(), first.content_type)
    producer.send_raw(b"k", first.data, replay)  # a true replay: same bytes, skipped silently
    good = producer.send("bottle", synthetic_frame("bottle", 3))
    producer.close()

    def dlq() -> dict[str, dict[str, str]] | None:
        got = {}
        for rec in pipeline.dlq_records():
            h = {k: v.decode(errors="replace") for k, v in rec.headers}
            got[h.get("test-case", "")] = h
        return got if len(got) >= len(bad) else None

    records = wait_for(dlq, 60, f"{len(bad)} DLQ records")
    by_case = {case: records[headers[-1][1].decode()] for case, (_, headers, _, _) in bad.items()}
    for case, (_, _, stage, words) in bad.items():
        h = by_case[case]
        assert h["error-stage"] == stage and words in h["error"], f"{case}: {h['error-stage']}: {h['error']}"
    wait_for(lambda: good in {x["frame_id"] for x in pipeline.results()}, 30, "the good frame after them")
    assert Counter(x["frame_id"] for x in pipeline.results()) == {reused_id: 1, good: 1}
    assert worker.metric("anoclip_frame_id_conflicts_total", line="bottle") == 1
    assert worker.metric("anoclip_duplicates_skipped_total", line="bottle") == 1, "the true replay"
    assert worker.metric("anoclip_frames_dead_lettered_total", stage="conflict") == 1
    wait_for(lambda: sum(pipeline.committed().values()) == len(bad) + 3, 15, "every offset committed")
    assert worker.alive()


def test_two_workers_score_one_line(pipeline: Pipeline) -> None:
    """Frames are keyed by frame id: one line spreads over the four partitions and both workers score it."""
    a = pipeline.start_worker("a")
    b = pipeline.start_worker("b")
    a.wait_ready()
    b.wait_ready()
    producer = FrameProducer(pipeline.settings)
    ids = [producer.send("bottle", synthetic_frame("bottle", i)) for i in range(40)]
    producer.close()
    wait_for(lambda: len(pipeline.results()) >= 40, 60, "40 results")
    results = pipeline.results()
    assert sorted(x["frame_id"] for x in results) == sorted(ids), "each frame exactly once"
    assert {int(x["partition"]) for x in results} == {0, 1, 2, 3}, "one line on every partition"
    by_worker = Counter(x["worker"] for x in results)
    assert by_worker["a"] > 0 and by_worker["b"] > 0, f"both workers scored the line: {by_worker}"
    assert a.metric("anoclip_frames_scored_total", line="bottle") == by_worker["a"]
    assert b.metric("anoclip_frames_scored_total", line="bottle") == by_worker["b"]


def test_lag_counts_frames_waiting_while_paused(pipeline_own_redis: Pipeline) -> None:
    p = pipeline_own_redis
    w = p.start_worker("w")
    w.wait_ready()
    assert w.metric("anoclip_consumer_lag") == 0
    p.redis_server.stop()
    wait_for(lambda: w.metric("anoclip_consumer_paused") == 1 or w.health()[1].get("redis") is False, 15,
             "the worker to notice Redis is down")
    producer = FrameProducer(p.settings)
    for i in range(30):
        producer.send("wood", synthetic_frame("wood", i))
    producer.close()
    wait_for(lambda: w.metric("anoclip_consumer_paused") == 1, 15, "partitions paused")
    wait_for(lambda: w.metric("anoclip_consumer_lag") == 30, 20, "the lag to count the 30 waiting frames")
    code, body = w.health()
    assert code == 503 and body["redis"] is False and body["broker"] is True
    p.redis_server.start()
    wait_for(lambda: len(p.results()) >= 30, 60, "30 results once Redis is back")
    wait_for(lambda: w.metric("anoclip_consumer_lag") == 0, 20, "the lag back to 0")


def test_broker_down_fails_readiness_and_the_worker_stays_live(redis_server: RedisServer, text_cache_dir: Path,
                                                                tmp_path: Path) -> None:
    port = stack.free_port()
    run = tmp_path / "tansu"
    stack.start_broker(stack.fetch_tansu(TANSU_CACHE), run, "127.0.0.1", port)  # a broker of its own, to stop
    own = Broker(f"127.0.0.1:{port}", run, port)
    p = Pipeline(make_pipeline_config(own, redis_server.url, text_cache_dir), tmp_path, redis_server)
    ensure_topics(p.settings.kafka)
    w = p.start_worker("w")
    try:
        w.wait_ready()
        assert w.metric("anoclip_broker_up") == 1
        stack.stop_broker(run, port)
        wait_for(lambda: w.health()[1].get("broker") is False, 30, "readiness to report the broker down")
        code, body = w.health()
        assert code == 503 and any("Kafka broker at" in x and "unreachable" in x for x in body["problems"])
        assert w.metric("anoclip_broker_up") == 0
        assert w.health("/healthz")[0] == 200 and w.alive(), "live: not restarted into a crash loop"
    finally:
        p.stop_all()
        stack.stop_broker(run, port)
