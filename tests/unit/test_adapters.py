"""The two TTA adapters: their formulas, init, stacking and the factory (synthetic tensors, no model)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.adapters import LinearAdapter, TextAdapter, create_adapter, text_basis
from pipeline.model.text import TextFeatures

C = 16


def _text(n_sent: int = 5, seed: int = 0) -> TextFeatures:
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    return TextFeatures(unit(2, C), unit(n_sent, C), unit(n_sent + 1, C))


def test_text_adapter_is_the_official_formula() -> None:
    tf = _text()
    a = create_adapter("text", tf, 0.5, generator=torch.Generator().manual_seed(3))
    x = 4.0 * torch.randn(7, C)
    basis = torch.cat([tf.normal_sentences, tf.abnormal_sentences])
    expected = 0.5 * x + 0.5 * torch.tanh(F.normalize(x, dim=-1) @ a.weight.T + a.bias) @ basis
    assert isinstance(a, TextAdapter) and a.out_dim == 11
    torch.testing.assert_close(a(x), expected)


def test_linear_adapter_is_the_official_formula_and_residual_weights_the_raw_token() -> None:
    a = LinearAdapter(C, residual=0.25, generator=torch.Generator().manual_seed(1))
    x = 3.0 * torch.randn(2, 5, C)
    expected = 0.25 * x + 0.75 * (F.normalize(x, dim=-1) @ a.weight.T + a.bias)
    torch.testing.assert_close(a(x), expected)
    assert torch.equal(LinearAdapter(C, residual=1.0)(x), x)  # residual 1: the adapter is the identity


def test_init_is_nn_linear_default_and_reproducible() -> None:
    tf = _text()
    a = create_adapter("linear", tf, generator=torch.Generator().manual_seed(5))
    b = create_adapter("linear", tf, generator=torch.Generator().manual_seed(5))
    c = create_adapter("linear", tf, generator=torch.Generator().manual_seed(6))
    bound = 1 / math.sqrt(C)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)
    assert a.weight.abs().max() <= bound and a.weight.abs().max() > 0.8 * bound  # U(-1/sqrt(C), 1/sqrt(C))
    assert a.bias.abs().max() <= bound


def test_uninitialised_adapters_draw_nothing_from_the_global_rng() -> None:
    state = torch.get_rng_state()
    a = create_adapter("text", _text(), init=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert not a.weight.any()


def test_stacked_adapter_applies_adapter_i_to_group_i() -> None:
    tf = _text()
    stack = create_adapter("text", tf, stack=3, generator=torch.Generator().manual_seed(2))
    x = torch.randn(3 * 2, 1, 4, C)  # (frames * tiles, layers, P, C), frame-major as maps_from_tokens passes it
    out = stack(x).view(3, 2, 1, 4, C)
    for i in range(3):
        single = stack.unstack(i)
        assert single.stack is None
        torch.testing.assert_close(out[i], single(x.view(3, 2, 1, 4, C)[i]))
    with pytest.raises(ValueError, match="divisible"):
        stack(torch.randn(4, C))


def test_factory_kinds_and_errors() -> None:
    tf = _text()
    assert create_adapter("linear", tf).weight.shape == (C, C)
    assert create_adapter("text", tf).weight.shape == (text_basis(tf).shape[0], C)
    with pytest.raises(ValueError, match="unknown adapter kind"):
        create_adapter("mlp", tf)
    with pytest.raises(ValueError, match="width"):
        create_adapter("linear", tf)(torch.randn(3, C + 1))


def test_bf16_compute_stays_close_to_fp32() -> None:
    tf = _text(n_sent=200)
    a = create_adapter("text", tf, generator=torch.Generator().manual_seed(4))
    x = 5.0 * torch.randn(50, C, generator=torch.Generator().manual_seed(5))
    ref = a(x)
    a.compute_dtype = torch.bfloat16
    out = a(x)
    assert out.dtype == torch.float32 and not torch.equal(out, ref)  # it did run in bf16...
    torch.testing.assert_close(out, ref, rtol=0.0, atol=0.05 * float(ref.abs().max()))  # ...and stayed close
