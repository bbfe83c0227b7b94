"""The grouped Triton GEMM behind ``lowbit::grouped_linear`` (MoE experts): numerics under the
interpreter against a float64 per-expert matmul, the tile map, the sm_90 compile, the lowering."""
from __future__ import annotations

import pytest
import torch

from lowbit_compiler import zoo
from lowbit_compiler.backends import _triton_adapter, grouped_kernel
from lowbit_compiler.formats import WeightFormat, dequantize, quantize, sqnr_db
from lowbit_compiler.passes.quantize.common import stack_experts
from tests.helpers import Recorder

# rows per expert: a full tile and a partial one, an expert without rows, 3 rows past offs[-1]
COUNTS = [5, 0, 19, 2]


def _case(fmt: str, k: int = 256, n: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(len(COUNTS), n, k, generator=g) * 0.05
    qws = [quantize(w[i], WeightFormat.parse(fmt)) for i in range(len(COUNTS))]
    x = torch.randn(sum(COUNTS) + 3, k, generator=g)
    offs = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    ref = torch.zeros(x.shape[0], n, dtype=torch.float64)
    start = 0
    for e, end in enumerate(offs.tolist()):
        ref[start:end] = x[start:end].double() @ dequantize(qws[e]).double().t()
        start = end
    return x, offs, qws, stack_experts(qws), ref


def test_tile_map_covers_every_routed_row_once():
    offs = torch.tensor([5, 5, 24, 26, 26], dtype=torch.int32)
    experts, starts, ends = grouped_kernel.tile_map(offs, 29, block_m=16)
    assert experts.shape[0] == 2 + 5  # cdiv(29, 16) + E: a static bound
    covered = []
    for e, s, t in zip(experts.tolist(), starts.tolist(), ends.tolist()):
        rows = list(range(s, min(s + 16, t)))
        covered += rows
        first = int(offs[e - 1]) if e else 0
        assert all(first <= r < int(offs[e]) for r in rows), (e, s, t)  # rows of that tile's expert only
    assert sorted(covered) == list(range(26))  # rows past offs[-1] belong to no tile


@pytest.mark.parametrize("fmt", ["int8", "int4_g128_asym", "int4_g32_sym", "int4_g64_asym"])
def test_the_kernel_matches_a_float64_per_expert_matmul(fmt):
    x, offs, qws, st, ref = _case(fmt)
    out = grouped_kernel.launch(x, offs, st.qweight, st.scale, st.zero, fmt, 256)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert sqnr_db(ref, out.double()) > 120  # fp32 products (ieee dots under the interpreter)
    assert torch.equal(out[-3:], torch.zeros(3, 40))
    # 16-bit activations: loaded in their dtype, computed in fp32, stored in it
    for dtype, floor in ((torch.float16, 60), (torch.bfloat16, 45)):
        low = grouped_kernel.launch(x.to(dtype), offs, st.qweight, st.scale, st.zero, fmt, 256)
        assert low.dtype == dtype and sqnr_db(ref, low.double()) > floor, dtype


def test_padded_k_and_unsupported_calls_say_why():
    x, offs, qws, st, ref = _case("int4_g128_asym", k=200)  # K padded to 256 in the codes
    out = grouped_kernel.launch(x, offs, st.qweight, st.scale, st.zero, "int4_g128_asym", 200)
    assert sqnr_db(ref, out.double()) > 120
    assert "int8 activations has no Triton kernel" in grouped_kernel.unsupported_reason("int8", "int8", torch.float32)
    assert "takes int8 and int4" in grouped_kernel.unsupported_reason("nf4_g64", None, torch.float32)
    assert grouped_kernel.unsupported_reason("int4_g128_sym", None, torch.bfloat16) is None


@pytest.mark.heavy
def test_the_kernel_compiles_for_sm90_without_spills():
    """The GPU variants (fp16 / bf16 tensor-core dots, TF32 for fp32) compiled ahead of time.
    Measured: int4 g128 fp16 214 registers, int8 bf16 116, int4 g64 tf32 182, no spills."""
    jobs = [grouped_kernel.aot_job("int4_g128_asym", torch.float16), grouped_kernel.aot_job("int8", torch.bfloat16),
            grouped_kernel.aot_job("int4_g64_asym", torch.float32)]
    for job, report in zip(jobs, _triton_adapter.compile_for_gpu(jobs)):
        assert report["arch"] == "sm_90" and 0 < report["registers"] <= 255, report
        assert report["spill_bytes"] == 0, (job["constexprs"], report)


@pytest.mark.slow  # about 35 s on one core: the whole model interpreted
def test_mixtral_experts_lower_to_the_grouped_kernel():
    model, inputs = zoo.build("mixtral")
    cpu = Recorder(recipe="w4a16", target="cpu", cpu_compute_dtype="activation")
    gpu = Recorder(recipe="w4a16", target="triton", strict=True)
    with torch.no_grad():
        ref = torch.compile(model, backend=cpu)(**inputs).logits
        torch.compiler.reset()
        out = torch.compile(model, backend=gpu)(**inputs).logits
    kernels = gpu.summaries[0]["kernels"]
    assert sorted(v for v in kernels.values() if "grouped" in v) == ["triton:grouped_int4_g128_asym"] * 4
    assert gpu.summaries[0]["fallbacks"] == {}
    assert sqnr_db(ref, out) > 100  # fp32 CPU kernels vs fp32 interpreted kernels


def test_quantized_activations_under_triton_run_the_cpu_op_and_say_so():
    model, inputs = zoo.build("qwen3_moe")
    rec = Recorder(recipe="w8a8", target="triton")
    with torch.no_grad():
        ref = model(**inputs).logits
        out = torch.compile(model, backend=rec)(**inputs).logits
    summary = rec.summaries[0]
    reason = "lowbit::grouped_linear with int8 activations has no Triton kernel yet (weight-only int8/int4 experts do)"
    assert summary["fallbacks"] == {reason: 4}
    assert sum(v == "cpu-op" for v in summary["kernels"].values()) == 4
    assert sqnr_db(ref, out) > 30
