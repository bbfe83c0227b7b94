"""The Triton kernel of ``lowbit::hadamard`` (interpreter numerics, sm_90 compile) and its lowering."""
from __future__ import annotations

import pytest
import torch

from lowbit_compiler import hadamard
from lowbit_compiler.backends import _triton_adapter, hadamard_kernel
from lowbit_compiler.formats import sqnr_db
from tests.conftest import make_model, prompt
from tests.helpers import Recorder


@pytest.mark.parametrize("n", [12, 32, 96, 256, 688, 4096, 5632])
def test_the_kernel_matches_the_float64_transform(n):
    a, b = hadamard.split_two(n)
    assert torch.equal(torch.kron(hadamard.kron_factor(a), hadamard.kron_factor(b)) / n ** 0.5, hadamard.matrix(n))
    x = torch.randn(3, 2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    ref = x @ hadamard.matrix(n)
    if (reason := hadamard_kernel.unsupported_reason(n, torch.float32)) is None:
        out = hadamard_kernel.launch(x.float())
        assert out.dtype == torch.float32 and out.shape == x.shape
        assert sqnr_db(ref, out.double()) > 125  # fp32 products (no TF32)
    else:  # 688 = 172 x 4, padded 256 x 16: fp32 factors exceed an H200's shared memory
        assert n == 688 and "shared memory" in reason
        with pytest.raises(ValueError, match="shared memory"):
            hadamard_kernel.launch(x.float())
    # loaded and stored in dtype, computed in fp32 (another summation order than the CPU op's, and
    # the interpreter's fp32 -> bf16 store rounds its own way): within one step of the CPU op
    for dtype, bits in ((torch.float16, 10), (torch.bfloat16, 7)):
        low, cpu = hadamard_kernel.launch(x.to(dtype)), torch.ops.lowbit.hadamard(x.to(dtype))
        assert low.dtype == dtype
        assert ((low.float() - cpu.float()).abs() <= cpu.float().abs() * 2.0 ** -bits + 1e-6).all(), dtype


def test_sizes_too_large_for_one_tile_are_refused_with_the_reason():
    assert hadamard_kernel.unsupported_reason(14336) is None  # Llama-3's down projection: 112 x 128
    assert hadamard_kernel.unsupported_reason(11008) is None  # Llama-2's: 172 x 64, padded 256 x 64
    assert "exceeds 16384" in hadamard_kernel.unsupported_reason(32768)
    assert "not a power of two" in hadamard_kernel.unsupported_reason(100)
    # fp32 factors for 11008 (256 x 64 padded) need 336 KB of shared memory: an H200 refused the
    # launch (OutOfResources, 344064 > 232448 bytes); 16-bit ones need half and ran there
    assert "336 KB of shared memory" in hadamard_kernel.unsupported_reason(11008, torch.float32)
    assert hadamard_kernel.unsupported_reason(11008, torch.bfloat16) is None
    assert hadamard_kernel.unsupported_reason(14336, torch.float32) is None  # 192 KB: ran on the H200


def test_the_shared_memory_model_matches_the_compiler():
    jobs = [hadamard_kernel.aot_job(n, dtype) for n, dtype in ((4096, torch.float32), (14336, torch.float16))]
    for job, report, (n, dtype) in zip(jobs, _triton_adapter.compile_for_gpu(jobs),
                                       ((4096, torch.float32), (14336, torch.float16))):
        assert report["shared_bytes"] <= hadamard_kernel.shared_bytes(n, dtype), (n, dtype, report)


def test_w4a4_rot_lowers_every_hadamard_to_the_rotate_and_quantize_kernel():
    ids = prompt()
    cpu = Recorder(recipe="w4a4-rot", target="cpu")
    gpu = Recorder(recipe="w4a4-rot", target="triton", strict=True)
    with torch.no_grad():
        ref = torch.compile(make_model("llama"), backend=cpu)(ids)[0]
        out = torch.compile(make_model("llama"), backend=gpu)(ids)[0]
    assert sqnr_db(ref, out) >= 35
    kernels = gpu.summaries[0]["kernels"]
    # R4 per MLP: rotated and quantized in one kernel, feeding down_proj's kernel as int4 codes
    assert sorted(v for v in kernels.values() if "rotate" in v or "hadamard" in v) == ["triton:rotate_quantize"] * 2
    downs = [r for r in gpu.summaries[0]["generated_kernels"] if r["layer"].endswith("down_proj")]
    assert len(downs) == 2 and all("quantize_int4" not in r["fused_ops"] for r in downs)
    assert gpu.summaries[0]["fallbacks"] == {}


def test_the_kernel_compiles_for_sm90_without_spills():
    """16-bit rows take tensor-core dots (the bf16 one is only compiled here: the interpreter's bf16
    arithmetic is wrong), fp32 rows fp32 dots. Measured: 4096 fp16 67 registers, 14336 bf16 114."""
    jobs = [hadamard_kernel.aot_job(4096, torch.float16), hadamard_kernel.aot_job(14336, torch.bfloat16),
            hadamard_kernel.aot_job(1024, torch.float32)]
    for job, report in zip(jobs, _triton_adapter.compile_for_gpu(jobs)):
        assert report["arch"] == "sm_90" and 0 < report["registers"] <= 255, report
        assert report["spill_bytes"] == 0, (job["constexprs"], report)


def test_flatquant_transform_under_triton_runs_its_torch_implementation_and_says_so():
    from lowbit_compiler.recipe import PRESETS

    recipe = PRESETS["w4a4-flat"].replace(options=(("flatquant", (("steps", 3),)),))
    ids = prompt(16)
    cpu = Recorder(recipe=recipe, target="cpu", calibration=[ids], progress=False)
    gpu = Recorder(recipe=recipe, target="triton", calibration=[ids], progress=False)
    with torch.no_grad():
        ref = torch.compile(make_model("llama"), backend=cpu)(ids)[0]
        torch.compiler.reset()
        out = torch.compile(make_model("llama"), backend=gpu)(ids)[0]
    assert sqnr_db(ref, out) >= 35
    fallbacks = gpu.summaries[0]["fallbacks"]
    transforms = sum(v == "cpu-op" for v in gpu.summaries[0]["kernels"].values())
    assert transforms > 0 and fallbacks == {"no Triton kernel for lowbit::kron_transform yet": transforms}


@pytest.mark.parametrize("n, dtype, act", [(256, torch.float32, "int8"), (4096, torch.float16, "int4"),
                                           (192, torch.bfloat16, "int8")])
def test_rotate_and_quantize_in_one_kernel_matches_float64(n, dtype, act):
    """QuaRot's online rotation fused with the per-row activation quantization: the codes equal
    round(x H / s) computed in float64 (except within 1e-3 of a rounding tie) and the scale its
    float64 value to fp32 rounding; the rotated row itself is never written."""
    from lowbit_compiler import hadamard
    from lowbit_compiler.ops import ACTIVATION_MAX

    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n)).to(dtype)
    codes, scale = hadamard_kernel.rotate_quantize(x, act)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and scale.shape == (5, 1)
    z = x.double() @ hadamard.matrix(n)
    s64 = z.abs().amax(-1, keepdim=True) / ACTIVATION_MAX[act]
    q = z / s64
    near_tie = ((q - q.floor()) - 0.5).abs() < 1e-3
    assert torch.equal(codes.double()[~near_tie], torch.round(q)[~near_tie])
    assert ((scale.double() - s64).abs() / s64).max() < 1e-6


def test_learned_kronecker_transform_rotates_and_quantizes_in_the_same_kernel():
    from lowbit_compiler import ops

    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(16, 16, generator=g), torch.randn(12, 12, generator=g)
    x = torch.randn(3, 192, generator=g)
    codes, scale = hadamard_kernel.rotate_quantize(x, "int4", (left, right))
    z = ops.kron_transform_reference(x.double(), left, right)
    s64 = z.abs().amax(-1, keepdim=True) / 7
    assert torch.equal(codes.double(), torch.round(z / s64)) and codes.abs().max() <= 7
    assert ((scale.double() - s64).abs() / s64).max() < 1e-6


@pytest.mark.parametrize("scheme, rows", [("w4a8-sym", 1), ("w8a8", 12), ("w4a4", 20)])
def test_quarot_chain_rotate_quantize_then_prequantized_gemv_matches_float64(scheme, rows):
    """rotate_quantize -> the generated GEMV/GEMM taking pre-quantized codes and their row scales
    (KernelSpec.act_prequant): against qa_linear's float64 reference on the float64-rotated input."""
    import dataclasses

    from lowbit_compiler import hadamard, ops
    from lowbit_compiler.backends import codegen, kernel_cache
    from tests.backends.test_codegen import SCHEMES, make_qa_spec

    fmt, act, _ = SCHEMES[scheme]
    n, k = 48, 256
    spec = dataclasses.replace(make_qa_spec(rows, scheme, None, "none", "float32", n=n, k=k), act_prequant=True)
    assert "x_scale" not in spec.stats  # no statistics kernel: the scale comes with the codes
    args = codegen.make_inputs(spec, rows, n, k, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    codes, scale = hadamard_kernel.rotate_quantize(x, act)
    args[0], args[1] = codes, scale
    out = kernel_cache.get_kernel(spec, interpret=True).launch(*args)
    named = dict(zip(codegen.launcher_params(spec), args))
    ref = ops.qa_linear_reference(x.double() @ hadamard.matrix(k), named["qw0"], named["scale0"], named.get("zero0"),
                                  None, fmt, k, act)
    assert sqnr_db(ref.double(), out.double()) >= 100


def test_rotate_quantize_compiles_for_sm90_without_spills():
    """16-bit rows (tensor-core dots). fp32 rows at 64 x 64 spill 80 bytes per thread (FMA dots),
    (docs/codegen.md says so)."""
    jobs = [hadamard_kernel.rotate_quantize_aot_job(4096, torch.float16),
            hadamard_kernel.rotate_quantize_aot_job(1024, torch.float32)]
    for job, report in zip(jobs, _triton_adapter.compile_for_gpu(jobs)):
        assert report["arch"] == "sm_90" and report["spill_bytes"] == 0, (job["constexprs"], report)
