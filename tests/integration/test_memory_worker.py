"""The per-line patch memory in the streaming worker on a real broker and a real Redis (docs/memory.md):
banks built off the scoring path, versioned in the registry under `kind="banks"`, served by every worker of
the line, rolled back and paused from the CLI; and a recurring defect still flagged after refreshes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.adaptation.memory.service import COLD_START_KEY, MemoryService
from pipeline.adaptation.registry import RefreshLock, VersionRegistry
from pipeline.evaluation import synth
from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.inspection.score_scale import from_z
from pipeline.observability.telemetry import WorkerTelemetry
from pipeline.streaming.envelope import build_headers
from pipeline.streaming.frame_sources import encode
from pipeline.streaming.producer import FrameProducer
from tests.conftest import make_tiny_settings
from tests.integration.conftest import Pipeline, wait_for
from workers.cli import main

pytestmark = pytest.mark.integration

LINE = "wood"
MEMORY: dict[str, Any] = {"layers": [2], "min_bank_frames": 4, "admit_min_window": 4, "window_frames": 8}


def _image(i: int, recurring: bool = False) -> np.ndarray:
    if recurring:
        return synth.render_recurring("wood", 64, 1000 + i, "stain", 7)[0]
    return synth.render_part("wood", 64, 1000 + i, None)[0]


def _service(pipeline: Pipeline, text_cache_dir: Path, name: str,
             **memory: Any) -> tuple[MemoryService, FrameScorer, WorkerTelemetry]:
    s = make_tiny_settings(text_cache_dir, memory={**MEMORY, **memory},
                           lines=[{"id": LINE, "class_name": "wood", "domain": "texture", "memory": "stream"}])
    insp = FrameScorer.from_settings(s)
    tel = WorkerTelemetry()
    reg = VersionRegistry(pipeline.redis(), pipeline.keys, kind="banks")
    return MemoryService(insp, reg, [LINE], name, tel), insp, tel


def _batch(svc: MemoryService, insp: FrameScorer, start: int, n: int = 4) -> list:
    raws = insp.score_raw(LINE, [_image(i) for i in range(start, start + n)], hidden_layers=svc.hidden_layers)
    return svc.score(LINE, raws, [f"{svc.worker_id}-{i}" for i in range(start, start + n)])


def _cli(pipeline: Pipeline, *args: str) -> int:
    return main(["versions", *args, "--line", LINE, "--config", str(pipeline.config_path)])


def test_banks_are_versioned_shared_rolled_back_and_paused_through_the_registry(
        pipeline: Pipeline, text_cache_dir: Path, capsys: pytest.CaptureFixture) -> None:
    a, insp_a, tel_a = _service(pipeline, text_cache_dir, "wa")
    b, insp_b, _ = _service(pipeline, text_cache_dir, "wb")
    banks = VersionRegistry(pipeline.redis(), pipeline.keys, kind="banks")
    adapters = VersionRegistry(pipeline.redis(), pipeline.keys)
    _batch(a, insp_a, 0)
    _batch(a, insp_a, 4)  # 4 frames admitted (window of 4 reached): the first bank is due
    assert a.run_pending() == 1
    assert banks.versions(LINE) == ["v1"] and banks.current(LINE) == "v1"
    assert adapters.versions(LINE) == [] and adapters.current(LINE) is None, "the adapters' registry is untouched"
    meta = banks.meta(LINE, "v1")
    assert meta["patches"] > 0 and meta["thresholds"]["image"] > 0 and meta["worker"] == "wa"
    assert banks.audit(LINE)[0]["action"] == "promote"
    # the bank gate's figures (held-out frame, pasted positive, reference: mutual scoring before the first bank)
    gate = json.loads(banks.audit(LINE)[0]["validation"])
    assert gate == meta["validation"] and gate["reference"] == "mutual" and gate["holdout_frames"] == 1
    assert 0 <= gate["pixel_auroc_candidate"] <= 1 and 0 <= gate["pixel_auroc_serving"] <= 1
    assert gate["holdout_ids"] == ["wa-7"]
    # the builder serves it from its next batch; the other worker loads it from Redis
    assert all(o.bank_version == "v1" and o.threshold_key == "bank:v1" for o in _batch(a, insp_a, 8))
    assert "wa-7" not in a.lines[LINE].memory.bank.frames and "wa-7" in a.lines[LINE].memory.pending.frames
    assert b.sync(LINE)
    scored_b = _batch(b, insp_b, 0)
    assert all(o.bank_version == "v1" for o in scored_b)
    assert b.lines[LINE].memory.bank.version == a.lines[LINE].memory.bank.version == meta["id"]
    assert insp_b.thresholds(LINE).version_thresholds("bank:v1").image == pytest.approx(
        from_z(meta["thresholds"]["image"]))  # stored in z, served on the anomaly scale
    assert tel_a.bank_version.labels(LINE, "v1")._value.get() == 1  # noqa: SLF001
    # one builder per line: while another worker holds the line's bank lock, a due build is skipped
    lock = RefreshLock(pipeline.redis(), pipeline.keys, LINE, "someone-else", 30, kind="banks")
    assert lock.acquire()
    for start in range(12, 40, 4):
        _batch(a, insp_a, start)
    assert a.run_pending() == 1 and banks.versions(LINE) == ["v1"]
    assert tel_a.bank_refreshes.labels(LINE, "skipped")._value.get() == 1  # noqa: SLF001
    lock.release()
    for start in range(40, 72, 4):
        _batch(a, insp_a, start)
    assert a.run_pending() == 1 and banks.versions(LINE) == ["v1", "v2"]
    assert banks.meta(LINE, "v2")["parent"] == meta["id"]
    assert b.sync(LINE) and all(o.bank_version == "v2" for o in _batch(b, insp_b, 4))
    # the CLI lists both kinds and steers the banks
    assert _cli(pipeline, "list", "--kind", "bank", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in listed["versions"]] == ["v1", "v2"] and listed["current"] == "v2"
    assert _cli(pipeline, "list") == 0
    out = capsys.readouterr().out
    assert "line wood: current none (base model)" in out and "line wood: memory bank v2" in out
    assert _cli(pipeline, "rollback", "--kind", "bank", "--reason", "test") == 0
    assert "current memory bank is now v1" in capsys.readouterr().out
    assert banks.current(LINE) == "v1" and banks.audit(LINE)[0]["action"] == "rollback"
    assert a.sync(LINE) and b.sync(LINE)
    assert all(o.bank_version == "v1" for o in _batch(a, insp_a, 72) + _batch(b, insp_b, 72))
    assert _cli(pipeline, "rollback", "--kind", "bank", "--version", "v2") == 0
    assert _cli(pipeline, "rollback", "--kind", "bank") == 0  # v2 -> v1
    assert _cli(pipeline, "rollback", "--kind", "bank") == 0  # v1 -> none: back to the cold start
    assert banks.current(LINE) is None and a.sync(LINE)
    assert all(o.bank_version is None and o.threshold_key == COLD_START_KEY for o in _batch(a, insp_a, 76))
    # paused: a due build publishes nothing
    assert _cli(pipeline, "pause", "--kind", "bank", "--reason", "audit") == 0
    assert banks.is_paused(LINE) and not adapters.is_paused(LINE)
    for start in range(80, 120, 4):
        _batch(a, insp_a, start)
    assert a.run_pending() == 1 and banks.versions(LINE) == ["v1", "v2"] and banks.current(LINE) is None
    assert tel_a.bank_refreshes.labels(LINE, "refused")._value.get() == 1  # noqa: SLF001
    assert _cli(pipeline, "resume", "--kind", "bank") == 0 and not banks.is_paused(LINE)


def test_a_worker_scores_a_line_with_its_memory_and_a_recurring_defect_stays_flagged(pipeline: Pipeline) -> None:
    cfg = pipeline.config
    cfg["memory"] = MEMORY
    cfg["lines"] = [x for x in cfg["lines"] if x["id"] != LINE] + [
        {"id": LINE, "class_name": "wood", "domain": "texture", "memory": "stream"}]
    cfg["tta"] = {"trainer_poll_s": 0.2}
    worker = pipeline.start_worker("mem-w")
    worker.wait_ready()
    producer = FrameProducer(pipeline.settings)
    flags = [i >= 10 and i % 10 in (3, 7, 9) for i in range(48)]  # the same stain in 30% of frames from 10 on
    ids = []
    for i, rec in enumerate(flags):
        data, ctype = encode(_image(i, rec), "png")
        fid = f"{LINE}-m{i}-{time.time_ns()}"
        # one key: one partition, so the worker sees the frames in this order
        producer.send_raw(b"k", data, build_headers(fid, LINE, "cam-1", time.time_ns(), ctype))
        ids.append(fid)
        if i % 8 == 7:
            producer.flush()
            time.sleep(0.3)  # let builds land between batches, as a live camera's pace does
    producer.flush()
    wait_for(lambda: len(pipeline.results([LINE])) >= len(ids), 60, "every frame scored")
    results = {r["frame_id"]: r for r in pipeline.results([LINE])}
    rows = [(results[fid], rec) for fid, rec in zip(ids, flags, strict=True)]
    served = [r["bank_version"] for r, _ in rows]
    assert served[0] == "", "the first frame is scored before the line has a bank"
    versions = [v for v in dict.fromkeys(served) if v]
    assert len(versions) >= 2, f"banks were built and refreshed: {served}"
    result_json = json.loads(pipeline.redis().get(pipeline.keys.frame(ids[-1], "result")))
    assert result_json["bank_version"] == served[-1] and result_json["adapter_version"] is None
    banks = VersionRegistry(pipeline.redis(), pipeline.keys, kind="banks")
    assert set(versions) <= set(banks.versions(LINE)) and banks.current(LINE) == versions[-1]
    assert worker.metric("anoclip_bank_version", line=LINE, version=versions[-1]) == 1
    assert worker.metric("anoclip_bank_patches", line=LINE) > 0 and worker.metric("anoclip_bank_bytes", line=LINE) > 0
    assert worker.metric("anoclip_bank_refreshes_total", line=LINE, outcome="promoted") >= 2
    assert worker.metric("anoclip_memory_cold_start_frames_total", line=LINE) >= 4
    by_bank = [(float(r["score"]), rec) for r, rec in rows if r["bank_version"]]
    recurring = [s for s, rec in by_bank if rec]
    normal = [s for s, rec in by_bank if not rec]
    assert len(recurring) >= 8 and min(recurring) > np.quantile(normal, 0.9), (recurring, normal)
    last = [(float(r["score"]), rec, float(r["threshold"])) for r, rec in rows if r["bank_version"] == versions[-1]]
    assert all(s >= thr for s, rec, thr in last if rec), "flagged by the last bank's own thresholds"


def test_a_bank_the_gate_refuses_is_audited_with_its_figures_and_never_published(
        pipeline: Pipeline, text_cache_dir: Path) -> None:
    strict, insp, tel = _service(pipeline, text_cache_dir, "ws", gate_max_normal_z=1e-6)  # every candidate fails
    banks = VersionRegistry(pipeline.redis(), pipeline.keys, kind="banks")
    _batch(strict, insp, 0)
    _batch(strict, insp, 4)
    assert strict.run_pending() == 1
    assert banks.versions(LINE) == [] and banks.current(LINE) is None, "a refused bank is never stored"
    entry = banks.audit(LINE)[0]
    assert entry["action"] == "refuse" and "median z" in entry["reason"] and entry["actor"] == "ws"
    gate = json.loads(entry["validation"])
    assert gate["reference"] == "mutual" and gate["positives"] == 1
    assert {"pixel_auroc_candidate", "pixel_auroc_serving", "normal_median_z_candidate"} <= set(gate)
    assert tel.bank_refreshes.labels(LINE, "refused")._value.get() == 1  # noqa: SLF001
    assert all(o.bank_version is None for o in _batch(strict, insp, 8)), "the line stays on mutual scoring"


def test_one_line_adapts_and_remembers_both_refresh_on_one_score_scale(pipeline: Pipeline) -> None:
    """`memory: stream` with `tta.mode: buffered` on one line: the worker starts, the bank and the adapter are
    both refreshed from the line's own frames, results name both, and every score is on the 0..1 scale."""
    cfg = pipeline.config
    cfg["memory"] = MEMORY
    cfg["lines"] = [x for x in cfg["lines"] if x["id"] != LINE] + [
        {"id": LINE, "class_name": "wood", "domain": "texture", "memory": "stream"}]
    cfg["tta"] = {"mode": "buffered", "refresh_every": 16, "min_frames": 8, "holdout": 0.3, "train_steps": 5,
                  "train_share": 1.0, "batch_tokens": 256, "trainer_poll_s": 0.2, "lock_ttl_s": 3.0,
                  "admit_image_z": None, "admit_max_abnormal_share": 1.0, "gate_max_flip_share": 1.0,
                  "gate_auroc_margin": 1.0, "gate_min_contrast_ratio": 0.0}
    worker = pipeline.start_worker("adapt-and-remember")
    worker.wait_ready()
    producer = FrameProducer(pipeline.settings)
    ids = []
    for i in range(64):
        data, ctype = encode(_image(i), "png")
        fid = f"{LINE}-ar{i}-{time.time_ns()}"
        producer.send_raw(b"k", data, build_headers(fid, LINE, "cam-1", time.time_ns(), ctype))
        ids.append(fid)
        if i % 8 == 7:
            producer.flush()
            time.sleep(0.4)  # a live camera's pace: refreshes land between batches
    producer.flush()
    wait_for(lambda: len(pipeline.results([LINE])) >= len(ids), 90, "every frame scored")
    adapters = VersionRegistry(pipeline.redis(), pipeline.keys)
    banks = VersionRegistry(pipeline.redis(), pipeline.keys, kind="banks")
    wait_for(lambda: adapters.current(LINE) is not None, 60, "an adapter promoted on the memory line")
    assert banks.current(LINE) is not None, "a bank promoted on the same line"
    assert worker.metric("anoclip_bank_refreshes_total", line=LINE, outcome="promoted") >= 1
    assert worker.metric("anoclip_tta_runs_total", line=LINE, outcome="promoted") >= 1
    late = _send_spread_one(pipeline, 8)
    wait_for(lambda: all(pipeline.redis().exists(pipeline.keys.frame(f, "result")) for f in late), 60, "late frames")
    res = [json.loads(pipeline.redis().get(pipeline.keys.frame(f, "result"))) for f in late]
    assert {r["adapter_version"] for r in res} == {adapters.current(LINE)}, "scored through the line's adapter"
    assert {r["bank_version"] for r in res} == {banks.current(LINE)}, "and judged with its bank"
    scores = [float(r["score"]) for r in pipeline.results([LINE])]
    assert all(0.0 <= s <= 1.0 for s in scores), "one score scale, 0 to 1, whatever the line runs"


def _send_spread_one(pipeline: Pipeline, n: int) -> list[str]:
    producer = FrameProducer(pipeline.settings)
    ids = []
    for i in range(n):
        data, ctype = encode(_image(500 + i), "png")
        fid = f"{LINE}-late{i}-{time.time_ns()}"
        producer.send_raw(b"k", data, build_headers(fid, LINE, "cam-1", time.time_ns(), ctype))
        ids.append(fid)
    producer.flush()
    return ids
