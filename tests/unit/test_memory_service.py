"""The patch memory as a worker runs it (pipeline/adaptation/memory/service.py): cold start, builds handed off the
scoring path and swapped in between batches, thresholds per bank version, the metrics; and the pieces around it
(the bank thresholds, the shared safetensors header reader, `FrameResult.bank_version`, `lines[].memory`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.adaptation.memory import files as bank_files
from pipeline.adaptation.memory.bank import build_bank
from pipeline.adaptation.memory.files import META_KEY, read_meta
from pipeline.adaptation.memory.params import FORMAT, MemoryBankError, MemoryParams, bank_target
from pipeline.adaptation.memory.records import FrameRecord
from pipeline.adaptation.memory.service import BUILDER_NICE, COLD_START_KEY, MemoryService, threshold_key
from pipeline.adaptation.memory.stream import bank_thresholds
from pipeline.adaptation.tta import files as adapter_files
from pipeline.errors import AdapterMismatchError, ConfigError
from pipeline.evaluation import synth
from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.inspection.score_scale import from_z
from pipeline.observability.telemetry import WorkerTelemetry
from pipeline.streaming.records import FrameResult
from tests.conftest import make_tiny_settings

LINE = "wood"
MEMORY = {"layers": [2], "min_bank_frames": 4, "admit_min_window": 4, "window_frames": 8}


@pytest.fixture(scope="module")
def inspector(text_cache_dir: Path) -> FrameScorer:
    s = make_tiny_settings(text_cache_dir, memory=MEMORY,
                           lines=[{"id": LINE, "class_name": "wood", "domain": "texture", "memory": "stream"}])
    return FrameScorer.from_settings(s)


def _frame(i: int, recurring: bool = False, size: int = 64) -> np.ndarray:
    if recurring:
        return synth.render_recurring("wood", size, 1000 + i, "stain", 7)[0]
    return synth.render_part("wood", size, 1000 + i, None)[0]


def _run(svc: MemoryService, inspector: FrameScorer, batches: list[list[tuple[str, np.ndarray]]],
         build: bool = True) -> list[list]:
    out = []
    for batch in batches:
        raws = inspector.score_raw(LINE, [img for _, img in batch], hidden_layers=svc.hidden_layers)
        out.append(svc.score(LINE, raws, [fid for fid, _ in batch]))
        if build:
            svc.run_pending()  # what the builder thread does between the scorer's batches
    return out


def test_line_memory_setting_defaults_off_and_takes_stream(tmp_path: Path) -> None:
    s = make_tiny_settings(tmp_path)
    assert all(x.memory == "off" for x in s.lines)
    s = make_tiny_settings(tmp_path, lines=[{"id": "a", "class_name": "bottle", "memory": "stream"}])
    assert s.line("a").memory == "stream"
    with pytest.raises(ConfigError, match="lines.0.memory"):
        make_tiny_settings(tmp_path, lines=[{"id": "a", "class_name": "bottle", "memory": "train"}])
    both = make_tiny_settings(tmp_path, tta={"mode": "buffered"},  # a line may adapt and remember
                              lines=[{"id": "a", "class_name": "bottle"},
                                     {"id": "b", "class_name": "bottle", "memory": "stream"}])
    assert both.line("b").memory == "stream" and both.tta.mode == "buffered"
    # one score scale: a fixed threshold written in z units (a memory line's before) is refused, not reread
    with pytest.raises(ConfigError, match=r"lines\.0: .*threshold\.image: 2\.5 is not an anomaly score"):
        make_tiny_settings(tmp_path, lines=[{"id": "a", "class_name": "bottle", "memory": "stream",
                                             "threshold": {"image": 2.5}}])


def test_cold_start_then_banks_swapped_in_between_batches_never_with_the_frame_itself(
        inspector: FrameScorer) -> None:
    tel = WorkerTelemetry()
    svc = MemoryService(inspector, None, [LINE], "w-test", tel)
    frames = [(f"f{i}", _frame(i)) for i in range(24)]
    batches = [frames[i : i + 4] for i in range(0, 24, 4)]
    # builds are not run: a due refresh is handed over, and the served bank does not change under the scorer
    first = _run(svc, inspector, batches[:2], build=False)
    assert all(o.bank_version is None and o.threshold_key == COLD_START_KEY for b in first for o in b)
    assert svc.lines[LINE].building and svc.lines[LINE].memory.bank is None
    assert tel.memory_cold_start_frames.labels(LINE)._value.get() == 8  # noqa: SLF001
    assert svc.run_pending() == 1 and not svc.lines[LINE].building
    assert svc.lines[LINE].memory.bank is None, "a built bank waits for the next batch"
    before = svc.lines[LINE].memory.admitted
    _run(svc, inspector, [batches[1]], build=False)  # the same frames again (a retry, a replay): not re-admitted
    assert svc.lines[LINE].memory.admitted == before
    rest = _run(svc, inspector, batches[2:])
    served = [o.bank_version for b in rest for o in b]
    assert served[0] is not None and len(set(served)) >= 2, "refreshed again later"
    # every bank that scored a frame holds only frames before it
    banks = {v: svc.lines[LINE].memory.bank for v in served[-1:]}
    seen = [fid for fid, _ in frames]
    last_bank = banks[served[-1]]
    first_scored_by_it = served.index(served[-1]) + 8
    assert max(seen.index(f) for f in last_bank.frames) < first_scored_by_it
    # thresholds of each served version are registered under its key, and judge in z units
    th = inspector.thresholds(LINE)
    assert th.has_version(threshold_key(served[-1])) and th.has_version(COLD_START_KEY)
    vt = th.version_thresholds(threshold_key(served[-1]))
    # on the anomaly scale: a z median of 0 is from_z(0)
    assert vt is not None and 0 < vt.image < 1 and vt.pixel_median == pytest.approx(from_z(0.0))
    # metrics: the version in use, its size, the builds
    assert tel.bank_version.labels(LINE, served[-1])._value.get() == 1  # noqa: SLF001
    assert tel.bank_version.labels(LINE, "none")._value.get() == 0  # noqa: SLF001
    bank = svc.lines[LINE].memory.bank
    assert tel.bank_patches.labels(LINE)._value.get() == bank.patches  # noqa: SLF001
    assert tel.bank_bytes.labels(LINE)._value.get() == bank.nbytes > 0  # noqa: SLF001
    assert tel.bank_refreshes.labels(LINE, "promoted")._value.get() == svc.lines[LINE].memory.refreshes  # noqa: SLF001


def test_a_recurring_defect_stays_above_normal_frames_across_refreshes(inspector: FrameScorer) -> None:
    svc = MemoryService(inspector, None, [LINE], "w-test")
    flags = [i >= 10 and i % 10 in (3, 7, 9) for i in range(48)]  # the same stain in 30% of frames from 10 on
    frames = [(f"r{i}", _frame(i, rec)) for i, rec in enumerate(flags)]
    outs = [o for b in _run(svc, inspector, [frames[i : i + 4] for i in range(0, 48, 4)]) for o in b]
    assert svc.lines[LINE].memory.refreshes >= 3
    by_bank = [(o, f) for o, f in zip(outs, flags, strict=True) if o.bank_version is not None]
    recurring = [o.raw.score for o, f in by_bank if f]
    normal = [o.raw.score for o, f in by_bank if not f]
    assert len(recurring) >= 8 and min(recurring) > np.quantile(normal, 0.9), (recurring, normal)
    # flagged by the thresholds its own bank carries, also by the last bank
    th = inspector.thresholds(LINE)
    last = [(o, f) for o, f in by_bank if o.bank_version == by_bank[-1][0].bank_version]
    assert all(o.raw.score >= th.view(o.threshold_key).image for o, f in last if f)


def test_bank_thresholds_are_held_out_and_ignore_refused_patches(inspector: FrameScorer) -> None:
    params = MemoryParams(layers=(2,))
    target = bank_target(inspector, LINE, params)
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(64, target.feature_dim, generator=g), dim=-1)

    def rec(i: int) -> FrameRecord:
        f = torch.nn.functional.normalize(base + 0.05 * torch.randn(base.shape, generator=g), dim=-1)
        return FrameRecord(f"f{i}", f[None], torch.rand(50, generator=g), 0.5)

    recs = [rec(i) for i in range(6)]
    bank = build_bank(LINE, recs, params, target)
    th = bank_thresholds(bank, recs, params, quantile=0.99, pixel_quantile=0.999)
    assert th["frames"] == 6 and th["pixel_median"] == 0.0 and np.isfinite(th["image"])
    # a frame's own rows never answer for it: with them, every patch has distance 0 and the threshold falls
    own = bank_thresholds(bank, [FrameRecord("other", recs[0].features, recs[0].zero_shot_sample, 0.5)],
                          params)
    assert own["image"] < th["image"]
    # a patch admission refused does not count: a foreign patch on a kept-elsewhere frame leaves it unchanged
    odd = FrameRecord("f0", recs[0].features.clone(), recs[0].zero_shot_sample, 0.5)
    odd.features[0, :3] = torch.nn.functional.normalize(torch.randn(3, target.feature_dim, generator=g), dim=-1)
    odd.keep = torch.ones(1, 64, dtype=torch.bool)
    odd.keep[0, :3] = False
    clean = FrameRecord("f0", recs[0].features, recs[0].zero_shot_sample, 0.5)
    clean.keep = odd.keep
    assert bank_thresholds(bank, [odd], params) == bank_thresholds(bank, [clean], params)
    assert bank_thresholds(bank, [], params) == {}


def test_adapters_and_banks_share_one_safetensors_header_reader() -> None:
    for reader, err, noun in ((adapter_files.read_meta, AdapterMismatchError, "adapter file"),
                              (read_meta, MemoryBankError, "memory bank")):
        with pytest.raises(err, match=f"{noun}: too short"):
            reader(b"abc")
        with pytest.raises(err, match=f"{noun}: invalid safetensors header"):
            reader((1 << 40).to_bytes(8, "little") + b"{}")
        header = json.dumps({"__metadata__": {}}).encode()
        with pytest.raises(err, match=f"not an anoclip {noun}: no .* metadata"):
            reader(len(header).to_bytes(8, "little") + header)
    header = json.dumps({"__metadata__": {META_KEY: json.dumps({"format": FORMAT, "format_version": 99})}})
    with pytest.raises(MemoryBankError, match="memory bank format version 99 is not supported"):
        read_meta(len(header).to_bytes(8, "little") + header.encode())
    assert bank_files.read_header_meta is adapter_files.read_header_meta  # one artifact format (artifacts.py)


def test_frame_results_name_their_bank_version() -> None:
    r = FrameResult(frame_id="f1", line=LINE, capture_ts_ns=1, score=2.0, anomalous=True, threshold=1.0,
                    pixel_threshold=1.0, adapter_version="v2", bank_version="v3")
    d = r.to_json_dict()
    assert (d["adapter_version"], d["bank_version"]) == ("v2", "v3")
    assert FrameResult.from_json_dict(d).bank_version == "v3"
    assert r.results_entry(result_key="k", mask_key="m")["bank_version"] == "v3"
    assert FrameResult.from_json_dict({k: v for k, v in d.items() if k != "bank_version"}).bank_version is None


def test_the_bank_builder_runs_at_a_lower_priority_than_scoring(inspector: FrameScorer) -> None:
    """A build is seconds of CPU at once: at nice +10 it takes what the scorer thread leaves."""
    import os
    import threading
    import time

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    svc = MemoryService(inspector, None, [LINE], "w-test", WorkerTelemetry()).start()
    try:
        builder = next(t for t in threading.enumerate() if t.name == "memory-builder")
        end = time.monotonic() + 10
        while time.monotonic() < end and os.getpriority(os.PRIO_PROCESS, builder.native_id) == base:
            time.sleep(0.01)
        assert os.getpriority(os.PRIO_PROCESS, builder.native_id) == min(19, base + BUILDER_NICE)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base, "the caller keeps its priority"
    finally:
        svc.stop()
