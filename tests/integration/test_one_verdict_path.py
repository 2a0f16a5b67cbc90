"""One verdict path: the same frames judged by a streaming worker (real broker, real Redis), `anoclip serve`,
`anoclip score` and the Python API get the same scores, verdicts and masks, for a zero-shot line (thresholds
calibrated by the worker and published), an adapter line (the registry's adapter and its own thresholds) and a
memory line (the registry's bank, judged on the anomaly scale with the bank's thresholds)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.adaptation.memory.files import to_bytes as bank_bytes
from pipeline.adaptation.memory.params import MemoryParams
from pipeline.adaptation.memory.scoring import bank_from_images
from pipeline.adaptation.registry import VersionRegistry
from pipeline.adaptation.tta.files import build_meta, target_for
from pipeline.adaptation.tta.files import to_bytes as adapter_bytes
from pipeline.evaluation import synth
from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.model.adapters import create_adapter
from pipeline.streaming.envelope import build_headers
from pipeline.streaming.frame_sources import encode
from pipeline.streaming.producer import FrameProducer
from pipeline.verdicts.inspector import Inspector
from tests.integration.conftest import Pipeline, serving, wait_for
from workers.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

ZERO, ADAPTED, MEMORY_LINE = "pcb1", "bottle", "wood"
MEMORY: dict[str, Any] = {"layers": [2], "min_bank_frames": 4, "admit_min_window": 4, "window_frames": 8}
N = 3  # test frames per line


def _frame(line: str, i: int) -> np.ndarray:
    defect = "stain" if line == MEMORY_LINE and i == 1 else ("scratch" if i == 2 else None)
    return synth.render_part(line, 64, 5000 + i, defect)[0]


def _png_mask(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L")) > 127


def _configure(pipeline: Pipeline) -> None:
    cfg = pipeline.config
    cfg["memory"] = MEMORY
    cfg["tta"] = {"mode": "buffered", "trainer_poll_s": 0.2, "refresh_every": 100_000, "min_frames": 100_000}
    cfg["redis"]["store_masks"] = "all"
    cfg["lines"] = [
        {"id": ZERO, "class_name": "printed circuit board", "threshold": {"warmup_frames": 4, "quantile": 0.5}},
        {"id": ADAPTED, "class_name": "bottle"},
        {"id": MEMORY_LINE, "class_name": "wood", "domain": "texture", "memory": "stream"},
    ]


def _publish_state(pipeline: Pipeline) -> tuple[str, str]:
    """An adapter for the adapter line and a bank for the memory line, published as workers publish them; both
    registries paused so nothing the test's frames teach can move them."""
    settings = pipeline.settings
    scorer = FrameScorer.from_settings(settings)
    adapters = VersionRegistry(pipeline.redis(), pipeline.keys)
    adapter = create_adapter(scorer.line(ADAPTED).adapter_kind, scorer.prepare_line(ADAPTED),
                             generator=torch.Generator().manual_seed(7))
    meta = build_meta(adapter, target_for(scorer, ADAPTED), thresholds={"image": 0.9999, "pixel": 0.52,
                                                                        "pixel_median": 0.4})
    a = adapters.publish(ADAPTED, adapter_bytes(adapter, meta), meta, actor="test", reason="test", base_version=None)
    banks = VersionRegistry(pipeline.redis(), pipeline.keys, kind="banks")
    bank = bank_from_images(scorer, MEMORY_LINE, [synth.render_part("wood", 64, 100 + i, None)[0] for i in range(6)],
                            MemoryParams.from_settings(settings.memory), ids=[f"ref-{i}" for i in range(6)])
    b = banks.publish(MEMORY_LINE, bank_bytes(bank), {**bank.meta, "thresholds": {"image": 2.0, "pixel": 2.5,
                                                                                  "pixel_median": 0.0}},
                      actor="test", reason="test", base_version=None)
    assert a.promoted and b.promoted
    for line in (ZERO, ADAPTED, MEMORY_LINE):
        adapters.pause(line, actor="test")
        banks.pause(line, actor="test")
    return str(a.version), str(b.version)


def _send(pipeline: Pipeline, line: str, frames: list[np.ndarray], tag: str) -> list[str]:
    producer = FrameProducer(pipeline.settings)
    ids = []
    for i, img in enumerate(frames):
        data, ctype = encode(img, "png")
        fid = f"{line}-{tag}{i}-{time.time_ns()}"
        producer.send_raw(line.encode(), data, build_headers(fid, line, "cam-1", time.time_ns(), ctype))
        ids.append(fid)
    producer.flush()
    producer.close()
    return ids


def _worker_view(pipeline: Pipeline, ids: list[str]) -> list[tuple[float, bool, np.ndarray]]:
    r = pipeline.redis()
    out = []
    for fid in ids:
        res = json.loads(r.get(pipeline.keys.frame(fid, "result")))
        mask = _png_mask(r.get(pipeline.keys.frame(fid, "mask")))
        out.append((float(res["score"]), res["verdict"] == "anomalous", mask))
    return out


def _serve_view(port: int, line: str, frames: list[np.ndarray]) -> list[tuple[float, bool, np.ndarray]]:
    out = []
    for img in frames:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", f"/v1/lines/{line}/inspect?mask=true", body=encode(img, "png")[0],
                     headers={"Content-Type": "image/png"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
        assert resp.status == 200, body
        out.append((float(body["score"]), body["verdict"] == "anomalous",
                    _png_mask(base64.b64decode(body["mask_png"]))))
    return out


def _score_view(pipeline: Pipeline, line: str, frames: list[np.ndarray],
                tmp: Path) -> list[tuple[float, bool, np.ndarray]]:
    src, out = tmp / f"in-{line}", tmp / f"out-{line}"
    src.mkdir()
    for i, img in enumerate(frames):
        Image.fromarray(img).save(src / f"{i}.png")
    assert main(["score", "--line", line, "--config", str(pipeline.config_path), "--out", str(out), str(src)]) == 0
    recs = sorted((json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()),
                  key=lambda r: int(Path(r["image"]).stem))
    return [(float(r["score"]), r["verdict"] == "anomalous", _png_mask(Path(r["mask"]).read_bytes())) for r in recs]


def _api_view(inspector: Inspector, line: str, frames: list[np.ndarray]) -> list[tuple[float, bool, np.ndarray]]:
    return [(r.score, bool(r.verdict), r.mask) for r in inspector.inspect(line, frames)]


def test_worker_serve_score_and_api_give_one_verdict(pipeline: Pipeline, tmp_path: Path) -> None:
    _configure(pipeline)
    adapter_v, bank_v = _publish_state(pipeline)
    worker = pipeline.start_worker("one-path")
    worker.wait_ready()
    time.sleep(1.0)  # the adapter and bank followers poll every 0.2 s
    warm = _send(pipeline, ZERO, [synth.render_part("pcb1", 64, 900 + i, None)[0] for i in range(4)], "warm")
    _send(pipeline, MEMORY_LINE, [synth.render_part("wood", 64, 950, None)[0]], "warm")  # the staged bank goes in
    wait_for(lambda: len(pipeline.results([ZERO])) >= len(warm), 60, "warm-up frames scored")
    wait_for(lambda: worker.metric("anoclip_bank_version", line=MEMORY_LINE, version=bank_v) == 1, 30, "bank served")
    wait_for(lambda: pipeline.redis().hget(pipeline.keys.threshold(ZERO), "calibrated_image") is not None, 30,
             "the zero-shot line's calibration published")

    frames = {line: [_frame(line, i) for i in range(N)] for line in (ZERO, ADAPTED, MEMORY_LINE)}
    ids = {line: _send(pipeline, line, fr, "t") for line, fr in frames.items()}
    wait_for(lambda: all(pipeline.redis().exists(pipeline.keys.frame(f, "result")) for v in ids.values() for f in v),
             60, "every test frame scored")
    results = {json.loads(pipeline.redis().get(pipeline.keys.frame(f, "result")))["frame_id"]:
               json.loads(pipeline.redis().get(pipeline.keys.frame(f, "result"))) for v in ids.values() for f in v}
    assert {results[f]["adapter_version"] for f in ids[ADAPTED]} == {adapter_v}
    assert {results[f]["bank_version"] for f in ids[MEMORY_LINE]} == {bank_v}
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in results.values()), "one score scale, 0 to 1"
    assert {results[f]["threshold_source"] for f in ids[ZERO]} == {"calibrated"}
    assert {results[f]["threshold_source"] for f in ids[ADAPTED]} == {"version"}

    views: dict[str, dict[str, list[tuple[float, bool, np.ndarray]]]] = {
        "worker": {line: _worker_view(pipeline, v) for line, v in ids.items()}}
    with serving(pipeline.settings, FrameScorer.from_settings(pipeline.settings)) as (_state, port):
        views["serve"] = {line: _serve_view(port, line, fr) for line, fr in frames.items()}
    views["score"] = {line: _score_view(pipeline, line, fr, tmp_path) for line, fr in frames.items()}
    with Inspector.from_settings(pipeline.settings) as inspector:
        views["api"] = {line: _api_view(inspector, line, fr) for line, fr in frames.items()}

    ref = views["worker"]
    for name, view in views.items():
        for line in frames:
            for i, ((s0, v0, m0), (s1, v1, m1)) in enumerate(zip(ref[line], view[line], strict=True)):
                assert s1 == pytest.approx(s0, abs=1e-5), (name, line, i)
                assert v1 == v0, (name, line, i, s0, s1)
                assert m1.shape == m0.shape and (m1 != m0).mean() <= 0.001, (name, line, i)
    # the adapter line's own image threshold (0.9999) passes its frames; the other lines flag theirs
    assert any(v for view in ref.values() for _, v, _ in view) and not all(
        v for view in ref.values() for _, v, _ in view), "the frames include both verdicts"
