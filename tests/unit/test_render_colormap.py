"""Heatmap colours come from matplotlib's `jet` colormap (issue 13), imported only when the first heatmap is drawn."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.inspection.render import colorize, colormap_lut, heatmap_png

REPO = Path(__file__).resolve().parents[2]


def test_heatmap_lut_is_matplotlibs_jet() -> None:
    from matplotlib import colormaps

    lut = colormap_lut()
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    assert np.array_equal(lut, colormaps["jet"](np.arange(256), bytes=True)[:, :3])
    assert lut[0].tolist() == [0, 0, 127] and lut[-1].tolist() == [127, 0, 0]  # dark blue .. dark red
    assert not lut.flags.writeable


def test_colorize_maps_the_range_onto_the_table() -> None:
    amap = np.array([[-1.0, 0.0, 0.5], [1.0, 2.0, np.float32(0.25)]], dtype=np.float32)
    rgb = colorize(amap, 0.0, 1.0)
    lut = colormap_lut()
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 0] == lut[0]).all() and (rgb[0, 1] == lut[0]).all()  # at and below lo
    assert (rgb[1, 0] == lut[255]).all() and (rgb[1, 1] == lut[255]).all()  # at and above hi
    assert (rgb[0, 2] == lut[127]).all() and (rgb[1, 2] == lut[63]).all()
    png = heatmap_png(np.zeros((2, 3, 3), np.uint8), amap, 0.0, 1.0)
    assert png.startswith(b"\x89PNG")


def test_render_imports_no_matplotlib_until_a_heatmap_and_never_pyplot() -> None:
    code = ("import sys, numpy as np; import pipeline.inspection.render as r; "
            "before = 'matplotlib' in sys.modules; r.colorize(np.zeros((2, 2)), 0, 1); "
            "print(before, 'matplotlib' in sys.modules, 'matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "False"]
