"""The sparse CPU kernels: the activation-sparse K-major GEMV (``backends/cpu_sparse.py``) and the
2:4 + int8 kernel (``cpu_codegen``), each ISA build against a float64 reference, exact skipping
of zeroed inputs, more rows going to the dense kernels, and the dispatch by measurement (with a
fake clock: real timings on a shared machine would make the decisions vary)."""
from __future__ import annotations

import collections
import copy
import ctypes
import logging

import pytest
import torch

from lowbit_compiler import ops
from lowbit_compiler.backends import cpu_codegen, cpu_dispatch, cpu_kernels, cpu_sparse
from lowbit_compiler.formats import QuantizedWeight, WeightFormat, dequantize, quantize, sqnr_db
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
    # split over the threads (partial sums); N = 1100 (9 tiles), one thread: int4 tasks of >=
    # STREAM_TILES tiles read row by row; 2100 with 2 threads: each thread half the kept inputs (int8) or
    # groups (int4) over all 17 tiles; K = 128 with 2 threads: int4 g128 has one group, so the threads
    # split the columns (3 tiles) instead
    assert (1100 + 127) // 128 >= cpu_sparse.STREAM_TILES and (2100 + 127) // 128 // 2 >= cpu_sparse.STREAM_TILES
    assert cpu_sparse.ksplit_for(2176, 2) == cpu_sparse.ksplit_for(2176, 2, 3) == 2  # int8; int4, 3 groups
    assert cpu_sparse.ksplit_for(384, 2, 1) == 1 and cpu_sparse.ksplit_for(128, 2, 1) == 2  # columns; one tile
    for (n, k), t in (((200, 256), 1), ((128, 512), 2), ((1100, 256), 1), ((2100, 384), 2), ((300, 128), 2)):
        threads(t)
        qw = quantize(torch.randn(n, k, generator=gen), WeightFormat.parse(fmt))
        w = cpu_sparse.kmajor_cpu(qw.qweight, qw.scale, qw.zero, fmt, k)
        x, bias = _row(k, gen), torch.randn(n, generator=gen)
        x[: k // 4] = 0  # whole groups zeroed: skipped
        y = cpu_sparse.run(x, w, bias, fmt, k, isa)
        ref = x.double() @ dequantize(qw).double()[:, :k].T + bias.double()
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (isa, fmt, n, k, t)


@pytest.mark.parametrize("isa", ["native", "portable"])
@pytest.mark.parametrize("fmt", ["int8", "int4_g128_asym"])
def test_the_kernel_epilogue_silu_mul_and_residual(isa, fmt, threads):
    """The epilogue inside the C call: a stacked gate/up weight gives silu(gate) * up, one weight
    plus a residual its sum; the RMSNorm prologue thresholds the normalised row; with kept inputs split over two threads (partial sums reduced first,
    N = 2 x 64: one tile) and without; against float64."""
    gen = torch.Generator().manual_seed(3)
    k = 256
    for n1, t in ((64, 2), (300, 1)):
        threads(t)
        qw = quantize(torch.randn(2 * n1, k, generator=gen), WeightFormat.parse(fmt))
        w = cpu_sparse.kmajor_cpu(qw.qweight, qw.scale, qw.zero, fmt, k)
        x, bias = _row(k, gen), torch.randn(2 * n1, generator=gen)
        full = x.double() @ dequantize(qw).double()[:, :k].T + bias.double()
        y = cpu_sparse.run(x, w, bias, fmt, k, isa, lead=(1,), silu_first=n1)
        ref = torch.nn.functional.silu(full[:n1]) * full[n1:]
        assert y.shape == (1, n1) and (y[0].double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (fmt, n1, t)
        residual = torch.randn(1, 2 * n1, generator=gen)
        y = cpu_sparse.run(x, w, bias, fmt, k, isa, lead=(1,), residual=residual)
        ref = full + residual[0].double()
        assert (y[0].double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (fmt, n1, t)
        # the RMSNorm prologue: the threshold applies to the normalised row (written to xs_out)
        raw, nw = torch.randn(k, generator=gen) * 3, torch.rand(k, generator=gen) + 0.5
        xs, thr = torch.empty(k), torch.tensor([0.6])
        y = cpu_sparse.run(raw, w, bias, fmt, k, isa, lead=(1,), threshold=thr, xs_out=xs, norm_weight=nw, eps=1e-6)
        normed = torch.nn.functional.rms_norm(raw.double(), (k,), nw.double(), 1e-6)
        kept = normed.abs() >= 0.6
        assert 0.2 * k < int(kept.sum()) < 0.8 * k
        assert torch.equal(xs != 0, kept) and (xs.double() - normed * kept).abs().max() <= 1e-6 * normed.abs().max()
        ref = (normed * kept) @ dequantize(qw).double()[:, :k].T + bias.double()
        assert (y[0].double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (fmt, n1, t)


@pytest.mark.parametrize("fmt, n", [("int8", 256), ("int4_g128_asym", 256), ("int4_g128_asym", 1100)])
def test_zeroed_inputs_rows_are_never_read(fmt, n, threads):
    """Garbage in the K-major rows of zeroed inputs changes nothing (bit for bit); no kept input
    gives exactly the bias; a NaN input that is kept reaches the output (N = 1100, one thread: int4
    read row by row)."""
    threads(1)
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
    monkeypatch.setattr(cpu_sparse, "_TRIALS", {})
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


@pytest.mark.parametrize("sparse_ms, faster", [(0.5, True), (1.03, True), (1.1, False)])
def test_nm_kernel_dispatch_by_measurement(measured, sparse_ms, faster):
    """2:4 + int8: the compressed kernel unless the dense int8 kernel over the decompressed copy
    (which costs 1 byte per weight more) is measured MARGIN (1.05x) faster: a near tie keeps the
    compressed kernel; both against the float64 reference."""
    gen = torch.Generator().manual_seed(6)
    fmt, n, k = "s24+int8", 64, 256
    qw = quantize(torch.randn(n, k, generator=gen), WeightFormat.parse(fmt))
    measured.update(dense=1e-3, sparse=sparse_ms * 1e-3)
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
@pytest.mark.parametrize("k", [272, 384])
def test_2of4_int8_kernel_builds_match_float64(build, k):
    """The 2:4 + int8 kernel's paths: with AVX-512 VNNI + VBMI (K a multiple of 128: 384 ends in a
    block of 128 columns) the activations of the kept codes' columns gathered from x's three int8
    parts, one row two channels at a time (N odd: the last pair is one channel twice); the float paths for
    K = 272 (a tail of kept values past the vector steps) and in the AVX2 (table + permutes) and
    portable builds; float64 reference (>= 110 dB)."""
    fmt = "s24+int8"
    flags = {"native": cpu_codegen.FLAGS, "avx2": cpu_codegen.FLAGS + ("-mno-avx512f",),
             "portable": cpu_codegen.PORTABLE_FLAGS}[build]
    fn = cpu_codegen.build(cpu_codegen.kernel_name(fmt), cpu_codegen.source(fmt),
                           [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 3 + [ctypes.c_int], flags=flags)
    gen = torch.Generator().manual_seed(7)
    n = 41
    qw = quantize(torch.randn(n, k, generator=gen), WeightFormat.parse(fmt))
    for rows in (1, 3, 16):
        x = torch.randn(rows, k, generator=gen)
        y = torch.empty(rows, n)
        scratch = torch.empty(rows * ((3 * k) // 4 + k // 256 + 2))  # Bound's size: x's int8 parts, block scales, sums
        fn(x.data_ptr(), qw.qweight.data_ptr(), qw.scale.view(torch.int16).data_ptr(), None, None, y.data_ptr(),
           scratch.data_ptr(), rows, n, k, 1)
        ref = x.double() @ dequantize(qw).double().T
        assert sqnr_db(ref, y.double()) >= 110.0


def test_2of4_weight_out_of_column_order_or_with_a_shared_position(caplog):
    """The storage keeps a group's two kept values in column order at distinct positions. A stream
    out of that order (a hand-edited checkpoint: one group's two swapped, the same matrix) still runs
    the N:M kernel, which gathers each code's own column, and gives the matrix's numbers (so does its
    dense copy: ``to_dense`` scatters by index). Two kept values at one position, which the kernel
    would add where the format's dequantization keeps one, are refused at binding (logged): the
    dense kernel runs over the decompressed copy, which follows the format's dequantization."""
    fmt, n, k = "s24+int8", 8, 256
    qw = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(3)), WeightFormat.parse(fmt))
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(4))
    swapped = qw.qweight.clone()
    b = swapped[2, k // 2]  # kept values 0 and 1 of row 2: group 0's positions p0 | p1 << 2 in the low nibble
    swapped[2, k // 2] = (b & 0xF0) | ((b & 3) << 2) | ((b >> 2) & 3)
    vals = swapped[2, :2].clone()
    swapped[2, 0], swapped[2, 1] = vals[1], vals[0]
    assert torch.equal(dequantize(QuantizedWeight(qw.format, swapped, qw.scale, None, k)), dequantize(qw))
    ref = x.double() @ dequantize(qw).double().T
    assert cpu_codegen.bind(swapped, qw.scale, None, fmt, k) is not None
    assert sqnr_db(ref, cpu_codegen.linear(x, swapped, qw.scale, None, None, fmt, k).double()) >= 110.0
    d = WeightFormat.parse(fmt).to_dense(swapped, qw.scale, None)
    assert torch.equal(dequantize(d), dequantize(qw))

    shared = qw.qweight.clone()
    shared[2, k // 2] = (shared[2, k // 2] & 0xF0) | 0b0101  # both kept values of group 0 at position 1
    with caplog.at_level(logging.WARNING, logger="lowbit_compiler"):
        assert cpu_codegen.bind(shared, qw.scale, None, fmt, k) is None
        assert cpu_sparse.use_nm_kernel(shared, qw.scale, fmt, k, 1) is False
        y = cpu_kernels.wo_linear_fast(x, shared, qw.scale, None, None, fmt, k)
    assert "share one position" in caplog.text
    assert cpu_cache_holds_dense_copy(shared)
    expected = x.double() @ dequantize(QuantizedWeight(qw.format, shared, qw.scale, None, k)).double().T
    assert sqnr_db(expected, y.double()) >= 110.0


@pytest.mark.parametrize("sparse_wins", [True, pytest.param(False, marks=pytest.mark.slow)])  # a compress each
def test_layer_records_say_which_kernel_the_target_sparsity_gets(measured, sparse_wins):
    """A compressed model's layer records say the site decides at its first decode row; after one
    row each says what its site (q/k/v stacked, gate/up, o and down alone) measured and runs."""
    from lowbit_compiler import compress
    from tests.conftest import make_model

    calibration = [torch.randint(3, 256, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    measured.update(dense=1e-3, sparse_all=0.8e-3 if sparse_wins else 3e-3,
                    sparse_quarter=0.3e-3 if sparse_wins else 1.5e-3)
    model = compress(make_model("llama"), "teal-50+w8a16", calibration=calibration, progress=False)
    layers = model.lowbit_summary["layers"]
    assert layers["model.layers.0.mlp.down_proj"]["sparse_kernel"].startswith("decided at the site's first decode row")
    with torch.no_grad():
        model(torch.tensor([[5]]))  # one row: each site (q/k/v, gate/up, o, down) decides, once
    expected = "activation-sparse kernel" if sparse_wins else "dense kernel"
    for name in ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"):
        record = layers[name]["sparse_kernel"]
        assert record.startswith(f"{expected} at the target 50% sparsity (measured: dense 1.0000 ms"), record
    assert layers["model.layers.0.self_attn.q_proj"]["sparse_kernel"].endswith(
        f"site's 3 weight(s) in one call (N=128+64+64), {torch.get_num_threads()} thread(s)")
    assert layers["model.layers.0.mlp.down_proj"]["sparse_kernel"].endswith("site's 1 weight(s) in one call (N=128), "
                                                                            f"{torch.get_num_threads()} thread(s)")


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


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
@pytest.mark.parametrize("fmt", ["int8", "int4_g128_asym"])
def test_the_kernel_applies_the_threshold_itself_bit_for_bit(isa, fmt):
    """``threshold=``: the kernel's own act_sparsify (|x| or WINA's |x| * column scale against one
    threshold or one per channel) gives the same output bits as the row thresholded in torch, and
    ``xs_out`` is that thresholded row exactly, also when the call declines (too many kept)."""
    from lowbit_compiler.ops import act_sparsify_reference

    gen = torch.Generator().manual_seed(8)
    n, k = 300, 256
    qw = quantize(torch.randn(n, k, generator=gen), WeightFormat.parse(fmt))
    w = cpu_sparse.kmajor_cpu(qw.qweight, qw.scale, qw.zero, fmt, k)
    x, bias = torch.randn(k, generator=gen), torch.randn(n, generator=gen)
    x[:7] = 0.0
    x[10] = float("nan")  # a NaN score is below every threshold: zeroed, as torch.where's comparison
    for threshold, col_scale in ((torch.tensor([0.6]), None), (torch.rand(k, generator=gen), None),
                                 (torch.tensor([0.5]), torch.rand(k, generator=gen) + 0.5)):
        xs_ref = act_sparsify_reference(x, threshold, col_scale)
        xs = torch.full((k,), 7.0)
        y = cpu_sparse.run(x, w, bias, fmt, k, isa, threshold=threshold, col_scale=col_scale, xs_out=xs)
        assert torch.equal(xs, xs_ref)
        assert torch.equal(y, cpu_sparse.run(xs_ref, w, bias, fmt, k, isa))
        kept = int((xs_ref != 0).sum())
        assert 0 < kept < k - 7
        xs.fill_(7.0)
        assert cpu_sparse.run(x, w, bias, fmt, kept - 1, isa, threshold=threshold, col_scale=col_scale,
                              xs_out=xs) is None
        assert torch.equal(xs, xs_ref)


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
def test_the_compactions_vector_steps_and_scalar_tail_agree(isa):
    """K = 100 (int8: one group): the compaction's vector steps (8 or 16 inputs) and its scalar
    tail (the last 4) keep the same inputs as torch's threshold and give the float64 product."""
    from lowbit_compiler.ops import act_sparsify_reference

    gen = torch.Generator().manual_seed(9)
    n, k = 200, 100
    qw = quantize(torch.randn(n, k, generator=gen), WeightFormat.parse("int8"))
    w = cpu_sparse.kmajor_cpu(qw.qweight, qw.scale, qw.zero, "int8", k)
    x = torch.randn(k, generator=gen)
    x[::3] = 0.0
    threshold = torch.tensor([0.3])
    xs_ref = act_sparsify_reference(x, threshold, None)
    assert bool((xs_ref[96:] != 0).any()) and bool((xs_ref[96:] == 0).any())  # the tail keeps some, drops some
    xs = torch.full((k,), 7.0)
    y = cpu_sparse.run(x, w, None, "int8", k, isa, threshold=threshold, xs_out=xs)
    assert torch.equal(xs, xs_ref)
    ref = xs_ref.double() @ dequantize(qw).double()[:, :k].T
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def _group(fmt: str, sizes: list[int], k: int, gen: torch.Generator, epilogue: int = 0, col_scale: bool = False):
    qws = [quantize(torch.randn(n, k, generator=gen) / k ** 0.5, WeightFormat.parse(fmt)) for n in sizes]
    threshold = torch.tensor([0.67])
    cs = torch.rand(k, generator=gen) + 0.5 if col_scale else None
    group = cpu_sparse.SparseInputGroup(threshold, cs, [(q.qweight, q.scale, q.zero) for q in qws], fmt, k,
                                        torch.bfloat16, epilogue)
    return group, qws, threshold, cs


def _reference(x, qws, threshold, cs, biases, fmt, k):
    return [sparse_input_linear_reference(x.double(), threshold, cs, q.qweight, q.scale, q.zero,
                                          None if b is None else b.double(), fmt, k) for q, b in zip(qws, biases)]


@pytest.mark.parametrize("fmt", ["int8", "int4_g128_asym"])
def test_a_sparse_group_is_its_members_stacked(fmt, monkeypatch):
    """One call for the linears of one thresholded input (q/k/v side by side with a bias on some,
    gate/up with silu(gate) * up, one weight with the RMSNorm prologue and the residual), the
    sparse kernel forced: each output against the float64 reference of its member."""
    monkeypatch.setenv(cpu_sparse.DISPATCH_ENV, "sparse")
    gen = torch.Generator().manual_seed(9)
    k = 256
    x = torch.randn(1, 1, k, generator=gen)
    group, qws, thr, _ = _group(fmt, [256, 128, 128], k, gen, col_scale=True)
    cs = group.col_scale
    biases = (torch.randn(256, generator=gen), None, torch.randn(128, generator=gen))
    before = cpu_sparse.dispatch_counter[(fmt, "sparse")]
    outs = cpu_sparse.sparse_input_group_linear(x, group, biases)
    assert cpu_sparse.dispatch_counter[(fmt, "sparse")] == before + 3
    for y, ref in zip(outs, _reference(x, qws, thr, cs, biases, fmt, k)):
        assert y.shape == ref.shape and (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()

    group, qws, thr, _ = _group(fmt, [384, 384], k, gen, epilogue=cpu_codegen.SILU_MUL)
    gate, up = _reference(x, qws, thr, None, (None, None), fmt, k)
    y = cpu_sparse.sparse_input_group_linear(x, group, (None, None))
    ref = torch.nn.functional.silu(gate) * up
    assert y.shape == (1, 1, 384) and (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()

    group, qws, thr, _ = _group(fmt, [256], k, gen)
    norm_w, residual = torch.rand(k, generator=gen) + 0.5, torch.randn(1, 1, 256, generator=gen)
    y = cpu_sparse.sparse_input_group_linear(x, group, (None,), norm_weight=norm_w, eps=1e-6, residual=residual)
    normed = torch.nn.functional.rms_norm(x, (k,), norm_w, 1e-6)
    ref = residual.double() + _reference(normed, qws, thr, None, (None,), fmt, k)[0]
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    # the kernel declines (one kept input allowed) or never runs: the norm applies once either way
    for mode, limit in (("dense", None), ("sparse", 1)):
        monkeypatch.setenv(cpu_sparse.DISPATCH_ENV, mode)
        if limit is not None:
            monkeypatch.setattr(group, "limit", lambda limit=limit: limit)
            group._rows.clear()  # the row call is rebuilt with that limit
            assert group.row_call().limit == 1
        y = cpu_sparse.sparse_input_group_linear(x, group, (None,), norm_weight=norm_w, eps=1e-6, residual=residual)
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), mode


def test_a_sparse_group_runs_the_dense_kernels_past_the_crossover_and_for_more_rows(monkeypatch):
    """``LOWBIT_SPARSE_DISPATCH=dense`` and calls of several rows: the thresholded input through the
    dense generated kernels (one fused call), the same bits as thresholding in torch first."""
    gen = torch.Generator().manual_seed(10)
    fmt, k = "int4_g128_asym", 256
    group, qws, thr, _ = _group(fmt, [256, 128, 128], k, gen)
    for rows, mode in ((1, "dense"), (3, "sparse")):
        monkeypatch.setenv(cpu_sparse.DISPATCH_ENV, mode)
        x = torch.randn(1, rows, k, generator=gen)
        before = cpu_sparse.dispatch_counter[(fmt, "sparse")]
        outs = cpu_sparse.sparse_input_group_linear(x, group, (None, None, None))
        assert cpu_sparse.dispatch_counter[(fmt, "sparse")] == before  # the sparse kernel did not run
        xs = torch.where(x.abs() >= thr, x, torch.zeros(()))
        expected = cpu_kernels.fused_linear(xs, group.fused, (None, None, None), torch.bfloat16)
        assert all(torch.equal(a, b) for a, b in zip(outs, expected))


@pytest.mark.heavy
def test_compiled_teal_decode_runs_one_sparse_call_per_site():
    """teal-50 + w8a16 compressed, then compiled: each site of a decode step is one direct call
    (q/k/v stacked, o with the residual, gate.up with SiLU * mul, down with the residual), the
    written-out RMSNorms folded into the calls that read them; logits match the compressed model
    run eagerly (the op's own path)."""
    from transformers import DynamicCache

    from lowbit_compiler import compress
    from tests.conftest import make_model
    from tests.helpers import Recorder, count

    calibration = [torch.randint(3, 256, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    model = compress(make_model("llama"), "teal-50+w8a16", calibration=calibration, progress=False)
    rec = Recorder(progress=False)
    compiled = torch.compile(model, backend=rec, dynamic=False)
    ids = calibration[0][:, :8]
    with torch.no_grad():
        cache, eager_cache = DynamicCache(), DynamicCache()
        compiled(ids, past_key_values=cache, use_cache=True)
        model(ids, past_key_values=eager_cache, use_cache=True)
        step = torch.tensor([[5]])
        before = cpu_sparse.dispatch_counter[("int8", "sparse")] + cpu_sparse.dispatch_counter[("int8", "dense")]
        y = compiled(step, past_key_values=cache, use_cache=True).logits
        ran = cpu_sparse.dispatch_counter[("int8", "sparse")] + cpu_sparse.dispatch_counter[("int8", "dense")] - before
        ref = model(step, past_key_values=eager_cache, use_cache=True).logits
    gm, summary = rec.graphs[-1], rec.summaries[-1]
    assert count(gm, "sparse_input_group_linear") == 8 and count(gm, "sparse_input_linear.default") == 0
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is cpu_sparse.sparse_input_group_linear]
    assert sum("norm_weight" in n.kwargs for n in calls) == 4 and sum("residual" in n.kwargs for n in calls) == 4
    assert summary["cpu_fusions"]["rms_norm_rewritten"] == 5  # two per layer and the final norm
    from lowbit_compiler.cli import format_summary

    assert "written-out RMSNorms rewritten to rms_norm (folded into the calls): 5" in format_summary(
        {"graph": "g", **summary})
    assert ran >= 8  # every site ran one of the two kernels (a group counts once per member when sparse)
    assert (y - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_eager_sparse_groups_of_a_compressed_teal_model(monkeypatch):
    """``compress`` links the LowbitLinears behind one threshold (q/k/v, gate/up; o and down as
    sites of one); run eagerly on one row, the first member's call runs the site's stacked
    activation-sparse kernel and the others return their part: each output within float rounding
    of its member's own call (``LOWBIT_CPU_FUSE=0``: the same kernel per weight), one group call per
    site and step; prompts of several rows run each member alone, and so does a step under
    ``torch.inference_mode()`` in the sites of several members (its tensors have no version
    counter), while the sites of one still make their one call."""
    from transformers import DynamicCache

    from lowbit_compiler import compress
    from lowbit_compiler.backends import eager_groups
    from tests.conftest import make_model

    monkeypatch.setenv(cpu_sparse.DISPATCH_ENV, "sparse")
    calibration = [torch.randint(3, 256, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        model = compress(make_model("llama"), "teal-50+w8a16", calibration=calibration, progress=False)
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        group = attn.q_proj._eager_group
        assert isinstance(group, eager_groups.EagerSparseGroup) and attn.v_proj._eager_group is group
        assert isinstance(mlp.gate_proj._eager_group, eager_groups.EagerSparseGroup)
        assert [m._eager_group.members for m in (attn.o_proj, mlp.down_proj)] == [[attn.o_proj], [mlp.down_proj]]
        ids = calibration[1][:, :6]
        cache = DynamicCache()
        model(ids, past_key_values=cache, use_cache=True)
        assert group.calls == 0  # six rows: each member alone
        alone_cache = DynamicCache()
        monkeypatch.setenv(cpu_codegen.FUSE_ENV, "0")
        model(ids, past_key_values=alone_cache, use_cache=True)
        step = torch.tensor([[7]])
        alone = model(step, past_key_values=alone_cache, use_cache=True).logits
        monkeypatch.delenv(cpu_codegen.FUSE_ENV)
        before = cpu_sparse.dispatch_counter[("int8", "sparse")]
        grouped = model(step, past_key_values=cache, use_cache=True).logits
        assert group.calls == 1 and mlp.gate_proj._eager_group.calls == 1 and attn.o_proj._eager_group.calls == 1
        assert cpu_sparse.dispatch_counter[("int8", "sparse")] - before == 14  # every linear of both layers
        assert (grouped - alone).abs().max() <= 1e-4 * alone.abs().max()
        hidden = attn.o_proj.in_features
        assert attn.o_proj(torch.randn(1, 1, hidden)).shape == (1, 1, attn.o_proj.out_features)  # a site of one
    o_calls = attn.o_proj._eager_group.calls
    with torch.no_grad():
        monkeypatch.setenv(cpu_codegen.FUSE_ENV, "0")
        expected = model(step, past_key_values=copy.deepcopy(alone_cache), use_cache=True).logits
        monkeypatch.delenv(cpu_codegen.FUSE_ENV)
    with torch.inference_mode():
        inference = model(step, past_key_values=alone_cache, use_cache=True).logits
    assert group.calls == 1 and attn.o_proj._eager_group.calls == o_calls + 1
    assert (inference - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_a_sparse_group_thresholds_bf16_rows_as_the_op_does(monkeypatch):
    """bf16 rows: the op compares in bf16 (the threshold and WINA's score rounded), so a score just
    below a float32 threshold that rounds onto it is kept; the group keeps exactly the op's inputs
    (its output equals the member's float kernel over the op's thresholded row). A bias edited in
    place is picked up."""
    from lowbit_compiler.ops import act_sparsify_reference

    monkeypatch.setenv(cpu_sparse.DISPATCH_ENV, "sparse")
    gen = torch.Generator().manual_seed(11)
    fmt, k = "int8", 256
    qw = quantize(torch.randn(256, k, generator=gen) / k ** 0.5, WeightFormat.parse(fmt))
    col_scale = torch.full((k,), 0.699)
    threshold = torch.tensor([0.69921875])  # bf16(1.0 * bf16(0.699)) == threshold: kept in bf16 only
    group = cpu_sparse.SparseInputGroup(threshold, col_scale, [(qw.qweight, qw.scale, None)], fmt, k, torch.bfloat16)
    x = torch.ones(1, k, dtype=torch.bfloat16)
    x[0, ::2] = 0.5  # below the threshold either way
    xs = act_sparsify_reference(x, threshold, col_scale)
    assert int((xs != 0).sum()) == k // 2  # the op keeps the 1.0 inputs
    bias = torch.randn(256, generator=gen)
    y = cpu_sparse.sparse_input_group_linear(x, group, (bias,))
    w = cpu_sparse.kmajor_cpu(qw.qweight, qw.scale, None, fmt, k)
    assert torch.equal(y, cpu_sparse.run(xs.reshape(k).float(), w, bias, fmt, k, lead=(1,)).to(torch.bfloat16))
    bias.add_(1.0)
    y2 = cpu_sparse.sparse_input_group_linear(x, group, (bias,))
    assert torch.equal(y2, cpu_sparse.run(xs.reshape(k).float(), w, bias, fmt, k, lead=(1,)).to(torch.bfloat16))


def test_a_sparse_group_measures_its_own_calls_and_caches_the_plan(measured):
    """The group's crossover comes from timing its decode-row call (Python and allocations
    included) against its fallback (the kernel thresholding, then the dense kernels), on the
    stacked shape; the plan is cached on disk under the group's shape and epilogue."""
    gen = torch.Generator().manual_seed(12)
    fmt, k = "int8", 256
    group, *_ = _group(fmt, [256, 256], k, gen, epilogue=cpu_codegen.SILU_MUL)
    measured.update(dense=0.6e-3, sparse_all=1.0e-3)
    gen_q = torch.Generator().manual_seed(0)  # the quarter-kept row measure() draws
    torch.randn(k, generator=gen_q)
    nq = int((torch.rand(k, generator=gen_q) < 0.25).sum())
    measured["sparse_quarter"] = 0.1e-3 + 0.9e-3 * nq / k
    limit = group.limit()
    expected = (0.6e-3 / cpu_sparse.MARGIN - 0.1e-3) / (0.9e-3 / k)
    assert abs(limit - expected) <= 1 and measured.calls == 1
    (key, entry), = cpu_sparse._PLANS.items()
    assert key[0] == "group" and entry["measured"] == "group calls" and entry["max_nnz"] == limit

    cpu_sparse._PLANS.clear()  # a new process, a group of the same shape: from disk, not timed again
    again, *_ = _group(fmt, [256, 256], k, gen, epilogue=cpu_codegen.SILU_MUL)
    assert again.limit() == limit and measured.calls == 1


def test_a_group_the_sparse_kernel_never_wins_runs_one_dense_call_that_thresholds(measured, caplog, monkeypatch):
    """Measured slower at every sparsity: no K-major copy and no sparse row call are made; a float32
    row with the RMSNorm prologue and the residual is one call of the dense kernel's ``_ext`` entry,
    which normalises and thresholds it (counted dense, logged; torch never thresholds); the result
    is the float64 reference's."""
    gen = torch.Generator().manual_seed(13)
    fmt, k = "int4_g128_asym", 256
    group, qws, thr, _ = _group(fmt, [256], k, gen)
    measured.update(dense=0.1e-3, sparse_all=0.5e-3, sparse_quarter=0.2e-3)
    assert group.limit() == -1
    assert cpu_sparse.KMAJOR_CACHE.get(qws[0].qweight, ("kmajor_cpu", fmt)) is None  # never built
    assert group.row_call() is None
    x = torch.randn(1, 1, k, generator=gen)
    norm_w, residual = torch.rand(k, generator=gen) + 0.5, torch.randn(1, 1, 256, generator=gen)
    counts, ext_calls = dict(cpu_sparse.dispatch_counter), cpu_codegen.calls.copy()

    def no_torch_threshold(*args):
        raise AssertionError("a float32 row is thresholded by the kernel, not by torch")

    with caplog.at_level(logging.INFO, logger="lowbit_compiler"), monkeypatch.context() as patch:
        patch.setattr(ops, "act_sparsify_reference", no_torch_threshold)
        y = cpu_sparse.sparse_input_group_linear(x, group, (None,), norm_weight=norm_w, eps=1e-6, residual=residual)
    assert cpu_codegen.calls - ext_calls == collections.Counter({cpu_codegen.kernel_name(fmt) + "_ext": 1})
    assert cpu_sparse.dispatch_counter[(fmt, "dense")] == counts.get((fmt, "dense"), 0) + 1
    assert cpu_sparse.dispatch_counter[(fmt, "sparse")] == counts.get((fmt, "sparse"), 0)
    assert "slower at every sparsity" in caplog.text and "threshold in their prologue" in caplog.text
    normed = torch.nn.functional.rms_norm(x, (k,), norm_w, 1e-6)
    ref = residual.double() + _reference(normed, qws, thr, None, (None,), fmt, k)[0]
    assert y.shape == ref.shape and (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    # a bf16 row: thresholded in bf16, as the op compares (in torch), then the same dense kernels
    xb = x.to(torch.bfloat16)
    yb = cpu_sparse.sparse_input_group_linear(xb, group, (None,), norm_weight=norm_w, eps=1e-6)
    normed_b = torch.nn.functional.rms_norm(xb, (k,), norm_w, 1e-6)
    kept = torch.where(normed_b.abs() >= thr.to(torch.bfloat16), normed_b, torch.zeros((), dtype=torch.bfloat16))
    assert torch.equal(yb, cpu_kernels.packed_linear(kept, group.dense[0], None, group.compute_dtype))
    # the same row with norm_weight but no eps: rms_norm's default eps (float32's machine epsilon)
    y2 = cpu_sparse.sparse_input_group_linear(x, group, (None,), norm_weight=norm_w, residual=residual)
    normed = torch.nn.functional.rms_norm(x, (k,), norm_w)
    ref = residual.double() + _reference(normed, qws, thr, None, (None,), fmt, k)[0]
    assert (y2.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("dense_faster", [True, False])
def test_the_in_model_trial_confirms_or_overrules_the_plan(measured, monkeypatch, caplog, dense_faster):
    """A plan that takes the sparse kernel is checked inside the model: the first decode rows of
    the sites of one shape alternate the sparse call and the dense call (threshold in its
    prologue), TRIAL_ROWS each after a site's first call of each (not samples), timed whole (a fake
    clock here); the faster median then runs at every site of that shape (a second site of the
    same shape follows at once), logged and written into the layer records. Both paths give the
    float64 reference's outputs."""
    gen = torch.Generator().manual_seed(21)
    fmt, k = "int8", 256
    group, qws, thr, _ = _group(fmt, [256, 256], k, gen, epilogue=cpu_codegen.SILU_MUL)
    record = {}
    group.records = ((record, 0.5),)
    measured.update(dense=1e-3, sparse_all=0.8e-3, sparse_quarter=0.3e-3)
    assert group.limit() == k  # the plan: sparse at every count
    clock, ran = [0.0], collections.Counter()
    monkeypatch.setattr(cpu_dispatch, "timer", lambda: clock[0])
    row_call, dense = cpu_sparse.RowCall.__call__, cpu_sparse._dense

    def sparse_call(self, *args):
        clock[0] += 2e-3 if dense_faster else 0.5e-3
        ran["sparse"] += 1
        return row_call(self, *args)

    def dense_call(*args, **kwargs):
        clock[0] += 1e-3
        ran["dense"] += 1
        return dense(*args, **kwargs)

    monkeypatch.setattr(cpu_sparse.RowCall, "__call__", sparse_call)
    monkeypatch.setattr(cpu_sparse, "_dense", dense_call)
    n = cpu_sparse.TRIAL_ROWS
    with caplog.at_level(logging.INFO, logger="lowbit_compiler"):
        for i in range(2 * n + 2 + 3):
            x = torch.randn(1, 1, k, generator=gen)
            y = cpu_sparse.sparse_input_group_linear(x, group, (None, None))
            gate, up = (_reference(x, [q], thr, None, (None,), fmt, k)[0] for q in qws)
            ref = torch.nn.functional.silu(gate) * up
            assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    winner = "dense" if dense_faster else "sparse"
    assert ran == {winner: n + 1 + 3, ("sparse" if dense_faster else "dense"): n + 1}
    assert f"-> the {winner} kernel" in caplog.text and record["sparse_kernel"].endswith(f"-> the {winner} kernel")
    assert (group._kmajor is None and group.row_call() is None) == dense_faster  # a dense verdict drops the copy
    again, *_ = _group(fmt, [256, 256], k, gen, epilogue=cpu_codegen.SILU_MUL)  # another site of this shape
    late = {"sparse_kernel": "measured plan"}
    again.records = ((late, 0.5),)
    ran.clear()
    cpu_sparse.sparse_input_group_linear(torch.randn(1, 1, k, generator=gen), again, (None, None))
    assert ran == {winner: 1} and late["sparse_kernel"].endswith(f"-> the {winner} kernel")  # joined late


def test_the_in_model_trial_counts_a_row_the_sparse_call_refuses_as_sparse(measured, monkeypatch):
    """A row that keeps more inputs than the sparse call's limit costs the sparse attempt plus the
    dense call: the trial's sparse sample is that whole time (left out, every such row would have
    made the sparse path look faster than it is)."""
    gen = torch.Generator().manual_seed(22)
    fmt, k = "int8", 256
    group, qws, thr, _ = _group(fmt, [256], k, gen)
    measured.update(dense=1e-3, sparse_all=0.8e-3, sparse_quarter=0.3e-3)
    assert group.limit() == k
    call = group.row_call()
    call.limit = 0  # every row keeps more than the call takes: it hands the thresholded row to the dense kernels
    clock = [0.0]
    monkeypatch.setattr(cpu_dispatch, "timer", lambda: clock[0])
    row_call, dense = cpu_sparse.RowCall.__call__, cpu_sparse._dense

    def sparse_call(self, *args):
        clock[0] += 0.4e-3
        return row_call(self, *args)

    def dense_call(*args, **kwargs):
        clock[0] += 1e-3
        return dense(*args, **kwargs)

    monkeypatch.setattr(cpu_sparse.RowCall, "__call__", sparse_call)
    monkeypatch.setattr(cpu_sparse, "_dense", dense_call)
    for _ in range(2 * cpu_sparse.TRIAL_ROWS + 3):  # a row's sample is taken when the next row starts
        x = torch.randn(1, 1, k, generator=gen)
        y = cpu_sparse.sparse_input_group_linear(x, group, (None,))
        ref = _reference(x, qws, thr, None, (None,), fmt, k)[0]
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    trial = call.trial
    assert trial.times["sparse"] and all(abs(t - 1.4e-3) < 1e-9 for t in trial.times["sparse"])
    assert trial.verdict == "dense"  # 1.4 ms (attempt + dense) against 1.0


def test_the_in_model_trial_compares_whole_rows_of_every_site(measured, monkeypatch):
    """Two sites of one format in a decode row (called in turn, as a model's layers are): each row
    runs every site on one policy, the sample is the row's sum, and the verdict holds for both
    sites, also the one whose own sparse call was the faster (a per-site trial would keep it
    sparse): 0.5 + 2.0 ms sparse rows against 1.0 + 1.0 ms dense rows -> dense everywhere."""
    gen = torch.Generator().manual_seed(23)
    fmt, k = "int8", 256
    site_a, *_ = _group(fmt, [256], k, gen)
    site_b, *_ = _group(fmt, [128, 64], k, gen)
    measured.update(dense=1e-3, sparse_all=0.8e-3, sparse_quarter=0.3e-3)
    assert site_a.limit() == k and site_b.limit() == k
    clock, rows = [0.0], []
    monkeypatch.setattr(cpu_dispatch, "timer", lambda: clock[0])
    row_call, dense = cpu_sparse.RowCall.__call__, cpu_sparse._dense

    def sparse_call(self, *args):
        clock[0] += 0.5e-3 if self.n == 256 else 2e-3  # site a (256 outputs) or site b (192)
        rows[-1].append("sparse")
        return row_call(self, *args)

    def dense_call(*args, **kwargs):
        clock[0] += 1e-3
        rows[-1].append("dense")
        return dense(*args, **kwargs)

    monkeypatch.setattr(cpu_sparse.RowCall, "__call__", sparse_call)
    monkeypatch.setattr(cpu_sparse, "_dense", dense_call)
    for _ in range(2 * cpu_sparse.TRIAL_ROWS + 4):
        rows.append([])
        x = torch.randn(1, 1, k, generator=gen)
        cpu_sparse.sparse_input_group_linear(x, site_a, (None,))
        cpu_sparse.sparse_input_group_linear(x, site_b, (None, None))
    assert all(len(set(r)) == 1 for r in rows)  # one policy per row
    trial = site_a.trial()
    assert trial is site_b.trial() and trial.verdict == "dense"
    assert trial.times["sparse"] == [pytest.approx(2.5e-3)] * cpu_sparse.TRIAL_ROWS
    assert trial.times["dense"] == [pytest.approx(2e-3)] * cpu_sparse.TRIAL_ROWS
    assert rows[-1] == ["dense", "dense"] and site_a.row_call() is None and site_b.row_call() is None


@pytest.mark.parametrize("sizes", [[128, 128], [128]])
def test_a_sparse_group_rebuilds_its_call_when_a_member_is_edited_in_place(sizes, monkeypatch):
    monkeypatch.setenv(cpu_sparse.DISPATCH_ENV, "sparse")
    gen = torch.Generator().manual_seed(14)
    fmt, k = "int8", 256
    group, qws, thr, _ = _group(fmt, sizes, k, gen)
    x = torch.randn(1, k, generator=gen)
    first = group.row_call()
    cpu_sparse.sparse_input_group_linear(x, group, (None,) * len(sizes))
    qws[-1].scale.mul_(2.0)  # a scale edited in place (not the codes): the K-major copy and the call are rebuilt
    outs = cpu_sparse.sparse_input_group_linear(x, group, (None,) * len(sizes))
    assert group.row_call() is not first
    outs = outs if isinstance(outs, tuple) else (outs,)
    for y, ref in zip(outs, _reference(x, qws, thr, None, (None,) * len(sizes), fmt, k)):
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_compiled_2of4_int8_decode_runs_the_nm_kernel_in_the_fusion_groups():
    """s24-w8a16 (2:4 + int8) compressed, then compiled: the decode step runs the N:M kernel over the
    compressed storage in the dense weights' CPU fusion groups (q/k/v side by side and gate.up +
    SiLU * mul, each with its RMSNorm; o and down with the residual add; the LM head with the final
    norm), as does the 9-row prompt (M <= 16), so no dense copy is made; the records name the kernel.
    Logits match the compressed model run eagerly (the op's path: the same kernel one weight at a
    time, torch's norms)."""
    from transformers import DynamicCache

    from lowbit_compiler import compress
    from tests.conftest import make_model
    from tests.helpers import Recorder

    calibration = [torch.randint(3, 256, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    model = compress(make_model("llama"), "s24-w8a16", calibration=calibration, progress=False)
    rec = Recorder(progress=False)
    compiled = torch.compile(model, backend=rec, dynamic=False)
    name = cpu_codegen.kernel_name("s24+int8")
    with torch.no_grad():
        cache, eager_cache = DynamicCache(), DynamicCache()
        compiled(calibration[0][:, :9], past_key_values=cache, use_cache=True)
        model(calibration[0][:, :9], past_key_values=eager_cache, use_cache=True)
        step = torch.tensor([[5]])
        before = dict(cpu_codegen.calls)
        y = compiled(step, past_key_values=cache, use_cache=True).logits
        ran = {k: v - before.get(k, 0) for k, v in cpu_codegen.calls.items() if v != before.get(k, 0)}
        ref = model(step, past_key_values=eager_cache, use_cache=True).logits
    assert ran == {name + "_ext": 5, name + "_x3_ext": 2, name + "_silu_mul_ext": 2}
    qweights = [m.qweight for m in model.modules() if getattr(m, "fmt", None) == "s24+int8"]
    assert len(qweights) == 15  # 7 linears in each of 2 layers and the LM head
    assert not any(cpu_cache_holds_dense_copy(q) for q in qweights)
    decode = rec.summaries[-1]["implementations"]
    assert sum(f"generated C kernel {name}" in r["implementation"] for r in decode) == 15
    assert sqnr_db(ref.double(), y.double()) >= 100.0
