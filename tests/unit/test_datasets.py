"""Readers on miniature generated MVTec AD, VisA and folder trees, broken on purpose."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ImageError
from pipeline.evaluation.datasets import (
    DatasetError,
    load_pair,
    protocol_size,
    read_dataset,
    read_folder,
    read_mvtec,
    read_visa,
    resize_image,
    resize_mask,
)
from pipeline.evaluation.synth import write_mvtec_tree, write_visa_tree


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    write_mvtec_tree(root, ["wood", "bottle"], n_good=2, n_defect=2, size=48, seed=1, defects=["hole", "scratch"])
    return root


def _broken_mvtec(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    (dst / "wood/ground_truth/hole/001_mask.png").unlink()  # missing mask
    Image.new("L", (40, 40)).save(dst / "bottle/ground_truth/scratch/000_mask.png")  # wrong size
    Image.new("L", (48, 48)).save(dst / "bottle/ground_truth/scratch/007_mask.png")  # orphan
    return dst


def test_mvtec_reader_lists_the_test_split(mvtec: Path) -> None:
    idx = read_mvtec(mvtec)
    assert idx.classes == ["bottle", "wood"] and idx.issues == [] and not idx.keep_aspect
    wood = idx.of_class("wood")
    assert [(s.defect, s.image_path.name, s.label) for s in wood] == [
        ("good", "000.png", 0),
        ("good", "001.png", 0),
        ("hole", "000.png", 1),
        ("hole", "001.png", 1),
        ("scratch", "000.png", 1),
        ("scratch", "001.png", 1),
    ]
    for s in wood:
        assert (s.mask_path is None) == (s.label == 0)
        if s.mask_path:
            assert s.mask_path == mvtec / "wood/ground_truth" / s.defect / f"{s.image_path.stem}_mask.png"
    assert idx.domain("wood") == "texture" and idx.domain("bottle") == "object"
    assert [s.cls for s in read_mvtec(mvtec, ["wood"]).samples] == ["wood"] * 6


def test_mvtec_reader_reports_missing_mismatched_and_orphan_masks(mvtec: Path, tmp_path: Path) -> None:
    idx = read_mvtec(_broken_mvtec(mvtec, tmp_path / "broken"))
    problems = {i.path: i.problem for i in idx.issues}
    assert "missing mask" in problems["wood/test/hole/001.png"]
    assert "40x40" in problems["bottle/ground_truth/scratch/000_mask.png"]
    assert "no matching test image" in problems["bottle/ground_truth/scratch/007_mask.png"]
    assert len(idx.issues) == 3
    by_path = {(s.cls, s.defect, s.image_path.name): s for s in idx.samples}
    for key in (("wood", "hole", "001.png"), ("bottle", "scratch", "000.png")):
        s = by_path[key]
        assert s.label == 1 and s.mask_path is None and not s.has_pixel_truth  # kept for image metrics
    assert len(idx.samples) == 12


def test_mvtec_reader_errors_name_the_problem(mvtec: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="carpet.*found: bottle, wood"):
        read_mvtec(mvtec, ["carpet"])
    with pytest.raises(DatasetError, match="no MVTec AD class"):
        read_mvtec(tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset layout"):
        read_dataset("kitti", mvtec)


def test_visa_reader_uses_the_test_split_and_reports_missing_files(tmp_path: Path) -> None:
    root = tmp_path / "visa"
    write_visa_tree(root, ["pcb1", "tile"], n_good=2, n_defect=3, size=40, seed=2, n_train=2)
    (root / "pcb1/Data/Masks/Anomaly/0001.png").unlink()
    (root / "tile/Data/Images/Normal/0003.JPG").unlink()  # a test normal image
    with open(root / "split_csv/1cls.csv", "a", newline="") as f:
        csv.writer(f).writerow(["tile", "test", "weird", "tile/Data/Images/Anomaly/0000.JPG", ""])
    idx = read_visa(root)
    assert idx.keep_aspect and idx.classes == ["pcb1", "tile"]
    pcb = idx.of_class("pcb1")
    assert [s.label for s in pcb] == [0, 0, 1, 1, 1]  # train rows excluded, CSV order kept
    assert [s.defect for s in pcb] == ["normal", "normal", "anomaly", "anomaly", "anomaly"]
    assert [s.mask_path is not None for s in pcb] == [False, False, True, False, True]
    assert len(idx.of_class("tile")) == 4  # one normal image is gone
    problems = [str(i) for i in idx.issues]
    assert any("pcb1/Data/Masks/Anomaly/0001.png" in p and "missing mask" in p for p in problems)
    assert any("tile/Data/Images/Normal/0003.JPG" in p and "not found" in p for p in problems)
    assert any("unknown label 'weird'" in p for p in problems)
    assert len(problems) == 3


def test_visa_reader_needs_its_split_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="1cls.csv"):
        read_visa(tmp_path)
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv/1cls.csv").write_text("object,split,image\n")
    with pytest.raises(DatasetError, match="lacks column"):
        read_visa(tmp_path)


def test_visa_masks_with_small_labels_count_as_defect(tmp_path: Path) -> None:
    """VisA masks are not 0/255: any non-zero pixel is defect."""
    root = tmp_path / "visa"
    write_visa_tree(root, ["pcb1"], n_good=1, n_defect=1, size=40, seed=3)
    mask_path = root / "pcb1/Data/Masks/Anomaly/0000.png"
    m = np.asarray(Image.open(mask_path)) > 0
    Image.fromarray(m.astype(np.uint8)).save(mask_path)  # values 0/1
    s = [x for x in read_visa(root).samples if x.label][0]
    pair = load_pair(s, keep_aspect=True)
    assert pair.image.shape == (240, 336, 3) and pair.mask.shape == (240, 336)
    assert np.array_equal(pair.mask, resize_mask(m, (336, 240))) and pair.mask.any()


def test_folder_reader_single_and_multi_class(tmp_path: Path) -> None:
    line = tmp_path / "line7"
    for d in ("good", "dent", "masks/dent"):
        (line / d).mkdir(parents=True)
    img = np.zeros((30, 50, 3), np.uint8)
    for name in ("g1.png", "g2.jpg"):
        Image.fromarray(img).save(line / "good" / name)
    for name in ("d1.png", "d2.png"):
        Image.fromarray(img).save(line / "dent" / name)
    Image.fromarray(np.full((30, 50), 255, np.uint8)).save(line / "masks/dent/d1.png")
    Image.fromarray(np.full((30, 50), 255, np.uint8)).save(line / "masks/dent/zz.png")
    idx = read_folder(line)
    assert idx.classes == ["line7"] and idx.keep_aspect
    assert [(s.defect, s.label, s.mask_path is not None) for s in idx.samples] == [
        ("good", 0, False),
        ("good", 0, False),
        ("dent", 1, True),
        ("dent", 1, False),
    ]
    problems = [str(i) for i in idx.issues]
    assert any("dent/d2.png" in p and "no mask" in p for p in problems)
    assert any("zz.png" in p and "no matching image" in p for p in problems)
    assert read_folder(line, class_name="bottle").classes == ["bottle"]
    assert read_folder(tmp_path).classes == ["line7"]  # a root holding class folders
    with pytest.raises(DatasetError, match="no 'good' folder"):
        read_folder(line / "dent")


def test_protocol_sizes_follow_the_papers() -> None:
    assert protocol_size(900, 900, keep_aspect=False) == (240, 240)
    assert protocol_size(1500, 1000, keep_aspect=False) == (240, 240)  # MVTec squashes
    assert protocol_size(1500, 1000, keep_aspect=True) == (360, 240)  # VisA: 240 x W'
    assert protocol_size(1562, 1000, keep_aspect=True) == (int(240 * 1562 / 1000), 240)  # truncates like torchvision
    assert protocol_size(500, 1000, keep_aspect=True) == (240, 480)


def test_masks_are_resized_like_images_and_binarised_at_half() -> None:
    m = np.zeros((480, 480), bool)
    m[100:140, 200:260] = True  # 40 x 60 block -> 20 x 30 at 240
    m[300, 300] = True  # a lone pixel fades below 0.5 when halved
    small = resize_mask(m, (240, 240))
    grey = resize_image(np.repeat((m * 255).astype(np.uint8)[..., None], 3, axis=2), (240, 240))[..., 0]
    assert np.array_equal(small, grey.astype(np.float32) / 255 > 0.5)  # same filter as the image
    assert small[50:70, 100:130].all() and small.sum() == 20 * 30 and not small[150, 150]


def test_load_pair_gives_empty_masks_for_good_and_none_without_truth(mvtec: Path, tmp_path: Path) -> None:
    idx = read_mvtec(_broken_mvtec(mvtec, tmp_path / "b"))
    good = next(s for s in idx.samples if s.label == 0)
    lost = next(s for s in idx.samples if s.label == 1 and s.mask_path is None)
    with_mask = next(s for s in idx.samples if s.mask_path is not None)
    g = load_pair(good, keep_aspect=False)
    assert g.image.shape == (240, 240, 3) and g.mask is not None and not g.mask.any() and g.original_size == (48, 48)
    assert load_pair(lost, keep_aspect=False).mask is None
    p = load_pair(with_mask, keep_aspect=False, side=96)
    assert p.mask.shape == (96, 96) and p.mask.any()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageError, match="bad.png"):
        load_pair(type(good)(bad, None, 0, "good", "x"), keep_aspect=False)
