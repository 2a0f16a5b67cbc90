"""The public API of docs/api.md: the names a notebook uses, cheap to import, and the example works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import pipeline
from pipeline.settings import Settings


def test_import_pipeline_does_not_load_torch() -> None:
    code = "import sys, pipeline; from pipeline import load_settings; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_public_name_resolves() -> None:
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None, name


def test_score_a_folder_as_the_docs_show(tiny_settings: Settings, tmp_path: Path) -> None:
    from pipeline import Inspector, list_images, load_image, save_overlay

    folder = tmp_path / "frames"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, hw in (("a.png", (64, 96)), ("sub/b.png", (80, 64))):
        Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(folder / name)
    inspector = Inspector.from_settings(tiny_settings, follow="never")  # a unit test: no Redis to follow
    paths = list_images([folder])
    assert [p.name for p in paths] == ["a.png", "b.png"]
    for path in paths:
        image = load_image(path)
        (r,) = inspector.inspect("bottle", [image])
        assert r.anomaly_map.shape == image.shape[:2] and r.anomaly_map.dtype == np.float32
        assert r.mask.shape == image.shape[:2] and r.mask.dtype == bool
        assert r.verdict == (r.score >= r.image_threshold)
        out = save_overlay(tmp_path / f"{path.stem}.png", image, r)
        assert np.asarray(Image.open(out)).shape == image.shape
