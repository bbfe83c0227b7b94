"""``lowbit::grouped_linear`` (MoE experts): the op's CPU implementation and float reference
against a float64 per-expert matmul, and its Triton kernel under the interpreter."""
from __future__ import annotations

import pytest
import torch

from lowbit_compiler import ops
from lowbit_compiler.formats import WeightFormat, dequantize, quantize, sqnr_db
from lowbit_compiler.passes.quantize.common import stack_experts


def _experts(fmt: str, e: int = 4, n: int = 48, k: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(e, n, k, generator=g) * 0.05
    qws = [quantize(w[i], WeightFormat.parse(fmt)) for i in range(e)]
    return w, qws, stack_experts(qws)


def _float64(x: torch.Tensor, offs: torch.Tensor, qws, act: str | None = None) -> torch.Tensor:
    """Independent reference: float64 dequantised weight per expert on its rows (quantized
    activations: the op's per-token codes times their scale)."""
    out = torch.zeros(x.shape[0], qws[0].out_features, dtype=torch.float64)
    start = 0
    for e, end in enumerate(offs.tolist()):
        rows = x[start:end].double()
        if act is not None:
            codes, scale = ops.quantize_per_token(x[start:end], act)
            rows = codes.double() * scale.double()
        out[start:end] = rows @ dequantize(qws[e]).double().t()
        start = end
    return out


# rows per expert: uneven, one expert without tokens, and 3 trailing rows routed to no expert
COUNTS = [5, 0, 9, 2]


@pytest.mark.parametrize("fmt", ["int8", "int4_g128_asym", "int4_g32_sym", "nf4_g64", "int3_g128_asym"])
def test_op_matches_a_float64_per_expert_matmul(fmt):
    _, qws, stacked = _experts(fmt)
    x = torch.randn(sum(COUNTS) + 3, 256, generator=torch.Generator().manual_seed(1))
    offs = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    ref = _float64(x, offs, qws)
    args = (offs, stacked.qweight, stacked.scale, stacked.zero, fmt, 256)
    reference = ops.grouped_linear_reference(x, *args)
    assert sqnr_db(ref, reference.double()) > 120  # float32 matmul of the same dequantised weights
    # packed CPU kernels (bf16 compute), NF4's generated kernel (its int8 table: ~45-51 dB), int3's
    # lookup-table kernel for these decode-sized expert calls (its int8 tables: 36-47 dB)
    out = torch.ops.lowbit.grouped_linear(x, *args)
    assert out.shape == (sum(COUNTS) + 3, 48) and out.dtype == torch.float32
    assert torch.equal(out[-3:], torch.zeros(3, 48))  # rows past offs[-1]: no expert
    assert sqnr_db(ref, out.double()) > (33 if fmt == "int3_g128_asym" else 40)
    x64 = x.double()
    assert sqnr_db(ref, torch.ops.lowbit.grouped_linear(x64, *args)) > 250  # float64: the reference, exactly


def test_each_expert_is_the_wo_linear_of_its_rows():
    """Per expert, the grouped op equals ``lowbit::wo_linear`` on that expert's rows, bit for bit
    (the same packed kernel), and packing happens once per stacked weight, not per call."""
    from lowbit_compiler.backends import cpu_kernels

    _, qws, stacked = _experts("int4_g128_asym")
    x = torch.randn(sum(COUNTS), 256, generator=torch.Generator().manual_seed(2))
    offs = torch.tensor(COUNTS).cumsum(0)
    out = torch.ops.lowbit.grouped_linear(x, offs, stacked.qweight, stacked.scale, stacked.zero, "int4_g128_asym", 256)
    misses = cpu_kernels.PACK_CACHE.misses
    torch.ops.lowbit.grouped_linear(x, offs, stacked.qweight, stacked.scale, stacked.zero, "int4_g128_asym", 256)
    assert cpu_kernels.PACK_CACHE.misses == misses
    start = 0
    for e, end in enumerate(offs.tolist()):
        q = qws[e]
        expected = torch.ops.lowbit.wo_linear(x[start:end], q.qweight, q.scale, q.zero, None, q.format.key, 256)
        assert torch.equal(out[start:end], expected), e
        start = end


@pytest.mark.parametrize("fmt, act", [("int8", "int8"), ("int4_g128_sym", "int8")])
def test_quantized_activations_per_token_per_expert(fmt, act):
    _, qws, stacked = _experts(fmt)
    x = torch.randn(sum(COUNTS), 256, generator=torch.Generator().manual_seed(3))
    offs = torch.tensor(COUNTS).cumsum(0)
    ref = _float64(x, offs, qws, act)
    args = (offs, stacked.qweight, stacked.scale, stacked.zero, fmt, 256, act)
    assert sqnr_db(ref, torch.ops.lowbit.grouped_linear(x, *args).double()) > 120  # integer products, exact
    assert sqnr_db(ref, ops.grouped_linear_reference(x, *args).double()) > 120
