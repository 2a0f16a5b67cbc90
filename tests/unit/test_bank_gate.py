"""The memory bank gate (pipeline/adaptation/memory/gate.py `gate_bank`, docs/memory.md *The bank gate*): a candidate
bank is judged on held-out frames it has never seen, with synthetic defects pasted into them as labelled positives;
a bank that learned the defects as normal, or whose scales put normal frames far from z = 0, is refused. And the
worker's side (pipeline/adaptation/memory/service.py): the time split, refusals counted, held-out rows carried."""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import numpy as np
import pytest

from pipeline.adaptation.memory.bank import BankScales, MemoryBank, build_bank
from pipeline.adaptation.memory.gate import POSITIVE_KIND, BankGateRule, gate_bank, make_positives
from pipeline.adaptation.memory.params import MemoryParams, bank_target
from pipeline.adaptation.memory.records import FrameRecord, frame_record, score_frames
from pipeline.adaptation.memory.scoring import BankScorer
from pipeline.adaptation.memory.service import MemoryService
from pipeline.adaptation.memory.stream import HeldOut
from pipeline.adaptation.synthetic import synthetic_anomaly
from pipeline.adaptation.tta.buffered import input_resizer
from pipeline.errors import ConfigError
from pipeline.evaluation import synth
from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.model.memory import ScoreScale
from pipeline.model.tta_gate import GateResult
from pipeline.model.tta_params import stream_seed
from pipeline.observability.telemetry import WorkerTelemetry
from tests.conftest import make_tiny_settings

LINE = "wood"
MEMORY = {"layers": [2], "min_bank_frames": 4, "admit_min_window": 4, "window_frames": 8}
PARAMS = MemoryParams(layers=(2,))


@pytest.fixture(scope="module")
def inspector(text_cache_dir: Path) -> FrameScorer:
    s = make_tiny_settings(text_cache_dir, memory=MEMORY,
                           lines=[{"id": LINE, "class_name": "wood", "domain": "texture", "memory": "stream"}])
    return FrameScorer.from_settings(s)


def _wood(i: int) -> np.ndarray:
    return synth.render_part("wood", 64, 1000 + i, None)[0]


def _records(inspector: FrameScorer, images: list[np.ndarray], prefix: str) -> list[FrameRecord]:
    raws = score_frames(inspector, LINE, images, PARAMS)
    return [frame_record(r, f"{prefix}{i}", PARAMS, inspector.model.grid_size) for i, r in enumerate(raws)]


@pytest.fixture(scope="module")
def setting(inspector: FrameScorer) -> dict:
    """A serving bank of frames 0-7, a healthy candidate grown on it from frames 8-15, held-out frames 16-19 with a
    pasted positive each (what `take_pending` and `make_positives` hand the gate)."""
    target = bank_target(inspector, LINE, PARAMS)
    serving = build_bank(LINE, _records(inspector, [_wood(i) for i in range(8)], "s"), PARAMS, target)
    new = _records(inspector, [_wood(i) for i in range(8, 16)], "n")
    candidate = build_bank(LINE, new, PARAMS, target, parent=serving)
    resize = input_resizer(inspector)
    held_images = [resize(_wood(i)) for i in range(16, 20)]
    normals = _records(inspector, held_images, "h")
    held = [HeldOut(r, img) for r, img in zip(normals, held_images, strict=True)]
    return {"target": target, "serving": serving, "new": new, "candidate": candidate, "normals": normals,
            "held": held, "positives": make_positives(inspector, LINE, held, PARAMS),
            "scorer": BankScorer(inspector.model, PARAMS)}


def _gate(setting: dict, candidate: MemoryBank, rule: BankGateRule | None = None) -> GateResult:
    return gate_bank(candidate, setting["serving"], setting["normals"], setting["positives"], setting["scorer"],
                     rule or BankGateRule.from_params(PARAMS))


def test_positives_are_one_pasted_defect_per_held_out_frame(setting: dict) -> None:
    pos = setting["positives"]
    assert [p.source_frame for p in pos] == [h.record.frame_id for h in setting["held"]]
    assert all(p.mask.any() and not p.mask.all() and tuple(p.mask.shape) == p.raw.input_hw for p in pos)
    assert all(p.record.frame_id.endswith(f"#{POSITIVE_KIND}") for p in pos)
    assert all(h.image is not None and h.image.shape[:2] == p.raw.input_hw for h, p in zip(setting["held"], pos,
                                                                                          strict=True))
    assert not [h for h in setting["held"] if h.record.frame_id in set(setting["candidate"].frames)], "held out"


def test_a_good_candidate_passes_the_gate(setting: dict) -> None:
    result = _gate(setting, setting["candidate"])
    f = result.figures
    assert result.accepted, result.reasons
    assert f["reference"] == f"bank:{setting['serving'].version}" and f["holdout_frames"] == 4 and f["positives"] == 4
    assert f["pixel_auroc_candidate"] > 0.6 and f["pixel_auroc_candidate"] >= f["pixel_auroc_serving"] - 0.05
    assert abs(f["normal_median_z_candidate"]) < 1.0 and f["labelled_pixels"] > 0


def test_a_candidate_that_learned_the_pasted_defect_as_normal_is_refused(inspector: FrameScorer, setting: dict) -> None:
    # the same defects (same look, same place: the gate's own seeds) on the new frames, all their patches admitted,
    # as if admission had let a recurring defect in: the defect is now "normal" to the candidate
    seeds = [stream_seed(PARAMS.seed, zlib.crc32(h.record.frame_id.encode())) for h in setting["held"]]
    resize = input_resizer(inspector)
    poisoned_imgs = [synthetic_anomaly(resize(_wood(30 + j)), seeds[j % len(seeds)], POSITIVE_KIND).image
                     for j in range(8)]
    poison = _records(inspector, poisoned_imgs, "p")
    # calibrated on the clean new frames (the newest records), so only the rows differ from the good candidate
    candidate = build_bank(LINE, poison + setting["new"], PARAMS, setting["target"], parent=setting["serving"])
    result = _gate(setting, candidate)
    f = result.figures
    assert not result.accepted
    assert any("pixel AUROC" in r for r in result.reasons), result.reasons
    assert f["pixel_auroc_candidate"] < f["pixel_auroc_serving"] - 0.05
    # the AUROC rule alone refused it: with no margin check it would have passed
    assert _gate(setting, candidate, BankGateRule(auroc_margin=1.0)).accepted


def _shifted(bank: MemoryBank, by: float) -> MemoryBank:
    s = bank.scales
    mem = ScoreScale(s.memory.center + by * s.memory.scale, s.memory.scale)
    return dataclasses.replace(bank, scales=BankScales(mem, s.zero_shot, s.cls))


@pytest.mark.parametrize(("by", "what"), [(3.0, "everything looks normal"), (-3.0, "normal frames look abnormal")])
def test_the_collapse_rule_refuses_scales_that_move_normal_frames_off_zero(setting: dict, by: float,
                                                                           what: str) -> None:
    good = _gate(setting, setting["candidate"])
    bad = _gate(setting, _shifted(setting["candidate"], by))
    assert not bad.accepted and len(bad.reasons) == 1 and what in bad.reasons[0], bad.reasons
    assert bad.figures["normal_median_z_candidate"] == pytest.approx(good.figures["normal_median_z_candidate"] - by,
                                                                      abs=1e-4)
    # a shifted memory z moves the fused map by a constant: the pixel AUROC cannot see it, only this rule does
    assert bad.figures["pixel_auroc_candidate"] == pytest.approx(good.figures["pixel_auroc_candidate"], abs=1e-6)
    assert _gate(setting, _shifted(setting["candidate"], by), BankGateRule(max_normal_z=5.0)).accepted


def test_a_bank_of_another_product_fails_the_collapse_rule(inspector: FrameScorer, setting: dict) -> None:
    bottles = _records(inspector, [synth.render_part("bottle", 64, 1000 + i, None)[0] for i in range(8)], "b")
    other = build_bank(LINE, bottles, PARAMS, setting["target"])
    result = _gate(setting, other)
    assert not result.accepted and result.figures["normal_median_z_candidate"] > 1.0, result.figures


def test_first_bank_is_judged_against_mutual_scoring(setting: dict) -> None:
    window = setting["new"] + setting["normals"]
    result = gate_bank(setting["candidate"], None, setting["normals"], setting["positives"], setting["scorer"],
                       window=window)
    f = result.figures
    assert f["reference"] == "mutual" and 0.0 <= f["pixel_auroc_serving"] <= 1.0
    assert np.isfinite(f["normal_median_z_serving"])
    # no window at all: the reference is the zero-shot map alone, still a number to beat
    alone = gate_bank(setting["candidate"], None, setting["normals"], setting["positives"], setting["scorer"])
    assert 0.0 <= alone.figures["pixel_auroc_serving"] <= 1.0


# -- the worker's side ------------------------------------------------------------------------------------------


def _stream(svc: MemoryService, inspector: FrameScorer, start: int, n: int, build: bool = True) -> list:
    out = []
    for i in range(start, start + n, 4):
        ids = [f"f{j}" for j in range(i, i + 4)]
        raws = inspector.score_raw(LINE, [_wood(j) for j in range(i, i + 4)], hidden_layers=svc.hidden_layers)
        out.append(svc.score(LINE, raws, ids))
        if build:
            svc.run_pending()
    return out


def test_the_worker_holds_out_the_newest_frames_and_banks_them_next_time(inspector: FrameScorer) -> None:
    svc = MemoryService(inspector, None, [LINE], "w-test")
    results: list[dict] = []
    build = svc.build
    svc.build = lambda *a: results.append(build(*a)) or results[-1]  # type: ignore[method-assign]
    _stream(svc, inspector, 0, 12)
    first = results[0]
    assert first["action"] == "promote", first
    held = first["validation"]["holdout_ids"]
    assert len(held) == 1 and first["validation"]["reference"] == "mutual"
    mem = svc.lines[LINE].memory
    assert not set(held) & set(mem.bank.frames), "held out of the bank it judged"
    assert set(held) <= set(mem.pending.frames), "then carried into the next build"
    _stream(svc, inspector, 12, 8)  # the second build (8 more admitted frames) and one batch served by it
    assert len(results) == 2 and results[1]["action"] == "promote" and mem.bank.version == results[1]["version"]
    assert set(held) <= set(mem.bank.frames) and not set(results[1]["validation"]["holdout_ids"]) & set(mem.bank.frames)
    assert results[1]["validation"]["reference"].startswith("bank:")
    assert max(int(f[1:]) for f in held) < min(int(f[1:]) for f in results[1]["validation"]["holdout_ids"])


def test_a_refused_bank_is_counted_not_served_and_its_rows_dropped(inspector: FrameScorer) -> None:
    tel = WorkerTelemetry()
    strict = dataclasses.replace(MemoryParams.from_settings(inspector.settings.memory), gate_max_normal_z=1e-6)
    svc = MemoryService(inspector, None, [LINE], "w-test", tel, params=strict)
    _stream(svc, inspector, 0, 8, build=False)
    assert svc.lines[LINE].building
    out = svc.build(*svc._jobs.get_nowait())  # noqa: SLF001
    assert out["action"] == "refuse" and "median z" in out["reason"]
    assert out["validation"]["normal_median_z_candidate"] is not None
    assert tel.bank_refreshes.labels(LINE, "refused")._value.get() == 1  # noqa: SLF001
    assert tel.bank_refreshes.labels(LINE, "promoted")._value.get() == 0  # noqa: SLF001
    after = _stream(svc, inspector, 8, 4, build=False)
    mem = svc.lines[LINE].memory
    assert mem.bank is None and all(o.bank_version is None for o in after[0]), "nothing served"
    assert mem.pending.frames and not set(out["validation"]["holdout_ids"]) & set(mem.pending.frames), "dropped"
    assert all(int(f[1:]) >= 8 for f in mem.pending.frames), "the refused build's rows are not retried"


def test_gate_settings(tmp_path: Path) -> None:
    s = make_tiny_settings(tmp_path)
    assert (s.memory.gate_holdout_frames, s.memory.gate_auroc_margin, s.memory.gate_max_normal_z) == (8, 0.05, 1.0)
    p = MemoryParams.from_settings(make_tiny_settings(tmp_path, memory={"gate_holdout_frames": 0}).memory)
    assert p.gate_holdout_frames == 0 and BankGateRule.from_params(p) == BankGateRule()
    with pytest.raises(ConfigError, match="memory.gate_max_normal_z"):
        make_tiny_settings(tmp_path, memory={"gate_max_normal_z": 0})


def test_no_holdout_means_no_gate(inspector: FrameScorer) -> None:
    off = dataclasses.replace(MemoryParams.from_settings(inspector.settings.memory), gate_holdout_frames=0)
    svc = MemoryService(inspector, None, [LINE], "w-test", params=off)
    _stream(svc, inspector, 0, 8, build=False)
    out = svc.build(*svc._jobs.get_nowait())  # noqa: SLF001
    assert out["action"] == "promote" and out["validation"] == {"gate": "off (memory.gate_holdout_frames: 0)",
                                                                 "gate_seconds": out["validation"]["gate_seconds"]}
