"""`anoclip adapt` end to end on generated images, then `anoclip score --adapter` / `--tta per_frame`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from workers.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, text_cache_dir: Path) -> tuple[Path, Path]:
    """(config, image folder): 16 plain frames and 1 corrupt file; a small training budget."""
    root = tmp_path_factory.mktemp("adapt")
    d = root / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray((110 + rng.integers(0, 30, (64, 64, 3))).astype(np.uint8)).save(d / f"f{i:02d}.png")
    (d / "corrupt.png").write_bytes((d / "f00.png").read_bytes()[:100])
    cfg = {
        "model": {"arch": "anoclip-tiny", "pretrained": "none", "device": "cpu", "precision": "fp32",
                  "text_cache_dir": str(text_cache_dir), "batch_size": 4},
        "lines": [{"id": "bottle", "class_name": "bottle"},
                  {"id": "pcb1", "class_name": "pcb1", "adapter_kind": "linear"}],
        # The gate's rules are unit-tested; on random weights and noise frames its AUROC comparison on three
        # pasted defects is a coin toss (it refused in some CI runs), and this test is about the command.
        "tta": {"train_steps": 15, "min_frames": 8, "batch_tokens": 512, "gate_auroc_margin": 1.0,
                "gate_min_contrast_ratio": 0.0},
    }
    p = root / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p, d


def _results(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_adapt_writes_adapter_report_and_curve_then_score_uses_it(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg, imgs = setup
    adapter = tmp_path / "bottle.safetensors"
    rc = main(["adapt", "--config", str(cfg), "--line", "bottle", "--out", str(adapter), str(imgs)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "corrupt.png" in err and "accepted" in err
    assert re.search(r"training took [\d.]+ s for 15 steps, scoring the 16 image\(s\) [\d.]+ s", err), err[-500:]
    report = json.loads((tmp_path / "bottle.report.json").read_text())
    assert report["accepted"] and report["kind"] == "text" and report["steps"] == 15 == len(report["losses"])
    assert report["frames_train"] + report["frames_val"] == sum(a["admitted"] for a in report["extra"]["admissions"])
    assert len(report["extra"]["admissions"]) == 16 and report["extra"]["skipped"]
    assert set(report["validation"]) >= {"finite", "spread_ratio", "abnormal_flip_share", "normal_flip_share"}
    assert (tmp_path / "bottle.loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    test_imgs = [str(imgs / "f00.png"), str(imgs / "f01.png")]
    base, adapted, per_frame = tmp_path / "base", tmp_path / "adapted", tmp_path / "pf"
    assert main(["score", "--config", str(cfg), "--line", "bottle", "--out", str(base), *test_imgs]) == 0
    assert main(["score", "--config", str(cfg), "--line", "bottle", "--out", str(adapted),
                 "--adapter", str(adapter), *test_imgs]) == 0
    assert main(["score", "--config", str(cfg), "--line", "bottle", "--out", str(per_frame),
                 "--tta", "per_frame", *test_imgs]) == 0
    b, a, pf = _results(base), _results(adapted), _results(per_frame)
    assert a[0]["adapter_version"] == f"file-{report['extra']['adapter_id']}" and b[0]["adapter_version"] is None
    assert pf[0]["adapter_version"] == "per_frame" and "tta" in pf[0]["timings_ms"]
    assert [r["score"] for r in a] == [r["score"] for r in b]  # adapters never change the image score
    peaks = {"base": b[0]["max_pixel_score"], "adapter": a[0]["max_pixel_score"], "per_frame": pf[0]["max_pixel_score"]}
    assert len(set(peaks.values())) == 3, f"each way of scoring gives its own map: {peaks}"

    # the adapter belongs to line bottle: another line refuses it, and it cannot be mixed with per-frame TTA
    capsys.readouterr()
    rc = main(["score", "--config", str(cfg), "--line", "pcb1", "--out", str(tmp_path / "x"),
               "--adapter", str(adapter), *test_imgs])
    assert rc == 2 and "does not fit" in capsys.readouterr().err
    rc = main(["score", "--config", str(cfg), "--line", "bottle", "--out", str(tmp_path / "y"),
               "--adapter", str(adapter), "--tta", "per_frame", *test_imgs])
    assert rc == 2 and "exclude each other" in capsys.readouterr().err


def test_adapt_refuses_with_too_few_frames_and_writes_no_adapter(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg, imgs = setup
    adapter = tmp_path / "pcb1.safetensors"
    rc = main(["adapt", "--config", str(cfg), "--line", "pcb1", "--out", str(adapter), "--min-frames", "50",
               str(imgs)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "no adapter written" in err and "linear adapter not trained: " in err
    assert "loss - -> -" not in err and "training linear adapter" not in err, "no 0/N bar and no empty loss line"
    assert not adapter.exists()
    report = json.loads((tmp_path / "pcb1.report.json").read_text())
    assert not report["accepted"] and "admitted frames" in report["reasons"][0] and report["kind"] == "linear"
