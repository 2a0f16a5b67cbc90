"""The result publisher against a real Redis: atomic per frame, idempotent, trimmed, TTL'd."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from pipeline.redis_client import RETRYABLE
from pipeline.settings import RedisSettings
from pipeline.streaming.records import FrameResult
from pipeline.streaming.redis_io import FrameOutput, ResultPublisher, manual_override
from tests.integration.conftest import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture
def publisher(redis_server: RedisServer) -> ResultPublisher:
    rs = RedisSettings(url=redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}", results_maxlen=100,
                       frame_ttl_s=600, heartbeat_ttl_s=5)
    return ResultPublisher.from_settings(rs, "w-test")


def _out(fid: str, ts: int, alert: bool, line: str = "bottle") -> FrameOutput:
    result = FrameResult(fid, line, ts, score=0.9 if alert else 0.1, anomalous=alert, threshold=0.5,
                         pixel_threshold=0.5, regions=[{"area": 4, "box": [1, 2, 3, 4]}] if alert else [],
                         defect_area=4 if alert else 0)
    return FrameOutput(result, b"mask-" + fid.encode(), b"heat-" + fid.encode(), b"image-" + fid.encode())


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
    assert r.ttl(k.done_marker("b")) > 0
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
    from pipeline.stack import free_port

    pub = ResultPublisher.from_settings(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0",
                                                      socket_timeout_s=1.0), "w")
    t0 = time.monotonic()
    with pytest.raises(RETRYABLE):
        pub.publish([_out("x", time.time_ns(), False)])
    assert time.monotonic() - t0 < 5
    assert pub.ping() is False
