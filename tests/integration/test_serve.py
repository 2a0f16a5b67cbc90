"""`anoclip serve` over real HTTP: verdicts, refusals with the DLQ's reasons, batching, auth, metrics,
publishing into a real Redis."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.redis_keys import RedisKeys
from pipeline.streaming import local_stack as stack
from pipeline.streaming.frame_sources import encode
from tests.conftest import TINY_LINES
from tests.integration.conftest import RedisServer, wait_for

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TOKEN = "serve-test-token-0123"


@dataclass
class Served:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    prefix: str

    def call(self, method: str, path: str, body: bytes | None = None, *, token: str | None = TOKEN,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        import http.client

        conn = http.client.HTTPConnection(self.url.split("//")[1], timeout=30)
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        ctype = r.getheader("content-type", "")
        return r.status, json.loads(data) if "json" in ctype else data.decode(errors="replace")

    def inspect(self, line: str, body: bytes, ctype: str | None = "image/jpeg", query: str = "",
                **headers: str) -> tuple[int, Any]:
        h = {"Content-Type": ctype} if ctype else {}
        h.update({k.replace("_", "-"): v for k, v in headers.items()})
        return self.call("POST", f"/v1/lines/{line}/inspect{query}", body, headers=h)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
           text_cache_dir: Path) -> Iterator[Served]:
    d = tmp_path_factory.mktemp("serve")
    prefix = f"s{uuid.uuid4().hex[:8]}"
    cfg = {
        "model": {"arch": "anoclip-tiny", "pretrained": "none", "device": "cpu", "precision": "fp32",
                  "text_cache_dir": str(text_cache_dir)},
        "lines": [{**TINY_LINES[0], "threshold": {"image": 0.0, "pixel": 0.0}},  # bottle: always anomalous
                  {**TINY_LINES[1], "threshold": {"image": 1.01}}],  # wood: never
        "redis": {"url": redis_server.url, "prefix": prefix},
        "worker": {"max_frame_bytes": 200_000, "max_side": 4000, "max_batch": 8},
    }
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    port = stack.free_port()
    log = d / "serve.log"
    env = {**{k: v for k, v in os.environ.items() if k != "ANOCLIP_CONFIG"}, "ANOCLIP_SERVE_TOKEN": TOKEN}
    with log.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "serve", "--config", str(d / "cfg.yaml"),
                                 "--port", str(port), "--publish", "--max-wait-ms", "200"],
                                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    s = Served(f"http://127.0.0.1:{port}", proc, log, prefix)

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"anoclip serve exited: {log.read_text(errors='replace')[-3000:]}")
        try:
            return s.call("GET", "/readyz", token=None)[0] == 200
        except OSError:
            return False

    wait_for(ready, 90, "anoclip serve to be ready")
    yield s
    proc.terminate()
    try:
        assert proc.wait(timeout=30) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def _jpeg(seed: int, h: int = 48, w: int = 80) -> bytes:
    return encode(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8), "jpeg")[0]


def test_inspect_returns_the_streamed_record_and_publishes_it(served: Served, redis_server: RedisServer) -> None:
    code, r = served.inspect("bottle", _jpeg(1), query="?mask=true", X_Frame_Id="cam1.0001", X_Camera_Id="cam-1")
    assert code == 200, r
    assert r["frame_id"] == "cam1.0001" and r["line"] == "bottle" and r["camera"] == "cam-1"
    assert r["verdict"] == "anomalous" and r["threshold"] == 0.0 and 0.0 < r["score"] < 1.0
    assert (r["width"], r["height"]) == (80, 48) and r["content_type"] == "image/jpeg"
    assert r["regions"] and set(r["regions"][0]) >= {"area", "box"}
    assert {"model", "queue", "decode", "post"} <= set(r["timings_ms"]) and r["adapter_version"] is None
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(r["mask_png"]))))
    assert mask.shape == (48, 80) and mask.all()  # pixel threshold 0: every pixel is defect
    assert r["published"] is True
    keys, red = RedisKeys(served.prefix), redis_server.client()
    stored = json.loads(red.get(keys.frame("cam1.0001", "result")))
    assert stored["score"] == r["score"] and stored["verdict"] == "anomalous"
    assert red.xlen(keys.results_stream("bottle")) >= 1 and red.get(keys.frame("cam1.0001", "mask"))

    code, r = served.inspect("wood", _jpeg(2), ctype=None)  # type sniffed from the bytes
    assert code == 200 and r["verdict"] == "normal" and r["content_type"] == "image/jpeg" and "mask_png" not in r


@pytest.mark.parametrize(("line", "body", "ctype", "headers", "status", "reason"), [
    ("bottle", b"", "image/jpeg", {}, 400, "empty frame"),
    ("bottle", b"hello", "text/plain", {}, 415, "unsupported content type 'text/plain'"),
    ("bottle", _jpeg(3)[:300], "image/jpeg", {}, 422, "image"),
    ("bottle", encode(np.zeros((8, 8, 3), np.uint8), "png")[0], "image/jpeg", {}, 415, "does not match the data"),
    ("bottle", b"\x00" * 300_000, "image/png", {}, 413, "frame too large"),
    ("toaster", _jpeg(4), "image/jpeg", {}, 404, "unknown line 'toaster' (configured lines: bottle, wood)"),
    ("bottle", _jpeg(5), "image/jpeg", {"X-Frame-Id": "bad id"}, 400, "malformed X-Frame-Id"),
    ("bottle", _jpeg(6, 8, 4000), "image/jpeg", {}, 422, "image too elongated"),
])
def test_bad_requests_get_the_dlq_reasons(served: Served, line: str, body: bytes, ctype: str,
                                          headers: dict[str, str], status: int, reason: str) -> None:
    code, r = served.call("POST", f"/v1/lines/{line}/inspect", body, headers={"Content-Type": ctype, **headers})
    assert code == status, r
    assert reason in r["error"] and r["stage"] in ("size", "decode", "line", "headers")


def test_concurrent_requests_share_batches(served: Served) -> None:
    bodies = [_jpeg(100 + i) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: served.inspect("bottle", b), bodies))
    assert [c for c, _ in results] == [200] * 16
    assert len({r["frame_id"] for _, r in results}) == 16
    code, text = served.call("GET", "/metrics")
    assert code == 200
    count = _metric(text, 'anoclip_batch_size_count{line="bottle"}')
    total = _metric(text, 'anoclip_batch_size_sum{line="bottle"}')
    assert total > count, "no batch held more than one frame"
    assert _metric(text, 'anoclip_http_requests_total{line="bottle",status="200"}') >= 16
    assert _metric(text, 'anoclip_http_requests_total{line="unknown",status="404"}') >= 1


def test_auth_health_and_docs(served: Served) -> None:
    code, r = served.call("POST", "/v1/lines/bottle/inspect", _jpeg(7), token=None,
                          headers={"Content-Type": "image/jpeg"})
    assert code == 401 and "access token" in r["error"]
    assert served.call("GET", "/metrics", token="wrong-token-123")[0] == 401
    assert served.call("GET", "/healthz", token=None) == (200, {"live": True})
    code, ready = served.call("GET", "/readyz", token=None)
    assert code == 200 and ready["model_loaded"] and ready["redis_up"]
    code, spec = served.call("GET", "/openapi.json", token=None)
    assert code == 200 and "/v1/lines/{line}/inspect" in spec["paths"]
    assert "image/jpeg" in spec["paths"]["/v1/lines/{line}/inspect"]["post"]["requestBody"]["content"]
    assert served.call("GET", "/docs", token=None)[0] == 200


def test_listening_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"lines": TINY_LINES}))
    env = {k: v for k, v in os.environ.items() if k not in ("ANOCLIP_CONFIG", "ANOCLIP_SERVE_TOKEN")}
    r = subprocess.run([sys.executable, "-m", "workers.cli", "serve", "--config", str(tmp_path / "cfg.yaml"),
                        "--host", "0.0.0.0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "without an access token" in r.stderr


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
