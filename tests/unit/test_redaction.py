"""Issue 15, finding 4: no secret in any log line or print.

Every way a Redis or Kafka password enters the process registers it (`make_redis`, the Kafka client
config, the local stack's Redis probe), and every log record of the process is redacted; the dashboard's
start-up banner prints the Redis URL redacted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from pipeline.observability.redaction import MASK, redact, redact_url, register_secrets
from pipeline.services.redis_client import make_redis
from pipeline.settings import KafkaSettings, RedisSettings
from pipeline.streaming.kafka_io import client_config
from pipeline.streaming.local_stack import free_port, redis_answers

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:hunter22@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://anoclip:p%40ss:w0rd@r.svc:6380/1", "rediss://anoclip:***@r.svc:6380/1"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://user@host:1/0", "redis://user@host:1/0"),
        ("see redis://a:b@h:1 and sasl_ssl://u:x@k:9093.", "see redis://a:***@h:1 and sasl_ssl://u:***@k:9093."),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_every_password_the_clients_see_is_redacted_from_logs(caplog: pytest.LogCaptureFixture) -> None:
    make_redis(RedisSettings(url="redis://app:url-secret-1@127.0.0.1:1/0", password="acl-secret-2"))
    ks = KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="anoclip",
                       sasl_password="sasl-secret-3")
    cfg = client_config(ks)
    redis_answers("redis://127.0.0.1:1/0", password="stack-secret-4", timeout_s=0.1)
    with caplog.at_level(logging.DEBUG):
        # what kafka-python's admin client logs at DEBUG: its whole configuration, password included
        logging.getLogger("kafka.admin.client").debug("Starting KafkaAdminClient with configuration: %s", cfg)
        logging.getLogger("anoclip.test").warning("connecting to %s as %s", "redis://app:url-secret-1@h:1/0",
                                                  "acl-secret-2")
        logging.getLogger("anoclip.test").info("stack probe with stack-secret-4")
        try:
            raise RuntimeError("auth failed for acl-secret-2")
        except RuntimeError:
            logging.getLogger("anoclip.test").exception("boom")
    text = caplog.text + "".join(r.exc_text or "" for r in caplog.records)
    for secret in ("url-secret-1", "acl-secret-2", "sasl-secret-3", "stack-secret-4"):
        assert secret not in text, secret
    assert text.count(MASK) >= 5
    assert "sasl_plain_username': 'anoclip'" in text, "only the secrets go, not the rest of the line"


def test_short_values_are_not_redacted_as_free_text() -> None:
    register_secrets("ab", None, "")
    assert redact("a tab stops here") == "a tab stops here"


def test_dashboard_banner_prints_the_redis_url_redacted(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lines: [{id: bottle, class_name: bottle}]\n")
    token = "ops:dashboard-token-secret-6"
    env = {**os.environ, "ANOCLIP_REDIS__URL": f"redis://:banner-secret-5@127.0.0.1:{free_port()}/0",
           "ANOCLIP_DASHBOARD_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "--log-level", "DEBUG", "dashboard", "--config",
                             str(cfg), "--port", "0"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("anoclip dashboard:") or len(lines) > 50:
                break
        url = lines[-1].split()[2].rstrip("/")
        with contextlib.suppress(OSError):  # a login with the token in the URL, as an operator would
            urllib.request.urlopen(f"{url}/?token={token.split(':')[1]}", timeout=10).read()
    finally:
        proc.terminate()
        rest, _ = proc.communicate(timeout=30)
    out = "".join(lines) + rest
    banner = [x for x in lines if x.startswith("anoclip dashboard:")]
    assert banner, out
    assert "redis://:***@127.0.0.1" in banner[0]
    assert "banner-secret-5" not in out and "dashboard-token-secret-6" not in out
