"""The fuzz target (tests/fuzz/fuzz_decode.py) in the suite: a short bounded run, and every input it ever
crashed on, replayed (tests/fuzz/regressions/: one file per finding, its first byte chooses the target)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ImageError
from pipeline.inspection.imaging import decode_image

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONTENT_TYPES = [None, "image/jpeg", "image/png", "image/png; q=1", "IMAGE/JPEG", "image/gif", "text/plain", ""]
REGRESSIONS = sorted((HERE / "regressions").iterdir())


def test_fuzz_target_runs_clean_for_a_few_seconds(tmp_path: Path) -> None:
    import atheris  # noqa: F401  (a dev dependency: a missing one fails here, it never skips)

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(HERE / "fuzz_decode.py"), "--seconds", "8",
                        f"-artifact_prefix={tmp_path}/"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=240)
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert r.returncode == 0 and not crashes, f"the fuzzer found {crashes}:\n{r.stderr[-3000:]}"
    assert "Done" in r.stderr and " runs in " in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_fuzz_findings_stay_fixed(path: Path) -> None:
    data = path.read_bytes()
    assert data[0] % 4, "image findings only so far"
    try:
        rgb = decode_image(data[1:], max_pixels=1 << 20, content_type=CONTENT_TYPES[(data[0] >> 2) % 8])
    except ImageError as e:
        assert str(e).startswith(("undecodable image", "truncated image", "image too large"))
        return
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8
