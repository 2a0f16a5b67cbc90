"""The dual-path forward against open_clip itself and against a naive block-by-block reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import MODEL_CONFIGS, create_anoclip
from pipeline.settings import ModelSettings


def _model(arch: str = "anoclip-tiny", **kw: object):
    return create_anoclip(ModelSettings(arch=arch, pretrained="none", device="cpu", **kw))


def naive_vv_reference(
    visual: torch.nn.Module, images: torch.Tensor, start: int, keep: list[int]
) -> dict[int, torch.Tensor]:
    """docs/algorithm.md §2.2 written as plainly as possible: per image, per head, explicit softmax.

    The original path is open_clip's own block forward; the V-V path accumulates from O_{start-1}.
    Returns {block number: projected patch tokens (N, P, C)} for the blocks in `keep`.
    """
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    o = visual.ln_pre(torch.cat([cls, x], 1) + visual.positional_embedding)  # O_0, (N, T, D)
    heads = visual.transformer.resblocks[0].attn.num_heads
    x_vv = None
    kept = {}
    for k, blk in enumerate(visual.transformer.resblocks, start=1):
        if k >= start:
            if x_vv is None:
                x_vv = o.clone()
            attn = blk.attn
            d = o.shape[-1]
            dh = d // heads
            u = blk.ln_1(o)
            v_all = u @ attn.in_proj_weight[2 * d :].T + attn.in_proj_bias[2 * d :]
            add = torch.zeros_like(o)
            for n in range(o.shape[0]):
                head_outs = []
                for h in range(heads):
                    v = v_all[n, :, h * dh : (h + 1) * dh]
                    scores = (v @ v.T) / dh**0.5
                    a = torch.exp(scores - scores.max(-1, keepdim=True).values)
                    a = a / a.sum(-1, keepdim=True)
                    head_outs.append(a @ v)
                merged = torch.cat(head_outs, -1)
                add[n] = merged @ attn.out_proj.weight.T + attn.out_proj.bias
            x_vv = x_vv + add
            if k in keep:
                kept[k] = (visual.ln_post(x_vv[:, 1:]) @ visual.proj).clone()
        o = blk(o)  # open_clip's own block (batch-first in open_clip 3.x)
    return kept


@pytest.mark.parametrize("arch", sorted(MODEL_CONFIGS))
def test_original_path_matches_open_clip_encode_image(arch: str) -> None:
    m = _model(arch)
    x = torch.randn(3, 3, m.image_size, m.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = m.encoder(x).cls_embedding
        theirs = m.clip.encode_image(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("start", "layers"), [(1, [3]), (2, [3]), (1, [1, 2, 3]), (2, [2, 3])])
def test_vv_tokens_equal_naive_reference(start: int, layers: list[int]) -> None:
    m = _model(vv_start_block=start, feature_layers=layers)
    x = torch.randn(2, 3, m.image_size, m.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = m.encoder(x)
        ref = naive_vv_reference(m.clip.visual, x, start, layers)
    assert feats.patch_tokens.shape == (2, len(layers), m.grid_size**2, m.embed_dim)
    for i, layer in enumerate(layers):
        torch.testing.assert_close(feats.patch_tokens[:, i], ref[layer], rtol=1e-4, atol=1e-5)
    if len(layers) > 1:  # proper copies: the fused layers really differ (no in-place aliasing)
        assert not torch.allclose(feats.patch_tokens[:, 0], feats.patch_tokens[:, -1])


@pytest.mark.slow
def test_real_architecture_paths() -> None:
    """ViT-B-16-plus-240 (random weights): CLS equals open_clip, V-V equals the reference, 15x15 grid."""
    m = _model("ViT-B-16-plus-240")
    assert (m.image_size, m.grid_size, m.embed_dim) == (240, 15, 640)
    x = torch.randn(1, 3, 240, 240, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = m.encoder(x)
        torch.testing.assert_close(feats.cls_embedding, m.clip.encode_image(x), rtol=1e-4, atol=1e-4)
        ref = naive_vv_reference(m.clip.visual, x, 1, [12])
    torch.testing.assert_close(feats.patch_tokens[:, 0], ref[12], rtol=1e-4, atol=1e-4)


def test_feature_layers_must_be_vv_blocks() -> None:
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="feature_layers"):
        _model(vv_start_block=3, feature_layers=[1])


def test_plain_forward_skips_vv_work_but_keeps_cls() -> None:
    m = _model()
    x = torch.randn(2, 3, m.image_size, m.image_size)
    with torch.no_grad():
        full, plain = m.encoder(x), m.encoder(x, with_patches=False)
    torch.testing.assert_close(full.cls_embedding, plain.cls_embedding)
    assert plain.patch_tokens.numel() == 0
    assert F.cosine_similarity(full.patch_tokens[0, 0, 0], full.patch_tokens[0, 0, 1], dim=0) < 0.9999
