"""The alert workflow against a real Redis fed by the real publisher: labels through the dashboard's HTTP
API (who = the token's name), counts, audit, metrics, the threshold suggestion, the export that
`anoclip eval --dataset folder` reads; and the dashboard's browse views, line states and yield."""

from __future__ import annotations

import io
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.dashboard.server import DashboardServer
from pipeline.dashboard.store import DashboardStore
from pipeline.evaluation.datasets import read_folder
from pipeline.inspection.render import encode_png, mask_png
from pipeline.operators.labels import CONFIRMED, FALSE_ALARM, LabelStore
from pipeline.settings import Settings, load_settings
from pipeline.streaming.records import FrameResult
from pipeline.streaming.redis_io import FrameOutput, ResultPublisher
from tests.integration.conftest import RedisServer
from workers.cli import main

pytestmark = pytest.mark.integration

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"
W, H = 40, 30


def call(url: str, body: dict | None = None, token: str = ALICE) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def settings(redis_server: RedisServer, tmp_path: Path) -> Settings:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lines: [{id: bottle, class_name: bottle}, {id: wood, class_name: wood}]\n")
    prefix = f"lab{os.getpid()}{time.monotonic_ns() % 10**9}"
    return load_settings(cfg, redis={"url": redis_server.url, "prefix": prefix},
                         worker={"heartbeat_interval_s": 1.0}, dashboard={"stale_after_s": 30})


@pytest.fixture
def server(settings: Settings) -> Iterator[DashboardServer]:
    with DashboardServer(settings, port=0, token=f"alice:{ALICE},bob:{BOB}", tick_s=60).start() as srv:
        yield srv


def publish(settings: Settings, fid: str, line: str, score: float, *, camera: str = "cam-1",
            age_s: float = 0.0) -> None:
    """One frame through the real publisher; an alert when score >= 0.5, with an image and a mask."""
    alert = score >= 0.5
    mask = np.zeros((H, W), bool)
    if alert:
        mask[2:8, 3:12] = True
    image = encode_png(np.full((H, W, 3), int(score * 255), np.uint8))
    ts = time.time_ns() - int(age_s * 1e9)
    result = FrameResult(fid, line, ts, score=score, anomalous=alert, threshold=0.5, pixel_threshold=0.5,
                         defect_area=int(mask.sum()), regions=[{"area": 54, "box": [3, 2, 12, 8]}] if alert else [],
                         camera=camera, width=W, height=H)
    ResultPublisher.from_settings(settings.redis, "w-test").publish([FrameOutput(result, mask_png(mask), image, image)])


def test_labels_flow_from_the_dashboard_to_metrics_suggestion_and_an_eval_dataset(
        settings: Settings, server: DashboardServer, tmp_path: Path) -> None:
    scores = {"a1": 0.62, "a2": 0.71, "a3": 0.93, "a4": 0.55, "n1": 0.2}
    for fid, score in scores.items():
        publish(settings, fid, "bottle", score)
    api = server.url + "/api/labels/"
    assert call(api + "n1", {"action": "acknowledge"})[0] == 404, "only alerts can be labelled"
    status, body = call(api + "a1", {"action": "label", "label": "confirmed"})
    assert status == 400 and "defect type" in body["error"]
    assert call(api + "a1", {"action": "label", "label": "maybe"})[0] == 400

    assert call(api + "a1", {"action": "acknowledge"})[0] == 200
    assert call(api + "a1", {"action": "label", "label": FALSE_ALARM})[0] == 200
    status, body = call(api + "a2", {"action": "label", "label": FALSE_ALARM}, token=BOB)
    assert status == 200 and body["label"]["labelled_by"] == "bob" and body["label"]["acknowledged_by"] == "bob"
    call(api + "a3", {"action": "label", "label": CONFIRMED, "defect_type": "scratch", "mask_is_defect": True})
    call(api + "a4", {"action": "label", "label": CONFIRMED, "defect_type": "dent"})
    # bob changes his mind on a4: it moves from confirmed/dent to false alarm; the audit keeps both
    status, body = call(api + "a4", {"action": "label", "label": FALSE_ALARM}, token=BOB)
    assert body["label"]["label"] == FALSE_ALARM and body["label"]["defect_type"] == ""
    assert call(api + "a4", {"action": "comment", "comment": "glare from the lamp"}, token=BOB)[0] == 200

    store = LabelStore(server.store.client, server.store.keys)
    c = store.counts("bottle")
    assert (c.confirmed, c.false_alarm, c.unsure, c.acknowledged) == (1, 3, 0, 4)
    assert c.defect_types == {"scratch": 1} and c.false_alarm_rate == 0.75
    audit = store.audit(line="bottle", count=100)
    a4 = [e for e in audit if e["frame_id"] == "a4"]
    assert [(e["action"], e["actor"]) for e in a4] == [("comment", "bob"), ("label", "bob"), ("label", "alice")]
    assert a4[1]["previous_label"] == CONFIRMED and a4[1]["previous_defect_type"] == "dent"
    assert a4[0]["comment"] == "glare from the lamp"
    assert [x.frame_id for x in store.labelled("bottle", label=FALSE_ALARM)] == ["a1", "a2", "a4"]

    status, body = call(server.url + "/api/lines/bottle/labels")
    sug = body["suggestion"]
    assert sug["threshold"] == 0.7101 and sug["missed"] == 0 and "avoided all 3" in sug["text"], sug
    with urllib.request.urlopen(server.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert 'anoclip_alert_labels{label="false_alarm",line="bottle"} 3.0' in text
    assert 'anoclip_alert_labels{label="confirmed",line="wood"} 0.0' in text, "known lines start at 0"
    assert 'anoclip_confirmed_defects{defect_type="scratch",line="bottle"} 1.0' in text
    assert 'anoclip_false_alarm_ratio{line="bottle"} 0.75' in text
    assert 'anoclip_false_alarm_ratio{line="wood"}' not in text and "NaN" not in text

    # the frames' own keys expire; the labelled image and mask stay with the label
    r = server.store.client
    for fid in scores:
        r.delete(*(server.store.keys.frame(fid, k) for k in ("image", "mask", "heatmap", "result")))
    with urllib.request.urlopen(urllib.request.Request(server.url + "/img/frame/a3/image",
                                                       headers={"Authorization": f"Bearer {ALICE}"})) as resp:
        assert Image.open(io.BytesIO(resp.read())).size == (W, H)

    out = tmp_path / "dataset"
    assert main(["labels", "export", "--config", str(_config_file(settings, tmp_path)), "--line", "bottle",
                 "--out", str(out)]) == 0
    index = read_folder(out)
    got = sorted((s.defect, s.label, s.mask_path is not None) for s in index.samples)
    assert got == [("good", 0, False), ("good", 0, False), ("good", 0, False), ("scratch", 1, True)], got
    assert not index.issues, index.issues
    manifest = [json.loads(x) for x in (out / "bottle.labels.jsonl").read_text().splitlines()]
    assert {m["frame_id"]: m["labelled_by"] for m in manifest} == {"a1": "alice", "a2": "bob", "a3": "alice",
                                                                    "a4": "bob"}
    (out / "bottle" / "good" / "extra.png").write_bytes(b"x")
    assert main(["labels", "export", "--config", str(_config_file(settings, tmp_path)), "--line", "bottle",
                 "--out", str(out)]) == 0
    assert not (out / "bottle" / "good" / "extra.png").exists(), "a re-export replaces its own folder"
    (tmp_path / "mine" / "bottle").mkdir(parents=True)
    assert main(["labels", "export", "--config", str(_config_file(settings, tmp_path)), "--line", "bottle",
                 "--out", str(tmp_path / "mine")]) == 2, "a folder it did not write is never deleted"


def _config_file(settings: Settings, tmp_path: Path) -> Path:
    p = tmp_path / "labels-config.yaml"
    p.write_text(json.dumps({"lines": [x.model_dump() for x in settings.lines], "redis": settings.redis.model_dump()}))
    return p


def test_browse_views_filter_and_page_and_lines_say_when_they_are_stale(settings: Settings) -> None:
    for i in range(12):
        publish(settings, f"b{i:02d}", "bottle", 0.9 if i % 3 == 0 else 0.1, camera="cam-1" if i % 2 else "cam-2")
    for i in range(5):
        publish(settings, f"w{i:02d}", "wood", 0.8 if i == 4 else 0.2)
    store = DashboardStore(settings)
    labels = LabelStore(store.client, store.keys)
    facts = store.alert_facts("b03")
    assert facts is not None and facts.width == W and facts.camera == "cam-1"
    labels.set_label(facts, FALSE_ALARM, "alice")

    page1 = store.browse_alerts(count=2)
    assert [a["frame_id"] for a in page1["alerts"]] == ["w04", "b09"] and page1["total"] == 5
    assert page1["alerts"][0]["region_text"] == "1 region, largest 4.5% of frame, upper left"
    page2 = store.browse_alerts(count=2, before=page1["next"])
    assert [a["frame_id"] for a in page2["alerts"]] == ["b06", "b03"]
    assert page2["alerts"][1]["label"]["label"] == FALSE_ALARM
    page3 = store.browse_alerts(count=2, before=page2["next"])
    assert [a["frame_id"] for a in page3["alerts"]] == ["b00"] and page3["next"] is None
    assert [a["frame_id"] for a in store.browse_alerts(line="bottle", label="unlabelled")["alerts"]] == \
        ["b09", "b06", "b00"]
    assert [a["frame_id"] for a in store.browse_alerts(label=FALSE_ALARM)["alerts"]] == ["b03"]
    assert [a["frame_id"] for a in store.browse_alerts(camera="cam-2")["alerts"]] == ["b06", "b00"]

    frames = store.browse_frames(count=5, verdict="normal")
    assert [f["frame_id"] for f in frames["frames"]] == ["w03", "w02", "w01", "w00", "b11"]
    rest = store.browse_frames(count=50, verdict="normal", before=frames["next"])
    assert len(rest["frames"]) == 12 - 5 and rest["next"] is None
    everything = store.browse_frames(count=100, line="bottle")["frames"]
    t_mid = everything[5]["ts_ms"]
    assert all(f["ts_ms"] <= t_mid for f in store.browse_frames(line="bottle", until_ms=t_mid)["frames"])
    assert all(f["ts_ms"] >= t_mid for f in store.browse_frames(line="bottle", since_ms=t_mid)["frames"])

    y = store.yield_per_hour("bottle")["hours"][-1]
    assert (y["pass"], y["fail"], y["yield"]) == (8, 4, round(8 / 12, 4))
    publish(settings, "b12", "bottle", 0.95)
    assert store.yield_per_hour("bottle")["hours"][-1]["fail"] == 5, "new frames are counted incrementally"

    pub = ResultPublisher.from_settings(settings.redis, "w-live")
    assert store.line_state("bottle")["status"]["state"] == "no_worker", "no heartbeat names the line"
    pub.heartbeat({"lines": "bottle,wood", "last_seen": int(time.time())})
    store.worker_scan_s = 0
    workers = store.workers()
    assert store.line_status("bottle", store.latest("bottle"), workers)["state"] == "live"
    later = time.time() + 31
    st = store.line_status("bottle", store.latest("bottle"), workers, now_s=later)
    assert st["state"] == "stale" and "no frame for 31 s" in st["text"]
