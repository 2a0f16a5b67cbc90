"""`anoclip eval --memory {off,train,mutual,stream}` end to end with the tiny model, and synth's recurring defect."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.evaluation.datasets import read_mvtec
from pipeline.evaluation.synth import recurring_count, render_part, render_recurring, write_mvtec_tree
from workers.cli import main


def _config(tmp_path: Path, text_cache_dir: Path) -> Path:
    cfg = {
        "model": {"arch": "anoclip-tiny", "pretrained": "none", "device": "cpu", "precision": "fp32",
                  "text_cache_dir": str(text_cache_dir), "batch_size": 4},
        "lines": [{"id": "bottle", "class_name": "bottle"}, {"id": "wood", "class_name": "wood", "domain": "texture"}],
        "memory": {"layers": [2], "min_bank_frames": 2, "admit_min_window": 3},
    }
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth-memory")
    write_mvtec_tree(root, ["wood", "bottle"], n_good=3, n_defect=1, size=64, seed=4, n_train=3, recurring=0.3)
    return root


def _eval(tmp_path: Path, cfg: Path, root: Path, *extra: str) -> tuple[int, dict, str, str]:
    out = tmp_path / ("report-" + "-".join(e.strip("-") for e in extra))
    import io
    from contextlib import redirect_stderr, redirect_stdout

    so, se = io.StringIO(), io.StringIO()
    with redirect_stdout(so), redirect_stderr(se):
        rc = main(["eval", "--config", str(cfg), "--dataset", "mvtec", "--root", str(root), "--out", str(out),
                   "--no-progress", "--no-figures", "--image-score", "cls", *extra])
    rep = json.loads((out / "report.json").read_text()) if rc == 0 else {}
    return rc, rep, so.getvalue(), se.getvalue()


@pytest.mark.parametrize("mode", ["off", "train", "mutual", "stream"])
def test_eval_memory_modes_write_reports_that_name_the_mode(
    tmp_path: Path, tree: Path, text_cache_dir: Path, mode: str
) -> None:
    rc, rep, out, err = _eval(tmp_path, _config(tmp_path, text_cache_dir), tree, "--memory", mode)
    assert rc == 0, err
    assert rep["protocol"]["memory"] == mode
    for key in ("pixel_auroc", "image_auroc", "aupro"):
        assert 0.0 <= rep["mean"]["metrics"][key] <= 1.0
    n_test = 3 + 4 + recurring_count(0.3, 7)
    for cls in ("wood", "bottle"):
        entry = rep["per_class"][cls]
        assert entry["images"] == n_test and entry["images_with_pixel_truth"] == n_test
        mem = entry.get("memory")
        if mode == "off":
            assert mem is None
            continue
        assert mem["mode"] == mode
        if mode == "train":
            assert mem["shots"] == 3 and mem["patches"] == 3 * 64 and len(mem["bank_version"]) == 12
        elif mode == "mutual":
            assert mem["frames"] == n_test
        else:
            assert mem["refreshes"] >= 1 and mem["bank_versions"][-1] == mem["bank_version"]
            assert sum(mem["scored_by"].values()) == n_test and mem["scored_by"]["none"] == 1
            assert mem["scored_by"]["bank"] >= 1 and 0 < mem["admitted"] < n_test
    if mode != "off":
        assert f"memory {mode}" in out
        assert f"- memory: `{mode}`" in (tmp_path / f"report-memory-{mode}" / "report.md").read_text()


def test_eval_memory_shots_and_refusals(tmp_path: Path, tree: Path, text_cache_dir: Path) -> None:
    cfg = _config(tmp_path, text_cache_dir)
    rc, rep, _, err = _eval(tmp_path, cfg, tree, "--memory", "train", "--shots", "1", "--classes", "wood")
    assert rc == 0, err
    assert rep["per_class"]["wood"]["memory"]["shots"] == 1 and rep["protocol"]["shots"] == 1
    assert rep["per_class"]["wood"]["memory"]["patches"] == 64
    rc, _, _, err = _eval(tmp_path, cfg, tree, "--memory", "mutual", "--shots", "2")
    assert rc != 0 and "--shots" in err
    rc, _, _, err = _eval(tmp_path, cfg, tree, "--memory", "stream", "--tta", "buffered")
    assert rc != 0 and "do not combine" in err
    folder = tmp_path / "folder"
    (folder / "good").mkdir(parents=True)
    Image.fromarray(render_part("wood", 64, 1, None)[0]).save(folder / "good" / "a.png")
    rc = main(["eval", "--config", str(cfg), "--dataset", "folder", "--root", str(folder), "--out",
               str(tmp_path / "f"), "--memory", "train", "--no-progress"])
    assert rc != 0


def test_synth_recurring_defect_is_one_defect_at_one_place(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["synth", "--out", str(tmp_path / "d"), "--classes", "wood", "bottle", "--n-good", "4", "--n-defect", "1",
               "--size", "64", "--recurring-defect", "0.3", "--recurring-type", "hole", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    index = read_mvtec(tmp_path / "d")
    assert not index.issues
    for cls in ("wood", "bottle"):
        samples = index.of_class(cls)
        rec = [s for s in samples if s.defect == "recurring_hole"]
        assert len(rec) == recurring_count(0.3, 8) == 3
        assert abs(len(rec) / len(samples) - 0.3) < 0.05
        masks = [np.asarray(Image.open(s.mask_path)) > 0 for s in rec]
        images = [np.asarray(Image.open(s.image_path)) for s in rec]
        for m in masks[1:]:  # the same place on every part (clipped to the part where it moves a little)
            assert (m & masks[0]).sum() / (m | masks[0]).sum() > 0.8
        assert not np.array_equal(images[0], images[1])  # different parts underneath
    # textures: exactly the same mask; pixels outside it untouched
    a, ma = render_recurring("wood", 64, 1, "stain", 99)
    b, mb_ = render_recurring("wood", 64, 2, "stain", 99)
    assert np.array_equal(ma, mb_) and ma.any()
    base, _ = render_part("wood", 64, 1, None)
    assert np.array_equal(a[~ma], base[~ma]) and not np.array_equal(a[ma], base[ma])
    other, mo = render_recurring("wood", 64, 1, "stain", 100)
    assert not np.array_equal(mo, ma)  # another place seed, another place
    assert main(["synth", "--out", str(tmp_path / "e"), "--recurring-defect", "1.0", "--no-progress"]) == 2
    assert main(["synth", "--out", str(tmp_path / "e"), "--layout", "visa", "--recurring-defect", "0.2",
                 "--no-progress"]) == 2


def test_train_samples_come_from_the_training_split_only(tmp_path: Path, tree: Path) -> None:
    from pipeline.evaluation.datasets import DatasetError, read_folder, read_visa, train_samples
    from pipeline.evaluation.synth import write_visa_tree

    mv = read_mvtec(tree)
    train = train_samples(mv, "wood")
    assert len(train) == 3 and all(s.image_path.parent.name == "good" and "train" in s.image_path.parts for s in train)
    visa_root = tmp_path / "visa"
    write_visa_tree(visa_root, ["pcb1"], n_good=2, n_defect=2, size=32, seed=1, n_train=3)
    vtrain = train_samples(read_visa(visa_root), "pcb1")
    test_paths = {s.image_path for s in read_visa(visa_root).samples}
    assert len(vtrain) == 3 and not ({s.image_path for s in vtrain} & test_paths)
    no_train = tmp_path / "visa0"
    write_visa_tree(no_train, ["pcb1"], n_good=2, n_defect=2, size=32, seed=1)
    with pytest.raises(DatasetError, match="no normal training images"):
        train_samples(read_visa(no_train), "pcb1")
    folder = tmp_path / "f" / "good"
    folder.mkdir(parents=True)
    Image.fromarray(render_part("wood", 32, 1, None)[0]).save(folder / "a.png")
    with pytest.raises(DatasetError, match="no training images"):
        train_samples(read_folder(tmp_path / "f"), "f")
