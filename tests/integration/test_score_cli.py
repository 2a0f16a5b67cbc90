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
        "model": {"arch": "anoclip-tiny", "pretrained": "none", "device": "cpu", "precision": "fp32",
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


# --- issue 12: the CLI findings ----------------------------------------------------------------------


def _score(tmp_path: Path, *args: str) -> int:
    return main(["score", "--config", str(_config(tmp_path)), *args])


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_sibling_folders_keep_their_names_and_a_rerun_replaces_its_own_outputs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rng = np.random.default_rng(1)
    for sub in ("good", "scratch"):
        (data / sub).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / sub / "000.png")
    out = tmp_path / "out"
    assert _score(tmp_path, "--line", "bottle", "--out", str(out), str(data / "good"), str(data / "scratch")) == 0
    assert sorted(p.relative_to(out).as_posix() for p in (out / "masks").rglob("*.png")) == \
        ["masks/good/000.png", "masks/scratch/000.png"], "not flattened into 000 and 000_2"
    (out / "masks" / "notes.txt").write_text("mine")
    assert _score(tmp_path, "--line", "bottle", "--out", str(out), str(data / "scratch" / "000.png")) == 0
    recs = _records(out)
    assert [Path(r["image"]).parent.name for r in recs] == ["scratch"], "results.jsonl is not appended across runs"
    assert sorted(p.name for p in (out / "masks").rglob("*") if p.is_file()) == ["000.png", "notes.txt"], \
        "the previous run's PNGs are gone, files it did not write are kept"


def test_paths_are_checked_before_the_model_loads(tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    from pipeline.inspection.frame_scorer import FrameScorer

    def no_model(*_: object, **__: object) -> None:
        raise AssertionError("the model must not load before the paths are checked")

    monkeypatch.setattr(FrameScorer, "from_settings", classmethod(no_model))
    assert _score(tmp_path, "--line", "bottle", str(images / "typo.png")) == 2
    assert "no such file or folder: " in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _score(tmp_path, "--line", "bottle", str(empty)) == 2, "an empty folder is an error, not a silent 0"
    assert "no images in" in capsys.readouterr().err
    assert _score(tmp_path, "--line", "bottle", "--calibrate", str(empty), str(images)) == 2
    assert _score(tmp_path, str(images)) == 2
    assert "--class-name" in capsys.readouterr().err


def test_class_name_calibration_and_the_verdict_stance(tmp_path: Path, images: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    good = [str(images / "a.png"), str(images / "b.jpg"), str(images / "sub")]
    out = tmp_path / "plain"
    assert _score(tmp_path, "--class-name", "metal nut", "--out", str(out), *good) == 0
    recs = _records(out)
    assert {r["line"] for r in recs} == {"metal-nut"}, "scored without a configured line"
    scores = sorted(r["score"] for r in recs)
    out = tmp_path / "cal"
    calibrate = [x for g in good for x in ("--calibrate", g)]
    assert _score(tmp_path, "--class-name", "metal nut", "--out", str(out), *calibrate, "--quantile", "0.5", *good) == 0
    assert "calibrated on 3 good image(s)" in capsys.readouterr().err
    recs = _records(out)
    assert {r["threshold_source"] for r in recs} == {"calibrated"}
    assert recs[0]["threshold"] == pytest.approx(float(np.quantile(scores, 0.5)), abs=1e-6)
    assert sum(r["verdict"] == "anomalous" for r in recs) == 2, "scores at or above the median"

    out = tmp_path / "stance"
    assert _score(tmp_path, "--line", "bottle", "--out", str(out), "--threshold", "1.0", "--pixel-threshold", "0.0",
                  str(images / "b.jpg")) == 0
    rec = _records(out)[0]
    assert rec["verdict"] == "normal" and rec["pixel_verdict"] == "anomalous"
    assert "suspicious only" in rec["verdict_note"], "a normal verdict with a full mask is said so"
    assert "where the mask disagrees with the verdict" in capsys.readouterr().err
