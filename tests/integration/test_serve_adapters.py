"""`anoclip serve` scores each line with its promoted adapter from the Redis registry (issue 13), as workers
do with buffered TTA: the version and its own thresholds are in the answer, a promotion is followed without a
restart. Without buffered TTA or a reachable Redis it serves the base model and says why."""

from __future__ import annotations

import http.client
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.adaptation.registry import VersionRegistry
from pipeline.adaptation.tta.files import build_meta, target_for, to_bytes
from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.inspection.imaging import decode_image
from pipeline.model.adapters import create_adapter
from pipeline.redis_keys import RedisKeys
from pipeline.streaming import local_stack as stack
from pipeline.streaming.frame_sources import encode
from tests.conftest import make_tiny_settings
from tests.integration.conftest import RedisServer, served_versions, serving, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

LINE = "bottle"
V1 = {"image": 0.125, "pixel": 0.3125, "pixel_median": 0.25, "frames": 6, "quantile": 0.99, "pixel_quantile": 0.999}
V2 = {**V1, "image": 0.875, "pixel": 0.9375}
"""Each version's own thresholds: unlike any line default (0.5), so their use shows."""


def _call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "image/png"} if body else {})
    r = conn.getresponse()
    data = json.loads(r.read())
    conn.close()
    return r.status, data


def _image() -> bytes:
    rng = np.random.default_rng(3)
    return encode((110 + rng.integers(0, 30, (64, 64, 3))).astype(np.uint8), "png")[0]


def _publish(reg: VersionRegistry, inspector: FrameScorer, seed: int, thresholds: dict[str, Any],
             base: str | None) -> tuple[Any, str]:
    adapter = create_adapter(inspector.line(LINE).adapter_kind, inspector.prepare_line(LINE),
                             generator=torch.Generator().manual_seed(seed))
    meta = build_meta(adapter, target_for(inspector, LINE), thresholds=thresholds)
    res = reg.publish(LINE, to_bytes(adapter, meta), meta, actor="test", reason="test", base_version=base)
    assert res.promoted and res.version is not None, res
    return adapter, res.version


def test_serve_follows_the_registrys_promoted_adapter(redis_server: RedisServer, text_cache_dir: Path) -> None:
    prefix = f"sa{uuid.uuid4().hex[:8]}"
    settings = make_tiny_settings(text_cache_dir, tta={"mode": "buffered", "trainer_poll_s": 0.05},
                                  redis={"url": redis_server.url, "prefix": prefix})
    inspector = FrameScorer.from_settings(settings)
    reg = VersionRegistry(redis_server.client(), RedisKeys(prefix))
    v1_adapter, v1 = _publish(reg, inspector, 0, V1, None)
    body = _image()
    with serving(settings, inspector) as (state, port):
        code, r = _call(port, "POST", f"/v1/lines/{LINE}/inspect", body)
        assert code == 200, r
        assert r["adapter_version"] == v1
        assert (r["threshold"], r["pixel_threshold"], r["threshold_source"]) == (V1["image"], V1["pixel"], "version")
        assert r["verdict"] == ("anomalous" if r["score"] >= V1["image"] else "normal")
        image = decode_image(body, content_type="image/png")
        (with_v1,) = inspector.score_raw(LINE, [image], v1_adapter)
        (base,) = inspector.score_raw(LINE, [image])
        # the adapter acts on patch tokens: the map shows it (the CLS image score does not change)
        assert r["max_pixel_score"] == pytest.approx(float(with_v1.anomaly_map.max()), abs=1e-6)
        assert abs(float(with_v1.anomaly_map.max()) - float(base.anomaly_map.max())) > 1e-4, "else this shows nothing"

        code, r = _call(port, "POST", "/v1/lines/wood/inspect", body)  # no version in the registry: base model
        assert code == 200 and r["adapter_version"] is None and r["threshold_source"] != "version"
        code, ready = _call(port, "GET", "/readyz")
        assert code == 200 and ready["adapters"] == {"bottle": v1, "wood": None, "pcb1": None}
        assert served_versions(port, "anoclip_adapter_version") == {"bottle": v1, "wood": "none", "pcb1": "none"}
        assert served_versions(port, "anoclip_bank_version") == {}, "no memory line"

        _, v2 = _publish(reg, inspector, 1, V2, v1)  # promoted while serving: followed without a restart

        def on_v2() -> dict[str, Any] | None:
            got = _call(port, "POST", f"/v1/lines/{LINE}/inspect", body)[1]
            return got if got["adapter_version"] == v2 else None

        r = wait_for(on_v2, 20, "serve to follow the promotion")
        assert (r["threshold"], r["pixel_threshold"]) == (V2["image"], V2["pixel"])
        assert served_versions(port, "anoclip_adapter_version")["bottle"] == v2, "v1's series is gone"

        assert reg.rollback(LINE, actor="test", reason="test") == v1
        assert reg.rollback(LINE, actor="test", reason="test") is None  # no adapter: back to the base model
        r = wait_for(lambda: (x := _call(port, "POST", f"/v1/lines/{LINE}/inspect", body)[1])["adapter_version"]
                     is None and x, 20, "serve to follow the rollback")
        assert r["max_pixel_score"] == pytest.approx(float(base.anomaly_map.max()), abs=1e-6)
        assert r["threshold_source"] != "version"
        assert served_versions(port, "anoclip_adapter_version")["bottle"] == "none"
    assert reg.versions(LINE) == [v1, v2], "serving never trains nor publishes"


@pytest.mark.parametrize(("tta", "reason"), [
    ("buffered", "serving the base model: Redis at redis://127.0.0.1:"),
    ("off", "serving the base model: tta.mode is off"),
])
def test_serve_falls_back_to_the_base_model_and_says_why(text_cache_dir: Path, caplog: pytest.LogCaptureFixture,
                                                         tta: str, reason: str) -> None:
    settings = make_tiny_settings(text_cache_dir, tta={"mode": tta},
                                  redis={"url": f"redis://127.0.0.1:{stack.free_port()}/0"})  # nothing listens
    with caplog.at_level(logging.INFO, logger="anoclip.serve"), \
            serving(settings, FrameScorer.from_settings(settings)) as (state, port):
        assert state.adapters is None
        assert any(reason in rec.getMessage() for rec in caplog.records), caplog.text
        code, r = _call(port, "POST", f"/v1/lines/{LINE}/inspect", _image())
        assert code == 200 and r["adapter_version"] is None
        code, ready = _call(port, "GET", "/readyz")
        assert code == 200 and ready["adapters"].startswith("base model: ")
