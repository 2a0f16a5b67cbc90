"""The live dashboard in a real browser (Debian's headless Chromium via chromedriver), fed by real output.

The stack is the real one: the Tansu broker, a redis-server started with the exact ACL command line
of deploy/compose.yaml (default user off, an `anoclip` user limited to anoclip:* keys and channels),
the real inspection worker (tiny model) as a subprocess, frames sent through the real producer, and
`anoclip dashboard` itself as a subprocess with its access token in the environment. The browser
checks what an operator sees: the page loads with every line and the worker, a new alert appears
without a reload, an alert opens its full-size detail view, a bad token is refused, and the page
recovers by itself when Redis restarts and when the dashboard connection drops. Screenshots go to
test-output/dashboard/ (or $ANOCLIP_TEST_OUTPUT).

Chromium and chromedriver come from Debian (`apt-get install chromium chromium-driver`); when they
are missing this test fails, it never skips.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import yaml
from PIL import Image

from pipeline.adaptation.registry import VersionRegistry
from pipeline.dashboard.server import TOKEN_ENV
from pipeline.evaluation import synth
from pipeline.redis_keys import RedisKeys
from pipeline.streaming import local_stack as stack
from pipeline.streaming.frame_sources import SourceFrame, encode
from pipeline.streaming.kafka_io import ensure_topics
from pipeline.streaming.producer import FrameProducer
from tests.integration.conftest import (
    Broker,
    Pipeline,
    RedisServer,
    WorkerProc,
    make_pipeline_config,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.browser]

REPO = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("ANOCLIP_TEST_OUTPUT", REPO / "test-output")) / "dashboard"
CHROMIUM = os.environ.get("ANOCLIP_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ANOCLIP_CHROMEDRIVER", "/usr/bin/chromedriver")
TOKEN = "dashboard-browser-test-token"
OPERATOR = "inspector-anna"
"""The name the dashboard's token carries: labels set in the browser are recorded under it."""
STALE_S = 6.0
REDIS_PASSWORD = "compose-acl-password"
FRAME_W, FRAME_H = 240, 160
UI_S = 20.0
"""Bound on every wait for the page to show something (the worker adds ~0.1-1 s per frame here)."""


# --- a redis-server with the compose ACL -------------------------------------------------------------


class AclRedis:
    """redis-server run with deploy/compose.yaml's own arguments (password filled in), owned by this test.

    Stopped and restarted by its pid only; AOF keeps the data across the restart, as in production.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.port = stack.free_port()
        compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
        values = {"REDIS_PASSWORD": REDIS_PASSWORD, "REDIS_ADMIN_PASSWORD": "compose-admin-password"}
        # Compose interpolation: ${VAR:?error} needs a value, ${VAR:-default} falls back to its default.
        args = [re.sub(r"\$\{(\w+):([?-])([^}]*)\}",
                       lambda m: values[m.group(1)] if m.group(2) == "?" else values.get(m.group(1), m.group(3)), a)
                for a in compose["services"]["redis"]["command"]]
        assert args[0] == "redis-server" and ">" + REDIS_PASSWORD in args, f"unexpected compose command {args}"
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (Debian: apt-get install redis-server)")
        self.cmd = [exe, *args[1:], "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(run_dir),
                    "--save", "", "--daemonize", "no"]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, username="anoclip", password=REDIS_PASSWORD, socket_timeout=5)

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server exited: {(self.run_dir / 'redis.log').read_text()[-2000:]}")
            try:
                return bool(self.client().ping())
            except redis.RedisError:
                return False

        wait_for(answers, 20, "redis-server (compose ACL) to answer the anoclip user")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


# --- the dashboard process ---------------------------------------------------------------------------


@dataclass
class DashboardProc:
    config: Path
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, TOKEN_ENV: f"{OPERATOR}:{TOKEN}", "PYTHONUNBUFFERED": "1"}
        env.pop("ANOCLIP_CONFIG", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "dashboard", "--config", str(self.config),
                 "--port", str(self.port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"anoclip dashboard exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return http_status(self.url + "/healthz") == 200

        wait_for(up, 20, "anoclip dashboard to answer /healthz")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


# --- the browser -------------------------------------------------------------------------------------


def chrome() -> Any:
    """Headless Debian Chromium through Debian's chromedriver; fails with the install line if absent."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: apt-get install chromium chromium-driver "
                    "(or set ANOCLIP_CHROMIUM / ANOCLIP_CHROMEDRIVER)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        pytest.fail(f"selenium is not installed (pip install -e '.[dev]'): {e}")
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(10)
    return driver


def js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def wait_js(driver: Any, script: str, what: str, timeout: float = UI_S) -> Any:
    """Wait until `script` (a JS expression) is truthy in the page; fail naming `what` with the page state."""
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        last = js(driver, f"return ({script});")
        if last:
            return last
        time.sleep(0.1)
    state = js(driver, "return {url: location.href, body: Object.assign({}, document.body.dataset),"
                       " banner: (document.getElementById('banner') || {}).textContent};")
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; page: {state}")


def screenshot(driver: Any, name: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    driver.save_screenshot(str(path))
    return path


# --- the stack ---------------------------------------------------------------------------------------


@dataclass
class LiveStack:
    pipeline: Pipeline
    redis: AclRedis
    worker: WorkerProc
    dashboard: DashboardProc
    producer: FrameProducer
    driver: Any
    sent: int = 0

    def send(self, line: str, defect: str | None = "scratch") -> str:
        """One frame through Kafka; returns its frame id."""
        self.sent += 1
        kind = line if line in synth.KINDS else synth.KINDS[0]
        rgb, _ = synth.render_part(kind, FRAME_H, 1000 + self.sent, defect, width=FRAME_W)
        data, ctype = encode(rgb, "jpeg")
        fid = self.producer.send(line, SourceFrame(data, ctype, f"{line}-{self.sent}"))
        self.producer.flush(timeout_s=20)
        return fid

    def published(self, frame_id: str) -> bool:
        try:
            return bool(self.redis.client().exists(self.pipeline.keys.frame(frame_id, "result")))
        except redis.RedisError:
            return False


@pytest.fixture(scope="module")
def live(broker: Broker, text_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    base = tmp_path_factory.mktemp("dashboard")
    acl_redis = AclRedis(base / "redis")
    acl_redis.start()
    cfg = make_pipeline_config(broker, acl_redis.url, text_cache_dir)
    # the compose ACL allows only anoclip:* keys: the real prefix, on a Redis this test owns alone
    cfg["redis"].update(prefix="anoclip", username="anoclip", password=REDIS_PASSWORD)
    cfg["lines"][0]["threshold"] = {"image": 0.0, "warmup_frames": 1, "pixel_quantile": 0.9}  # bottle: alerts
    cfg["dashboard"] = {"stale_after_s": STALE_S, "guess_limit": 20}
    pipeline = Pipeline(cfg, base, acl_redis)  # type: ignore[arg-type]  # same client()/url surface
    ensure_topics(pipeline.settings.kafka)
    worker = pipeline.start_worker("dash-w1")
    # a line only the dashboard knows: no worker's heartbeat names it
    pipeline.config["lines"].append({"id": "press", "class_name": "press", "domain": "object"})
    dashboard = DashboardProc(pipeline.config_path, stack.free_port(), base / "dashboard.log")
    driver = None
    producer = None
    try:
        dashboard.start()
        worker.wait_ready()
        producer = FrameProducer(pipeline.settings)
        driver = chrome()
        yield LiveStack(pipeline, acl_redis, worker, dashboard, producer, driver)
    finally:
        if driver is not None:
            driver.quit()
        if producer is not None:
            producer.close()
        pipeline.stop_all()
        dashboard.stop()
        acl_redis.stop()


def open_dashboard(live: LiveStack) -> None:
    live.driver.get(f"{live.dashboard.url}/?token={TOKEN}")
    wait_js(live.driver, "document.body.dataset.conn === 'live' && document.body.dataset.redis === 'up'",
            "the page to connect to the live feed")


# --- tests ---------------------------------------------------------------------------------------------


def test_bad_or_missing_token_is_refused(live: LiveStack) -> None:
    d = live.driver
    d.delete_all_cookies()
    d.get(f"{live.dashboard.url}/?token=not-the-token")
    status = wait_js(d, "document.getElementById('error-status') && "
                        "document.getElementById('error-status').textContent", "the refusal page")
    assert status == "401"
    assert "refused" in js(d, "return document.getElementById('error-message').textContent")
    assert not js(d, "return !!document.getElementById('lines')"), "no dashboard behind a bad token"
    assert not d.get_cookies(), "a refused token must not set a cookie"
    assert js(d, "return getComputedStyle(document.documentElement).backgroundColor") == "rgb(16, 20, 26)", \
        "the refusal page is styled (static assets need no token)"
    screenshot(d, "refused.png")
    d.get(f"{live.dashboard.url}/")
    assert "required" in wait_js(d, "document.getElementById('error-message') && "
                                    "document.getElementById('error-message').textContent", "the token-required page")
    base = live.dashboard.url
    assert http_status(base + "/api/snapshot", {"Authorization": "Bearer wrong-token-1"}) == 401
    assert http_status(base + "/events", {"Authorization": "Bearer wrong-token-1"}) == 401
    assert http_status(base + "/api/snapshot", {"Authorization": f"Bearer {TOKEN}"}) == 200
    assert http_status(base + "/healthz") == 200, "probes need no token"


def test_page_loads_with_every_line_and_the_worker(live: LiveStack) -> None:
    first = [live.send("bottle", None), live.send("wood", None), live.send("pcb1", None)]
    wait_for(lambda: all(live.published(f) for f in first), 60, "the worker to publish the first frames")
    VersionRegistry(live.redis.client(), RedisKeys("anoclip")).record(
        "wood", "refuse", actor="test@ci", reason="candidate flipped 40% of confident verdicts")
    open_dashboard(live)
    d = live.driver
    assert "token=" not in d.current_url, "the token moves into a cookie and out of the address bar"
    for line in ("bottle", "wood", "pcb1"):
        wait_js(d, f"document.querySelector('#line-{line}[data-frame-id]')", f"line {line} to show its latest frame")
        wait_js(d, f"document.querySelector('#line-{line} .chart').dataset.points > 0", f"line {line}'s score chart")
    wait_js(d, "document.querySelector('#line-bottle .base').naturalWidth > 0 && "
               "document.querySelector('#line-bottle .heat').naturalWidth > 0 && "
               "document.querySelector('#line-bottle .outline').naturalWidth > 0",
            "the latest frame, heatmap and mask outline images of line bottle")
    assert js(d, "return document.querySelector('#line-bottle').dataset.verdict") == "anomalous"
    assert js(d, "return document.querySelector('#line-wood').dataset.verdict") == "normal"
    assert js(d, "return document.querySelector('#line-bottle .threshold').textContent").startswith("0.0000")
    assert js(d, "return document.querySelectorAll('#line-wood .chart .thr-line').length") == 1
    assert "base model" in js(d, "return document.querySelector('#line-wood .adapter').textContent")
    wait_js(d, "document.querySelector('#line-wood .refresh').dataset.outcome === 'refuse'",
            "line wood's last refresh outcome")
    assert "flipped 40%" in js(d, "return document.querySelector('#line-wood .refresh').textContent")
    row = wait_js(d, "document.querySelector('#workers tr[data-worker=\"dash-w1\"]') && "
                     "document.querySelector('#workers tr[data-worker=\"dash-w1\"]').textContent",
                  "the worker's heartbeat row")
    assert "ok" in row and "bottle" in row
    wait_js(d, f"document.querySelector('li.alert-item[data-frame-id=\"{first[0]}\"]')", "bottle's first alert")
    screenshot(d, "dashboard.png")


def test_new_alert_appears_without_reload_and_opens_its_detail_view(live: LiveStack) -> None:
    open_dashboard(live)
    d = live.driver
    js(d, "window.__sameDocument = 'yes';")
    events_before = int(js(d, "return document.body.dataset.events || '0'"))
    fid = live.send("bottle", "scratch")
    item = f"li.alert-item[data-frame-id=\"{fid}\"]"
    wait_js(d, f"document.querySelector('{item}')", f"alert {fid} to appear in the list")
    assert js(d, "return window.__sameDocument") == "yes", "the page must not reload"
    assert int(js(d, "return document.body.dataset.events")) > events_before, "it came over the live feed"
    assert js(d, "return document.querySelector('#alert-list li').dataset.frameId") == fid, "newest first"
    wait_js(d, f"document.querySelector('#line-bottle').dataset.frameId === '{fid}'", "line bottle to show the frame")
    wait_js(d, f"document.querySelector('{item} img.base').naturalWidth > 0", "the alert's thumbnail")
    alert = next({k.decode(): v.decode() for k, v in f.items()}
                 for _, f in live.redis.client().xrevrange(live.pipeline.keys.alerts_stream, count=50)
                 if f[b"frame_id"].decode() == fid)
    regions = json.loads(alert["regions"])

    d.find_element("css selector", f"{item} a.alert-link").click()
    wait_js(d, "document.body.dataset.state === 'loaded'", f"the detail view of alert {fid}")
    assert d.current_url.endswith(f"/alert/{fid}")
    sizes = wait_js(d, "(() => { const ids = ['full-frame', 'full-mask', 'full-heatmap'];"
                       " const s = ids.map((i) => [document.getElementById(i).naturalWidth,"
                       " document.getElementById(i).naturalHeight]);"
                       " return s.every((x) => x[0] > 0) ? s : null; })()", "the full-size frame, mask and heatmap")
    assert sizes == [[FRAME_W, FRAME_H]] * 3, f"full-size images, got {sizes}"
    rows = js(d, "return document.querySelectorAll('#regions tbody tr').length")
    boxes = js(d, "return document.querySelectorAll('#full-boxes rect.region-box').length")
    assert rows == boxes == len(regions), (rows, boxes, regions)
    facts = js(d, "return document.getElementById('alert-facts').textContent")
    assert "bottle" in facts and "anomalous" in facts
    original = live.redis.client().get(live.pipeline.keys.frame(fid, "image"))
    with urllib.request.urlopen(urllib.request.Request(f"{live.dashboard.url}/img/frame/{fid}/image",
                                                       headers={"Authorization": f"Bearer {TOKEN}"})) as r:
        assert r.read() == original, "the detail view shows the original frame bytes"
    assert Image.open(io.BytesIO(original)).size == (FRAME_W, FRAME_H)
    screenshot(d, "alert.png")


def test_an_operator_labels_an_alert_and_finds_it_in_the_audit(live: LiveStack) -> None:
    open_dashboard(live)
    d = live.driver
    fid = live.send("bottle", "scratch")
    item = f"li.alert-item[data-frame-id=\"{fid}\"]"
    wait_js(d, f"document.querySelector('{item}')", f"alert {fid} in the list")
    assert js(d, f"return document.querySelector('{item}').dataset.label") == "new"
    assert "% of frame" in js(d, f"return document.querySelector('{item} .region-text').textContent"), \
        "regions are described in words, not raw boxes"
    d.find_element("css selector", f"{item} a.alert-link").click()
    wait_js(d, "document.body.dataset.state === 'loaded'", f"the detail view of alert {fid}")
    assert js(d, "return document.body.dataset.label") == "new"
    wait_js(d, f"document.getElementById('who').textContent.includes('{OPERATOR}')", "the operator's name")
    d.find_element("id", "ack").click()
    wait_js(d, "document.body.dataset.label === 'acknowledged'", "the acknowledgement to be saved")
    d.find_element("css selector", "input[name='label'][value='confirmed']").click()
    d.find_element("id", "defect-type").send_keys("scratch")
    d.find_element("id", "mask-is-defect").click()
    d.find_element("id", "save-label").click()
    wait_js(d, "document.body.dataset.label === 'confirmed'", "the label to be saved")
    assert f"labelled confirmed: scratch by {OPERATOR}" in js(d, "return document.getElementById('label-status')"
                                                                 ".textContent")
    d.find_element("id", "comment").send_keys("deep scratch near the cap")
    d.find_element("id", "add-comment").click()
    wait_js(d, "document.querySelectorAll('#label-history li').length === 3", "three entries in the history")
    screenshot(d, "labelled.png")

    d.get(f"{live.dashboard.url}/audit")
    rows = f"#audit tr[data-frame-id=\"{fid}\"]"
    wait_js(d, f"document.querySelectorAll('{rows}').length === 3", f"the audit rows of {fid}")
    actions = js(d, f"return [...document.querySelectorAll('{rows}')].map((r) => [r.dataset.action, r.dataset.actor])")
    assert actions == [["comment", OPERATOR], ["label", OPERATOR], ["acknowledge", OPERATOR]], actions
    assert "confirmed: scratch" in js(d, f"return document.querySelectorAll('{rows}')[1].textContent")
    screenshot(d, "audit.png")
    label = live.redis.client().hgetall(live.pipeline.keys.label(fid))
    assert label[b"labelled_by"] == OPERATOR.encode() and label[b"defect_type"] == b"scratch"

    open_dashboard(live)  # the live list shows the label; the line's counts and metrics include it
    wait_js(d, f"document.querySelector('{item}') && document.querySelector('{item}').dataset.label === 'confirmed'",
            "the label on the live alert list")
    wait_js(d, "document.querySelector('#line-bottle .labels').textContent.includes('scratch 1')",
            "line bottle's label counts")
    with urllib.request.urlopen(f"{live.dashboard.url}/metrics", timeout=5) as r:
        assert 'anoclip_confirmed_defects{defect_type="scratch",line="bottle"} 1.0' in r.read().decode()


def test_cards_say_stale_and_no_worker_keep_their_order_and_filters_page(live: LiveStack) -> None:
    fid = live.send("wood", None)
    wait_for(lambda: live.published(fid), 60, "a frame of line wood")
    open_dashboard(live)
    d = live.driver
    order = ["bottle", "wood", "pcb1", "press"]
    wait_js(d, "document.querySelectorAll('#lines .line-card').length === 4", "four line cards")
    assert js(d, "return [...document.querySelectorAll('#lines .line-card')].map((c) => c.dataset.line)") == order
    wait_js(d, "document.querySelector('#line-press').dataset.state === 'no_worker'", "line press without a worker")
    assert js(d, "return document.querySelector('#line-press .verdict').textContent") == "NO WORKER"
    wait_js(d, "document.querySelector('#line-wood').dataset.state === 'live'", "line wood live after its frame")
    wait_js(d, "document.querySelector('#line-wood').dataset.state === 'stale'", "line wood to turn stale",
            timeout=STALE_S + 15)
    assert js(d, "return document.querySelector('#line-wood .verdict').textContent") == "STALE"
    assert "no frame for" in js(d, "return document.querySelector('#line-wood .status-text').textContent")
    ticks = js(d, "return [...document.querySelectorAll('#line-bottle .chart .time-tick')].map((t) => t.textContent)")
    assert ticks and all(re.search(r"\d{1,2}:\d{2}", t) for t in ticks), f"a wall-clock time axis, got {ticks}"
    wait_js(d, "Number(document.querySelector('#line-bottle .yield').dataset.fail) > 0", "bottle's fails this hour")
    screenshot(d, "stale.png")
    d.refresh()
    wait_js(d, "document.querySelectorAll('#lines .line-card').length === 4", "four line cards after a reload")
    assert js(d, "return [...document.querySelectorAll('#lines .line-card')].map((c) => c.dataset.line)") == order

    # alerts: filter by line (wood never alerts) and page back through bottle's
    d.find_element("css selector", "#alert-filters select[name='line'] option[value='wood']").click()
    d.find_element("css selector", "#alert-filters button[type='submit']").click()
    wait_js(d, "!document.getElementById('no-alerts').hidden && "
               "document.getElementById('no-alerts').textContent.includes('filter')", "no alert of line wood")
    d.find_element("css selector", "#alert-filters select[name='line'] option[value='bottle']").click()
    d.find_element("css selector", "#alert-filters button[type='submit']").click()
    wait_js(d, "document.querySelectorAll('#alert-list li').length > 0 && [...document.querySelectorAll("
               "'#alert-list li')].every((li) => li.dataset.line === 'bottle')", "only bottle's alerts")
    # frames: normal verdicts only
    d.find_element("css selector", "#frame-filters select[name='verdict'] option[value='normal']").click()
    d.find_element("css selector", "#frame-filters button[type='submit']").click()
    wait_js(d, "Number(document.getElementById('frames-panel').dataset.rows) > 0 && [...document.querySelectorAll("
               "'#frames tbody tr')].every((r) => r.dataset.verdict === 'normal')", "only normal frames")


def test_recovers_when_redis_restarts_and_when_the_connection_drops(live: LiveStack) -> None:
    open_dashboard(live)
    d = live.driver
    js(d, "window.__sameDocument = 'yes';")

    keys = live.pipeline.keys
    sent = [live.send(line, None) for line in ("bottle", "wood", "pcb1")]
    wait_for(lambda: all(live.published(f) for f in sent), 60, "the worker to publish a frame of every line")
    kept = {line: live.redis.client().xlen(keys.results_stream(line)) for line in ("bottle", "wood", "pcb1")}
    assert all(kept.values()), kept
    live.redis.stop()
    wait_js(d, "document.body.dataset.redis === 'down'", "the page to say Redis is down")
    assert "Redis unreachable" in js(d, "return document.getElementById('banner').textContent")
    screenshot(d, "redis-down.png")
    live.redis.start()
    after = {line: live.redis.client().xlen(keys.results_stream(line)) for line in kept}
    assert after == kept, f"results lost over a Redis restart with the compose ACL and AOF: {kept} -> {after}"
    wait_js(d, "document.body.dataset.redis === 'up'", "the page to see Redis back", timeout=30)
    live.worker.wait_ready(timeout=30)
    fid = live.send("bottle")
    wait_js(d, f"document.querySelector('li.alert-item[data-frame-id=\"{fid}\"]')",
            "an alert published after the Redis restart", timeout=45)

    resyncs = int(js(d, "return document.body.dataset.resyncs"))
    live.dashboard.stop()
    wait_js(d, "document.body.dataset.conn === 'reconnecting'", "the page to notice the lost connection")
    live.dashboard.start()
    wait_js(d, "document.body.dataset.conn === 'live'", "the page to reconnect by itself", timeout=30)
    wait_js(d, f"Number(document.body.dataset.resyncs) > {resyncs}", "a resync after reconnecting")
    fid2 = live.send("bottle")
    wait_js(d, f"document.querySelector('li.alert-item[data-frame-id=\"{fid2}\"]')",
            "an alert published after the dashboard restart", timeout=45)
    assert js(d, "return window.__sameDocument") == "yes", "recovered without a reload"
    screenshot(d, "recovered.png")


def test_store_reads_bounded_views_of_real_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    """What the page is fed, read from output of the real publisher: ids stay text, catch-up after an
    alert id, lines announced by heartbeats, and a frame rate that needs no stream read after the first."""
    from pipeline.dashboard.store import DashboardStore
    from pipeline.inspection.render import mask_png
    from pipeline.settings import load_settings
    from pipeline.streaming.records import FrameResult
    from pipeline.streaming.redis_io import FrameOutput, ResultPublisher

    cfg = tmp_path / "c.yaml"
    cfg.write_text("lines: [{id: bottle, class_name: bottle}]\n")
    prefix = f"dash{os.getpid()}{int(time.time() * 1000) % 100000}"
    settings = load_settings(cfg, redis={"url": redis_server.url, "prefix": prefix})
    pub = ResultPublisher.from_settings(settings.redis, "w-a")
    mask = mask_png(np.zeros((8, 8), bool))

    def publish(i: int, alert: bool) -> None:
        result = FrameResult(f"{i:04d}", "bottle", time.time_ns(), score=0.9 if alert else 0.1, anomalous=alert,
                             threshold=0.5, pixel_threshold=0.5,
                             regions=[{"area": 4, "box": [0, 0, 2, 2]}] if alert else [])
        pub.publish([FrameOutput(result, mask, mask, b"")])

    for i in range(5):
        publish(i, alert=i in (1, 3))
    pub.heartbeat({"lines": "bottle,extra", "frames_per_s": 2.5, "last_seen": int(time.time())})
    store = DashboardStore(settings)
    workers = store.workers()
    assert [w["worker_id"] for w in workers] == ["w-a"] and workers[0]["health"] == "ok"
    assert store.line_ids() == ["bottle", "extra"], "lines announced by heartbeats are shown too"
    alerts = store.alerts()
    assert [a["frame_id"] for a in alerts] == ["0003", "0001"], "newest first, ids kept as text"
    assert [a["frame_id"] for a in store.alerts(after=alerts[1]["id"])] == ["0003"]
    history = store.history("bottle")
    assert [p["frame_id"] for p in history] == ["0000", "0001", "0002", "0003", "0004"]
    assert [p["anomalous"] for p in history] == [False, True, False, True, False]
    first = store.throughput("bottle")
    assert first["frames"] == 5 and first["stream_length"] == 5
    t0, n0 = store._added["bottle"][0]
    store._added["bottle"][0] = (t0 - 10.0, n0)  # as if the first sample were 10 s old
    for i in range(5, 8):
        publish(i, alert=False)
    later = store.throughput("bottle")
    assert later["frames"] == 3 and 0.2 < later["fps"] <= 0.3, later
    assert store.frame("0001")["alert"]["frame_id"] == "0001"
    assert store.frame("9999") is None
