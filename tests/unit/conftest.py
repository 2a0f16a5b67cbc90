"""Fixtures shared by the unit tests of the scorer: the tiny model and one line's text features."""

from __future__ import annotations

import pytest

from pipeline.model import build_prompt_set, create_anoclip
from pipeline.settings import ModelSettings


@pytest.fixture(scope="module")
def model():
    """The tiny architecture, random weights, fp32: one per test module (tests may attach adapters)."""
    return create_anoclip(ModelSettings(arch="anoclip-tiny", pretrained="none", device="cpu", precision="fp32"))


@pytest.fixture(scope="module")
def text(model):
    return model.encode_prompts(build_prompt_set("bottle"))
