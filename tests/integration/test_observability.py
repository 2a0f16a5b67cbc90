"""Every metric that deploy/prometheus/alerts.yml and deploy/grafana/dashboards/anoclip.json name is exported
by a live worker (a real subprocess after one frame of each line) or by a live dashboard; and what they
export is clean: no NaN, no `_created`, labelled counters of known lines present from the start."""

from __future__ import annotations

import re
import urllib.request

import pytest

from pipeline.dashboard.server import DashboardServer
from pipeline.dashboard.store import DashboardStore
from pipeline.operators.labels import CONFIRMED, FALSE_ALARM
from pipeline.streaming.producer import FrameProducer
from tests.integration.conftest import Pipeline, synthetic_frame, wait_for
from tests.unit.test_observability import PROMETHEUS_OWN, expressions, metric_names

pytestmark = pytest.mark.integration


def exported(text: str) -> set[str]:
    """Sample names in a Prometheus text exposition."""
    return {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", text, re.M)}


def test_every_rule_and_panel_names_a_metric_a_live_worker_or_dashboard_exports(pipeline: Pipeline) -> None:
    for line in pipeline.config["lines"]:  # pcb1 with its patch memory: the bank series exist from the start
        if line["id"] == "pcb1":
            line["memory"] = "stream"
    pipeline.config["memory"] = {"layers": [2]}  # the tiny model has 3 blocks
    worker = pipeline.start_worker("obs-w")
    worker.wait_ready()
    _, first = worker._get("/metrics")
    text0 = first.decode()
    assert 'anoclip_frames_dead_lettered_total{line="wood",stage="decode"} 0.0' in text0, \
        "counters of known lines exist before their first event"
    producer = FrameProducer(pipeline.settings)
    try:
        fids = [producer.send(line, synthetic_frame(line, i))
                for i, line in enumerate(("bottle", "wood", "pcb1", "bottle"))]
        producer.flush(timeout_s=20)
    finally:
        producer.close()
    r = pipeline.redis()
    wait_for(lambda: all(r.exists(pipeline.keys.frame(f, "result")) for f in fids), 60, "the frames scored")
    wait_for(lambda: worker.metric("anoclip_frames_scored_total") >= 4, 10, "the scored counter")
    wait_for(lambda: b"anoclip_consumer_lag{" in worker._get("/metrics")[1], 20, "the consumer lag probe")
    _, body = worker._get("/metrics")
    worker_text = body.decode()

    store = DashboardStore(pipeline.settings)
    facts = [store.alert_facts(fids[0]), store.alert_facts(fids[3])]  # bottle's frames are always alerts here
    assert facts[0] is not None and facts[1] is not None
    store.labels.set_label(facts[0], FALSE_ALARM, "ops-test")
    store.labels.set_label(facts[1], CONFIRMED, "ops-test", defect_type="scratch")
    with DashboardServer(pipeline.settings, port=0, store=store, tick_s=60).start() as dash, \
            urllib.request.urlopen(dash.url + "/metrics", timeout=5) as resp:
        dash_text = resp.read().decode()

    names = exported(worker_text) | exported(dash_text) | PROMETHEUS_OWN
    missing = {f"{where}: {n}" for where, expr in expressions() for n in metric_names(expr) if n not in names}
    assert not missing, "named in deploy/ but exported by no live worker or dashboard:\n" + "\n".join(sorted(missing))
    for text in (worker_text, dash_text):
        assert "NaN" not in text and "_created" not in text
    thresholds = re.findall(r"^anoclip_line_threshold\{(.*)\} ", worker_text, re.M)
    assert len(thresholds) == 3, f"one series per line, for its current source only: {thresholds}"
