"""The text-feature cache key's architecture and precision parts (issue 14, item 3).

The key is architecture + weights + prompt sentences. Text is always encoded in fp32, whatever the
scoring precision, so fp32 and bf16 models of the same weights share one cache entry: that sharing is
right only while a bf16 model's text features equal the fp32 ones, which is checked here too.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from pipeline.inspection.text_cache import TextFeatureCache
from pipeline.model import build_prompt_set, create_anoclip
from pipeline.settings import ModelSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(**kw: object):
    return create_anoclip(ModelSettings(arch="anoclip-tiny", pretrained="none", device="cpu", **kw))


@pytest.fixture(scope="module")
def fp32():
    return _model(precision="fp32")


def test_the_architecture_is_part_of_the_key(fp32, tmp_path: Path) -> None:
    ps = build_prompt_set("bottle")
    other = copy.copy(fp32)  # same weights id and prompts; only the architecture's name differs
    other.arch = "ViT-B/16-other"
    assert other.weights_id == fp32.weights_id
    assert TextFeatureCache.key(other, ps) != TextFeatureCache.key(fp32, ps)
    cache = TextFeatureCache(tmp_path)
    p_other, p_tiny = cache.path(other, ps), cache.path(fp32, ps)
    assert p_other != p_tiny and p_other.parent == p_tiny.parent == tmp_path, "a '/' in the name stays in the file"
    assert p_other.name.startswith("ViT-B_16-other-") and p_tiny.name.startswith("anoclip-tiny-")
    small = create_anoclip(ModelSettings(arch="anoclip-small", pretrained="none", device="cpu", precision="fp32"))
    assert TextFeatureCache.key(small, ps) != TextFeatureCache.key(fp32, ps)
    assert cache.get_or_compute(small, ps).class_embeddings.shape == (2, small.embed_dim)
    assert cache.get_or_compute(fp32, ps).class_embeddings.shape == (2, fp32.embed_dim)


def test_precision_shares_one_entry_because_text_is_always_fp32(fp32, tmp_path: Path) -> None:
    ps = build_prompt_set("bottle")
    bf16 = _model(precision="bf16")
    assert TextFeatureCache.key(bf16, ps) == TextFeatureCache.key(fp32, ps)
    direct32, direct16 = fp32.encode_prompts(ps), bf16.encode_prompts(ps)
    for name in ("class_embeddings", "normal_sentences", "abnormal_sentences"):
        assert torch.equal(getattr(direct16, name), getattr(direct32, name)), f"{name}: bf16 text differs"
    cache = TextFeatureCache(tmp_path)
    written = cache.get_or_compute(bf16, ps)  # written by the bf16 model ...
    read = TextFeatureCache(tmp_path).get_or_compute(fp32, ps)  # ... is what the fp32 model would compute
    assert torch.equal(read.class_embeddings, direct32.class_embeddings)
    assert torch.equal(written.class_embeddings, read.class_embeddings)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
