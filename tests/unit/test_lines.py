"""Every line configured in config.yaml scores with the tiny model (timm-style registry test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.model import MODEL_CONFIGS, create_anoclip
from pipeline.settings import load_settings
from pipeline.verdicts.inspector import Inspector
from tests.conftest import make_tiny_settings

REPO = Path(__file__).resolve().parents[2]
CONFIGURED = load_settings(REPO / "config.yaml").lines


@pytest.fixture(scope="module")
def inspector(tmp_path_factory: pytest.TempPathFactory) -> FrameScorer:
    lines = [line.model_dump() for line in CONFIGURED]
    settings = make_tiny_settings(tmp_path_factory.mktemp("tc"), lines=lines)
    return FrameScorer(settings, create_anoclip(settings.model))


@pytest.mark.parametrize("line_id", [line.id for line in CONFIGURED])
def test_configured_line_scores(inspector: FrameScorer, line_id: str) -> None:
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (48, 80, 3), dtype=np.uint8), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)]
    out = Inspector(inspector).inspect(line_id, frames)
    assert [o.anomaly_map.shape for o in out] == [(48, 80), (64, 64)]
    for o in out:
        assert 0.0 < o.score < 1.0 and o.mask.shape == o.anomaly_map.shape
        assert o.verdict == (o.score >= o.image_threshold)
        assert np.array_equal(o.mask, o.anomaly_map >= o.pixel_threshold)


@pytest.mark.parametrize("arch", sorted(MODEL_CONFIGS))
def test_registered_architectures_build(arch: str, tmp_path: Path) -> None:
    s = make_tiny_settings(tmp_path, model={"arch": arch})
    ins = FrameScorer(s, create_anoclip(s.model))
    out = Inspector(ins).inspect("bottle", [np.zeros((30, 50, 3), dtype=np.uint8)])
    assert out[0].anomaly_map.shape == (30, 50)
