"""Scoring: maps, tiling, batch invariance, temperature, multiview, factory errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError, WeightsError
from pipeline.model import TileLayout, create_anoclip
from pipeline.settings import ModelSettings


def _box_then_bilinear(p: np.ndarray, size: int) -> np.ndarray:
    """docs/algorithm.md §4.2 read literally, pixel by pixel (no torch): a 3x3 mean whose out-of-grid
    neighbours repeat the edge ("replicate-pad by 1"), then bilinear upsampling in which the first and
    last output pixels sit exactly on the first and last grid cells ("align_corners=True")."""
    g = p.shape[0]
    clip = lambda i: min(max(i, 0), g - 1)  # noqa: E731
    box = np.array([[np.mean([p[clip(i + di), clip(j + dj)] for di in (-1, 0, 1) for dj in (-1, 0, 1)])
                     for j in range(g)] for i in range(g)])
    out = np.empty((size, size))
    for y in range(size):
        sy = y * (g - 1) / (size - 1)
        y0 = int(np.floor(sy))
        y1, wy = min(y0 + 1, g - 1), sy - y0
        for x in range(size):
            sx = x * (g - 1) / (size - 1)
            x0 = int(np.floor(sx))
            x1, wx = min(x0 + 1, g - 1), sx - x0
            out[y, x] = ((1 - wy) * ((1 - wx) * box[y0, x0] + wx * box[y0, x1])
                         + wy * ((1 - wx) * box[y1, x0] + wx * box[y1, x1]))
    return out


def test_map_is_probability_of_abnormal_box_filtered_and_upsampled(model, text) -> None:
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = model(x, text)
    tok = F.normalize(out.tokens[0, 0].double(), dim=-1)  # (n_layers, P, C)
    logits = tok @ text.class_embeddings.double().T
    p = torch.sigmoid(logits[..., 1] - logits[..., 0]).mean(0).view(8, 8).numpy()  # §4.1, mean over layers
    expected = _box_then_bilinear(p, 64)
    np.testing.assert_allclose(out.anomaly_maps[0].numpy(), expected, rtol=1e-5, atol=1e-6)
    # by hand: the top-left pixel is the top-left cell's 3x3 mean, its 5 outside neighbours repeating edges
    corner = (4 * p[0, 0] + 2 * p[0, 1] + 2 * p[1, 0] + p[1, 1]) / 9
    assert float(out.anomaly_maps[0, 0, 0]) == pytest.approx(corner, rel=1e-5)
    g = F.normalize(model.encoder(x).cls_embedding, dim=-1) @ text.class_embeddings.T
    torch.testing.assert_close(out.image_scores, torch.sigmoid(g[:, 1] - g[:, 0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 64), (64, 100), (100, 64), (64, 200)])
def test_batch_of_four_equals_four_single_calls(model, text, shape: tuple[int, int]) -> None:
    x = torch.randn(4, 3, *shape, generator=torch.Generator().manual_seed(3))
    batch = model(x, text)
    for i in range(4):
        single = model(x[i : i + 1], text)
        torch.testing.assert_close(batch.anomaly_maps[i], single.anomaly_maps[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batch.image_scores[i], single.image_scores[0], rtol=1e-4, atol=1e-5)


def test_two_tiles_follow_the_visa_scheme(model, text) -> None:
    x = torch.randn(1, 3, 64, 100, generator=torch.Generator().manual_seed(4))
    out = model(x, text)
    diff = 100 - 64
    assert out.tile_starts == [0, diff]
    left = model(x[..., :64], text).anomaly_maps[0]
    right = model(x[..., diff:], text).anomaly_maps[0]
    m = out.anomaly_maps[0]
    torch.testing.assert_close(m[:, :diff], left[:, :diff])
    torch.testing.assert_close(m[:, diff:64], (left[:, diff:] + right[:, : 64 - diff]) / 2)
    torch.testing.assert_close(m[:, 64:], right[:, 64 - diff :])
    both = torch.stack([model(x[..., :64], text).image_scores, model(x[..., diff:], text).image_scores]).mean()
    torch.testing.assert_close(out.image_scores[0], both)


def test_tile_layout_covers_long_side() -> None:
    for length in (64, 65, 127, 128, 129, 400):
        lay = TileLayout(64, length, 64)
        starts = lay.starts
        assert starts[0] == 0 and starts[-1] == length - 64
        assert all(b - a <= 64 for a, b in zip(starts, starts[1:], strict=False))


def test_maps_from_tokens_rebuilds_forward_maps(model, text) -> None:
    x = torch.randn(2, 3, 64, 150, generator=torch.Generator().manual_seed(5))
    out = model(x, text)
    torch.testing.assert_close(model.maps_from_tokens(out.tokens, text, (64, 150)), out.anomaly_maps)


def test_temperature_sharpens_but_keeps_ranking(text) -> None:
    t1 = create_anoclip(ModelSettings(arch="anoclip-tiny", pretrained="none", device="cpu", precision="fp32"))
    t100 = create_anoclip(ModelSettings(arch="anoclip-tiny", pretrained="none", device="cpu", precision="fp32",
                                        temperature=100))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    tokens = t1(x, text).tokens
    a = t1.patch_probabilities(tokens, text)[..., 1].flatten()
    b = t100.patch_probabilities(tokens, text)[..., 1].flatten()
    assert (b - 0.5).abs().max() > 10 * (a - 0.5).abs().max()
    assert torch.equal(a.argsort(), b.argsort())  # a monotone transform of the same logit difference


def test_multiview_averages_22_views(text) -> None:
    m = create_anoclip(ModelSettings(arch="anoclip-tiny", pretrained="none", device="cpu", precision="fp32",
                                     image_score="multiview"))
    from pipeline.model.augment import multiview

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    views = torch.cat([x, multiview(x)])
    assert views.shape[0] == 22 * 2
    g = F.normalize(m.encoder(views, with_patches=False).cls_embedding, dim=-1) @ text.class_embeddings.T
    expected = torch.sigmoid(g[:, 1] - g[:, 0]).view(22, 2).mean(0)
    torch.testing.assert_close(m(x, text).image_scores, expected, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_close_to_fp32(model, text) -> None:
    m16 = create_anoclip(ModelSettings(arch="anoclip-tiny", pretrained="none", device="cpu", precision="bf16"))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    a, b = model(x, text).anomaly_maps, m16(x, text).anomaly_maps
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < 0.02


def test_factory_errors_name_the_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match="model.arch"):
        create_anoclip(ModelSettings(arch="no-such-net", pretrained="none"))
    with pytest.raises(ConfigError, match="model.pretrained"):
        create_anoclip(ModelSettings(arch="ViT-B-16-plus-240", pretrained="not_a_tag"))
    with pytest.raises(WeightsError, match="does not exist"):
        create_anoclip(ModelSettings(arch="anoclip-tiny", pretrained=str(tmp_path / "missing.pt")))
    with pytest.raises(ConfigError, match="fp16"):
        create_anoclip(ModelSettings(arch="anoclip-tiny", pretrained="none", device="cpu", precision="fp16"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda"):
            create_anoclip(ModelSettings(arch="anoclip-tiny", pretrained="none", device="cuda"))


def test_local_checkpoint_loads_those_weights(tmp_path, text) -> None:
    src = create_anoclip(ModelSettings(arch="anoclip-tiny", pretrained="none", device="cpu", seed=11))
    ckpt = tmp_path / "tiny.pt"
    torch.save(src.clip.state_dict(), ckpt)
    loaded = create_anoclip(ModelSettings(arch="anoclip-tiny", pretrained=str(ckpt), device="cpu", seed=0))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x, text).anomaly_maps, src(x, text).anomaly_maps)
    assert loaded.weights_id.startswith("anoclip-tiny/file-")
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="could not load"):
        create_anoclip(ModelSettings(arch="anoclip-tiny", pretrained=str(ckpt), device="cpu"))


def test_unfetchable_tag_fails_loudly(monkeypatch) -> None:
    import open_clip

    def no_network(*a, **k):
        raise RuntimeError("connection refused")

    monkeypatch.setattr(open_clip, "create_model", no_network)
    with pytest.raises(WeightsError, match="local file path"):
        create_anoclip(ModelSettings(arch="ViT-B-16-plus-240", pretrained="laion400m_e32", device="cpu"))
