"""The stack stops only what it started: pid files are checked against the program before any signal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.streaming import local_stack as stack


def test_stop_pid_refuses_a_pid_running_something_else(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        pid_file = tmp_path / "tansu-1.pid"
        pid_file.write_text(str(proc.pid))
        assert stack.stop_pid(pid_file, "tansu") is False  # pid reused by another program: left alone
        assert proc.poll() is None
        assert not pid_file.exists()
        pid_file.write_text(str(proc.pid))
        assert stack.stop_pid(pid_file, "time.sleep(30)") is True
        assert proc.wait(timeout=5) is not None
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stale_or_garbage_pid_files(tmp_path: Path) -> None:
    (tmp_path / "a.pid").write_text("not a pid")
    assert stack.stop_pid(tmp_path / "a.pid", "tansu") is False
    assert stack.stop_pid(tmp_path / "missing.pid", "tansu") is False
    assert stack.pid_runs(None, "tansu") is False


def test_only_local_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT", raising=False)
    with pytest.raises(stack.StackError, match="only runs the broker on 127.0.0.1"):
        stack.start_broker(Path("/nonexistent"), "/tmp", "10.0.0.1", 9092)
    with pytest.raises(stack.StackError, match="AWS_ENDPOINT"):
        stack.start_broker(Path("/nonexistent"), "/tmp", "127.0.0.1", 9092, storage="s3://bucket/")
    assert stack.parse_bootstrap("127.0.0.1:19092,other:1") == ("127.0.0.1", 19092)
    with pytest.raises(stack.StackError):
        stack.parse_bootstrap("nohost")
    assert stack.redis_address("redis://127.0.0.1:6390/0") == ("127.0.0.1", 6390)
