"""The 2:4 Triton kernels (``backends/sparse_kernel.py``) at prefill shapes (M > 16: the dense
tile expanded in registers, ``tl.dot``) and decode shapes, under the interpreter (TRITON_INTERPRET=1,
conftest) against the float64 reference, the bytes they load against the cost model
(``sparse_kernel.traffic``), and compiled for sm_90 (registers, no spills)."""
from __future__ import annotations

import pytest
import torch

from lowbit_compiler.backends import _triton_adapter, cpu_kernels, sparse_kernel
from lowbit_compiler.formats import WeightFormat, quantize
from lowbit_compiler.ops import wo_linear_reference

FORMATS = ["s24+int8", "s24+int4_g64_asym", "s24+int4_g32_sym"]


def _case(fmt, n=72, k=256, rows=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    qw = quantize(torch.randn(n, k, generator=g), WeightFormat.parse(fmt))
    return qw, torch.randn(rows, k, generator=g), torch.randn(n, generator=g)


@pytest.mark.parametrize("fmt", FORMATS)
def test_prefill_kernel_matches_float64(fmt):
    # N = 72: a partial block of output channels; K = 256 with BLOCK_K 64 (int4 g32: BLOCK_K 64 = 2 x 32
    # kept values per scale group); 40 and 67 rows: partial row blocks (BLOCK_M 64)
    for rows in (40, 67):
        qw, x, bias = _case(fmt, rows=rows)
        ref = wo_linear_reference(x.double(), qw.qweight, qw.scale, qw.zero, bias.double(), fmt, 256)
        out = sparse_kernel.launch(x, qw.qweight, qw.scale, qw.zero, bias, fmt, 256)
        assert out.dtype == torch.float32 and out.shape == (rows, 72)
        assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (fmt, rows)


def test_prefill_kernel_in_bf16():
    """bf16 activations and output (the interpreter multiplies in fp32, its bf16 arithmetic being
    wrong; on a GPU the tile goes to bf16 tensor cores): within bf16 rounding of float64."""
    fmt = "s24+int8"
    qw, x, _ = _case(fmt, rows=24)
    xb = x.to(torch.bfloat16)
    ref = wo_linear_reference(xb.double(), qw.qweight, qw.scale, qw.zero, None, fmt, 256)
    out = sparse_kernel.launch(xb, qw.qweight, qw.scale, qw.zero, None, fmt, 256)
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_bytes_loaded_equal_the_cost_model(fmt, rows):
    qw, x, bias = _case(fmt, rows=rows)
    with _triton_adapter.count_traffic() as counts:
        sparse_kernel.launch(x, qw.qweight, qw.scale, qw.zero, bias, fmt, 256)
    model = sparse_kernel.traffic(fmt, rows, 72, 256, x_itemsize=4, bias=True)
    assert counts["read"] == model["read"] and counts["written"] == model["written"], (counts, model)
    if rows > sparse_kernel.MAX_ROWS:  # prefill: the weight is read once per block of rows, in its compressed size
        f = WeightFormat.parse(fmt)
        codes = 72 * 128 * f.inner.bits // 8
        assert model["weight"] < 72 * 256 * f.inner.bits // 8 + 72 * 256 // 4 + 72 * 4 * 3
        assert model["weight"] >= codes + 72 * 256 // 8


def test_unsupported_shapes_and_formats_say_why():
    assert "2:4 with int8 or int4" in sparse_kernel.unsupported_reason("s48+int4_g128_sym", 32)
    assert "multiple of 16" in sparse_kernel.unsupported_reason("s24+int8", 32, 200)
    assert sparse_kernel.unsupported_reason("s24+int4_g128_asym", 512, 4096) is None


@pytest.mark.slow  # compiles in a child process (~20 s)
def test_prefill_kernel_compiles_for_sm90_without_spills():
    """Measured: 185 (int8, fp16) and 191 (int4 g128, bf16) registers, 8 warps, no spills."""
    jobs = [sparse_kernel.aot_job("s24+int8", torch.float16, rows=512),
            sparse_kernel.aot_job("s24+int4_g128_asym", torch.bfloat16, rows=512),
            sparse_kernel.aot_job("s24+int4_g64_sym", torch.float16, rows=64)]
    for job, report in zip(jobs, _triton_adapter.compile_for_gpu(jobs)):
        assert job["name"] == "sparse24_matmul"
        assert report["arch"] == "sm_90" and 0 < report["registers"] <= 255, report
        assert report["spill_bytes"] == 0, (job["constexprs"], report)


@pytest.mark.parametrize("fmt", ["s24+int8", pytest.param("s24+int4_g32_asym", marks=pytest.mark.slow)])
@pytest.mark.heavy
def test_triton_target_lowers_2of4_linears_to_the_kernels_for_prefill_and_decode(fmt):
    """A tiny Llama pruned 2:4 and stored compressed, compiled for ``target="triton"`` (strict: no
    fallback): every linear runs ``lowbit::sparse24_linear_triton`` (no float reference), and the
    prefill (24 rows, the matmul kernel) and a decode row (the GEMV) match the CPU flow."""
    from lowbit_compiler import Recipe, compress
    from tests.conftest import make_model
    from tests.helpers import Recorder

    recipe = Recipe(f"prune-{fmt}", ("canonicalize", "prune", "insert_weight_quant"), WeightFormat.parse(fmt))
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    rec = Recorder(recipe=recipe, target="triton", strict=True)
    model = torch.compile(make_model("llama"), backend=rec)
    cpu = compress(make_model("llama"), recipe)
    # the CPU flow in float32 compute (its prefill runs the dense kernels over the decompressed copy,
    # in bf16 by default: cpu_kernels.eager_compute_dtype)
    with torch.no_grad(), cpu_kernels.eager_compute_dtype("activation"):
        out = model(ids, use_cache=True)
        ref = cpu(ids, use_cache=True)
        step = model(ids[:, :1] + 1, past_key_values=out.past_key_values, use_cache=True).logits
        step_ref = cpu(ids[:, :1] + 1, past_key_values=ref.past_key_values, use_cache=True).logits
    for summary in rec.summaries:
        labels = [k for k in summary["kernels"].values() if "sparse24" in k]
        assert len(labels) == 15 and summary["fallbacks"] == {}, summary["kernels"]  # 7 per block x 2 + lm_head
    for y, y_ref in ((out.logits, ref.logits), (step, step_ref)):
        assert (y.double() - y_ref.double()).abs().max() <= 1e-3 * y_ref.abs().max()
