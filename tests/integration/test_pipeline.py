"""End to end through the real broker and a real Redis: results, alerts, masks, idempotent replays, DLQ."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.streaming import envelope as env
from pipeline.streaming.frame_sources import encode
from pipeline.streaming.producer import FrameProducer
from tests.integration.conftest import Pipeline, synthetic_frame, wait_for

pytestmark = pytest.mark.integration


def _png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_frames_in_results_out(pipeline: Pipeline) -> None:
    r = pipeline.redis()
    keys = pipeline.keys
    live = r.pubsub()
    live.subscribe(keys.live_channel)
    # max_batch above the frame count: every batch is flushed by max_wait, never by size
    worker = pipeline.start_worker("w1", max_batch=64, max_in_flight=64)
    worker.wait_ready()

    producer = FrameProducer(pipeline.settings)
    sent: dict[str, tuple[str, bytes, int]] = {}  # frame id -> (line, bytes, capture ts)
    plan = [("bottle", 6), ("wood", 6), ("pcb1", 6)]
    for line, n in plan:
        for i in range(n):
            frame = synthetic_frame(line, i, defect="scratch" if i % 2 else None, size=48 + 8 * i)
            ts = time.time_ns()
            fid = producer.send(line, frame, capture_ts_ns=ts)
            sent[fid] = (line, frame.data, ts)
    producer.flush()
    assert producer.stats.acked == len(sent)

    wait_for(lambda: len(pipeline.results()) >= len(sent), 60, f"{len(sent)} results")
    results = pipeline.results()
    ids = [x["frame_id"] for x in results]
    assert sorted(ids) == sorted(sent), "every frame exactly once in the results streams"
    for x in results:
        assert x["line"] == sent[x["frame_id"]][0]
        assert 0.0 <= float(x["score"]) <= 1.0
        assert x["verdict"] in ("anomalous", "normal")
        assert x["adapter_version"] == ""  # no adapter yet, published as empty
        assert float(x["latency_ms"]) > 0
        assert json.loads(x["timings_ms"])["model"] >= 0

    # alerts: exactly the anomalous frames, with regions; bottle (threshold 0) always, wood (1.01) never
    alerts = pipeline.alerts()
    anomalous = {x["frame_id"] for x in results if x["verdict"] == "anomalous"}
    assert sorted(a["frame_id"] for a in alerts) == sorted(anomalous)
    assert {f for f, (line, _, _) in sent.items() if line == "bottle"} <= anomalous
    assert not {f for f, (line, _, _) in sent.items() if line == "wood"} & anomalous
    with_regions = 0
    for a in alerts:
        regions = json.loads(a["regions"])
        assert all(reg["area"] > 0 and len(reg["box"]) == 4 for reg in regions)
        mask = _png_array(r.get(a["mask_key"]))
        # the image score decides; with random weights a frame can pass its line's threshold with no pixel
        # above the pixel threshold: an empty mask, no region; mask, area and regions always agree
        assert int(mask.astype(bool).sum()) == int(a["defect_area"]) and (not regions or int(a["defect_area"]) > 0)
        with_regions += bool(regions)
        assert r.get(a["image_key"]) == sent[a["frame_id"]][1], "alert keeps the original frame bytes"
        heat = _png_array(r.get(a["heatmap_key"]))
        assert heat.shape[:2] == mask.shape[:2]
    assert with_regions > 0, "alerts localise their defects"

    # per-frame blobs carry a TTL; masks match the frame size
    for fid, (_line, data, _) in sent.items():
        w, h = Image.open(io.BytesIO(data)).size
        mask = _png_array(r.get(keys.frame(fid, "mask")))
        assert mask.shape[:2] == (h, w)
        assert 0 < r.ttl(keys.frame(fid, "mask")) <= pipeline.settings.redis.frame_ttl_s
        assert json.loads(r.get(keys.frame(fid, "result")))["frame_id"] == fid
        assert r.exists(keys.frame(fid, "image")) == (fid in anomalous)

    # latest per line = the newest capture of that line
    for line, _ in plan:
        newest = max((ts, f) for f, (ln, _, ts) in sent.items() if ln == line)[1]
        assert json.loads(r.get(keys.latest(line, "result")))["frame_id"] == newest
        assert r.get(keys.latest(line, "image")) == sent[newest][1]
        assert r.get(keys.latest(line, "mask")) == r.get(keys.frame(newest, "mask"))

    # live notifications for every frame (pub/sub is for dashboards; we were subscribed throughout)
    seen: set[str] = set()

    def drain_live() -> bool:
        while (m := live.get_message(timeout=0.1)) is not None:
            if m["type"] == "message":
                seen.add(json.loads(m["data"])["frame_id"])
        return seen >= set(sent)

    wait_for(drain_live, 10, "a live notification per frame")

    # thresholds: fixed from config, or calibrated from pcb1's first 4 frames
    th = {ln: {k.decode(): v.decode() for k, v in r.hgetall(keys.threshold(ln)).items()} for ln, _ in plan}
    wait_for(lambda: r.hget(keys.threshold("pcb1"), "source") == b"calibrated", 10, "pcb1 calibrated threshold")
    pcb1 = {k.decode(): v.decode() for k, v in r.hgetall(keys.threshold("pcb1")).items()}
    assert pcb1["calibration_frames"] == "4" and pcb1["calibrated_model"] == "anoclip-tiny/none/fp32"
    assert th["bottle"]["source"] == "config" and float(th["bottle"]["image"]) == 0.0
    assert th["wood"]["source"] == "config"

    # offsets: everything committed once published; heartbeat and metrics tell the same story
    wait_for(lambda: sum(pipeline.committed().values()) == len(sent), 15, "all offsets committed")
    assert r.ttl(keys.worker("w1")) > 0
    assert worker.metric("anoclip_frames_scored_total") == len(sent)
    assert worker.metric("anoclip_alerts_total") == len(anomalous)
    assert worker.metric("anoclip_e2e_latency_seconds_count") == len(sent)
    assert worker.health("/healthz")[0] == 200

    # replaying the same frames (same ids) changes nothing in Redis
    before = (len(results), len(alerts), r.get(keys.latest("bottle", "result")))
    for fid, (line, data, ts) in list(sent.items())[:8]:
        producer.send_raw(line.encode(), data, env.build_headers(fid, line, "cam-1", ts, "image/jpeg"))
    producer.close()
    wait_for(lambda: worker.metric("anoclip_duplicates_skipped_total") == 8, 30, "8 replays skipped")
    assert (len(pipeline.results()), len(pipeline.alerts()), r.get(keys.latest("bottle", "result"))) == before
    wait_for(lambda: sum(pipeline.committed().values()) == len(sent) + 8, 15, "replays committed")

    # a run-time override in Redis wins over the config (wood: 1.01 -> 0.0) within a heartbeat
    r.hset(keys.threshold("wood"), "manual_image", "0.0")
    wait_for(lambda: r.hget(keys.threshold("wood"), "source") == b"manual", 10, "the override to be picked up")
    producer = FrameProducer(pipeline.settings)
    overridden = [producer.send("wood", synthetic_frame("wood", 50 + i)) for i in range(2)]
    producer.close()
    wait_for(lambda: {a["frame_id"] for a in pipeline.alerts()} >= set(overridden), 30, "overridden wood alerts")

    worker.terminate()
    assert worker.wait_exit(30) == 0


def _bomb_png() -> bytes:
    """A tiny file that decodes to 4 million pixels."""
    buf = io.BytesIO()
    Image.new("1", (2000, 2000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_bad_input_goes_to_dlq(pipeline: Pipeline) -> None:
    worker = pipeline.start_worker("w1", max_frame_bytes=200_000, max_pixels=1_000_000)
    good = synthetic_frame("bottle", 1)
    jpeg = good.data
    png, _ = encode(np.zeros((32, 32, 3), np.uint8), "png")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    big = np.random.default_rng(0).integers(0, 255, 300_000, dtype=np.uint8).tobytes()
    bomb = _bomb_png()
    assert len(bomb) < 20_000

    def hdrs(case: str, *, drop: str | None = None, **over: str) -> list[tuple[str, bytes]]:
        base = {env.H_FRAME_ID: f"bad-{case}", env.H_LINE_ID: "bottle", env.H_CAMERA_ID: "cam-1",
                env.H_CAPTURE_TS: str(time.time_ns()), env.H_CONTENT_TYPE: "image/jpeg", env.H_SCHEMA: "1"}
        base.update({k.replace("_", "-"): v for k, v in over.items()})
        hs = [(k, v.encode()) for k, v in base.items() if k != drop]
        return hs + [("test-case", case.encode())]

    # case -> (value, headers, expected stage, expected words in the reason)
    bad: dict[str, tuple[bytes, list[tuple[str, bytes]], str, str]] = {
        "garbage": (b"this is not an image", hdrs("garbage"), "decode", "undecodable"),
        "truncated": (jpeg[: len(jpeg) // 2], hdrs("truncated"), "decode", "truncated"),
        "gif": (gif.getvalue(), hdrs("gif", content_type="image/gif"), "decode", "unsupported content type"),
        "text": (b"hello", hdrs("text", content_type="text/plain"), "decode", "unsupported content type"),
        "mismatch": (png, hdrs("mismatch"), "decode", "does not match"),
        "oversized": (big, hdrs("oversized"), "size", "frame too large"),
        "bomb": (bomb, hdrs("bomb", content_type="image/png"), "decode", "too large"),
        "empty": (b"", hdrs("empty"), "size", "empty frame"),
        "no-frame-id": (jpeg, hdrs("no-frame-id", drop=env.H_FRAME_ID), "headers", "missing header 'frame-id'"),
        "no-headers": (jpeg, [("test-case", b"no-headers")], "headers", "missing headers"),
        "bad-ts": (jpeg, hdrs("bad-ts", capture_ts="yesterday"), "headers", "malformed header 'capture-ts'"),
        "ms-ts": (jpeg, hdrs("ms-ts", capture_ts=str(int(time.time() * 1000))), "headers", "capture-ts"),
        "bad-schema": (jpeg, hdrs("bad-schema", schema="99"), "headers", "unsupported schema"),
        "unknown-line": (jpeg, hdrs("unknown-line", line_id="toaster"), "line", "unknown line 'toaster'"),
    }
    garbled = hdrs("garbled")
    garbled[1] = (env.H_LINE_ID, b"\xff\xfe")
    bad["garbled"] = (jpeg, garbled, "headers", "not UTF-8")

    producer = FrameProducer(pipeline.settings)
    good_ids = []
    for i, (value, headers, _, _) in enumerate(bad.values()):
        good_ids.append(producer.send("bottle", synthetic_frame("bottle", 100 + i)))
        producer.send_raw(b"bottle", value, headers)
    good_ids.append(producer.send("wood", synthetic_frame("wood", 7)))
    producer.close()
    assert producer.stats.acked == producer.stats.sent == 2 * len(bad) + 1

    worker.wait_ready()
    wait_for(lambda: len(pipeline.results()) >= len(good_ids), 60, f"{len(good_ids)} good results")
    assert sorted(x["frame_id"] for x in pipeline.results()) == sorted(good_ids)

    def dlq() -> dict[str, object] | None:
        got = {dict(rec.headers)["test-case"].decode(): rec for rec in pipeline.dlq_records()}
        return got if len(got) >= len(bad) else None

    records = wait_for(dlq, 30, f"{len(bad)} DLQ records")
    assert set(records) == set(bad)
    topic = pipeline.settings.kafka.frames_topic
    for case, (value, _, stage, words) in bad.items():
        rec = records[case]
        h = {k: v.decode(errors="replace") for k, v in rec.headers}
        assert h["error-stage"] == stage, f"{case}: {h['error']}"
        assert words in h["error"], f"{case}: reason {h['error']!r} lacks {words!r}"
        assert rec.value == value, f"{case}: the DLQ keeps the original bytes"
        assert h["source-topic"] == topic and h["source-offset"].isdigit() and h["source-partition"].isdigit()
    assert len(pipeline.dlq_records()) == len(bad), "each bad frame dead-lettered once"
    wait_for(lambda: sum(pipeline.committed().values()) == 2 * len(bad) + 1, 15, "all offsets committed")
    assert worker.metric("anoclip_frames_dead_lettered_total") == len(bad)
    assert worker.alive()
