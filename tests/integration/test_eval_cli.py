"""`anoclip eval` end to end: the tiny model through the CLI, and oracle scorers that pin down the
loop's wiring (stream order, protocol resolution, mask alignment, the TTA hook)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn.metrics import roc_auc_score

from pipeline.evaluation import loop as evaluation_loop
from pipeline.evaluation.datasets import load_pair, read_folder, read_visa
from pipeline.evaluation.loop import check_tta, eval_settings, run_eval, stream_order
from pipeline.evaluation.options import EvalError, EvalOptions
from pipeline.evaluation.synth import write_mvtec_tree, write_visa_tree
from pipeline.settings import Settings
from workers.cli import main


def _config(tmp_path: Path, text_cache_dir: Path) -> Path:
    cfg = {
        "model": {
            "arch": "anoclip-tiny",
            "pretrained": "none",
            "device": "cpu",
            "precision": "fp32",  # `auto` picks bf16 on CPUs with native bf16: figures would depend on the CPU
            "text_cache_dir": str(text_cache_dir),
            "batch_size": 4,
        },
        "lines": [{"id": "bottle", "class_name": "bottle"}, {"id": "wood", "class_name": "wood", "domain": "texture"}],
    }
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture(scope="module")
def mvtec_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth-mvtec")
    write_mvtec_tree(root, ["wood", "bottle"], n_good=3, n_defect=1, size=64, seed=4)
    return root


def test_eval_cli_on_synthetic_mvtec_with_tiny_model(
    tmp_path: Path, mvtec_tree: Path, text_cache_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "mvtec"
    shutil.copytree(mvtec_tree, root)
    (root / "wood/ground_truth/stain/000_mask.png").unlink()
    out = tmp_path / "report"
    rc = main(
        ["eval", "--config", str(_config(tmp_path, text_cache_dir)), "--dataset", "mvtec", "--root", str(root),
         "--out", str(out), "--no-progress"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "mvtec: 2 classes, 14 images" in captured.out
    for name in ("report.md", "report.json", "per_image.csv"):
        assert (out / name).stat().st_size > 0
    for name in ("roc_image.png", "roc_pixel.png", "pro_curve.png", "overlays.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) >= 300

    rep = json.loads((out / "report.json").read_text())
    assert rep["classes"] == ["bottle", "wood"]
    assert rep["model"]["image_score"] == "multiview"  # the MVTec protocol
    assert rep["protocol"]["resolution"].startswith("240x240") and rep["protocol"]["aupro_variant"] == "rescaled"
    assert "rescaled" in rep["definitions"]["aupro_rescaled"] and rep["definitions"]["aupro_variant_reported"]
    wood, bottle = rep["per_class"]["wood"], rep["per_class"]["bottle"]
    assert (wood["images"], wood["anomalous"], wood["images_with_pixel_truth"]) == (7, 4, 6)
    assert (bottle["images"], bottle["anomalous"], bottle["images_with_pixel_truth"]) == (7, 4, 7)
    assert wood["pixels"]["normal"] + wood["pixels"]["anomalous"] == 6 * 240 * 240
    assert any("wood/test/stain/000.png" in i and "missing mask" in i for i in rep["issues"])

    # image metrics recomputed from the per-image scores the run wrote
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 14
    for cls in ("wood", "bottle"):
        mine = [(int(r["label"]), float(r["score"])) for r in rows if r["class"] == cls]
        y, s = zip(*mine, strict=True)
        assert rep["per_class"][cls]["metrics"]["image_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    for key, value in rep["mean"]["metrics"].items():
        vals = [rep["per_class"][c]["metrics"][key] for c in ("wood", "bottle")]
        assert value == pytest.approx(np.mean(vals))
        assert rep["mean"]["percent"][key] == round(100 * value, 1)
        assert all(0.0 <= v <= 1.0 for v in vals)
    md = (out / "report.md").read_text()
    assert "| wood | 7 |" in md and "| **mean** | 14 |" in md and "AUPRO@30" in md and "missing mask" in md
    assert rep["timing"]["images"] == 14 and rep["timing"]["images_per_s"] > 0


class OracleScorer:
    """Scores with the ground truth, at a lower resolution than the protocol, and checks the stream."""

    name = "oracle"

    def __init__(self, expected: dict[str, list], keep_aspect: bool, invert: bool = False) -> None:
        self.expected = {k: list(v) for k, v in expected.items()}
        self.keep_aspect = keep_aspect
        self.invert = invert
        self.calls: list[tuple[str, str]] = []
        self._queue: list = []

    def begin_class(self, line_id: str) -> None:
        self.calls.append(("begin", line_id))
        self._queue = list(self.expected[line_id])

    def score(self, line_id: str, images: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        self.calls.append(("score", line_id))
        out = []
        for img in images:
            sample = self._queue.pop(0)
            pair = load_pair(sample, self.keep_aspect)
            assert np.array_equal(pair.image, img), "frames must arrive in the fixed stream order"
            truth = np.zeros(img.shape[:2], bool) if pair.mask is None else pair.mask
            small = np.asarray(Image.fromarray(truth.astype(np.float32)).resize((img.shape[1] // 3, img.shape[0] // 3)))
            small = 1.0 - small if self.invert else small
            out.append((float(sample.label) if not self.invert else 1.0 - sample.label, small))
        return out

    def end_class(self, line_id: str) -> None:
        self.calls.append(("end", line_id))
        assert not self._queue


def _visa(tmp_path: Path) -> Path:
    root = tmp_path / "visa"
    write_visa_tree(root, ["pcb1", "tile"], n_good=3, n_defect=3, size=40, seed=8)
    return root


def test_eval_loop_with_oracle_on_visa_keep_aspect_and_shuffled_stream(tmp_path: Path, tiny_settings: Settings) -> None:
    index = read_visa(_visa(tmp_path))
    opts = EvalOptions(out=tmp_path / "out", order="shuffled", seed=3, progress=False, memory_budget=50_000)
    settings, lines = eval_settings(tiny_settings, index, opts)
    assert lines == {"pcb1": "pcb1", "tile": "tile"}
    tile_line = settings.line("tile")
    assert (tile_line.class_name, tile_line.domain, tile_line.adapter_kind) == ("tile", "object", "linear")
    assert settings.model.resize == "tile" and settings.model.image_score == "cls"  # VisA protocol
    expected = {c: stream_order(index.of_class(c), "shuffled", 3) for c in index.classes}
    assert [s.image_path for s in expected["pcb1"]] != [s.image_path for s in index.of_class("pcb1")]
    oracle = OracleScorer(expected, keep_aspect=True)
    report, paths = run_eval(tiny_settings, index, opts, scorer=oracle)
    assert oracle.calls[0] == ("begin", "pcb1") and oracle.calls[-1] == ("end", "tile")
    for r in report.classes:
        assert r.image.auroc == 1.0 and r.pixel is not None
        assert r.pixel.auroc > 0.99 and r.pixel.aupro_unrescaled > 0.9  # maps came back aligned with masks
        assert r.pixel.n_pixels_normal + r.pixel.n_pixels_anomalous == 6 * 240 * 336  # 240 x W' (W' = 336)
    assert report.mean["pixel_auroc"] > 0.99
    assert (tmp_path / "out/overlays.png").exists() and len(paths) == 7

    inverted = OracleScorer(expected, keep_aspect=True, invert=True)
    bad, _ = run_eval(tiny_settings, index, EvalOptions(out=tmp_path / "o2", order="shuffled", seed=3,
                                                        progress=False, figures=False), scorer=inverted)  # fmt: skip
    assert bad.mean["image_auroc"] == 0.0 and bad.mean["pixel_auroc"] < 0.01


def test_unknown_tta_mode_fails_fast_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for mode in ("off", "per_frame", "buffered"):
        check_tta(mode)
    with pytest.raises(EvalError, match="unknown TTA mode 'sometimes'"):
        check_tta("sometimes")
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--dataset", "mvtec", "--root", str(tmp_path), "--out", str(tmp_path / "o"),
              "--tta", "sometimes"])
    assert exc.value.code == 2 and "invalid choice: 'sometimes'" in capsys.readouterr().err


def test_tta_modes_plug_in_through_the_scorer_hook(
    tmp_path: Path, mvtec_tree: Path, tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TTA module exposing eval_scorer(mode, inspector, settings) serves per_frame and buffered."""
    from pipeline.evaluation.datasets import read_mvtec

    index = read_mvtec(mvtec_tree, ["wood"])
    made: list[tuple[str, object]] = []

    def eval_scorer(mode: str, inspector: object, settings: Settings) -> OracleScorer:
        assert settings.tta.mode == mode
        made.append((mode, inspector))
        return OracleScorer({"wood": index.of_class("wood")}, keep_aspect=False)

    monkeypatch.setattr(evaluation_loop, "eval_scorer", eval_scorer)
    sentinel = object()
    for mode in ("per_frame", "buffered"):
        opts = EvalOptions(out=tmp_path / mode, tta=mode, progress=False, figures=False)
        report, _ = run_eval(tiny_settings, index, opts, inspector=sentinel)
        assert report.meta["protocol"]["tta"] == mode and report.classes[0].image.auroc == 1.0
    assert made == [("per_frame", sentinel), ("buffered", sentinel)]


def test_eval_cli_folder_without_masks(tmp_path: Path, mvtec_tree: Path, text_cache_dir: Path) -> None:
    """A user's folder with no masks: image metrics, pixel metrics n/a, nothing crashes."""
    line = tmp_path / "myline"
    shutil.copytree(mvtec_tree / "bottle/test", line)
    (line / "broken").mkdir()
    (line / "broken/x.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    rc = main(
        ["eval", "--config", str(_config(tmp_path, text_cache_dir)), "--dataset", "folder", "--root", str(line),
         "--class-name", "bottle", "--out", str(out), "--no-progress", "--no-figures", "--resolution", "64"]
    )  # fmt: skip
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    b = rep["per_class"]["bottle"]
    assert (b["images"], b["anomalous"], b["images_with_pixel_truth"], b["skipped"]) == (7, 4, 3, 1)
    assert 0 <= b["metrics"]["image_auroc"] <= 1
    assert rep["model"]["image_score"] == "cls" and rep["model"]["resize"] == "tile"
    # only normal images carry pixel truth: pixel metrics are undefined, reported as null / n/a
    assert b["metrics"]["pixel_auroc"] is None and rep["mean"]["metrics"]["aupro"] is None
    assert any("broken/x.png" in i and "skipped" in i for i in rep["issues"])
    assert "n/a" in (out / "report.md").read_text()
    assert not (out / "overlays.png").exists()
    assert len(read_folder(line).samples) == 8


@pytest.mark.parametrize("mode", ["per_frame", "buffered"])
def test_eval_runs_the_tta_modes_with_the_tiny_model(
    mode: str, tmp_path: Path, mvtec_tree: Path, tiny_settings: Settings
) -> None:
    """The real TTA scorers (pipeline.adaptation.tta.eval_scorers) through the harness: image scores untouched
    (docs/algorithm.md §5.1)."""
    from pipeline.evaluation.datasets import read_mvtec

    index = read_mvtec(mvtec_tree, ["wood"])

    def run(tta: str):
        opts = EvalOptions(out=tmp_path / tta, tta=tta, image_score="cls", progress=False, figures=False)
        return run_eval(tiny_settings, index, opts)[0]

    off, adapted = run("off"), run(mode)
    assert adapted.meta["protocol"]["tta"] == mode
    assert [r.score for r in adapted.records] == [r.score for r in off.records]
    assert [r.path for r in adapted.records] == [r.path for r in off.records]
    px = adapted.classes[0].pixel
    assert px is not None and 0.0 <= px.auroc <= 1.0 and np.isfinite(px.score_max)
    assert off.classes[0].adaptation is None
    if mode == "buffered":  # 7 frames: refreshed on a schedule scaled to the class, not tta.refresh_every (500)
        a = adapted.classes[0].adaptation
        assert a is not None and a["refreshes"] >= 1 and a["schedule"]["refresh_every"] < 7, a
        assert len(a["outcomes"]) == a["refreshes"] == a["promoted"] + a["refused"]
        same_maps = (px.score_min, px.score_max, px.auroc) == (off.classes[0].pixel.score_min,
                                                                off.classes[0].pixel.score_max,
                                                                off.classes[0].pixel.auroc)
        assert same_maps == (a["promoted"] == 0), "maps change exactly when a refresh was promoted"
    if mode == "per_frame":  # every map comes from its own adapted tokens
        assert (px.score_min, px.score_max) != (off.classes[0].pixel.score_min, off.classes[0].pixel.score_max)
