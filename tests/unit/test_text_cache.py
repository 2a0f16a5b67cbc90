"""The text-feature cache: hit without recomputing, keyed by weights and prompts, robust to damage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.inspection.text_cache import TextFeatureCache
from pipeline.model import build_prompt_set, create_anoclip
from pipeline.settings import ModelSettings


@pytest.fixture
def counted_model(monkeypatch: pytest.MonkeyPatch):
    m = create_anoclip(ModelSettings(arch="anoclip-tiny", pretrained="none", device="cpu"))
    calls = []
    real = m.encode_prompts
    monkeypatch.setattr(m, "encode_prompts", lambda p: calls.append(p) or real(p))
    return m, calls


def test_hit_returns_identical_features_without_encoding(tmp_path: Path, counted_model) -> None:
    m, calls = counted_model
    cache = TextFeatureCache(tmp_path)
    ps = build_prompt_set("bottle")
    a = cache.get_or_compute(m, ps)
    b = TextFeatureCache(tmp_path).get_or_compute(m, ps)
    assert len(calls) == 1
    assert torch.equal(a.class_embeddings, b.class_embeddings)
    assert torch.equal(a.abnormal_sentences, b.abnormal_sentences)
    cache.get_or_compute(m, build_prompt_set("bottle", extra_normal_states=["shiny {}"]))
    assert len(calls) == 2  # another prompt set is another key


def test_other_weights_other_key() -> None:
    ps = build_prompt_set("bottle")
    a = create_anoclip(ModelSettings(arch="anoclip-tiny", pretrained="none", device="cpu", seed=0))
    b = create_anoclip(ModelSettings(arch="anoclip-tiny", pretrained="none", device="cpu", seed=1))
    assert TextFeatureCache.key(a, ps) != TextFeatureCache.key(b, ps)


def test_damaged_file_is_recomputed(tmp_path: Path, counted_model) -> None:
    m, calls = counted_model
    cache = TextFeatureCache(tmp_path)
    ps = build_prompt_set("bottle")
    cache.get_or_compute(m, ps)
    cache.path(m, ps).write_bytes(b"garbage")
    tf = cache.get_or_compute(m, ps)
    assert len(calls) == 2 and tf.class_embeddings.shape == (2, m.embed_dim)
