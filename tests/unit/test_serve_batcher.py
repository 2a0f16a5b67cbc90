"""The serve batcher: a lone request is scored at once, announced concurrent ones share one batch."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.serving.app import check_token_policy
from pipeline.serving.batcher import InspectionBatcher
from pipeline.settings import Settings
from pipeline.verdicts.inspector import Inspector


@pytest.fixture
def inspector(tiny_settings: Settings, one_torch_thread: None) -> Inspector:
    ins = Inspector.from_settings(tiny_settings, follow="never")
    ins.prepare_line("bottle")
    ins.prepare_line("wood")
    return ins


def _img(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (40, 64, 3), dtype=np.uint8)


def test_lone_request_does_not_wait_for_a_batch(inspector: Inspector) -> None:
    sizes: list[int] = []
    b = InspectionBatcher(inspector, max_batch=8, max_wait_ms=3000, on_batch=lambda ln, n, s: sizes.append(n)).start()
    try:
        t0 = time.perf_counter()
        insp = b.submit("bottle", _img(0), announced=False).result(timeout=30)
        assert time.perf_counter() - t0 < 2.5  # not the 3 s batch wait
        assert insp.line == "bottle" and insp.mask.shape == (40, 64) and "queue" in insp.timings
        assert sizes == [1]
    finally:
        b.stop()


def test_announced_requests_share_a_batch_and_lines_stay_apart(inspector: Inspector) -> None:
    calls: list[tuple[str, int]] = []
    b = InspectionBatcher(inspector, max_batch=8, max_wait_ms=3000, on_batch=lambda ln, n, s: calls.append((ln, n)))
    for _ in range(4):
        b.announce()  # four requests accepted, still being read
    b.start()
    try:
        futures = [b.submit("bottle", _img(1))]
        time.sleep(0.2)  # the first waits for the others instead of running alone
        futures += [b.submit("bottle", _img(2)), b.submit("wood", _img(3)), b.submit("bottle", _img(4))]
        results = [f.result(timeout=30) for f in futures]
    finally:
        b.stop()
    assert sorted(calls) == [("bottle", 3), ("wood", 1)]
    assert [r.line for r in results] == ["bottle", "bottle", "wood", "bottle"]
    alone = inspector.inspect("bottle", [_img(2)])[0]
    assert results[1].score == pytest.approx(alone.score, abs=1e-5)  # batching changes no score


def test_token_policy() -> None:
    assert check_token_policy("127.0.0.1", None, False) is None
    assert check_token_policy("::1", " a-good-token ", False) == "a-good-token"
    with pytest.raises(ConfigError, match="without an access token"):
        check_token_policy("0.0.0.0", None, False)
    assert check_token_policy("0.0.0.0", None, True) is None
    with pytest.raises(ConfigError, match="8 to 512 characters"):
        check_token_policy("127.0.0.1", "short", False)
