"""The result publisher against a real Redis: atomic per frame, idempotent, trimmed, TTL'd."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from pipeline.inspection.thresholds import manual_override
from pipeline.services.redis_client import RETRYABLE
from pipeline.settings import RedisSettings
from pipeline.streaming import redis_io
from pipeline.streaming.local_stack import free_port, start_redis, stop_redis
from pipeline.streaming.records import FrameResult
from pipeline.streaming.redis_io import CONFLICT, DUPLICATE, WRITTEN, FrameOutput, ResultPublisher
from tests.integration.conftest import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture
def publisher(redis_server: RedisServer) -> ResultPublisher:
    rs = RedisSettings(url=redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}", results_maxlen=100,
                       frame_ttl_s=600, heartbeat_ttl_s=5)
    return ResultPublisher.from_settings(rs, "w-test")


def _out(fid: str, ts: int, alert: bool, line: str = "bottle", image: bytes | None = None,
         heat: bytes | None = None) -> FrameOutput:
    result = FrameResult(fid, line, ts, score=0.9 if alert else 0.1, anomalous=alert, threshold=0.5,
                         pixel_threshold=0.5, regions=[{"area": 4, "box": [1, 2, 3, 4]}] if alert else [],
                         defect_area=4 if alert else 0)
    return FrameOutput(result, b"mask-" + fid.encode(), heat or b"heat-" + fid.encode(),
                       b"image-" + fid.encode() if image is None else image)


def test_publish_once_then_replays_change_nothing(publisher: ResultPublisher) -> None:
    r, k = publisher.client, publisher.keys
    sub = r.pubsub()
    sub.subscribe(k.live_channel)
    t = time.time_ns()
    batch = [_out("a", t, True), _out("b", t + 1, False), _out("c", t + 2, True)]
    assert publisher.publish(batch) == [True, True, True]
    assert r.xlen(k.results_stream("bottle")) == 3
    alerts = r.xrange(k.alerts_stream)
    assert [f[b"frame_id"] for _, f in alerts] == [b"a", b"c"]
    assert json.loads(alerts[0][1][b"regions"]) == [{"area": 4, "box": [1, 2, 3, 4]}]
    assert r.get(k.frame("a", "image")) == b"image-a" and r.get(k.frame("b", "image")) is None
    assert 0 < r.ttl(k.frame("b", "mask")) <= 600
    assert r.ttl(k.done_marker("b")) == -1, "done markers carry no TTL: volatile-lru can never evict them"
    assert r.zscore(k.done_index, "b") is not None
    assert r.get(k.frame("b", "heatmap")) is None and r.get(k.frame("a", "heatmap")) == b"heat-a", \
        "default image policy: per-frame heatmaps for alerts only"
    assert r.get(k.frame("b", "mask")) == b"mask-b"
    assert json.loads(r.get(k.latest("bottle", "result")))["frame_id"] == "c"

    watched = (k.frame("a", "mask"), k.frame("a", "result"), k.alerts_stream, k.results_stream("bottle"))
    snapshot = {key: r.dump(key) for key in watched}
    assert publisher.publish(batch + [_out("d", t + 3, False)]) == [False, False, False, True]
    assert r.xlen(k.results_stream("bottle")) == 4
    assert r.xlen(k.alerts_stream) == 2
    for key in watched[:3]:
        assert r.dump(key) == snapshot[key], key

    msgs = []
    end = time.monotonic() + 5
    while len(msgs) < 4 and time.monotonic() < end:
        m = sub.get_message(timeout=0.2)
        if m and m["type"] == "message":
            msgs.append(json.loads(m["data"])["frame_id"])
    assert msgs == ["a", "b", "c", "d"], "one live notification per new frame, none for replays"


def test_latest_never_moves_back_to_an_older_frame(publisher: ResultPublisher) -> None:
    r, k = publisher.client, publisher.keys
    t = time.time_ns()
    publisher.publish([_out("new", t, False)])
    publisher.publish([_out("old", t - 1_000_000, True)])  # e.g. replayed late by another worker
    assert json.loads(r.get(k.latest("bottle", "result")))["frame_id"] == "new"
    assert r.get(k.latest("bottle", "mask")) == b"mask-new"
    assert r.xlen(k.results_stream("bottle")) == 2  # but it is still in the stream


def test_streams_are_trimmed(publisher: ResultPublisher) -> None:
    t = time.time_ns()
    for start in range(0, 400, 50):
        publisher.publish([_out(f"f{i}", t + i, False) for i in range(start, start + 50)])
    n = publisher.client.xlen(publisher.keys.results_stream("bottle"))
    assert 100 <= n < 400


def test_thresholds_keep_the_operators_override(publisher: ResultPublisher) -> None:
    r, k = publisher.client, publisher.keys
    r.hset(k.threshold("bottle"), mapping={"manual_image": "0.62"})
    publisher.write_threshold("bottle", {"image": 0.5, "pixel": 0.4, "source": "default", "manual_image": 0.1})
    state = publisher.read_threshold("bottle")
    assert state["manual_image"] == "0.62" and state["source"] == "default" and state["worker"] == "w-test"
    assert manual_override(state) == (0.62, None)
    assert manual_override({"manual_image": "x", "manual_pixel": "0.3"}) == (None, 0.3)


def test_heartbeat_expires(publisher: ResultPublisher) -> None:
    publisher.heartbeat({"frames": 3, "redis_ok": True})
    key = publisher.keys.worker("w-test")
    assert publisher.client.hget(key, "frames") == b"3"
    assert 0 < publisher.client.ttl(key) <= 5
    publisher.forget_worker()
    assert not publisher.client.exists(key)


def test_unreachable_redis_raises_a_retryable_error_fast() -> None:
    pub = ResultPublisher.from_settings(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0",
                                                      socket_timeout_s=1.0), "w")
    t0 = time.monotonic()
    with pytest.raises(RETRYABLE):
        pub.publish([_out("x", time.time_ns(), False)])
    assert time.monotonic() - t0 < 5
    assert pub.ping() is False


def test_reused_frame_id_with_other_content_is_a_conflict_not_a_replay(publisher: ResultPublisher) -> None:
    r, k = publisher.client, publisher.keys
    t = time.time_ns()
    assert publisher.publish([_out("cam1.42", t, True, image=b"first image")]) == [WRITTEN]

    def state() -> tuple[object, ...]:
        fid = "cam1.42"
        return r.xlen(k.results_stream("bottle")), r.get(k.frame(fid, "image")), r.get(k.latest("bottle", "result"))

    before = state()
    outcome = publisher.publish([_out("cam1.42", t + 5, False, image=b"first image"),  # a replay: same bytes
                                 _out("cam1.42", t + 9, False, image=b"another image")])  # the id reused
    assert outcome == [DUPLICATE, CONFLICT]
    assert state() == before, "neither the replay nor the conflict wrote anything"
    assert publisher.done_digest("cam1.42") == redis_io.content_digest(b"first image")
    r.set(k.done_marker("old"), "w-1@123")  # a marker written before digests: always a replay
    assert publisher.publish([_out("old", t, False)]) == [DUPLICATE]


def test_done_markers_expire_through_the_index_a_few_per_publish(publisher: ResultPublisher, monkeypatch) -> None:
    r, k = publisher.client, publisher.keys
    now = time.time_ns()
    old = now - (publisher.settings.done_ttl_s + 3600) * 10**9
    monkeypatch.setattr(redis_io.time, "time_ns", lambda: old)
    publisher.publish([_out(f"old{i}", old + i, False) for i in range(20)])
    monkeypatch.setattr(redis_io.time, "time_ns", lambda: now)
    publisher.publish([_out("new0", now, False)])
    left = [i for i in range(20) if r.exists(k.done_marker(f"old{i}"))]
    assert len(left) == 20 - redis_io.DONE_EXPIRE_PER_CALL, "bounded work per publish"
    publisher.publish([_out("new1", now + 1, False)])
    assert not any(r.exists(k.done_marker(f"old{i}")) for i in range(20))
    assert r.zcard(k.done_index) == 2 and r.exists(k.done_marker("new0"), k.done_marker("new1")) == 2


def test_image_policy_and_stream_age(redis_server: RedisServer) -> None:
    base = {"url": redis_server.url, "results_maxlen": 100, "frame_ttl_s": 600}
    every = ResultPublisher.from_settings(RedisSettings(**base, prefix=f"t{uuid.uuid4().hex[:8]}",
                                                        store_heatmaps="all", stream_max_age_s=60), "w")
    r, k = every.client, every.keys
    old_ms = int(time.time() * 1000) - 3_600_000
    for i in range(250):  # entries an hour old: trimmed by MINID (whole stream nodes of 100)
        r.xadd(k.results_stream("bottle"), {"frame_id": f"ancient{i}"}, id=f"{old_ms + i}-0")
    t = time.time_ns()
    every.publish([_out("n1", t, False), _out("n2", t + 1, True)])
    assert r.get(k.frame("n1", "heatmap")) == b"heat-n1", "store_heatmaps: all"
    assert r.xlen(k.results_stream("bottle")) < 100
    assert r.xrevrange(k.results_stream("bottle"), count=1)[0][1][b"frame_id"] == b"n2"

    lean = ResultPublisher.from_settings(RedisSettings(**base, prefix=f"t{uuid.uuid4().hex[:8]}",
                                                       store_heatmaps="none", store_masks="alerts"), "w")
    r, k = lean.client, lean.keys
    lean.publish([_out("n1", t, False), _out("n2", t + 1, True)])
    assert r.get(k.frame("n1", "heatmap")) is None and r.get(k.frame("n2", "heatmap")) is None
    assert r.get(k.frame("n1", "mask")) is None and r.get(k.frame("n2", "mask")) == b"mask-n2"
    assert r.get(k.latest("bottle", "heatmap")) == b"heat-n2", "the line's latest heatmap is always kept"
    entry = r.xrange(k.results_stream("bottle"))[0][1]
    assert entry[b"mask_key"] == b"", "results entries do not point at masks that were not stored"


def test_eviction_never_touches_registry_threshold_or_done_markers(tmp_path) -> None:
    """A Redis started as `anoclip stack` starts it (maxmemory, volatile-lru), flooded with frames 3x over."""
    port = free_port()
    start_redis(tmp_path, "127.0.0.1", port, persist=False, maxmemory="8mb")
    try:
        rs = RedisSettings(url=f"redis://127.0.0.1:{port}/0", prefix="anoclip", results_maxlen=100,
                           alerts_maxlen=100, store_heatmaps="all")
        pub = ResultPublisher.from_settings(rs, "w")
        r, k = pub.client, pub.keys
        assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "volatile-lru"
        r.hset(k.threshold("bottle"), mapping={"image": "0.7", "source": "calibrated"})
        r.set(k.registry_current("bottle"), "v3")
        r.hset(k.registry_version("bottle", "v3"), mapping={"meta": "{}", "tensors": b"x" * 1000})
        heat = bytes(range(256)) * 400  # ~100 KB, incompressible like a real heatmap PNG
        t = time.time_ns()
        ids = [f"f{i}" for i in range(240)]  # ~24 MB of heatmaps into 8 MB
        for start in range(0, len(ids), 20):
            batch = ids[start:start + 20]
            outcome = pub.publish([_out(fid, t + i, i % 7 == 0, heat=heat) for i, fid in enumerate(batch)])
            assert outcome == [WRITTEN] * 20, "no OOM: per-frame blobs made room"
        info = r.info()
        assert info["evicted_keys"] > 0 and info["used_memory"] <= 8 * 2**20 * 1.1
        assert all(r.exists(k.done_marker(fid)) for fid in ids), "no done marker evicted"
        assert r.hget(k.threshold("bottle"), "image") == b"0.7"
        assert r.get(k.registry_current("bottle")) == b"v3" and r.exists(k.registry_version("bottle", "v3"))
        assert r.exists(k.latest("bottle", "heatmap")) and r.xlen(k.results_stream("bottle")) >= 100
        assert sum(r.exists(k.frame(fid, "heatmap")) for fid in ids) < len(ids), "old heatmaps were evicted"
    finally:
        stop_redis(tmp_path, port)
