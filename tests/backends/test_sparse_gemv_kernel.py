"""The Triton activation-sparse decode GEMV under the interpreter: against the float reference,
bytes read equal to its cost model and following the sparsity, and compiled for sm_90 (registers, spills)."""
from __future__ import annotations

import pytest
import torch

from lowbit_compiler.backends import _triton_adapter, cpu_sparse, sparse_gemv_kernel
from lowbit_compiler.formats import WeightFormat, quantize
from lowbit_compiler.ops import sparse_input_linear_reference


def _case(fmt, n=200, k=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qw = quantize(torch.randn(n, k, generator=gen), WeightFormat.parse(fmt))
    return qw, torch.randn(1, k, generator=gen), torch.randn(n, generator=gen)


@pytest.mark.parametrize("fmt", ["int8", "int4_g64_asym", "int4_g128_sym"])
def test_the_kernel_matches_the_float_reference(fmt):
    qw, x, bias = _case(fmt, n=600)  # two column tiles of the K-major int4 layout, the second partial
    thr = torch.tensor([0.67])
    xs = torch.ops.lowbit.act_sparsify(x, thr)
    w = cpu_sparse.kmajor(qw.qweight, qw.scale, qw.zero, fmt, x.shape[-1])
    y = sparse_gemv_kernel.launch(xs, w, bias, fmt)
    ref = sparse_input_linear_reference(x.double(), thr, None, qw.qweight, qw.scale, qw.zero, bias.double(), fmt,
                                        x.shape[-1])
    assert (y.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("fmt", ["int8", "int4_g64_asym", "int4_g128_sym"])
def test_bytes_loaded_equal_the_cost_model_and_follow_the_sparsity(fmt):
    """The interpreter's count of loaded bytes equals ``traffic`` at every sparsity (nothing else
    is read), and the code lanes are exactly the kept inputs' rows: zeroed inputs' rows never load."""
    n, k = 200, 256
    qw, x, _ = _case(fmt, n=n, k=k)
    w = cpu_sparse.kmajor(qw.qweight, qw.scale, qw.zero, fmt, k)
    codes = {}
    for thr in (0.0, 0.67, 1.5):
        xs = torch.ops.lowbit.act_sparsify(x, torch.tensor([thr]))
        kept = int((xs != 0).sum())
        with _triton_adapter.count_traffic() as counts:
            sparse_gemv_kernel.launch(xs, w, None, fmt)
        model = sparse_gemv_kernel.traffic(fmt, n, k, kept)
        assert counts["read"] == model["read"], (thr, counts, model)
        codes[thr] = (model["codes"], kept)
    assert codes[0.0] == (k * n, k)  # dense: every code lane once
    assert codes[0.67][0] == codes[0.67][1] * n and 0.35 < codes[0.67][1] / k < 0.65  # about half the rows
    assert codes[1.5][1] < codes[0.67][1]
    dense, half = (sparse_gemv_kernel.traffic(fmt, n, k, kept)["weight"] for kept in (k, k // 2))
    assert dense - half == (k // 2) * n * WeightFormat.parse(fmt).bits // 8  # the weight bytes fall with the rows


@pytest.mark.slow  # the ahead-of-time compile runs in a child process (~10-25 s)
def test_the_kernel_compiles_for_sm90_without_spills():
    """Measured: int8 (BLOCK_K 64) 72 registers, int4 g128 (BLOCK_K 128) 152, BLOCK_N 64, 4 warps, no spills."""
    jobs = [sparse_gemv_kernel.aot_job(fmt) for fmt in ("int8", "int4_g128_asym")]
    for job, report in zip(jobs, _triton_adapter.compile_for_gpu(jobs)):
        assert report["arch"] == "sm_90" and report["spill_bytes"] == 0, (job["constexprs"], report)
        assert 0 < report["registers"] <= 255, report


@pytest.mark.slow  # about 35 s on one core: the decode graph interpreted
def test_decode_row_lowers_to_the_triton_kernel_and_matches_compress():
    from lowbit_compiler import compress
    from lowbit_compiler.backends.cpu_kernels import eager_compute_dtype
    from tests.conftest import make_model
    from tests.helpers import Recorder, count

    calibration = [torch.randint(3, 256, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    recipe = "teal-50+w8a16"
    offline = compress(make_model("llama"), recipe, calibration=calibration, progress=False)
    rec = Recorder(recipe=recipe, calibration=calibration, progress=False, target="triton")
    compiled = torch.compile(make_model("llama"), backend=rec)
    token = calibration[1][:, :1]
    with torch.no_grad():
        compiled(calibration[0])  # the calibration-shaped graph computes the thresholds
        y = compiled(token).logits  # one row: every fused linear runs the Triton GEMV
        with eager_compute_dtype("activation"):  # the compressed model's dense head in fp32, as the kernels
            ref = offline(token).logits
    assert count(rec.graphs[-1], "sparse_input_linear_triton.default") == 14
    assert (y - ref).abs().max() <= 1e-3 * ref.abs().max()
