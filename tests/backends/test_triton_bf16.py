"""bf16 GPU variants, checked without bf16 arithmetic: Triton's interpreter computes bf16 wrongly
(silently), so each bf16 kernel is covered by (1) its generated source being the fp16 variant's
with only the dtype spelled differently (the fp16 variant runs under the interpreter:
``test_the_fp16_gpu_variant_computes_correctly_under_the_interpreter``) and its jit code's only
bf16 operations being conversions, and (2) bit-level checks of those conversions: widening
(bf16 -> fp32) run under the interpreter on every bit pattern against torch; narrowing (fp32 ->
bf16, for the tensor-core dot and the store), which the interpreter truncates, through the sm_90
PTX (``cvt.rn``: round to nearest even, torch's rounding)."""
from __future__ import annotations

import ast
import re

import pytest
import torch
import triton
import triton.language as tl

from lowbit_compiler.backends import _triton_adapter, codegen, kernel_cache
from tests.backends.test_codegen import make_qa_spec, make_spec

# every template (FMA GEMV, tl.dot GEMV, GEMM; symbolic M), every weight format, prologues and
# epilogues, side by side, gated pairs, quantized activations
CASES = [(rows, fmt, pro, epi) for rows in (1, 4, 12, 17, None)
         for fmt, pro, epi in (("int4_g128_asym", "rms", "gated"), ("int8", None, "residual"),
                               ("int3_g128_asym", "layer", "bias"), ("int2_g64_sym", None, "none"),
                               ("nf4_g64", "rms", "none"), ("mxfp4", None, "residual"), ("nvfp4", "layer", "bias"),
                               ("int4_g64_sym", None, "qkv"))]


def _normalised(src: str, name: str) -> str:
    """The source with the kernel's digest name removed and bf16 spelled as fp16."""
    src = src.replace(name, "KERNEL")
    return re.sub(r"bfloat16", "float16", re.sub(r"\bbf16\b", "fp16", src))


@pytest.mark.parametrize("rows, fmt, prologue, epilogue", CASES)
def test_the_bf16_gpu_variant_is_the_fp16_one_but_for_the_dtype(rows, fmt, prologue, epilogue):
    fp16 = make_spec(rows, fmt, prologue, epilogue, "float16", on_gpu=True, n=48, k=256)
    bf16 = make_spec(rows, fmt, prologue, epilogue, "bfloat16", on_gpu=True, n=48, k=256)
    s16, sb = codegen.render(fp16), codegen.render(bf16)
    assert s16 != sb and "bfloat16" in sb
    assert _normalised(sb, bf16.name) == _normalised(s16, fp16.name)
    # the jit kernels' only bf16 operations are conversions (what the bit-level tests below cover);
    # bf16 values otherwise arrive by loads of bf16 pointers, widened at once (the 16-bit rule)
    jitted = [ast.unparse(f) for f in ast.walk(ast.parse(sb)) if isinstance(f, ast.FunctionDef)
              and any("jit" in ast.unparse(d) for d in f.decorator_list)]
    assert jitted
    for body in jitted:
        assert body.count("tl.bfloat16") == body.count(".to(tl.bfloat16)"), body


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8-sym"])
def test_quantized_activation_bf16_variants_match_fp16_but_for_the_dtype(scheme):
    for rows in (1, 12, 17):
        fp16 = make_qa_spec(rows, scheme, "rms", "residual", "float16", on_gpu=True, n=48, k=256)
        bf16 = make_qa_spec(rows, scheme, "rms", "residual", "bfloat16", on_gpu=True, n=48, k=256)
        assert _normalised(codegen.render(bf16), bf16.name) == _normalised(codegen.render(fp16), fp16.name)


@triton.jit
def _narrow(bits_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """fp32 bit patterns -> bf16 (the kernels' ``.to(tl.bfloat16)``) -> their 16 bits."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(bits_ptr + i, mask=i < n).to(tl.float32, bitcast=True)
    tl.store(out_ptr + i, v.to(tl.bfloat16).to(tl.int16, bitcast=True), mask=i < n)


@triton.jit
def _widen(bits_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """bf16 bit patterns -> fp32 (the kernels' load then ``.to(tl.float32)``) -> its 32 bits."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(bits_ptr + i, mask=i < n).to(tl.bfloat16, bitcast=True)
    tl.store(out_ptr + i, v.to(tl.float32).to(tl.int32, bitcast=True), mask=i < n)


def test_bf16_to_fp32_is_exact_for_every_bit_pattern():
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    out = torch.empty(bits.shape, dtype=torch.int32)
    _widen[(triton.cdiv(bits.numel(), 4096),)](bits, out, bits.numel(), BLOCK=4096)
    ref = bits.view(torch.bfloat16).float()
    got = out.view(torch.float32)
    nan = ref.isnan()
    assert torch.equal(got.isnan(), nan) and int(nan.sum()) == 2 * 127
    # the interpreter's own bf16 -> fp32 conversion mishandles the 254 nonzero subnormals (found
    # here: 0x8002 gives -5.9e-39 instead of -1.8e-40); a GPU's cvt is exact. Every other pattern
    # bit for bit, signed zeros and infinities included
    sub = (ref.abs() < 2.0 ** -126) & (ref != 0)
    assert int(sub.sum()) == 254
    keep = ~nan & ~sub
    assert torch.equal(out[keep], ref.view(torch.int32)[keep])


@pytest.mark.heavy
def test_the_interpreter_truncates_fp32_to_bf16_so_the_gpu_rounding_is_checked_in_the_ptx():
    """Under the interpreter ``.to(tl.bfloat16)`` truncates (found here: 0.0108 -> 0.010742 where
    torch gives 0.010803), so it cannot check the GPU's narrowing; the compiled bf16 variants are
    checked instead: every fp32 -> bf16 conversion in their sm_90 PTX is ``cvt.rn`` (round to
    nearest even, torch's rounding, bit for bit by PTX's definition), none truncating."""
    bits = torch.tensor([0x3C30F27C], dtype=torch.int32)  # 0.0108 (low half 0xF27C: rounds up)
    out = torch.empty(1, dtype=torch.int16)
    _narrow[(1,)](bits, out, 1, BLOCK=16)
    torch_rne = bits.view(torch.float32).to(torch.bfloat16).view(torch.int16)
    assert int(out) == 0x3C30 and int(torch_rne) == 0x3C31  # the interpreter truncates; torch rounds
    specs = [make_spec(1, "int4_g128_asym", "rms", "gated", "bfloat16", on_gpu=True, n=4096, k=4096),
             make_spec(12, "nvfp4", "layer", "bias", "bfloat16", on_gpu=True, n=4096, k=4096),
             make_spec(None, "int8", None, "residual", "bfloat16", on_gpu=True, n=4096, k=4096)]
    jobs = []
    for spec in specs:
        path, _ = kernel_cache.source_file(spec)
        args = codegen.make_inputs(spec, 4, 64, 256)
        jobs.append({"path": str(path), "name": f"{spec.name}_kernel", "signature": kernel_cache.kernel_signature(spec, args),
                     "constexprs": {"BLOCK_M": spec.block_m, "BLOCK_N": spec.block_n, "BLOCK_K": spec.block_k,
                                    **({"SPLIT_K": spec.split_k} if spec.split_k > 1 else {})},
                     "num_warps": spec.num_warps, "arch": 90})
    for spec, report in zip(specs, _triton_adapter.compile_for_gpu(jobs)):
        narrowing = [c for c in report["conversions"] if ".bf16" in c and ".f32" in c and c.index(".bf16") < c.index(".f32")]
        assert narrowing and all(c.startswith("cvt.rn.") for c in narrowing), (spec.name, report["conversions"])
        assert report["spill_bytes"] == 0, (spec.name, report)
