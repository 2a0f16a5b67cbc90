"""The `anoclip` command line: global options anywhere, --version, errors that name their real source, a
producer that fails fast without a broker, and structured log lines with ids as fields."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.observability.log_format import configure_logging, log_context
from pipeline.streaming import local_stack as stack
from workers.cli import main, version


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("ANOCLIP_CONFIG", raising=False)
    p = tmp_path / "config.yaml"
    port = stack.free_port()  # nothing listens there
    p.write_text(f"lines: [{{id: bottle, class_name: bottle}}]\nkafka: {{bootstrap_servers: '127.0.0.1:{port}'}}\n"
                 "redis: {url: 'redis://127.0.0.1:1/0'}\n")
    return p


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"anoclip {version()}"
    assert version() not in ("", "unknown")


def test_log_options_work_before_and_after_the_sub_command(config: Path) -> None:
    assert main(["labels", "list", "--line", "nope", "--config", str(config), "--log-level", "DEBUG"]) == 2
    assert logging.getLogger().level == logging.DEBUG, "--log-level after the sub-command"
    assert main(["--log-level", "WARNING", "labels", "list", "--line", "nope", "--config", str(config)]) == 2
    assert logging.getLogger().level == logging.WARNING
    assert main(["labels", "list", "--line", "nope", "--config", str(config), "--log-level", "LOUD"]) == 2


def test_errors_from_the_environment_are_not_blamed_on_the_config_file(
        config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("ANOCLIP_REDIS__SOCKET_TIMEOUT_S", "-3")
    assert main(["labels", "list", "--line", "bottle", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration (environment)" in err and "ANOCLIP_REDIS__SOCKET_TIMEOUT_S" in err
    assert str(config) not in err
    monkeypatch.delenv("ANOCLIP_REDIS__SOCKET_TIMEOUT_S")
    config.write_text(config.read_text() + "worker: {max_batch: 0}\n")
    assert main(["labels", "list", "--line", "bottle", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"invalid configuration ({config})" in err and "environment variable" not in err


def test_produce_without_a_broker_fails_fast_with_one_line(config: Path, capsys: pytest.CaptureFixture) -> None:
    t0 = time.monotonic()
    rc = main(["produce", "--config", str(config), "--line", "bottle", "--source", "synthetic", "--count", "1"])
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 2 and took < 8, f"rc {rc} after {took:.1f} s"
    assert "no Kafka broker answers at 127.0.0.1:" in err and "anoclip stack up" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_json_log_lines_carry_line_and_frame_ids_as_fields(capsys: pytest.CaptureFixture) -> None:
    configure_logging("INFO", "json")
    log = logging.getLogger("anoclip.test")
    log.info("line %s: resumed calibrated thresholds (image %.4f)", "bottle", 0.61)
    with log_context(line="wood", frame_id="cam-1.000042"):
        log.warning("scored")
    log.info("dead letter: %s/%d offset %d stage=%s", "frames", 1, 7, "decode", extra={"frame_id": "x-9"})
    # Only this test's records: client threads left by earlier tests may log (or fail to) meanwhile.
    records = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    first, second, third = (r for r in records if r["logger"] == "anoclip.test")
    assert first["line"] == "bottle" and first["msg"].startswith("line bottle") and first["level"] == "INFO"
    assert (second["line"], second["frame_id"]) == ("wood", "cam-1.000042")
    assert third["stage"] == "decode" and third["frame_id"] == "x-9" and isinstance(third["ts"], float)
    configure_logging("INFO", "text")
    log.info("frame %s done", "f-1")
    assert capsys.readouterr().err.rstrip().endswith("frame f-1 done [frame_id=f-1]")


def test_demo_alert_lines_describe_regions_in_words() -> None:
    from pipeline.jobs.demo import format_alert

    line = format_alert({"line": "bottle", "camera": "demo-cam", "frame_id": "f1", "score": "0.91", "threshold": "0.5",
                       "regions": json.dumps([{"area": 1200, "box": [10, 10, 50, 40]}]), "width": "256",
                       "height": "256", "synthetic_defect": "scratch"})
    assert "1 region, largest 1.8% of frame, upper left" in line and "[drawn: scratch]" in line
    assert "[10, 10, 50, 40]" not in line


def test_a_global_log_format_reaches_a_sub_command_with_its_own_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """`anoclip --log-format json worker`: the worker's own --log-format default must not win over it."""
    import workers.worker

    seen = {}
    monkeypatch.setattr(workers.worker, "run", lambda args: seen.setdefault("fmt", args.log_format) and 0)
    assert main(["--log-format", "json", "worker"]) == 0 and seen["fmt"] == "json"
    seen.clear()
    monkeypatch.setenv("ANOCLIP_LOG_FORMAT", "json")
    assert main(["worker"]) == 0 and seen["fmt"] == "json"
