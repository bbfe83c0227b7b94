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
    assert hadamard_kernel.unsupported_reason(n, torch.float32) is None
    out = hadamard_kernel.launch(x.float())
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert sqnr_db(ref, out.double()) > 125  # the fp32 row as three fp16 parts: fp32-level
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
    # fp32 rows at 11008 (256 x 64 padded): fp16 factor parts plus the staged fp32 row tile need
    # 232 KB (Triton reports 237568 bytes, above sm_90's 232448); 16-bit rows need 168 KB
    assert "232 KB of shared memory" in hadamard_kernel.unsupported_reason(11008, torch.float32)
    assert hadamard_kernel.unsupported_reason(11008, torch.bfloat16) is None
    assert hadamard_kernel.unsupported_reason(14336, torch.float32) is None  # 160 KB


_SHARED_CASES = [(14336, torch.float16, None), (8192, torch.float32, None), (4096, torch.float32, None),
                 (14336, torch.float16, (112, 128))]


# one compile for sm_90 per mode (16-bit, fp32 split, learned) costs ~5 s: two modes in the default suite
@pytest.mark.parametrize("case", [pytest.param(c, marks=() if i < 2 else (pytest.mark.slow,), id=f"{c[0]}-{i}")
                                  for i, c in enumerate(_SHARED_CASES)])
@pytest.mark.heavy
def test_the_shared_memory_model_matches_the_compiler(case):
    """The refusal rule's byte count equals what Triton reports, per mode (16-bit, fp32 split, learned)."""
    cases = [case]
    jobs = [hadamard_kernel.rotate_quantize_aot_job(n, dtype, kron=kron) for n, dtype, kron in cases]
    for (n, dtype, kron), report in zip(cases, _triton_adapter.compile_for_gpu(jobs)):
        if kron is None:
            assert report["shared_bytes"] == hadamard_kernel.shared_bytes(n, dtype), (n, dtype, report)
        else:
            assert report["shared_bytes"] == hadamard_kernel._shared_bytes(128, 128, torch.float32), report


@pytest.mark.heavy
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


# Llama sizes the kernels meet: hidden 2048/4096/5120/8192 (q/k/v, gate/up inputs), intermediate
# 11008/13824/14336 (down_proj's input, where QuaRot's R4 sits)
LLAMA_SIZES = (2048, 4096, 5120, 8192, 11008, 13824, 14336)


def _sm90_jobs(sizes, dtypes, kron_sizes=()):
    from lowbit_compiler.learned_rotation import kron_split

    jobs = []
    for n in sizes:
        for dtype in dtypes:
            if hadamard_kernel.unsupported_reason(n, dtype) is None:  # refused sizes never launch
                jobs += [hadamard_kernel.aot_job(n, dtype), hadamard_kernel.rotate_quantize_aot_job(n, dtype)]
    for n in kron_sizes:
        a, b = kron_split(n)
        if hadamard_kernel.kron_unsupported_reason(a, b, n) is None:
            jobs.append(hadamard_kernel.rotate_quantize_aot_job(n, torch.float16, kron=(a, b)))
    return jobs


def _assert_no_spills(jobs):
    for job, report in zip(jobs, _triton_adapter.compile_for_gpu(jobs)):
        assert report["arch"] == "sm_90" and 0 < report["registers"] <= 255, (job["name"], job["constexprs"], report)
        assert report["spill_bytes"] == 0, (job["name"], job["signature"]["x_ptr"], job["constexprs"], report)


@pytest.mark.heavy
def test_the_kernels_compile_for_sm90_without_spills():
    """The variants a GPU runs: 16-bit rows (HALF; bf16 only compiled here), fp32 rows as fp16
    parts (SPLIT: at 4096 the former fp32 FMA dots spilled 80 bytes, from 5120 up 8-15 KB), learned
    factors as hi + lo parts (KRON at 128 x 128, the largest tile). Every size: the slow test below."""
    jobs = _sm90_jobs((4096,), (torch.float32,)) + _sm90_jobs((14336,), (torch.float32, torch.bfloat16), (14336,))
    assert {j["constexprs"]["MODE"] for j in jobs} == {0, 1, 2}
    _assert_no_spills(jobs)


@pytest.mark.slow
def test_every_variant_at_every_llama_size_compiles_for_sm90_without_spills():
    """hadamard_rows and rotate_quantize_rows for fp32/fp16/bf16 rows at every Llama size the kernel
    takes (11008 fp32 is refused for shared memory), and the learned-factor variant at every size
    (measured: at most 252 registers, no spills)."""
    jobs = _sm90_jobs(LLAMA_SIZES, (torch.float32, torch.float16, torch.bfloat16), LLAMA_SIZES)
    assert len(jobs) == 2 * (3 * len(LLAMA_SIZES) - 1) + len(LLAMA_SIZES)
    _assert_no_spills(jobs)


@pytest.mark.parametrize("tokens", [1, pytest.param(16, marks=pytest.mark.slow)])
@pytest.mark.heavy
def test_flatquant_transform_is_fused_into_the_rotate_and_quantize_kernel(tokens):
    """FlatQuant (w4a4-flat): each ``qa_linear(kron_transform(x, P1, P2))`` group -- q/k/v and
    gate/up share one transform -- becomes one rotate_quantize kernel whose int4 codes feed the
    linears' generated kernels (q/k/v still side by side); nothing falls back. Decode (1 token)
    and prefill graphs; logits against the CPU target's."""
    from lowbit_compiler.recipe import PRESETS

    recipe = PRESETS["w4a4-flat"].replace(options=(("flatquant", (("steps", 3),)),))
    ids = prompt(16)[:, :tokens]
    cpu = Recorder(recipe=recipe, target="cpu", calibration=[ids], progress=False)
    gpu = Recorder(recipe=recipe, target="triton", calibration=[ids], progress=False, strict=True)
    with torch.no_grad():
        ref = torch.compile(make_model("llama"), backend=cpu)(ids)[0]
        torch.compiler.reset()
        out = torch.compile(make_model("llama"), backend=gpu)(ids)[0]
    assert sqnr_db(ref, out) >= 35
    summary = gpu.summaries[0]
    assert summary["fallbacks"] == {}
    rotations = [v for v in summary["kernels"].values() if "rotate" in v or "kron" in v or v == "cpu-op"]
    # every transform the CPU graph runs (q/k/v's, o's, gate/up's, down's where FlatQuant found one
    # better than the identity) is one rotate_quantize kernel under Triton
    transforms = [k for k in cpu.summaries[0]["kernels"] if "kron_transform" in k]
    assert len(transforms) >= 6 and rotations == ["triton:rotate_quantize"] * len(transforms), summary["kernels"]
    records = summary["generated_kernels"]
    prequant = [r for r in records if "quantize_int4" not in r["fused_ops"]]
    assert sum(r["fused_ops"].count("qa_linear") for r in prequant) >= len(transforms)
    qkv = [r for r in prequant if r["layer"].endswith("q_proj")]  # one launch for q, k, v on shared codes
    assert len(qkv) == 2 and all("_3parts_" in r["kernel"] for r in qkv), [r["kernel"] for r in qkv]


@pytest.mark.parametrize("n, dtype, act", [(256, torch.float32, "int8"), (4096, torch.float16, "int4"),
                                           (192, torch.bfloat16, "int8"), (4096, torch.float32, "int8")])
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


@pytest.mark.parametrize("scheme, rows, learned", [("w4a8-sym", 1, False), ("w8a8", 12, False), ("w4a4", 20, False),
                                                   ("w4a4", 1, True), ("w8a8", 4, True)])
def test_quarot_chain_rotate_quantize_then_prequantized_gemv_matches_float64(scheme, rows, learned):
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
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, k, generator=g)
    # FlatQuant's learned factors (16 x 16: k = 256), or the Hadamard
    transform = (torch.eye(16) + 0.3 * torch.randn(16, 16, generator=g),
                 torch.eye(16) + 0.3 * torch.randn(16, 16, generator=g)) if learned else None
    codes, scale = hadamard_kernel.rotate_quantize(x, act, transform)
    args[0], args[1] = codes, scale
    out = kernel_cache.get_kernel(spec, interpret=True).launch(*args)
    named = dict(zip(codegen.launcher_params(spec), args))
    rotated = ops.kron_transform_reference(x.double(), *transform) if learned else x.double() @ hadamard.matrix(k)
    ref = ops.qa_linear_reference(rotated, named["qw0"], named["scale0"], named.get("zero0"),
                                  None, fmt, k, act)
    assert sqnr_db(ref.double(), out.double()) >= 100


def test_fp32_rows_of_any_magnitude_keep_fp32_precision_through_the_fp16_parts():
    """SPLIT scales each row by a power of two before cutting it into fp16 parts: rows at 1e30 and
    1e-30 (far outside fp16's range), an all-zero row and a row mixing magnitudes are all within
    fp32 precision of the float64 transform (learned factors too, scaled by 1e3 / 1e-3)."""
    n = 1024
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, n, generator=g, dtype=torch.float64)
    x[0] *= 1e30
    x[1] *= 1e-30
    x[2] = 0.0
    x[3, ::7] *= 1e6
    out = hadamard_kernel.launch(x.float()).double()
    ref = x.float().double() @ hadamard.matrix(n)
    assert torch.equal(out[2], torch.zeros(n))
    for i in (0, 1, 3, 4):
        assert sqnr_db(ref[i], out[i]) > 125, i
    left, right = 1e3 * torch.randn(32, 32, generator=g), 1e-3 * torch.randn(32, 32, generator=g)
    right[0, 0] = 1e-9  # far below the rest: the fp16 parts' floor is relative to the factor's max
    codes, scale = hadamard_kernel.rotate_quantize(x.float(), "int8", (left, right))
    from lowbit_compiler import ops

    z = ops.kron_transform_reference(x.float().double(), left, right)
    s64 = z.abs().amax(-1, keepdim=True) / 127
    for i in (0, 1, 3, 4):
        q = z[i] / s64[i]
        far = ((q - q.floor()) - 0.5).abs() > 1e-3
        assert torch.equal(codes[i].double()[far], torch.round(q)[far]), i
        assert abs(float(scale[i]) / float(s64[i]) - 1) < 1e-6
    assert torch.equal(codes[2], torch.zeros(n, dtype=torch.int8))
