"""`anoclip score --adapter FILE` judges with the thresholds the adapter file carries (issue 12): an adapter
rescales p(abnormal), so the line's base-model thresholds would give it wrong masks. `--threshold` /
`--pixel-threshold` still win per threshold, and `--calibrate` through the adapter replaces them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.adaptation.tta.files import build_meta, save_adapter, target_for
from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.model.adapters import create_adapter
from pipeline.settings import load_settings
from workers.cli import main

pytestmark = pytest.mark.integration

OWN = {"image": 0.125, "pixel": 0.3125, "pixel_median": 0.25, "frames": 6, "quantile": 0.99,
       "pixel_quantile": 0.999}
"""The adapter's own thresholds: unlike any default (0.5) or calibrated value, so their use shows."""


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    cfg = {"model": {"arch": "anoclip-tiny", "pretrained": "none", "device": "cpu", "precision": "fp32",
                     "text_cache_dir": str(tmp_path / "tc"), "batch_size": 2},
           "lines": [{"id": "bottle", "class_name": "bottle"}]}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((110 + rng.integers(0, 30, (64, 64, 3))).astype(np.uint8)).save(imgs / f"{i}.png")
    inspector = FrameScorer.from_settings(load_settings(config))
    text = inspector.prepare_line("bottle")
    adapter = create_adapter("text", text, generator=torch.Generator().manual_seed(0))
    meta = build_meta(adapter, target_for(inspector, "bottle"), thresholds=OWN)
    path = save_adapter(tmp_path / "bottle.safetensors", adapter, meta)
    return config, imgs, path


def _score(config: Path, out: Path, *args: str) -> list[dict]:
    assert main(["score", "--config", str(config), "--line", "bottle", "--out", str(out), *args]) == 0
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_score_with_an_adapter_judges_with_the_files_thresholds(setup: tuple[Path, Path, Path],
                                                                 tmp_path: Path) -> None:
    config, imgs, adapter = setup
    recs = _score(config, tmp_path / "own", "--adapter", str(adapter), str(imgs))
    assert len(recs) == 4
    for r in recs:
        assert r["adapter_version"].startswith("file-")
        assert r["threshold"] == OWN["image"] and r["pixel_threshold"] == OWN["pixel"]
        assert r["threshold_source"] == "version"
        assert r["verdict"] == ("anomalous" if r["score"] >= OWN["image"] else "normal")

    base = _score(config, tmp_path / "base", str(imgs))  # without the adapter: the line's (default) ones
    assert all(r["threshold"] == 0.5 and r["pixel_threshold"] == 0.5 for r in base)

    manual = _score(config, tmp_path / "manual", "--adapter", str(adapter), "--threshold", "0.75", str(imgs))
    for r in manual:  # --threshold wins for the image; the pixel threshold stays the adapter's
        assert r["threshold"] == 0.75 and r["pixel_threshold"] == OWN["pixel"]
        assert r["threshold_source"] == "manual"
        assert r["verdict"] == ("anomalous" if r["score"] >= 0.75 else "normal")
    both = _score(config, tmp_path / "both", "--adapter", str(adapter), "--threshold", "0.75",
                  "--pixel-threshold", "0.9", str(imgs))
    assert all(r["pixel_threshold"] == 0.9 for r in both)

    calibrated = _score(config, tmp_path / "cal", "--adapter", str(adapter), "--calibrate", str(imgs), str(imgs))
    for r in calibrated:  # calibrated through the adapter on good images: those replace the file's
        assert r["threshold_source"] == "calibrated"
        assert r["threshold"] != OWN["image"] and r["pixel_threshold"] != OWN["pixel"]
