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
    from pipeline.services.redis_client import make_redis
    from pipeline.settings import RedisSettings

    with pytest.raises(ConfigError, match="rediss://"):
        make_redis(RedisSettings(url="redis://127.0.0.1:6379/0", ssl_ca_certs="/etc/ssl/ca.pem"))
    client = make_redis(RedisSettings(url="rediss://127.0.0.1:6380/0", ssl_ca_certs="/etc/ssl/ca.pem"))
    assert client.connection_pool.connection_kwargs["ssl_ca_certs"] == "/etc/ssl/ca.pem"


@pytest.mark.parametrize(
    ("var", "value", "key"),
    [
        ("ANOCLIP_LINES", '[{"id": "b",', "lines: not valid JSON"),
        ("ANOCLIP_LINES", "bottle", "lines: not valid JSON"),
        ("ANOCLIP_LINES", '[{"id": "b", "class_name": "x", "domain": "metal"}]', "lines.0.domain"),
        ("ANOCLIP_LINES", '[{"id": "b", "class_nam": "x"}]', "lines.0.class_nam"),
        ("ANOCLIP_MODEL__FEATURE_LAYERS", "[1,", "model.feature_layers: not valid JSON"),
        ("ANOCLIP_MODEL", "{precision: bf16}", "model: not valid JSON"),
    ],
)
def test_bad_env_json_names_the_key_and_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str, value: str, key: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as e:  # a ConfigError, not pydantic-settings' bare SettingsError traceback
        load_settings(_write(tmp_path, "lines: [{id: a, class_name: x}]"))
    assert key in str(e.value) and f"environment variable {var}" in str(e.value)
    assert str(e.value).startswith("invalid configuration (environment)")


def test_overrides_beat_environment_beats_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _write(tmp_path, "model: {precision: fp32, seed: 3}\nredis: {prefix: from-yaml, url: 'redis://yaml:1/0'}\n")
    monkeypatch.setenv("ANOCLIP_MODEL__PRECISION", "bf16")
    monkeypatch.setenv("ANOCLIP_REDIS__URL", "redis://env:1/0")
    s = load_settings(p, redis={"url": "redis://override:1/0"}, model={"seed": 5})
    assert s.redis.url == "redis://override:1/0"  # override > environment
    assert s.model.precision == "bf16"  # environment > YAML
    assert s.redis.prefix == "from-yaml" and s.model.seed == 5  # sections are merged key by key


def test_yaml_file_only_through_load_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.settings import Settings

    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "lines: [{id: a, class_name: x}]").rename(tmp_path / "config.yaml")
    assert [x.id for x in load_settings().lines] == ["a"]  # ./config.yaml when no path nor $ANOCLIP_CONFIG
    assert Settings().lines == []  # the model alone reads no file
    assert load_settings().lines[0].id == "a"  # ...and loading again is not affected by it


def test_unknown_top_level_key_and_bad_encoding(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid configuration .*c.yaml.*: colour: Extra inputs"):
        load_settings(_write(tmp_path, "colour: red\n"))
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model: {arch: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(bad)
