"""The scorer with an adapter in the path, and its input checks; added after mutation testing of
pipeline/model/anoclip.py (the scorer tests only ran it without an adapter)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


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
