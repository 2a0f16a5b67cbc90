"""Live cameras into the real broker: an RTSP server that restarts mid-stream, and an HTTP MJPEG stream.

The RTSP server is GStreamer's rtsp-server (tests/integration/rtsp_server.py); the MJPEG stream is served
by Debian's ffmpeg (`-f mpjpeg -listen 1`). Both are installed by `deploy/local/setup.sh --dev`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline.inspection.imaging import decode_image
from pipeline.settings import load_settings
from pipeline.streaming import envelope as env
from pipeline.streaming import local_stack as stack
from pipeline.streaming.frame_sources import LiveSource
from pipeline.streaming.producer import produce
from tests.integration.conftest import Broker, RedisServer, make_pipeline_config, read_topic, wait_for

pytestmark = pytest.mark.integration
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SYSTEM_PYTHON = "/usr/bin/python3"


class RtspServer:
    """The test's RTSP server process; `restart` kills it and starts a new one on the same port."""

    def __init__(self, tmp: Path) -> None:
        self.port = stack.free_port()
        self.url = f"rtsp://127.0.0.1:{self.port}/cam"
        self.log = tmp / "rtsp.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([SYSTEM_PYTHON, str(HERE / "rtsp_server.py"), str(self.port), "/cam"],
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: b"ready" in self.log.read_bytes() or self.proc.poll() is not None, 15, "the RTSP server")
        if self.proc.poll() is not None:
            pytest.fail(f"the RTSP server exited: {self.log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.write_bytes(b"")  # the next start waits for its own "ready"


@pytest.fixture
def rtsp(tmp_path: Path):
    if not Path(SYSTEM_PYTHON).exists():
        pytest.fail("the RTSP test server needs /usr/bin/python3 with GStreamer's RTSP server: "
                    "bash deploy/local/setup.sh --dev")
    srv = RtspServer(tmp_path)
    srv.start()
    yield srv
    srv.stop()


def test_rtsp_camera_survives_a_server_restart(tmp_path: Path, broker: Broker, redis_server: RedisServer,
                                               text_cache_dir: Path, rtsp: RtspServer) -> None:
    settings = load_settings(_config(tmp_path, broker, redis_server, text_cache_dir))
    src = LiveSource(rtsp.url, buffer=2, backoff_s=0.2, backoff_max_s=1.0, open_timeout_s=5, read_timeout_s=2)
    sent: list[str] = []
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["stats"] = produce(settings, "bottle", src, fps=0, count=40, camera="line1-top",
                                      on_sent=lambda n, fid: sent.append(fid))
        except Exception as e:  # reported by the assertions below
            result["error"] = e
        finally:
            src.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_for(lambda: len(sent) >= 10, 30, "10 frames from the RTSP camera")
    rtsp.stop()  # the camera goes away mid-stream ...
    time.sleep(1.0)
    rtsp.start()  # ... and comes back on the same address
    t.join(timeout=45)
    assert not t.is_alive(), f"the producer did not finish: {len(sent)} sent, camera {src.stats.summary()}"
    assert "error" not in result, result.get("error")
    stats = result["stats"]
    assert stats.sent == 40 and stats.acked == 40 and stats.failed == 0
    assert src.stats.reconnects >= 1 and src.stats.failures >= 1, src.stats.summary()
    assert src.stats.captured >= 40 and src.stats.sent == 40

    records = read_topic(settings)
    assert len(records) == 40
    metas = [env.parse_meta(r.headers) for r in records]
    assert {m.camera for m in metas} == {"line1-top"} and {m.content_type for m in metas} == {"image/jpeg"}
    assert decode_image(records[-1].value, content_type="image/jpeg").shape == (120, 160, 3)


def test_produce_cli_reads_an_http_mjpeg_stream(tmp_path: Path, broker: Broker, redis_server: RedisServer,
                                                text_cache_dir: Path) -> None:
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg, "ffmpeg is missing: bash deploy/local/setup.sh --dev installs it"
    cfg = _config(tmp_path, broker, redis_server, text_cache_dir)
    port = stack.free_port()
    url = f"http://127.0.0.1:{port}/cam.mjpg"
    server = subprocess.Popen([ffmpeg, "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
                               "testsrc=size=96x64:rate=20", "-c:v", "mjpeg", "-q:v", "5", "-f", "mpjpeg",
                               "-listen", "1", url], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)
        env_ = {k: v for k, v in os.environ.items() if k != "ANOCLIP_CONFIG"}
        r = subprocess.run([sys.executable, "-m", "workers.cli", "produce", "--config", str(cfg), "--line", "wood",
                            "--source", url, "--count", "6", "--max-outage", "20"],
                           cwd=REPO, env=env_, capture_output=True, text=True, timeout=60)
    finally:
        server.kill()
        server.wait(timeout=10)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"sent 6 frames from camera 127.0.0.1:{port}/cam.mjpg" in r.stdout and "6 acknowledged" in r.stdout
    assert "captured" in r.stdout and "dropped" in r.stdout
    records = read_topic(load_settings(cfg))
    assert len(records) == 6
    assert decode_image(records[0].value).shape == (64, 96, 3)


def _config(tmp_path: Path, broker: Broker, redis_server: RedisServer, text_cache_dir: Path) -> Path:
    path = tmp_path / "cfg.yaml"
    cfg = make_pipeline_config(broker, redis_server.url, text_cache_dir)
    cfg["kafka"]["partitions"] = 1
    path.write_text(yaml.safe_dump(cfg))
    from pipeline.streaming.kafka_io import ensure_topics

    ensure_topics(load_settings(path).kafka)
    return path
