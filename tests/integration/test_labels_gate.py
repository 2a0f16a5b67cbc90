"""Operator labels flow back into the adaptation gate on a real Redis (issue 12 item 1, issue 11 item 2): an
alert labelled through `LabelStore` (image and mask kept) joins the next refresh of the worker's
`AdapterService`, which says so in the audit entry; each label counts once however many refreshes see it,
and a line without labels refreshes as before."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.adaptation.registry import VersionRegistry
from pipeline.adaptation.tta.service import AdapterService
from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.inspection.render import encode_png, mask_png
from pipeline.operators.labels import CONFIRMED, FALSE_ALARM, AlertFacts, LabelStore
from pipeline.redis_keys import RedisKeys
from tests.conftest import make_tiny_settings
from tests.integration.conftest import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

LINE = "bottle"
TTA: dict[str, Any] = {
    "mode": "buffered", "refresh_every": 1_000_000, "min_frames": 4, "holdout": 0.3, "train_steps": 4,
    "train_seconds": 60.0, "train_share": 1.0, "batch_tokens": 256, "admit_image_z": None,
    "admit_max_abnormal_share": 1.0, "gate_max_flip_share": 1.0,
    "gate_auroc_margin": 1.0, "gate_min_contrast_ratio": 0.0,  # random weights: the rules are unit-tested
}


def _images(n: int, seed: int, hw: tuple[int, int] = (64, 64)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(110 + rng.integers(0, 30, (*hw, 3))).astype(np.uint8) for _ in range(n)]


def _alert(client: Any, keys: RedisKeys, fid: str, image: np.ndarray, mask: np.ndarray, ts_ms: int) -> AlertFacts:
    """What the publisher leaves for an alert: the frame's image and mask, under the frame's keys."""
    client.set(keys.frame(fid, "image"), encode_png(image))
    client.set(keys.frame(fid, "mask"), mask_png(mask))
    h, w = image.shape[:2]
    return AlertFacts(fid, LINE, 0.9, 0.5, ts_ms, "cam-1", w, h)


def _last_refresh(reg: VersionRegistry) -> dict[str, Any]:
    e = next(e for e in reg.audit(LINE, count=20) if e["action"] in ("promote", "refuse"))
    positives = json.loads(e["positives"]) if "positives" in e else json.loads(e["report"])["positives"]
    validation = json.loads(e["validation"]) if "validation" in e else json.loads(e["report"])["validation"]
    return {"action": e["action"], "positives": positives, "validation": validation}


def test_labelled_alerts_join_the_next_refresh_and_the_audit_counts_them(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    inspector = FrameScorer.from_settings(make_tiny_settings(tmp_path, tta=TTA))
    client = redis_server.client()
    keys = RedisKeys(f"labgate{uuid.uuid4().hex[:8]}")
    reg = VersionRegistry(client, keys)
    svc = AdapterService(inspector, reg, [LINE], "w-test")
    for i, raw in enumerate(inspector.score_raw(LINE, _images(10, 0))):
        svc.observe(LINE, f"f{i}", raw, 10.0, time.time())

    # no labels: the gate has only its synthetic positives
    assert svc.refresh(LINE)["action"] in ("promote", "refuse")
    before = _last_refresh(reg)
    assert before["positives"]["synthetic"] >= 1
    assert before["positives"]["operator"] == 0 and before["positives"]["false_alarm"] == 0

    labels = LabelStore(client, keys)
    defect, fa, unendorsed = _images(3, 1, (48, 80))
    mask = np.zeros((48, 80), bool)
    mask[8:24, 30:60] = True
    labels.set_label(_alert(client, keys, "a-defect", defect, mask, 1000), CONFIRMED, "alice",
                     defect_type="scratch", mask_is_defect=True)
    labels.set_label(_alert(client, keys, "a-false", fa, np.zeros((48, 80), bool), 2000), FALSE_ALARM, "alice")
    labels.set_label(_alert(client, keys, "a-outline", unendorsed, mask, 3000), CONFIRMED, "bob", defect_type="dent")
    for fid in ("a-defect", "a-false"):
        lab = labels.get(fid)
        assert lab is not None and lab.has_image and lab.has_mask  # kept next to the label
    # the read the gate makes: newest first, filtered, across pages of the index
    assert [x.frame_id for x in labels.newest(LINE, CONFIRMED, limit=5)] == ["a-outline", "a-defect"]
    endorsed = labels.newest(LINE, CONFIRMED, limit=1, where=lambda x: x.mask_is_defect, page=1)
    assert [x.frame_id for x in endorsed] == ["a-defect"]
    assert labels.newest(LINE, CONFIRMED, limit=1, where=lambda x: x.mask_is_defect, page=1, scan=2) == []

    for _ in range(2):  # the next refreshes: each label counts once, however many refreshes see it
        assert svc.refresh(LINE)["action"] in ("promote", "refuse")
        after = _last_refresh(reg)
        # the confirmed defect whose outline the operator endorsed, and the false alarm; not the other one
        assert after["positives"]["operator"] == 1 and after["positives"]["false_alarm"] == 1, after
        assert after["positives"]["synthetic"] == before["positives"]["synthetic"]
        assert after["validation"]["operator_frames"] == 1
        assert after["validation"]["labelled_frames"] == before["validation"]["labelled_frames"] + 2
    assert len(svc.lines[LINE].labels) == 2  # decoded once, cached by frame and label
