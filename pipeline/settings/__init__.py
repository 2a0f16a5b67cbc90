"""The one settings model: `config.yaml`, overridden by `ANOCLIP_...` environment variables.

Nested keys use `__` (`ANOCLIP_MODEL__PRETRAINED=none`); lists take JSON
(`ANOCLIP_LINES='[{"id": "bottle", "class_name": "bottle"}]'`). Every error names its key, and
`load_settings` is called at start-up so a bad config never reaches a running worker. The layering is
pydantic-settings' own (`settings_customise_sources`: its environment and YAML sources, first wins):
`load_settings` overrides > `ANOCLIP_...` variables > the YAML file > defaults.
"""

from __future__ import annotations

import json
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from pipeline.errors import ConfigError, UnknownLineError
from pipeline.settings.adaptation import MemorySettings, TTASettings
from pipeline.settings.connections import KafkaSettings, RedisSettings, WorkerSettings
from pipeline.settings.lines import ADAPTER_KINDS, AdapterKind, LineSettings, ModelSettings, ThresholdSettings
from pipeline.settings.section import _Section

__all__ = [
    "ADAPTER_KINDS",
    "CONFIG_ENV",
    "DEFAULT_CONFIG",
    "AdapterKind",
    "DashboardSettings",
    "KafkaSettings",
    "LineSettings",
    "MemorySettings",
    "ModelSettings",
    "RedisSettings",
    "Settings",
    "TTASettings",
    "ThresholdSettings",
    "WorkerSettings",
    "load_settings",
    "resolve_config_path",
]

DEFAULT_CONFIG = "config.yaml"
CONFIG_ENV = "ANOCLIP_CONFIG"


class DashboardSettings(_Section):
    """The live dashboard (`anoclip dashboard`); its access tokens come from the environment or a file, never here."""

    stale_after_s: float = Field(60.0, gt=0)
    """A line whose worker is alive but whose newest frame is older than this shows as "stale"."""
    allowed_hosts: list[str] = Field(default_factory=list)
    """Host names the dashboard answers besides IP addresses and `localhost` (a guard against DNS rebinding):
    the name browsers use, e.g. the ingress host. `.example.com` also allows its sub-domains."""
    guess_limit: int = Field(5, ge=1)
    """Wrong access tokens one client may present per `guess_window_s` before it is refused unchecked (429)."""
    guess_window_s: float = Field(60.0, gt=0)
    defect_types: list[str] = Field(default_factory=lambda: ["scratch", "dent", "crack", "contamination",
                                                             "missing part", "other"])
    """Defect types offered when an operator confirms an alert (any other short name is accepted too)."""


class Settings(BaseSettings):
    """Root of the configuration. Build it with `load_settings`."""

    model_config = SettingsConfigDict(env_prefix="ANOCLIP_", env_nested_delimiter="__", extra="forbid")

    model: ModelSettings = Field(default_factory=ModelSettings)
    lines: list[LineSettings] = Field(default_factory=list)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    tta: TTASettings = Field(default_factory=TTASettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)

    @model_validator(mode="after")
    def _unique_lines(self) -> Settings:
        seen: set[str] = set()
        for line in self.lines:
            if line.id in seen:
                raise ValueError(f"line id {line.id!r} is declared twice")
            seen.add(line.id)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: `load_settings` overrides (init kwargs) > ANOCLIP_... variables > the YAML file > defaults.
        sources: list[PydanticBaseSettingsSource] = [init_settings, _EnvSource(settings_cls)]
        yaml_file = _YAML_FILE.get()
        if yaml_file is not None:
            sources.append(_YamlSource(settings_cls, yaml_file=yaml_file))
        return (*sources, file_secret_settings)

    def line(self, line_id: str) -> LineSettings:
        """The line's settings, or UnknownLineError naming the known lines."""
        for line in self.lines:
            if line.id == line_id:
                return line
        known = ", ".join(sorted(x.id for x in self.lines)) or "none"
        raise UnknownLineError(f"unknown line {line_id!r} (configured lines: {known})")


_YAML_FILE: ContextVar[Path | None] = ContextVar("anoclip_yaml_file", default=None)
"""The file `load_settings` is reading; `Settings()` built directly reads no file."""


class _YamlSource(YamlConfigSettingsSource):
    """pydantic-settings' YAML source, failing with the file's name on bad YAML or a non-mapping top level."""

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            data = super()._read_file(file_path)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {file_path} is not valid YAML: {e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {file_path} is not UTF-8 text: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {file_path} must hold a mapping at the top level")
        return data


class _EnvSource(EnvSettingsSource):
    """pydantic-settings' environment source; a value that is not valid JSON where JSON is needed (a list, a
    section) raises ConfigError naming the key and the variable instead of the library's bare SettingsError."""

    def prepare_field_value(self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool) -> Any:
        try:
            return super().prepare_field_value(field_name, field, value, value_is_complex)
        except ValueError as e:
            raise ConfigError(_env_json_error(field_name, e)) from e


def _env_json_error(field_name: str, err: ValueError) -> str:
    """`lines: not valid JSON (...) (from environment variable ANOCLIP_LINES)`, naming the failing variable."""
    top = f"ANOCLIP_{field_name}".upper()
    candidates = sorted(k for k in os.environ if k.upper() == top or k.upper().startswith(top + "__"))
    culprits = []
    for var in candidates:
        path = var[len("ANOCLIP_"):].lower().split("__")
        if not _expects_json(path):
            continue
        try:
            json.loads(os.environ[var])
        except ValueError:
            culprits.append((".".join(path), var))
    if not culprits:  # cannot tell which one: name them all
        culprits = [(field_name, ", ".join(candidates) or top)]
    return "invalid configuration (environment): " + "; ".join(
        f"{key}: not valid JSON ({err.__cause__ or err}) (from environment variable {var})" for key, var in culprits
    )


def _expects_json(path: list[str]) -> bool:
    """Whether the settings field at `path` is a list, tuple, dict or section (the environment gives it JSON)."""
    model: Any = Settings
    annotation: Any = None
    for part in path:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        annotation = fields[part].annotation
        model = annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return get_origin(annotation) in (list, tuple, dict)


def _env_source(loc: tuple[Any, ...]) -> str | None:
    """The `ANOCLIP_...` variable that set the value at `loc` (or a section above it), if one did."""
    env = {k.upper() for k in os.environ}
    names = [str(p) for p in loc]
    for n in range(len(names), 0, -1):
        var = "ANOCLIP_" + "__".join(names[:n]).upper()
        if var in env:
            return var
    return None


def _format_validation_error(err: ValidationError, source: str) -> str:
    parts, from_file = [], False
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        var = _env_source(e["loc"])
        from_file = from_file or var is None
        parts.append(f"{key}: {e['msg']}" + (f" (from environment variable {var})" if var else ""))
    where = source if from_file else "environment"
    return f"invalid configuration ({where}): " + "; ".join(parts)


def resolve_config_path(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The config file to read: the argument, else $ANOCLIP_CONFIG, else ./config.yaml if it exists."""
    if path is not None:
        return Path(path)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    default = Path(DEFAULT_CONFIG)
    return default if default.exists() else None


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read YAML, apply environment overrides and `overrides`, validate; raise ConfigError on any problem.

    First wins: `overrides` (deep-merged per section) > `ANOCLIP_...` variables > the YAML file > defaults.
    """
    cfg_path = resolve_config_path(path)
    source = "defaults"
    if cfg_path is not None:
        source = str(cfg_path)
        if not cfg_path.expanduser().is_file():  # pydantic-settings skips a missing file silently
            raise ConfigError(f"config file not found: {cfg_path}")
    token = _YAML_FILE.set(cfg_path)
    try:
        return Settings(**overrides)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from e
    finally:
        _YAML_FILE.reset(token)
