"""Streaming TTA on the real broker and a real Redis: refresh, hot swap, rollback, pause, dead trainers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis as redis_lib

from pipeline.adaptation.registry import VersionRegistry
from pipeline.adaptation.tta.service import AdapterService
from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.model import create_anoclip
from pipeline.redis_keys import RedisKeys
from pipeline.streaming.envelope import build_headers
from pipeline.streaming.producer import FrameProducer
from tests.conftest import make_tiny_settings
from tests.integration.conftest import Pipeline, RedisServer, synthetic_frame, wait_for
from workers.cli import main

pytestmark = pytest.mark.integration

LINE = "wood"  # threshold 1.01 in the pipeline config: never an alert, so every frame may be admitted

FAST_TTA: dict[str, Any] = {
    "mode": "buffered",
    "refresh_every": 1_000_000,  # only on request in these tests
    "min_frames": 4,
    "holdout": 0.3,
    "train_steps": 5,
    "train_seconds": 60.0,
    "train_share": 1.0,
    "batch_tokens": 256,
    "trainer_poll_s": 0.3,
    "lock_ttl_s": 3.0,
    "request_grace_s": 1.0,
    "admit_image_z": None,
    "admit_max_abnormal_share": 1.0,
    "gate_max_flip_share": 1.0,
    "gate_auroc_margin": 1.0,  # random weights: AUROC on pasted defects is a coin toss; these tests are about
    "gate_min_contrast_ratio": 0.0,  # refresh mechanics (the gate's rules have tests of their own)
}


def _setup(pipeline: Pipeline, **tta: Any) -> VersionRegistry:
    pipeline.config["tta"] = {**FAST_TTA, **tta}
    return VersionRegistry(pipeline.redis(), pipeline.keys)


def _send_spread(pipeline: Pipeline, n: int, start: int) -> list[str]:
    """Frames of LINE under varying keys, so they land on every partition (and every worker)."""
    producer = FrameProducer(pipeline.settings)
    ids = []
    for i in range(start, start + n):
        frame = synthetic_frame(LINE, i)
        fid = f"{LINE}-{i}-{time.time_ns()}"
        producer.send_raw(f"k{i}".encode(), frame.data,
                          build_headers(fid, LINE, "cam-1", time.time_ns(), frame.content_type))
        ids.append(fid)
    producer.flush()
    return ids


def _results_for(pipeline: Pipeline, ids: list[str]) -> list[dict[str, str]]:
    want = set(ids)
    return [r for r in pipeline.results([LINE]) if r["frame_id"] in want]


def _cli(pipeline: Pipeline, *args: str) -> int:
    return main(["versions", *args, "--line", LINE, "--config", str(pipeline.config_path)])


def _serving(pipeline: Pipeline, version: str) -> bool:
    return all(w.metric("anoclip_adapter_version", line=LINE, version=version) == 1 for w in pipeline.workers)


def test_one_refresh_one_version_served_everywhere_then_rollback_and_pause(pipeline: Pipeline) -> None:
    reg = _setup(pipeline)
    a, b = pipeline.start_worker("a"), pipeline.start_worker("b")
    a.wait_ready()
    b.wait_ready()
    first = _send_spread(pipeline, 16, 0)
    wait_for(lambda: len(_results_for(pipeline, first)) == 16, 60, "16 results")
    assert {r["worker"] for r in _results_for(pipeline, first)} == {"a", "b"}, "frames reached both workers"
    assert all(r["adapter_version"] == "" for r in _results_for(pipeline, first))

    assert _cli(pipeline, "refresh", "--timeout", "60") == 0
    # A wrong second answer would come from the other worker once the trainer lock is free and the grace for
    # workers holding frames is over: watch for longer than the lock's lease plus that grace plus a few polls.
    settle = FAST_TTA["lock_ttl_s"] + FAST_TTA["request_grace_s"] + 5 * FAST_TTA["trainer_poll_s"] + 2
    end = time.monotonic() + settle
    while time.monotonic() < end:
        answers = [e["action"] for e in reg.audit(LINE) if e["action"] in ("promote", "refuse")]
        trainings = sum(w.metric("anoclip_tta_runs_total", line=LINE) for w in (a, b))
        assert (answers, trainings) == (["promote"], 1), "one refresh request is answered by exactly one training"
        time.sleep(0.5)
    assert reg.versions(LINE) == ["v1"], "one refresh request trains exactly one version"
    assert reg.current(LINE) == "v1"
    meta = reg.meta(LINE, "v1")
    assert meta["line"] == LINE and meta["validation"] and meta["training_window"]["frames"] >= 4

    wait_for(lambda: _serving(pipeline, "v1"), 30, "both workers serving v1")
    second = _send_spread(pipeline, 16, 100)
    wait_for(lambda: len(_results_for(pipeline, second)) == 16, 60, "16 more results")
    res = _results_for(pipeline, second)
    assert {r["adapter_version"] for r in res} == {"v1"}
    assert {r["worker"] for r in res} == {"a", "b"}

    assert _cli(pipeline, "rollback", "--reason", "test") == 0
    assert reg.current(LINE) is None and reg.versions(LINE) == ["v1"], "rollback deletes nothing"
    wait_for(lambda: _serving(pipeline, "base"), 30, "both workers back on the base model")
    third = _send_spread(pipeline, 8, 200)
    wait_for(lambda: len(_results_for(pipeline, third)) == 8, 60, "8 more results")
    assert {r["adapter_version"] for r in _results_for(pipeline, third)} == {""}

    assert _cli(pipeline, "pause", "--reason", "inspection audit") == 0
    assert _cli(pipeline, "refresh", "--timeout", "30") == 3
    refusal = reg.audit(LINE)[0]
    assert refusal["action"] == "refuse" and "paused" in refusal["reason"]
    assert reg.versions(LINE) == ["v1"]
    assert _cli(pipeline, "resume") == 0
    assert [e["action"] for e in reg.audit(LINE)][:4] == ["resume", "refuse", "pause", "rollback"]


def test_refused_candidate_keeps_current_and_records_why(pipeline: Pipeline) -> None:
    reg = _setup(pipeline, gate_min_spread_ratio=1e6)  # every candidate "collapses the spread"
    w = pipeline.start_worker("a")
    w.wait_ready()
    ids = _send_spread(pipeline, 12, 0)
    wait_for(lambda: len(_results_for(pipeline, ids)) == 12, 60, "12 results")
    assert _cli(pipeline, "refresh", "--timeout", "60") == 3
    entry = reg.audit(LINE)[0]
    assert entry["action"] == "refuse" and "spread collapsed" in entry["reason"]
    assert reg.current(LINE) is None and reg.versions(LINE) == []
    assert w.metric("anoclip_tta_runs_total", line=LINE, outcome="refused") == 1


def test_dead_trainer_lock_expires_and_another_worker_refreshes(pipeline: Pipeline) -> None:
    """What a trainer killed mid-refresh leaves behind: its lock with a lease, and no version (versions
    are written whole with the pointer move, in one transaction). Another worker waits out the lease."""
    reg = _setup(pipeline)
    r = pipeline.redis()
    lock_key = pipeline.keys.registry_lock(LINE)
    b = pipeline.start_worker("b")
    b.wait_ready()
    ids = _send_spread(pipeline, 12, 0)
    wait_for(lambda: len(_results_for(pipeline, ids)) == 12, 60, "12 results on worker b")
    r.set(lock_key, "a-killed", px=4000)
    t0 = time.monotonic()
    assert _cli(pipeline, "refresh", "--timeout", "60") == 0
    assert time.monotonic() - t0 >= 2.5, "the refresh waited for the dead trainer's lease to run out"
    assert reg.current(LINE) == "v1" and reg.versions(LINE) == ["v1"]
    assert r.hexists(pipeline.keys.registry_version(LINE, "v1"), "tensors")
    promote = reg.audit(LINE)[0]
    assert promote["action"] == "promote" and promote["actor"] == "b"
    assert r.get(lock_key) is None, "the trainer released its lock"


def _planted(img: np.ndarray, channel: int) -> np.ndarray:
    """A discoloration: one channel saturated, the others dimmed, over the whole part."""
    out = img // 4
    out[..., channel] = 255
    return out


def test_persistent_defect_keeps_alerting(redis_server: RedisServer, tmp_path: Path) -> None:
    """A pattern the base model flags keeps being flagged, and never enters the buffer, over many refreshes."""
    from pipeline.evaluation import synth

    rng = np.random.default_rng(0)
    normals = [synth.render_part("bottle", 64, i, None)[0] for i in range(60)]
    settings = make_tiny_settings(tmp_path, tta={**FAST_TTA, "refresh_every": 12, "min_frames": 8})
    model = create_anoclip(settings.model)
    probe = FrameScorer(settings, model)
    base_normal = np.array([r.score for r in probe.score_raw("bottle", normals)])
    # The base model is random: find a planted pattern it scores above every normal frame.
    best = None
    for channel in (0, 1, 2):
        defects = [_planted(n, channel) for n in normals]
        s = np.array([r.score for r in probe.score_raw("bottle", defects)])
        if s.min() > base_normal.max() and (best is None or s.min() > best[1]):
            best = (channel, float(s.min()))
    assert best is not None, "precondition: some planted pattern must be flagged by the base model"
    threshold = (base_normal.max() + best[1]) / 2
    settings = make_tiny_settings(
        tmp_path,
        lines=[{"id": "bottle", "class_name": "bottle", "threshold": {"image": threshold}}],
        tta={**FAST_TTA, "refresh_every": 12, "min_frames": 8},
    )
    insp = FrameScorer(settings, model)
    client = redis_lib.Redis.from_url(redis_server.url)
    reg = VersionRegistry(client, RedisKeys(f"persist{rng.integers(1 << 30)}"))
    service = AdapterService(insp, reg, ["bottle"], "w-test")

    flagged, promoted = [], 0
    for i, normal in enumerate(normals):
        is_defect = i % 3 == 0
        frame = _planted(normal, best[0]) if is_defect else normal
        adapter, version = service.adapter_for("bottle")
        (raw,) = insp.score_raw("bottle", [frame], adapter)
        verdict = insp.judge("bottle", raw, version).verdict
        if is_defect:
            flagged.append(verdict)
        service.observe("bottle", f"f{i}", raw, 0.1, time.time())
        if service.lines["bottle"].tta.due:
            promoted += service.refresh("bottle")["action"] == "promote"
    assert promoted >= 2, "the line's adapter was refreshed and served several times"
    assert all(flagged), "the persistent defect still raises alerts after the refreshes"
    buffer = service.lines["bottle"].tta.buffer
    admitted = {f.frame_id for f in buffer._frames}
    assert admitted and not admitted & {f"f{i}" for i in range(0, len(normals), 3)}, \
        "no defect frame ever entered the buffer"
    assert buffer.counts["refused:image_score"] == len(flagged)
