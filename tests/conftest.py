"""Shared fixtures: settings for the tiny random-init model, used by most tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipeline.settings import Settings, load_settings

TINY_LINES = [
    {"id": "bottle", "class_name": "bottle", "domain": "object"},
    {"id": "wood", "class_name": "wood", "domain": "texture"},
    {"id": "pcb1", "class_name": "pcb1", "domain": "object", "adapter_kind": "linear"},
]


def make_tiny_settings(cache_dir: Path, **overrides: object) -> Settings:
    """Settings for the tiny model; `overrides` are deep-merged over the defaults."""
    base = {
        "model": {
            "arch": "anoclip-tiny",
            "pretrained": "none",
            "device": "cpu",
            "precision": "fp32",  # `auto` would depend on the CPU (bf16 where native): tests must not
            "text_cache_dir": str(cache_dir),
        },
        "lines": TINY_LINES,
    }
    return load_settings(_no_file(cache_dir), **_merge(base, overrides))


def _no_file(d: Path) -> Path:
    p = Path(d) / "empty-config.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("{}\n")
    return p


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture(scope="session")
def text_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("text-cache")


@pytest.fixture
def tiny_settings(text_cache_dir: Path) -> Settings:
    return make_tiny_settings(text_cache_dir)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one thread is faster and far steadier on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
