"""GPTQ's layer error tr(dW H dW^T) against round to nearest, on tiny random weights with a
correlated random Hessian (no model files needed; a few seconds)."""
from __future__ import annotations

import pytest
import torch

from lowbit_compiler import rounding
from lowbit_compiler.formats import WeightFormat, dequantize, quantize


def correlated(k=256, n=64, rows=1024, seed=0, outliers_at_end=False):
    """A weight and the GPTQ Hessian 2/rows X^T X of correlated inputs (low-rank mix plus noise)
    with a few high-energy channels, as trained models' activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 16, generator=g) @ torch.randn(16, k, generator=g) / 4 + 0.3 * torch.randn(rows, k, generator=g)
    hot = torch.arange(k - 4, k) if outliers_at_end else torch.randint(0, k, (4,), generator=g)
    x[:, hot] *= 20
    w = torch.randn(n, k, generator=g) / k ** 0.5
    return w, 2 * x.T @ x / rows


def layer_error(w, h, qw):
    d = dequantize(qw)[:, : w.shape[1]].double() - w.double()
    return float(((d @ h.double()) * d).sum())


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_default_gptq_beats_rtn(bits, seed):
    fmt = WeightFormat(bits, 128, symmetric=False)
    w, h = correlated(seed=seed)
    rtn = layer_error(w, h, quantize(w, fmt))
    gptq = layer_error(w, h, rounding.gptq(w, fmt, h))
    assert gptq <= 0.5 * rtn, (bits, seed, gptq, rtn)


@pytest.mark.parametrize("bits", [4, 3])
def test_activation_order_is_the_default_and_helps_when_hot_inputs_come_last(bits):
    """Storage order rounds the high-energy inputs last, when nothing is left to absorb their error."""
    fmt = WeightFormat(bits, 128, symmetric=False)
    w, h = correlated(outliers_at_end=True)
    default = layer_error(w, h, rounding.gptq(w, fmt, h))
    assert default == layer_error(w, h, rounding.gptq(w, fmt, h, act_order=True))
    assert default < layer_error(w, h, rounding.gptq(w, fmt, h, act_order=False))


@pytest.mark.parametrize("act_order", [True, False])
def test_groups_are_static_from_the_original_weight(act_order):
    """Scales and zero points are round to nearest's (llm-compressor's static groups), whatever
    the error compensation did to the weights afterwards."""
    fmt = WeightFormat(3, 128, symmetric=False)
    w, h = correlated()
    qw, rtn = rounding.gptq(w, fmt, h, act_order=act_order), quantize(w, fmt)
    assert torch.equal(qw.scale, rtn.scale) and torch.equal(qw.zero, rtn.zero)


@pytest.mark.parametrize("damp", [0.01, 100.0])
@pytest.mark.parametrize("bits", [4, 3])
def test_never_worse_than_rtn_even_with_a_useless_hessian(damp, bits):
    fmt = WeightFormat(bits, 128, symmetric=False)
    w, h = correlated(seed=3)
    for hess in (h, torch.diag(torch.diag(h))):  # a diagonal Hessian: nothing to compensate with
        rtn = layer_error(w, hess, quantize(w, fmt))
        assert layer_error(w, hess, rounding.gptq(w, fmt, hess, damp=damp)) <= rtn * (1 + 1e-6)
