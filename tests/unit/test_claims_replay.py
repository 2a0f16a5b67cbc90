"""Replay of a stream through buffered TTA, both outcomes of its first refresh checked unconditionally
(test_tta.py checks the accepted case only `if` the random tiny model's candidate passes the gate):
an accepted candidate serves every later frame, a refused one leaves them on the base model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.adaptation.tta.buffered import BufferedTTA, replay_buffered
from pipeline.inspection.frame_scorer import FrameScorer
from tests.conftest import make_tiny_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def inspector(text_cache_dir: Path) -> FrameScorer:
    return FrameScorer.from_settings(make_tiny_settings(
        text_cache_dir, tta={"min_frames": 6, "refresh_every": 10, "train_steps": 10, "holdout": 0.25}))


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [(110 + rng.integers(0, 30, (64, 64, 3))).astype(np.uint8) for _ in range(n)]


@pytest.mark.parametrize("accept", [True, False])
def test_frames_after_the_first_refresh_follow_its_outcome(
    inspector: FrameScorer, monkeypatch: pytest.MonkeyPatch, accept: bool
) -> None:
    st = BufferedTTA.for_line(inspector, "bottle")
    real = st.train_candidate

    def decided(*a: Any, **k: Any) -> Any:  # the gate's decision is not under test here: impose it
        adapter, report = real(*a, **k)
        assert adapter is not None and report.steps == 10
        report.accepted, report.reasons = accept, ([] if accept else ["refused for the test"])
        return adapter, report

    monkeypatch.setattr(st, "train_candidate", decided)
    images = _images(14)
    steps = list(replay_buffered(inspector, "bottle", images, state=st))
    assert [i for i, s in enumerate(steps) if s.refresh is not None] == [9]
    first = steps[9].refresh
    assert first is not None and first.accepted is accept
    zero_shot = inspector.score_raw("bottle", images)
    for s, z in zip(steps[:10], zero_shot[:10], strict=True):
        assert s.adapter_version is None and torch.equal(s.raw.anomaly_map, z.anomaly_map)
    for s, z in zip(steps[10:], zero_shot[10:], strict=True):
        if accept:
            assert s.adapter_version == first.extra["version"] == st.version is not None
            assert not torch.equal(s.raw.anomaly_map, z.anomaly_map), "served by the new adapter"
        else:
            assert s.adapter_version is None and "version" not in first.extra and st.current is None
            assert torch.equal(s.raw.anomaly_map, z.anomaly_map), "still the base model"
