"""CLI findings of issue 12 that need the real stack: `adapters list` over every line, and the demo's own
output (alerts in words, the dashboard mentioned) against a real broker, Redis and worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.adaptation.registry import VersionRegistry
from tests.integration.conftest import Pipeline
from workers.cli import main

pytestmark = pytest.mark.integration


def test_adapters_list_without_a_line_lists_every_line(pipeline: Pipeline, capsys: pytest.CaptureFixture) -> None:
    VersionRegistry(pipeline.redis(), pipeline.keys).pause("wood", actor="test@ci", reason="bad batch")
    cfg = str(pipeline.config_path)
    assert main(["adapters", "list", "--config", cfg]) == 0  # the old name of `versions` still works
    out = capsys.readouterr().out
    assert [x.split(":")[0] for x in out.splitlines() if x.startswith("line ")] == \
        ["line bottle", "line wood", "line pcb1"]
    assert "line wood: current none (base model) [PAUSED]" in out
    assert main(["adapters", "list", "--config", cfg, "--json"]) == 0
    assert [d["line"] for d in json.loads(capsys.readouterr().out)] == ["bottle", "wood", "pcb1"]
    assert main(["adapters", "pause", "--config", cfg]) == 2
    assert "pause needs --line" in capsys.readouterr().err


def test_demo_prints_alerts_in_words_and_points_at_the_dashboard(pipeline: Pipeline, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    from pipeline.jobs.demo import feed_and_watch

    worker = pipeline.start_worker("demo-w")
    worker.wait_ready()
    summary = feed_and_watch(pipeline.settings, ["bottle"], {"bottle": "bottle"}, worker.proc, worker.port,
                             worker.log_path, count=3, fps=0.0, defect_rate=1.0, size=96, timeout=120.0,
                             keep_stack=False)
    out = capsys.readouterr().out
    assert summary.exit_code == 0, out
    assert (summary.frames, summary.alerts) == (3, 3)
    assert "anoclip dashboard" in out and "http://127.0.0.1:8700/" in out
    alerts = [x for x in out.splitlines() if x.startswith("ALERT")]
    assert len(alerts) == 3 and all("% of frame" in a and "[drawn: " in a for a in alerts), alerts
