"""The sparse CPU kernels: the activation-sparse K-major GEMV (``backends/cpu_sparse.py``) and the
2:4 + int8 kernel (``cpu_codegen``), each ISA build against a float64 reference, exact skipping
of zeroed inputs, more rows going to the dense kernels, and the dispatch by measurement (with a
fake clock: real timings on a shared machine would make the decisions vary)."""
from __future__ import annotations

import ctypes
import logging

import pytest
import torch

from lowbit_compiler.backends import cpu_codegen, cpu_kernels, cpu_sparse
from lowbit_compiler.formats import WeightFormat, dequantize, quantize
from lowbit_compiler.ops import sparse_input_linear, sparse_input_linear_reference, wo_linear_reference

pytestmark = pytest.mark.skipif(cpu_sparse.kernel("int8") is None,
                                reason=f"no C compiler: {cpu_codegen._disabled_reason}")


def _row(k: int, gen: torch.Generator, sparsity: float = 0.5) -> torch.Tensor:
    x = torch.randn(k, generator=gen)
    return torch.where(x.abs() >= torch.quantile(x.abs(), sparsity), x, torch.zeros(()))


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield lambda t: torch.set_num_threads(t)
    torch.set_num_threads(before)


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
@pytest.mark.parametrize("fmt", ["int8", "int4_g128_asym", "int4_g64_sym", "int4_g32_asym"])
def test_activation_sparse_kernel_matches_float64(isa, fmt, threads):
    gen = torch.Generator().manual_seed(0)
    # N = 200: padded to 256 in the K-major copy; N = 128 with 2 threads: one tile, the kept inputs
    # split over the threads (partial sums); N = 1100 (9 tiles) and 2100 with 2 threads (8 + 9 tiles):
    # int4 tasks of >= STREAM_TILES tiles read row by row
    assert (1100 + 127) // 128 >= cpu_sparse.STREAM_TILES and (2100 + 127) // 128 // 2 >= cpu_sparse.STREAM_TILES
    for (n, k), t in (((200, 256), 1), ((128, 512), 2), ((1100, 256), 1), ((2100, 384), 2)):
        threads(t)
        qw = quantize(torch.randn(n, k, generator=gen), WeightFormat.parse(fmt))
        w = cpu_sparse.kmajor_cpu(qw.qweight, qw.scale, qw.zero, fmt, k)
        x, bias = _row(k, gen), torch.randn(n, generator=gen)
        x[: k // 4] = 0  # whole groups zeroed: skipped
        y = cpu_sparse.run(x, w, bias, fmt, k, isa)
        ref = x.double() @ dequantize(qw).double()[:, :k].T + bias.double()
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (isa, fmt, n, k, t)


@pytest.mark.parametrize("fmt, n", [("int8", 256), ("int4_g128_asym", 256), ("int4_g128_asym", 1100)])
def test_zeroed_inputs_rows_are_never_read(fmt, n):
    """Garbage in the K-major rows of zeroed inputs changes nothing (bit for bit); no kept input
    gives exactly the bias; a NaN input that is kept reaches the output (N = 1100: int4 read row by
    row)."""
    gen = torch.Generator().manual_seed(1)
    k = 256
    qw = quantize(torch.randn(n, k, generator=gen), WeightFormat.parse(fmt))
    w = cpu_sparse.kmajor_cpu(qw.qweight, qw.scale, qw.zero, fmt, k)
    x, bias = _row(k, gen), torch.randn(n, generator=gen)
    before = cpu_sparse.run(x, w, bias, fmt, k)
    zeroed = (x == 0).nonzero().flatten()
    w.codes[zeroed] = torch.randint(0, 127, (len(zeroed), w.codes.shape[1]), generator=gen).to(w.codes.dtype)
    assert torch.equal(cpu_sparse.run(x, w, bias, fmt, k), before)
    assert torch.equal(cpu_sparse.run(torch.zeros(k), w, bias, fmt, k), bias)
    x[int((x != 0).nonzero()[0])] = float("nan")
    assert bool(cpu_sparse.run(x, w, bias, fmt, k).isnan().all())


def test_the_kernel_declines_rows_that_keep_more_than_max_nnz():
    gen = torch.Generator().manual_seed(2)
    qw = quantize(torch.randn(128, 256, generator=gen), WeightFormat.parse("int8"))
    w = cpu_sparse.kmajor_cpu(qw.qweight, qw.scale, None, "int8", 256)
    x = _row(256, gen)
    kept = int((x != 0).sum())
    assert cpu_sparse.run(x, w, None, "int8", kept - 1) is None
    assert cpu_sparse.run(x, w, None, "int8", kept) is not None


def test_more_rows_run_the_dense_kernels():
    gen = torch.Generator().manual_seed(3)
    fmt, n, k = "int4_g128_asym", 256, 256
    qw = quantize(torch.randn(n, k, generator=gen), WeightFormat.parse(fmt))
    x, thr = torch.randn(3, k, generator=gen), torch.tensor([0.67])
    assert cpu_sparse.linear(x, qw.qweight, qw.scale, qw.zero, None, fmt, k) is None
    assert "3 rows" in cpu_sparse.unsupported_reason(x, qw.scale, fmt, k)
    before = sum(cpu_sparse.dispatch_counter.values())
    y = sparse_input_linear(x, thr, None, qw.qweight, qw.scale, qw.zero, None, fmt, k)
    assert sum(cpu_sparse.dispatch_counter.values()) == before  # the sparse kernel did not run
    xs = torch.where(x.abs() >= 0.67, x, torch.zeros(()))
    assert torch.equal(y, cpu_codegen.linear(xs, qw.qweight, qw.scale, qw.zero, None, fmt, k))
    ref = sparse_input_linear_reference(x.double(), thr, None, qw.qweight, qw.scale, qw.zero, None, fmt, k)
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


class FakeClock(dict):
    """Seconds per call of each contender; ``calls``: how many measurements ran."""

    calls = 0


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Measured dispatch, a private plan file and memory, and a fake clock: ``times[name]`` is
    what each contender of a measurement takes."""
    monkeypatch.setenv(cpu_sparse.DISPATCH_ENV, "measure")
    monkeypatch.setattr(cpu_sparse, "_dispatch_file", lambda: tmp_path / "plans.json")
    monkeypatch.setattr(cpu_sparse, "_PLANS", {})
    times = FakeClock()

    def fastest(calls, repeats=cpu_sparse.REPEATS, cold=None):
        times.calls += 1
        assert set(cold) == set(calls)  # every contender's weights are evicted before its timing
        for call in calls.values():
            call()  # the real calls still run (and must work)
        return {name: times[name] for name in calls}

    monkeypatch.setattr(cpu_sparse, "_fastest", fastest)
    return times


def test_measured_crossover_decides_per_call_and_is_cached_on_disk(measured, caplog):
    gen = torch.Generator().manual_seed(4)
    fmt, n, k = "int8", 256, 512
    qw = quantize(torch.randn(n, k, generator=gen), WeightFormat.parse(fmt))
    # sparse: 0.1 ms + 0.9 ms per all-kept row (linear in the kept count); dense 0.6 ms
    measured.update(dense=0.6e-3, sparse_all=1.0e-3)
    gen_q = torch.Generator().manual_seed(0)  # the quarter-kept row measure() draws
    torch.randn(k, generator=gen_q)
    nq = int((torch.rand(k, generator=gen_q) < 0.25).sum())
    measured["sparse_quarter"] = 0.1e-3 + 0.9e-3 * nq / k
    entry = cpu_sparse.plan(qw.qweight, qw.scale, None, fmt, k)
    expected = (0.6e-3 / cpu_sparse.MARGIN - 0.1e-3) / (0.9e-3 / k)
    assert abs(entry["max_nnz"] - expected) <= 1 and 0 < entry["max_nnz"] < k
    assert "at 50% sparsity about 1.09x dense" in cpu_sparse.describe(entry, k, 0.5)
    limit = entry["max_nnz"]

    few, many = torch.zeros(1, k), torch.zeros(1, k)
    few[0, :limit] = torch.randn(limit, generator=gen)
    many[0, : limit + 1] = torch.randn(limit + 1, generator=gen)
    counts = dict(cpu_sparse.dispatch_counter)
    with caplog.at_level(logging.INFO, logger="lowbit_compiler"):
        assert cpu_sparse.linear(few, qw.qweight, qw.scale, None, None, fmt, k) is not None
        assert cpu_sparse.linear(many, qw.qweight, qw.scale, None, None, fmt, k) is None  # dense runs
    assert cpu_sparse.dispatch_counter[(fmt, "sparse")] == counts.get((fmt, "sparse"), 0) + 1
    assert cpu_sparse.dispatch_counter[(fmt, "dense")] == counts.get((fmt, "dense"), 0) + 1
    assert f"more than {limit} of {k} inputs kept" in caplog.text
    y = sparse_input_linear(many, torch.tensor([0.0]), None, qw.qweight, qw.scale, None, None, fmt, k)
    assert torch.equal(y, cpu_codegen.linear(many, qw.qweight, qw.scale, None, None, fmt, k))

    cpu_sparse._PLANS.clear()  # a new process: the plan comes from disk, nothing is timed again
    assert cpu_sparse.plan(qw.qweight, qw.scale, None, fmt, k) == entry and measured.calls == 1


def test_dense_is_chosen_everywhere_when_the_sparse_kernel_never_wins(measured):
    gen = torch.Generator().manual_seed(5)
    fmt, k = "int4_g128_asym", 256
    qw = quantize(torch.randn(128, k, generator=gen), WeightFormat.parse(fmt))
    measured.update(dense=0.1e-3, sparse_all=0.5e-3, sparse_quarter=0.2e-3)
    assert cpu_sparse.plan(qw.qweight, qw.scale, qw.zero, fmt, k)["max_nnz"] == -1
    x = torch.zeros(1, k)
    x[0, 0] = 1.0
    assert cpu_sparse.linear(x, qw.qweight, qw.scale, qw.zero, None, fmt, k) is None


@pytest.mark.parametrize("faster", [True, False])
def test_nm_kernel_dispatch_by_measurement(measured, faster):
    """2:4 + int8: the compressed kernel when measured faster, else the dense int8 kernel over the
    decompressed copy; both against the float64 reference."""
    gen = torch.Generator().manual_seed(6)
    fmt, n, k = "s24+int8", 64, 256
    qw = quantize(torch.randn(n, k, generator=gen), WeightFormat.parse(fmt))
    measured.update(dense=1e-3, sparse=0.5e-3 if faster else 2e-3)
    x, bias = torch.randn(1, k, generator=gen), torch.randn(n, generator=gen)
    before = dict(cpu_sparse.dispatch_counter)
    y = cpu_kernels.wo_linear_fast(x, qw.qweight, qw.scale, None, bias, fmt, k)
    ran = "sparse" if faster else "dense"
    assert cpu_sparse.dispatch_counter[(fmt, ran)] == before.get((fmt, ran), 0) + 1
    assert cpu_cache_holds_dense_copy(qw.qweight) == (not faster)
    ref = wo_linear_reference(x.double(), qw.qweight, qw.scale, None, bias.double(), fmt, k)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def cpu_cache_holds_dense_copy(qweight: torch.Tensor) -> bool:
    return cpu_sparse.DENSE_CACHE.holds(qweight)


@pytest.mark.parametrize("build", ["native", "avx2", "portable"])
def test_2of4_int8_kernel_builds_match_float64(build):
    """The 2:4 + int8 kernel's AVX-512 (vpermt2ps), AVX2 (table + permutes) and portable paths;
    K = 272 leaves a tail of kept values past the vector steps."""
    fmt = "s24+int8"
    flags = {"native": cpu_codegen.FLAGS, "avx2": cpu_codegen.FLAGS + ("-mno-avx512f",),
             "portable": cpu_codegen.PORTABLE_FLAGS}[build]
    fn = cpu_codegen.build(cpu_codegen.kernel_name(fmt), cpu_codegen.source(fmt),
                           [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 3 + [ctypes.c_int], flags=flags)
    gen = torch.Generator().manual_seed(7)
    n, k = 40, 272
    qw = quantize(torch.randn(n, k, generator=gen), WeightFormat.parse(fmt))
    for rows in (1, 3, 16):
        x = torch.randn(rows, k, generator=gen)
        y = torch.empty(rows, n)
        fn(x.data_ptr(), qw.qweight.data_ptr(), qw.scale.view(torch.int16).data_ptr(), None, None, y.data_ptr(),
           torch.empty(1).data_ptr(), rows, n, k, 1)
        ref = x.double() @ dequantize(qw).double().T
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sparse_wins", [True, pytest.param(False, marks=pytest.mark.slow)])  # a compress each
def test_layer_records_say_which_kernel_the_target_sparsity_gets(measured, sparse_wins):
    from lowbit_compiler import compress
    from tests.conftest import make_model

    calibration = [torch.randint(3, 256, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    measured.update(dense=1e-3, sparse_all=0.8e-3 if sparse_wins else 3e-3,
                    sparse_quarter=0.3e-3 if sparse_wins else 1.5e-3)
    model = compress(make_model("llama"), "teal-50+w8a16", calibration=calibration, progress=False)
    record = model.lowbit_summary["layers"]["model.layers.0.mlp.down_proj"]["sparse_kernel"]
    expected = "activation-sparse kernel" if sparse_wins else "dense kernel"
    assert record.startswith(f"{expected} at the target 50% sparsity (measured: dense 1.0000 ms"), record


def test_evicting_a_weight_keeps_its_values():
    """The dispatch times kernels on weights evicted from the caches (clflush): data unchanged."""
    t = torch.randn(4096)
    before = t.clone()
    cpu_sparse._evict([t, None])
    assert torch.equal(t, before)


def test_an_unknown_dispatch_mode_is_an_error(monkeypatch):
    monkeypatch.setenv(cpu_sparse.DISPATCH_ENV, "fastest")
    qw = quantize(torch.randn(128, 128), WeightFormat.parse("int8"))
    with pytest.raises(ValueError, match="LOWBIT_SPARSE_DISPATCH='fastest'"):
        cpu_sparse.linear(torch.randn(1, 128), qw.qweight, qw.scale, None, None, "int8", 128)
