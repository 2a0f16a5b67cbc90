"""`anoclip serve` judges a `memory: stream` line as its workers do (docs/memory.md, *In the worker*): with the
line's current bank from the bank registry, the fused score in z units and the bank version's thresholds,
following promotions and rollbacks; read only (a request never admits a frame, builds nor publishes a bank).
Before the line has a bank it answers 503: it has no window of the line's recent frames to score mutually."""

from __future__ import annotations

import http.client
import json
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.adaptation.memory.files import to_bytes
from pipeline.adaptation.memory.params import MemoryParams
from pipeline.adaptation.memory.scoring import bank_from_images
from pipeline.adaptation.memory.service import MemoryService
from pipeline.adaptation.registry import VersionRegistry
from pipeline.evaluation import synth
from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.inspection.imaging import decode_image
from pipeline.inspection.score_scale import from_z
from pipeline.redis_keys import RedisKeys
from pipeline.serving.app import NO_BANK_RETRY_S, ServeState, create_app
from pipeline.settings import Settings
from pipeline.streaming import local_stack as stack
from pipeline.streaming.frame_sources import encode
from tests.conftest import make_tiny_settings
from tests.integration.conftest import RedisServer, served_versions, serving, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

LINE = "wood"
MEMORY: dict[str, Any] = {"layers": [2], "min_bank_frames": 4, "admit_min_window": 4, "window_frames": 8}
V1 = {"image": 1.625, "pixel": 2.375, "pixel_median": 0.0, "frames": 4}
V2 = {"image": 2.875, "pixel": 3.125, "pixel_median": 0.0, "frames": 4}
"""Each bank version's own thresholds (fused z units): unlike the cold start's 3.0 and any line default."""


def _settings(text_cache_dir: Path, redis_url: str, prefix: str) -> Settings:
    return make_tiny_settings(text_cache_dir, memory=MEMORY, tta={"trainer_poll_s": 0.05},
                              redis={"url": redis_url, "prefix": prefix},
                              lines=[{"id": LINE, "class_name": "wood", "domain": "texture", "memory": "stream"},
                                     {"id": "bottle", "class_name": "bottle"}])


def _call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, Any, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "image/png"} if body else {})
    r = conn.getresponse()
    data = json.loads(r.read())
    headers = {k.lower(): v for k, v in r.getheaders()}
    conn.close()
    return r.status, data, headers


def _frame(i: int) -> np.ndarray:
    return synth.render_part("wood", 64, 1000 + i, None)[0]


def _png(i: int) -> bytes:
    return encode(_frame(i), "png")[0]


def _publish(banks: VersionRegistry, inspector: FrameScorer, settings: Settings, first: int,
             thresholds: dict[str, Any], base: str | None) -> str:
    """A bank of known-normal frames, published to the registry as a worker's builder publishes one."""
    params = MemoryParams.from_settings(settings.memory)
    bank = bank_from_images(inspector, LINE, [_frame(i) for i in range(first, first + 4)], params,
                            ids=[f"ref-{i}" for i in range(first, first + 4)])
    meta = {**bank.meta, "thresholds": thresholds, "worker": "test"}
    res = banks.publish(LINE, to_bytes(bank), meta, actor="test", reason="test", base_version=base,
                        audit={"patches": bank.patches, "bank_id": bank.version})
    assert res.promoted and res.version is not None, res
    return res.version


def _worker_score(settings: Settings, banks: VersionRegistry, version: str, body: bytes) -> tuple[float, str]:
    """The same frame through the worker's path: its own `MemoryService` on the same registry, the frame scored
    with `hidden_layers` and `score` (then admitted there, in that service only), judged with its threshold key."""
    insp = FrameScorer.from_settings(settings)
    worker = MemoryService(insp, banks, [LINE], "worker-test")
    assert worker.sync(LINE)
    image = decode_image(body, content_type="image/png")
    raws = insp.score_raw(LINE, [image], hidden_layers=worker.hidden_layers)
    (o,) = worker.score(LINE, raws, ["worker-frame"])
    assert o.bank_version == version and o.threshold_key == f"bank:{version}"
    verdict = insp.judge(LINE, o.raw, o.threshold_key).verdict
    return o.raw.score, "anomalous" if verdict else "normal"


def test_serve_scores_a_memory_line_with_the_registrys_bank_and_admits_nothing(
        redis_server: RedisServer, text_cache_dir: Path) -> None:
    prefix = f"sm{uuid.uuid4().hex[:8]}"
    settings = _settings(text_cache_dir, redis_server.url, prefix)
    inspector = FrameScorer.from_settings(settings)
    keys = RedisKeys(prefix)
    banks = VersionRegistry(redis_server.client(), keys, kind="banks")
    body = _png(50)
    with serving(settings, inspector) as (state, port):
        # cold start: no bank, and no window of the line's recent frames to score mutually against
        code, r, headers = _call(port, "POST", f"/v1/lines/{LINE}/inspect", body)
        assert code == 503 and r["stage"] == "memory" and "no memory bank yet" in r["error"], r
        assert headers["retry-after"] == str(NO_BANK_RETRY_S)
        code, ready, _ = _call(port, "GET", "/readyz")
        assert code == 200 and ready["banks"] == {LINE: None}, ready  # other lines are served meanwhile
        assert served_versions(port, "anoclip_bank_version") == {LINE: "none"}, "only memory lines have one"
        code, r, _ = _call(port, "POST", "/v1/lines/bottle/inspect", body)  # memory off: zero-shot, no bank
        assert code == 200 and r["bank_version"] is None

        v1 = _publish(banks, inspector, settings, 0, V1, None)
        r = wait_for(lambda: (x := _call(port, "POST", f"/v1/lines/{LINE}/inspect", body))[0] == 200 and x[1],
                     20, "serve to load the line's first bank")
        assert r["bank_version"] == v1 and r["adapter_version"] is None
        assert r["threshold_source"] == "version"  # the bank's own, stored in z, served on the anomaly scale
        assert (r["threshold"], r["pixel_threshold"]) == pytest.approx((from_z(V1["image"]), from_z(V1["pixel"])),
                                                                      abs=1e-6)
        score, verdict = _worker_score(settings, banks, v1, body)
        assert r["score"] == pytest.approx(score, abs=1e-5)  # the worker's fused score, not zero-shot
        (zero_shot,) = inspector.score_raw(LINE, [decode_image(body, content_type="image/png")])
        assert abs(r["score"] - zero_shot.score) > 1e-3, "else this shows nothing"
        assert r["verdict"] == verdict
        assert _call(port, "GET", "/readyz")[1]["banks"] == {LINE: v1}
        assert served_versions(port, "anoclip_bank_version") == {LINE: v1}

        # many requests, concurrent ones sharing batches: nothing is admitted, built, published or locked
        def ask(i: int) -> None:
            got = _call(port, "POST", f"/v1/lines/{LINE}/inspect", _png(100 + i % 6))
            assert got[0] == 200 and got[1]["bank_version"] == v1, got

        workers = [threading.Thread(target=ask, args=(i,)) for i in range(24)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
        assert state.memory is not None and state.memory.follow_only
        mem = state.memory.lines[LINE].memory
        assert (mem.admitted, mem.pending.rows, len(mem.window), mem.pending_frames) == (0, 0, 0, 0)
        assert state.memory.run_pending() == 0
        assert banks.versions(LINE) == [v1], "serve never publishes a bank"
        assert not redis_server.client().exists(keys.registry_lock(LINE, kind="banks")), "nor takes the bank lock"

        v2 = _publish(banks, inspector, settings, 10, V2, v1)  # promoted while serving: followed
        r = wait_for(lambda: (x := _call(port, "POST", f"/v1/lines/{LINE}/inspect", body)[1])["bank_version"] == v2
                     and x, 20, "serve to follow the promotion")
        assert (r["threshold"], r["pixel_threshold"]) == pytest.approx((from_z(V2["image"]), from_z(V2["pixel"])),
                                                                      abs=1e-6)
        assert r["score"] == pytest.approx(_worker_score(settings, banks, v2, body)[0], abs=1e-5)
        assert served_versions(port, "anoclip_bank_version") == {LINE: v2}

        assert banks.rollback(LINE, actor="test", reason="test") == v1
        wait_for(lambda: _call(port, "POST", f"/v1/lines/{LINE}/inspect", body)[1].get("bank_version") == v1, 20,
                 "serve to follow the rollback to v1")
        assert banks.rollback(LINE, actor="test", reason="test") is None  # no bank: the cold start again
        code, r, _ = wait_for(lambda: (x := _call(port, "POST", f"/v1/lines/{LINE}/inspect", body))[0] == 503 and x,
                              20, "serve to follow the rollback to no bank")
        assert r["stage"] == "memory"
        assert _call(port, "GET", "/readyz")[1]["banks"] == {LINE: None}
    assert banks.versions(LINE) == [v1, v2], "serving never builds nor publishes a bank"
    assert [a["action"] for a in banks.audit(LINE)].count("promote") == 2


def test_memory_line_answers_503_while_redis_is_unreachable(text_cache_dir: Path) -> None:
    settings = _settings(text_cache_dir, f"redis://127.0.0.1:{stack.free_port()}/0", "nobody")  # nothing listens
    with serving(settings, FrameScorer.from_settings(settings)) as (state, port):
        code, r, _ = _call(port, "POST", f"/v1/lines/{LINE}/inspect", _png(0))
        assert code == 503 and r["stage"] == "memory", r
        code, ready, _ = _call(port, "GET", "/readyz")
        assert code == 200 and ready["banks"] == {LINE: None} and "unreachable" in ready["banks_note"], ready
        code, r, _ = _call(port, "POST", "/v1/lines/bottle/inspect", _png(0))
        assert code == 200 and r["bank_version"] is None


def test_openapi_names_bank_version(text_cache_dir: Path) -> None:
    settings = make_tiny_settings(text_cache_dir)
    schema = create_app(ServeState(settings)).openapi()["components"]["schemas"]["InspectResult"]
    assert "bank_version" in schema["properties"] and "adapter_version" in schema["required"]
