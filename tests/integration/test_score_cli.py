"""`anoclip score` end to end on generated images, including a corrupt file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from workers.cli import main


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (70, 50, 3), dtype=np.uint8)).save(d / "sub" / "a.png")
    (d / "corrupt.png").write_bytes((d / "a.png").read_bytes()[:150])
    return d


def _config(tmp_path: Path) -> Path:
    cfg = {
        "model": {"arch": "anoclip-tiny", "pretrained": "none", "device": "cpu",
                  "text_cache_dir": str(tmp_path / "tc"), "batch_size": 2},
        "lines": [{"id": "bottle", "class_name": "bottle"}],
    }
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_score_folder_with_corrupt_file(tmp_path: Path, images: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    rc = main(["score", "--config", str(_config(tmp_path)), "--line", "bottle", "--out", str(out), str(images)])
    err = capsys.readouterr().err
    assert rc == 1  # one image skipped
    assert "corrupt.png" in err and "truncated" in err
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(Path(r["image"]).name for r in recs) == ["a.png", "a.png", "b.jpg"]
    for r in recs:
        assert r["line"] == "bottle" and r["verdict"] in ("normal", "anomalous")
        assert r["verdict"] == ("anomalous" if r["score"] >= r["threshold"] else "normal")
        assert set(r["timings_ms"]) >= {"preprocess", "model", "post", "total"}
        src = Image.open(r["image"])
        mask, heat = Image.open(r["mask"]), Image.open(r["heatmap"])
        assert mask.size == src.size and heat.size == src.size
        assert int(np.asarray(mask).sum()) == r["defect_area"]
    assert len({r["mask"] for r in recs}) == 3  # sub/a.png and a.png do not overwrite each other


def test_threshold_flag_decides_verdicts(tmp_path: Path, images: Path) -> None:
    cfg = _config(tmp_path)
    for thr, verdict in ((0.0, "anomalous"), (1.0, "normal")):
        out = tmp_path / f"out{thr}"
        main(["score", "--config", str(cfg), "--line", "bottle", "--out", str(out), "--threshold", str(thr),
              str(images / "b.jpg")])
        rec = json.loads((out / "results.jsonl").read_text())
        assert rec["verdict"] == verdict and rec["threshold_source"] == "manual"


def test_unknown_line_is_an_error(tmp_path: Path, images: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["score", "--config", str(_config(tmp_path)), "--line", "nope", str(images)])
    assert rc == 2 and "unknown line 'nope'" in capsys.readouterr().err
