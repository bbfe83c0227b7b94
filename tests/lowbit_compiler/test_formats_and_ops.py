"""Weight formats and lowbit::wo_linear: SQNR floors against float, fast path against reference."""
from __future__ import annotations

import pytest
import torch

from lowbit_compiler.backends import cpu_kernels
from lowbit_compiler.formats import (FormatError, WeightFormat, check_layer, dequantize, pack_int4, quantize,
                                     sqnr_db, unpack_int4)
from lowbit_compiler.ops import wo_linear_reference

# Output SQNR floors of one quantized linear against the float linear (issue 2, point 5).
FLOORS = {
    WeightFormat(8): 35.0,
    WeightFormat(4, 32, False): 21.0, WeightFormat(4, 64, False): 20.0, WeightFormat(4, 128, False): 19.0,
    WeightFormat(4, 32, True): 19.0, WeightFormat(4, 64, True): 18.0, WeightFormat(4, 128, True): 17.5,
}


def _layer(n=192, k=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(16, k, generator=g)
    b = torch.randn(n, generator=g) * 0.01
    return w, x, b


def _run_op(qw, x, b):
    return wo_linear_reference(x, qw.qweight, qw.scale, qw.zero, b, qw.format.key, qw.in_features)


@pytest.mark.parametrize("fmt", list(FLOORS), ids=lambda f: f.key)
def test_linear_output_meets_sqnr_floor(fmt):
    w, x, b = _layer()
    qw = quantize(w, fmt)
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    assert sqnr_db(ref, _run_op(qw, x, b)) >= FLOORS[fmt]


@pytest.mark.parametrize("fmt", list(FLOORS), ids=lambda f: f.key)
def test_fast_cpu_path_matches_reference(fmt):
    w, x, b = _layer(n=200)  # N not a multiple of 16: the int4 kernel pads rows
    qw = quantize(w, fmt)
    ref = _run_op(qw, x, b)
    fast32 = cpu_kernels.wo_linear_fast(x, qw.qweight, qw.scale, qw.zero, b, fmt.key, qw.in_features,
                                        policy="activation")
    assert fast32.dtype == torch.float32
    assert sqnr_db(ref, fast32) >= 60.0
    xb = x.bfloat16()
    fast16 = cpu_kernels.wo_linear_fast(xb, qw.qweight, qw.scale, qw.zero, b, fmt.key, qw.in_features)
    assert fast16.dtype == torch.bfloat16
    assert sqnr_db(_run_op(qw, xb.float(), b), fast16) >= 45.0
    # the default policy casts fp32 activations to bf16 at the boundary and returns fp32
    default = torch.ops.lowbit.wo_linear(x, qw.qweight, qw.scale, qw.zero, b, fmt.key, qw.in_features)
    assert default.dtype == torch.float32 and sqnr_db(ref, default) >= 45.0


def test_int4_packing_roundtrip_and_storage_bytes():
    q = torch.randint(0, 16, (6, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    fmt = WeightFormat(4, 64, False)
    qw = quantize(torch.randn(6, 128), fmt)
    assert qw.nbytes() == fmt.storage_bytes(6, 128) == 6 * 64 + 6 * 2 * 2 + 6 * 2
    assert fmt.bits_per_weight(4096, 4096) == pytest.approx(4 + 24 / 64)


def test_codes_reproduce_weights_exactly_at_grid_points():
    """Weights already on the int8 grid of their stored scale come back exactly."""
    scale = torch.tensor([0.5, 0.25]).bfloat16().float()
    codes = torch.randint(-127, 128, (2, 32)).float()
    codes[:, 0] = 127  # pin the row max so the recomputed scale is the same
    w = codes * scale[:, None]
    assert torch.equal(dequantize(quantize(w, WeightFormat(8))), w)


def test_asymmetric_zero_point_is_exact_for_shifted_rows():
    w = torch.rand(4, 128) + 3.0  # all-positive: the zero point must move, not clip
    fmt = WeightFormat(4, 32, False)
    assert sqnr_db(w, dequantize(quantize(w, fmt))) > 30


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=5, group_size=128), "bits=5 is out of range"),
    (dict(bits=4, group_size=16, kind="mxfp4"), "format mxfp4 uses blocks of 32; got group_size=16"),
    (dict(bits=8, kind="nf4", group_size=64), "nf4 has 4-bit codes"),
    (dict(bits=4, kind="fp4"), "unknown weight format kind 'fp4'"),
    (dict(bits=4, group_size=48), "group_size=48 is not supported"),
    (dict(bits=8, group_size=128), "int8 weights are per-channel"),
])
def test_bad_formats_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(FormatError, match=message):
        WeightFormat(**kwargs)


def test_k_not_multiple_of_group_names_layer_and_fix():
    with pytest.raises(FormatError, match=r"layer model.layers.3.mlp.down_proj: K=5600 is not a multiple of "
                                          r"group_size=256; use group_size=32 or set pad_to_group"):
        check_layer(WeightFormat(4, 256), 5600, "model.layers.3.mlp.down_proj", pad_to_group=False)
    check_layer(WeightFormat(4, 256), 5600, "x", pad_to_group=True)


def test_padded_layer_matches_float_and_fast_path():
    w, x, b = _layer(n=64, k=200)
    fmt = WeightFormat(4, 128, False)
    qw = quantize(w, fmt)
    assert qw.qweight.shape == (64, 128) and qw.in_features == 200
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    out = _run_op(qw, x, b)
    assert sqnr_db(ref, out) >= 19.0
    fast = cpu_kernels.wo_linear_fast(x, qw.qweight, qw.scale, qw.zero, b, fmt.key, 200, policy="activation")
    assert sqnr_db(out, fast) >= 60.0


def test_fake_impl_gives_shapes_under_dynamo_tracing():
    qw = quantize(torch.randn(48, 64), WeightFormat(4, 32, True))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.lowbit.wo_linear(torch.empty(2, 5, 64), qw.qweight, qw.scale, None, None, qw.format.key, 64)
    assert out.shape == (2, 5, 48)
