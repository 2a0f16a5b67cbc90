"""The scorer with an adapter in the path, and its input checks; added after mutation testing of
pipeline/model/anoclip.py (the scorer tests only ran it without an adapter)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.anoclip import AnoCLIP


def test_maps_go_through_the_adapter_and_image_scores_do_not(model, text) -> None:
    w = torch.randn(model.embed_dim, model.embed_dim, generator=torch.Generator().manual_seed(1))
    adapter = lambda t: t + 0.5 * t @ w  # noqa: E731  (any token map will do)
    x = torch.randn(2, 3, 64, 150, generator=torch.Generator().manual_seed(2))
    base, adapted = model(x, text), model(x, text, adapter)
    assert not torch.allclose(adapted.anomaly_maps, base.anomaly_maps)
    torch.testing.assert_close(adapted.image_scores, base.image_scores)
    torch.testing.assert_close(adapted.tokens, base.tokens, msg="tokens are returned raw, before the adapter")
    torch.testing.assert_close(model.maps_from_tokens(base.tokens, text, (64, 150), adapter), adapted.anomaly_maps)
    p = model.patch_probabilities(base.tokens, text, adapter)[..., 1]
    manual = model.probabilities(F.normalize(adapter(base.tokens), dim=-1), text)[..., 1]
    torch.testing.assert_close(p, manual)


def test_probabilities_follow_the_input_dtype_and_tile_counts_are_checked(model, text) -> None:
    u = F.normalize(torch.randn(5, model.embed_dim, dtype=torch.float64), dim=-1)
    p = model.probabilities(u, text)
    assert p.dtype == torch.float64 and torch.allclose(p.sum(-1), torch.ones(5, dtype=torch.float64))
    tokens = model(torch.randn(1, 3, 64, 150), text).tokens  # 3 tiles
    with pytest.raises(ValueError, match=r"^tokens hold 3 tiles but a \(64, 100\) input has 2$"):
        model.maps_from_tokens(tokens, text, (64, 100))


def test_constructor_defaults_are_the_official_ones_and_bad_choices_are_named(model) -> None:
    """Added after mutation testing of the constructor: AnoCLIP's own defaults are the official code's (V-V
    path from block 1, the last block's tokens, temperature 1, CLS image score, fp32), every choice reaches
    the encoder, CLIP stays frozen, and a wrong choice is refused with its value."""
    m = AnoCLIP(model.clip, model.tokenize, arch="anoclip-tiny", weights_id="w-1")
    n = len(m.encoder.blocks)
    assert n >= 2
    assert (m.encoder.vv_start, m.encoder.feature_layers, m.temperature, m.image_score_mode, m.precision) == (
        0, [n], 1.0, "cls", "fp32")
    assert (m.arch, m.weights_id) == ("anoclip-tiny", "w-1")
    assert not any(p.requires_grad for p in m.clip.parameters())
    m2 = AnoCLIP(model.clip, model.tokenize, arch="a", weights_id="w", vv_start_block=2, feature_layers=[2, n],
                 temperature=0.5, image_score="multiview", precision="fp16")
    assert (m2.encoder.vv_start, m2.encoder.feature_layers, m2.temperature, m2.image_score_mode, m2.precision) == (
        1, [2, n], 0.5, "multiview", "fp16")
    with pytest.raises(ValueError, match=r"^image_score must be 'cls' or 'multiview', got 'CLS'$"):
        AnoCLIP(model.clip, model.tokenize, arch="a", weights_id="w", image_score="CLS")
    with pytest.raises(ValueError, match=r"^precision must be fp32, bf16 or fp16, got 'FP16'$"):
        AnoCLIP(model.clip, model.tokenize, arch="a", weights_id="w", precision="FP16")


@pytest.mark.parametrize("precision, dtype", [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_the_vision_tower_runs_at_the_chosen_precision(model, text, precision: str, dtype) -> None:
    """The image encoder runs under autocast at `precision` (fp32: none), seen from its patch embedding."""
    m = AnoCLIP(model.clip, model.tokenize, arch="a", weights_id="w", precision=precision)
    seen: list[tuple[bool, torch.dtype]] = []
    hook = m.encoder.visual.conv1.register_forward_hook(
        lambda *_: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
    try:
        out = m(torch.randn(1, 3, m.image_size, m.image_size), text)
    finally:
        hook.remove()
    assert seen and all(on == (dtype is not None) for on, _ in seen)
    if dtype is not None:
        assert all(d == dtype for _, d in seen)
    assert out.anomaly_maps.dtype == torch.float32 and out.tokens.dtype == torch.float32
