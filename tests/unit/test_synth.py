"""The synthetic generator: deterministic, exact masks, real layouts."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluation.datasets import read_mvtec, read_visa
from pipeline.evaluation.synth import DEFECTS, KINDS, TEXTURE_KINDS, render_part, write_mvtec_tree
from workers.cli import main


@pytest.mark.parametrize("kind", KINDS)
def test_masks_are_exactly_where_the_defect_was_drawn(kind: str) -> None:
    base, empty = render_part(kind, 64, 11, None)
    assert base.shape == (64, 64, 3) and base.dtype == np.uint8 and empty.dtype == bool and not empty.any()
    assert base.std() > 3  # a textured image, not a flat fill
    for defect in DEFECTS:
        img, mask = render_part(kind, 64, 11, defect)
        assert mask.shape == (64, 64) and mask.dtype == bool
        changed = (img != base).any(axis=-1)
        assert not (changed & ~mask).any(), f"{kind}/{defect}: pixels changed outside the mask"
        assert changed[mask].mean() > 0.95, f"{kind}/{defect}: mask covers unchanged pixels"
        assert 8 <= mask.sum() < 0.25 * mask.size


def test_render_is_deterministic_and_seed_dependent() -> None:
    a = render_part("metal_nut", 80, 5, "stain")
    b = render_part("metal_nut", 80, 5, "stain")
    c = render_part("metal_nut", 80, 6, "stain")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    neg = render_part("wood", 32, -5, "hole")  # the frame producer may derive any integer seed
    assert np.array_equal(neg[0], render_part("wood", 32, -5, "hole")[0]) and neg[1].any()


def test_parts_keep_defects_on_the_part() -> None:
    # corners of a part image are background; defects other than "missing" land on the part
    for kind in sorted(set(KINDS) - TEXTURE_KINDS):
        for defect in ("scratch", "hole", "stain"):
            _, mask = render_part(kind, 96, 3, defect)
            assert not mask[:4, :4].any() and not mask[-4:, -4:].any()
    # a missing piece replaces part pixels with background: the masked area gets the corner's colour
    img, mask = render_part("bottle", 96, 3, "missing")
    assert abs(float(img[mask].mean()) - float(img[:6, :6].mean())) < 15


def test_width_and_argument_checks() -> None:
    img, mask = render_part("pcb1", 48, 1, "hole", width=70)
    assert img.shape == (48, 70, 3) and mask.shape == (48, 70) and mask.any()
    with pytest.raises(ValueError, match="unknown kind"):
        render_part("teapot", 64, 0, None)
    with pytest.raises(ValueError, match="unknown defect"):
        render_part("wood", 64, 0, "dent")
    with pytest.raises(ValueError, match="at least 16"):
        render_part("wood", 8, 0, None)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def test_mvtec_tree_layout_and_reproducibility(tmp_path: Path) -> None:
    counts = write_mvtec_tree(tmp_path / "a", ["tile", "pcb1"], n_good=2, n_defect=1, size=40, seed=9, n_train=1)
    write_mvtec_tree(tmp_path / "b", ["tile", "pcb1"], n_good=2, n_defect=1, size=40, seed=9, n_train=1)
    assert counts == {"tile": 7, "pcb1": 7}
    a = _digest(tmp_path / "a")
    assert a == _digest(tmp_path / "b")
    assert {"tile/train/good/000.png", "tile/test/good/001.png", "pcb1/test/hole/000.png"} <= set(a)
    assert "pcb1/ground_truth/missing/000_mask.png" in a
    mask = np.asarray(Image.open(tmp_path / "a/pcb1/ground_truth/missing/000_mask.png"))
    assert set(np.unique(mask)) == {0, 255}
    idx = read_mvtec(tmp_path / "a")
    assert idx.issues == [] and len(idx.samples) == 12  # train images are not test samples
    with pytest.raises(ValueError, match="unknown kind"):
        write_mvtec_tree(tmp_path / "c", ["teapot"])


def test_synth_cli_writes_both_layouts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(
        ["synth", "--out", str(tmp_path / "m"), "--classes", "wood", "--n-good", "1", "--n-defect", "1",
         "--size", "32", "--no-progress"]
    )  # fmt: skip
    assert rc == 0 and "wrote 5 images" in capsys.readouterr().out
    assert len(read_mvtec(tmp_path / "m").samples) == 5
    rc = main(
        ["synth", "--out", str(tmp_path / "v"), "--layout", "visa", "--classes", "bottle", "--n-good", "2",
         "--n-defect", "2", "--size", "32", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    idx = read_visa(tmp_path / "v")
    assert [s.label for s in idx.samples] == [0, 0, 1, 1] and idx.issues == []
    assert Image.open(idx.samples[0].image_path).size == (45, 32)  # landscape, like VisA
    assert main(["synth", "--out", str(tmp_path / "x"), "--n-good", "-1"]) == 2
