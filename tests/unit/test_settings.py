"""Configuration: YAML + environment, and errors that name the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ConfigError, UnknownLineError
from pipeline.settings import load_settings

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_repo_config_is_valid() -> None:
    s = load_settings(REPO / "config.yaml")
    assert s.lines and s.tta.mode == "off"
    assert s.kafka.enable_idempotence is False  # the local Tansu broker needs it off


def test_environment_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _write(tmp_path, "model: {precision: fp32}\nlines: [{id: a, class_name: bottle}]\n")
    monkeypatch.setenv("ANOCLIP_MODEL__PRECISION", "bf16")
    monkeypatch.setenv("ANOCLIP_KAFKA__PARTITIONS", "7")
    monkeypatch.setenv("ANOCLIP_LINES", '[{"id": "b", "class_name": "wood", "domain": "texture"}]')
    s = load_settings(p)
    assert s.model.precision == "bf16" and s.kafka.partitions == 7
    assert [x.id for x in s.lines] == ["b"]


def test_config_from_env_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _write(tmp_path, "lines: [{id: zz, class_name: bottle}]\n")
    monkeypatch.setenv("ANOCLIP_CONFIG", str(p))
    assert load_settings().line("zz").class_name == "bottle"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("lines: [{id: a, class_name: x, domain: metal}]", "lines.0.domain"),
        ("model: {precison: bf16}", "model.precison"),
        ("lines: [{id: a, class_name: x}, {id: a, class_name: y}]", "declared twice"),
        ("lines: [{id: a, class_name: x, extra_abnormal_states: [cracked]}]", "lines.0.extra_abnormal_states"),
        ("kafka: {security_protocol: SASL_SSL}", "kafka"),
        ("worker: {max_batch: 0}", "worker.max_batch"),
        ("tta: {mode: sometimes}", "tta.mode"),
        ("model: {feature_layers: [0]}", "model.feature_layers"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(_write(tmp_path, text))
    assert key in str(e.value)


def test_bad_env_key_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANOCLIP_MODEL__PRECISON", "bf16")
    with pytest.raises(ConfigError, match="model.precison"):
        load_settings(_write(tmp_path, "{}"))


def test_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(_write(tmp_path, "model: [unclosed"))
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(_write(tmp_path, "- a\n- b\n"))


def test_yaml_off_means_off(tmp_path: Path) -> None:
    assert load_settings(_write(tmp_path, "tta: {mode: off}")).tta.mode == "off"


def test_unknown_line(tmp_path: Path) -> None:
    s = load_settings(_write(tmp_path, "lines: [{id: a, class_name: x}]"))
    with pytest.raises(UnknownLineError, match="'b'.*a"):
        s.line("b")


def test_redis_tls_ca_needs_a_tls_url() -> None:
    from pipeline.redis_client import make_redis
    from pipeline.settings import RedisSettings

    with pytest.raises(ConfigError, match="rediss://"):
        make_redis(RedisSettings(url="redis://127.0.0.1:6379/0", ssl_ca_certs="/etc/ssl/ca.pem"))
    client = make_redis(RedisSettings(url="rediss://127.0.0.1:6380/0", ssl_ca_certs="/etc/ssl/ca.pem"))
    assert client.connection_pool.connection_kwargs["ssl_ca_certs"] == "/etc/ssl/ca.pem"
