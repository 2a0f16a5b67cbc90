"""Adapter registry and service claims on a real Redis (issue 14, item 1):

- a promotion is refused when the line is paused, or its current adapter moves, *while* the candidate
  trains (so only the registry's own check in `publish` can answer: the service's check before training
  already passed);
- a registry version that does not fit the model (another model's weights, non-finite tensors) is
  skipped: the worker keeps serving what it had and does not retry that version.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.adaptation.registry import VersionRegistry
from pipeline.adaptation.tta.files import build_meta, from_bytes, target_for, to_bytes
from pipeline.adaptation.tta.service import AdapterService
from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.redis_keys import RedisKeys
from tests.conftest import make_tiny_settings
from tests.integration.conftest import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

LINE = "bottle"
FAST_TTA: dict[str, Any] = {
    "mode": "buffered", "refresh_every": 1_000_000, "min_frames": 4, "holdout": 0.3, "train_steps": 6,
    "train_seconds": 60.0, "train_share": 1.0, "batch_tokens": 256, "admit_image_z": None,
    "admit_max_abnormal_share": 1.0, "gate_max_flip_share": 1.0,
}


@pytest.fixture(scope="module")
def inspector(tmp_path_factory: pytest.TempPathFactory) -> FrameScorer:
    return FrameScorer.from_settings(make_tiny_settings(tmp_path_factory.mktemp("tc"), tta=FAST_TTA))


@pytest.fixture
def service(inspector: FrameScorer, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> AdapterService:
    """A line's adapter service with 10 buffered frames. The gate is not under test here (tests/unit/
    test_claims_gate.py, test_tta.py): every trained candidate counts as accepted, so what answers is
    the registry's own check in `publish`. `svc.during_training` holds actions run after training step 2."""
    registry = VersionRegistry(redis_server.client(), RedisKeys(f"claims{uuid.uuid4().hex[:8]}"))
    svc = AdapterService(inspector, registry, [LINE], "w-test")
    rng = np.random.default_rng(0)
    images = [(110 + rng.integers(0, 30, (64, 64, 3))).astype(np.uint8) for _ in range(10)]
    for i, raw in enumerate(inspector.score_raw(LINE, images)):
        svc.observe(LINE, f"f{i}", raw, 10.0, time.time())  # scoring time: the training budget is a share
    tta = svc.lines[LINE].tta
    real = tta.train_candidate
    actions: list[Callable[[], None]] = []

    def train_candidate(progress: Any = None, timed: bool = True, budget: Any = None) -> Any:
        def step(n: int, loss: float) -> None:
            if n == 2:
                while actions:
                    actions.pop(0)()
            if progress is not None:
                progress(n, loss)

        adapter, report = real(step, timed, budget)
        assert adapter is not None and report.steps == FAST_TTA["train_steps"], report.reasons
        report.accepted, report.reasons = True, []
        return adapter, report

    monkeypatch.setattr(tta, "train_candidate", train_candidate)
    svc.during_training = actions  # type: ignore[attr-defined]
    return svc


def _during_training(svc: AdapterService, act: Callable[[], None]) -> list[int]:
    """Run `act` after the next candidate's second training step (inside `refresh`); the list fills when it ran."""
    fired: list[int] = []
    svc.during_training.append(lambda: (act(), fired.append(2)))  # type: ignore[attr-defined]
    return fired


def test_pausing_the_line_during_training_refuses_the_promotion(service: AdapterService) -> None:
    reg = service.registry
    assert not reg.is_paused(LINE), "not paused when the refresh starts: the service's own check passes"
    fired = _during_training(service, lambda: reg.pause(LINE, actor="operator", reason="audit"))
    out = service.refresh(LINE)
    assert fired == [2], "the pause happened while the candidate trained"
    assert out == {"action": "refuse", "reason": "line paused during training"}
    assert reg.versions(LINE) == [] and reg.current(LINE) is None
    assert [(e["action"], e["reason"]) for e in reg.audit(LINE)[:2]] == [
        ("refuse", "line paused during training"), ("pause", "audit")]
    assert service.adapter_for(LINE) == (None, None)

    # control: resumed, the same refresh is promoted
    reg.resume(LINE, actor="operator")
    assert service.refresh(LINE) == {"action": "promote", "version": "v1"}


@pytest.mark.parametrize("move", ["another-promotion", "rollback"])
def test_the_current_adapter_moving_during_training_refuses_the_promotion(service: AdapterService, move: str) -> None:
    reg = service.registry
    assert service.refresh(LINE) == {"action": "promote", "version": "v1"}
    assert service.adapter_for(LINE)[1] == "v1", "the next candidate trains from v1"
    v1_bytes, v1_meta = reg.tensors(LINE, "v1"), reg.meta(LINE, "v1")

    def other_trainer() -> None:
        if move == "rollback":
            reg.rollback(LINE, actor="operator", reason="bad v1")
        else:
            assert reg.publish(LINE, v1_bytes, v1_meta, actor="w-other", reason="x", base_version="v1").promoted

    fired = _during_training(service, other_trainer)
    out = service.refresh(LINE)
    assert fired == [2]
    now = None if move == "rollback" else "v2"
    assert out == {"action": "refuse", "reason": f"current adapter moved from v1 to {now} during training"}
    assert reg.current(LINE) == now
    assert reg.versions(LINE) == (["v1"] if move == "rollback" else ["v1", "v2"]), "no version of ours was written"
    assert reg.audit(LINE)[0]["action"] == "refuse"


def test_a_version_that_does_not_fit_is_skipped_and_not_retried(
    service: AdapterService, inspector: FrameScorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = service.registry
    assert service.refresh(LINE) == {"action": "promote", "version": "v1"}
    served = service.adapter_for(LINE)
    assert served[1] == "v1"
    good = reg.tensors(LINE, "v1")
    adapter, meta = from_bytes(good, target_for(inspector, LINE), inspector.prepare_line(LINE))

    reads: list[str] = []
    real_tensors = reg.tensors
    monkeypatch.setattr(reg, "tensors", lambda line, v: reads.append(v) or real_tensors(line, v))

    def publish(data: bytes, meta_: dict[str, Any], base: str) -> str:
        res = reg.publish(LINE, data, meta_, actor="w-other", reason="x", base_version=base)
        assert res.promoted and res.version is not None
        return res.version

    other_model = dataclasses.replace(target_for(inspector, LINE), weights_id="ViT-B-16-plus-240/laion400m_e32")
    v2 = publish(to_bytes(adapter, build_meta(adapter, other_model)), meta, "v1")
    assert service.sync(LINE) is False
    assert service.adapter_for(LINE) == served, "keeps serving v1"
    assert service.sync(LINE) is False and reads == ["v2"], "a bad version is read once, then skipped"

    with torch.no_grad():
        adapter.weight.view(-1)[0] = float("nan")
    v3 = publish(to_bytes(adapter, meta), meta, v2)
    assert service.sync(LINE) is False and service.adapter_for(LINE) == served
    assert service.follower.bad_versions(LINE) == {v2, v3}

    v4 = publish(good, meta, v3)
    assert service.sync(LINE) is True and service.adapter_for(LINE)[1] == v4 == "v4"
