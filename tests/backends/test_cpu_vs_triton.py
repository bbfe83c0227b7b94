"""The generated CPU kernels against the generated Triton kernels (under Triton's interpreter) on
shared cases: the same codes, scales, zero points, activations, norm weight, biases and residual go
through both code generators, and the two outputs must agree with each other, not only each with
the float reference (tests/backends/test_codegen.py, test_cpu_codegen.py). Both accumulate in
float32 in their own order, so float32 outputs agree to ~1e-6 relative (>= 100 dB); half-precision
outputs differ by the Triton kernel's final rounding to the activation dtype (the CPU kernels
return float32)."""
from __future__ import annotations

import pytest
import torch

from lowbit_compiler.backends import codegen, cpu_codegen, kernel_cache
from lowbit_compiler.formats import sqnr_db
from tests.backends.test_codegen import make_spec

FLOORS = {"float32": 100.0, "float16": 60.0, "bfloat16": 40.0}


def _split(spec, args: list, n_weights: int):
    """The launcher's arguments as (x, norm weight, [(qweight, scale, zero, bias)], residual, eps)."""
    args = list(args)
    x = args.pop(0)
    norm_weight = args.pop(0) if spec.norm_weight else None
    weights = []
    for _ in range(n_weights):
        qweight, scale = args.pop(0), args.pop(0)
        zero = args.pop(0) if spec.format.key.endswith("asym") else None
        bias = args.pop(0) if spec.bias else None
        weights.append((qweight, scale, zero, bias))
    residual = args.pop(0) if spec.externals else None
    eps = args.pop(0) if spec.prologue else 0.0
    assert not args, f"unparsed launcher arguments: {len(args)}"
    return x, norm_weight, weights, residual, eps


# (rows, format, K, N, prologue, epilogue, dtype): decode (split-K GEMV) and small-batch row counts,
# every integer format family, the RMSNorm prologue, bias / residual / SiLU(gate) * up epilogues
CASES = [
    (1, "int4_g64_asym", 256, 97, "rms", "residual", "float32"),
    (3, "int4_g32_sym", 256, 128, None, "bias", "float32"),
    (5, "int8", 256, 97, "rms", "gated", "float32"),
    (1, "int4_g128_asym", 256, 128, "rms", "gated", "float32"),
    (12, "int4_g128_sym", 256, 97, None, "none", "float16"),
    (1, "int8", 256, 128, "rms", "bias", "bfloat16"),
    (3, "int4_g128_asym", 384, 97, "rms", "residual", "float32"),  # three groups
    (1, "int8", 200, 97, "rms", "bias", "float32"),  # ragged K (int4 K padded to the group: the CPU kernels decline)
]


@pytest.mark.parametrize("rows, fmt, k, n, prologue, epilogue, dtype", CASES,
                         ids=lambda v: str(v) if v is not None else "none")
def test_cpu_kernel_equals_the_triton_kernel(rows, fmt, k, n, prologue, epilogue, dtype):
    spec = make_spec(rows, fmt, prologue, epilogue, dtype, n=n, k=k)
    kernel = kernel_cache.get_kernel(spec, interpret=True)
    args = codegen.make_inputs(spec, rows, n, k, seed=rows + n + k)
    triton_out = kernel.launch(*args).float()

    gated = epilogue == "gated"
    x, norm_weight, weights, residual, eps = _split(spec, args, 2 if gated else 1)
    bound = [cpu_codegen.bind(q, s, z, fmt, k) for q, s, z, _ in weights]
    assert all(b is not None for b in bound), f"no generated CPU kernel for {fmt}: {cpu_codegen._disabled_reason}"
    biases = [b for *_, b in weights]
    if gated:  # SiLU(x W_gate^T) * (x W_up^T) in the store of one call over both weights
        group = cpu_codegen.bind_group(bound, cpu_codegen.SILU_MUL)
        assert group is not None
        cpu_out = group.ext(x, biases, norm_weight, eps)
    else:
        cpu_out = bound[0].ext(x, biases[0], norm_weight, eps, residual)
    assert cpu_out.shape == triton_out.shape == (rows, n)
    db = sqnr_db(cpu_out.double(), triton_out.double())
    assert db >= FLOORS[dtype], f"{spec.name} M={rows}: CPU vs Triton {db:.1f} dB"
    reference = kernel.reference(*args).float()  # and both meet the float reference
    assert sqnr_db(reference.double(), cpu_out.double()) >= FLOORS[dtype] - 10
