"""Generated CPU kernels (backends/cpu_codegen.py): numerics against the op's float reference in
float64 over formats x rows x shapes x bias x activation dtypes, when they decline, and what
happens without a compiler."""
from __future__ import annotations

import collections
import itertools
import logging

import pytest
import torch

from lowbit_compiler import formats, ops
from lowbit_compiler.backends import cpu_codegen
from lowbit_compiler.formats import WeightFormat

FORMATS = ("int8", "int4_g32_sym", "int4_g64_asym", "int4_g128_asym", "int4_g128_sym", "int4_g256_asym", "nf4_g64",
           "s24+int4_g64_asym", "s24+int4_g32_sym")  # 2:4 + int4: groups of kept values (K=256: 128 kept)
ROWS = (1, 2, 3, 5, 16)  # row tiles of 4: every remainder, and four full tiles
SHAPES = ((33, 256), (97, 512))  # odd N; K a multiple of every group size
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grid():
    """Every format with every row count; shape, bias and activation dtype cycle through them."""
    others = itertools.cycle(itertools.product(SHAPES, (True, False), DTYPES))
    for fmt, rows in itertools.product(FORMATS, ROWS):
        (n, k), bias, dtype = next(others)
        k += 24 if fmt == "int8" else 0  # int8: K % 32 = 24 (a 32-byte loop, a 16-byte step, the scalar tail)
        yield pytest.param(fmt, rows, n, k, bias, dtype, id=f"{fmt}-M{rows}-N{n}-K{k}-{'bias' if bias else 'nobias'}-"
                                                           f"{str(dtype).split('.')[-1]}")


# NF4 calls (K a multiple of 64) take the int8-table path by default: its floor is the table's
# rounding (test_nf4_int8_table_path); the float32 floor here is that of its float path
# (LOWBIT_CPU_SPLIT8=0), which also runs K not a multiple of 64
NF4_TABLE_FLOOR = 43.0  # dB against float64 (measured 45.3-50.7 dB over groups 32-256, M 1-16)


def _floor(fmt: str) -> float:
    """The SQNR floor (dB) of the default build of ``fmt``'s kernel against the float64 reference."""
    return NF4_TABLE_FLOOR if fmt.startswith("nf4") else 110.0


@pytest.mark.parametrize("fmt, rows, n, k, with_bias, dtype", list(_grid()))
def test_generated_kernel_matches_the_float_reference(fmt, rows, n, k, with_bias, dtype, monkeypatch):
    if fmt.startswith("nf4"):
        monkeypatch.setenv(cpu_codegen.SPLIT8_ENV, "0")  # the float path (the table path: test_nf4_int8_table_path)
    if cpu_codegen.kernel(fmt) is None:
        pytest.fail(f"no generated kernel for {fmt}: {cpu_codegen._disabled_reason}")
    g = torch.Generator().manual_seed(rows * 1000 + n)
    q = formats.quantize(torch.randn(n, k, generator=g) * 0.05, WeightFormat.parse(fmt))
    x = torch.randn(rows, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g) if with_bias else None
    y = cpu_codegen.linear(x, q.qweight, q.scale, q.zero, bias, fmt, k)
    assert y is not None and y.dtype == torch.float32 and y.shape == (rows, n)
    reference = ops.wo_linear_reference(x.double(), q.qweight, q.scale, q.zero,
                                        None if bias is None else bias.double(), fmt, k)
    assert formats.sqnr_db(reference, y.double()) >= 110.0  # float32 accumulation (measured 124-140 dB)


@pytest.mark.parametrize("fmt", ["int4_g128_asym", "int4_g32_sym", "int8"])
def test_a_non_finite_activation_shows_in_the_output(fmt):
    """One row and several (the split-int8 path for int4 groups of 64+, and int8 with VNNI):
    an inf or NaN in x never comes out as finite numbers."""
    q = formats.quantize(torch.randn(21, 256) * 0.05, WeightFormat.parse(fmt))
    for rows in (1, 3):
        for bad in (float("inf"), float("nan")):
            x = torch.randn(rows, 256)
            x[0, 5] = bad
            y = cpu_codegen.linear(x, q.qweight, q.scale, q.zero, None, fmt, 256)
            assert not torch.isfinite(y[0]).any()
            if rows > 1:
                assert torch.isfinite(y[1:]).all()


def test_declines_what_it_does_not_cover():
    q = formats.quantize(torch.randn(16, 128), WeightFormat.parse("int4_g128_asym"))
    many_rows = torch.randn(cpu_codegen.MAX_ROWS + 1, 128)
    assert cpu_codegen.linear(many_rows, q.qweight, q.scale, q.zero, None, "int4_g128_asym", 128) is None
    int3 = formats.quantize(torch.randn(16, 128), WeightFormat.parse("int3_g64_sym"))
    assert cpu_codegen.linear(torch.randn(1, 128), int3.qweight, int3.scale, int3.zero, None, "int3_g64_sym", 128) is None
    assert "int8, and int4 and NF4" in cpu_codegen.supported("int3_g64_sym")
    padded = formats.quantize(torch.nn.functional.pad(torch.randn(16, 100), (0, 28)), WeightFormat.parse("int4_g128_asym"))
    assert cpu_codegen.linear(torch.randn(1, 100), padded.qweight, padded.scale, padded.zero, None,
                              "int4_g128_asym", 100) is None  # K padded to the group: torch's kernels


def test_without_a_compiler_it_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(cpu_codegen, "_compiler", lambda: None)
    monkeypatch.setattr(cpu_codegen, "_disabled_reason", [])
    cpu_codegen._build.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="lowbit_compiler"):
            assert cpu_codegen.kernel("int8") is None
            assert cpu_codegen.kernel("int4_g128_asym") is None
        messages = [r.getMessage() for r in caplog.records if "generated CPU kernels unavailable" in r.getMessage()]
        assert len(messages) == 1 and "no C compiler" in messages[0]
    finally:
        cpu_codegen._build.cache_clear()


def test_source_is_readable_and_specialised():
    text = cpu_codegen.source("int4_g64_asym")
    assert "const int64_t G = 64" in text and "zp[g]" in text and "zero + n * groups" in text
    assert "8.0f" in cpu_codegen.source("int4_g64_sym")
    assert "_mm256_permutevar8x32_ps" in cpu_codegen.source("nf4_g64")  # NF4: the 16 values in registers
    table_on = f"#if defined(LOWBIT_AVX2) && 1\n#define {cpu_codegen.kernel_name('nf4_g64')}_Q8 1"
    assert table_on in cpu_codegen.source("nf4_g64") and "_mm256_shuffle_epi8(tab" in cpu_codegen.source("nf4_g64")
    assert table_on not in cpu_codegen.source("nf4_g64", split8=False)  # the int8 table path compiled out
    for fmt in ("int8", "int4_g64_asym"):  # explicit AVX2 under the preprocessor, the portable loops otherwise
        text = cpu_codegen.source(fmt)
        assert "#pragma omp parallel for" in text and "_mm256_fmadd_ps" in text and "#else" in text


@pytest.mark.parametrize("fmt, rows", [("int8", 5), ("int4_g32_asym", 1), ("int4_g128_sym", 6),
                                       ("s24+int4_g64_asym", 3)])
def test_portable_build_matches_the_float_reference(fmt, rows):
    """The loops a host without AVX2 + FMA runs (the compiler's default target)."""
    if cpu_codegen.kernel(fmt, portable=True) is None:
        pytest.fail(f"no portable build for {fmt}: {cpu_codegen._disabled_reason}")
    g = torch.Generator().manual_seed(rows)
    n, k = 37, 256 + (24 if fmt == "int8" else 0)  # int8: K not a multiple of 16 (the scalar tail)
    q = formats.quantize(torch.randn(n, k, generator=g) * 0.05, WeightFormat.parse(fmt))
    x = torch.randn(rows, k, generator=g)
    y = cpu_codegen.linear(x, q.qweight, q.scale, q.zero, None, fmt, k, portable=True)
    reference = ops.wo_linear_reference(x.double(), q.qweight, q.scale, q.zero, None, fmt, k)
    assert formats.sqnr_db(reference, y.double()) >= 110.0


def test_native_build_runs_the_widest_path_the_host_has():
    """The dispatched (native) build takes the AVX-512 / VNNI paths exactly when the host's CPU
    flags have them (the flags are in the cache key, so a cached build never crosses machines)."""
    for fmt in ("int8", "int4_g128_asym", cpu_codegen.W8A8):
        assert cpu_codegen.isa_of(cpu_codegen.kernel(fmt)) == cpu_codegen.host_isa()
    assert cpu_codegen.isa_of(cpu_codegen.kernel("int8", portable=True)) == "portable"


_HOST = set(cpu_codegen._host_flags().split())


@pytest.mark.skipif(not {"avx2", "fma"} <= _HOST, reason="the host has no AVX2 + FMA to run an AVX2 build")
@pytest.mark.parametrize("fmt", [f if f in ("int8", "int4_g32_sym", "int4_g128_asym", "nf4_g64")
                                 else pytest.param(f, marks=pytest.mark.slow) for f in FORMATS])  # a build each
@pytest.mark.heavy
def test_avx2_build_matches_the_float_reference(fmt):
    """What a host with AVX2 but no AVX-512 runs (``isa="avx2"``: the host's flags minus AVX-512),
    over every format, every row-tile remainder, odd N, bias; on an AVX-512 host this covers the
    path it does not dispatch, on an AVX2 host it is the dispatched one."""
    fn = cpu_codegen.kernel(fmt, isa="avx2")
    assert fn is not None and cpu_codegen.isa_of(fn) == "avx2"
    g = torch.Generator().manual_seed(7)
    n, k = 37, 256 + (24 if fmt == "int8" else 0)
    q = formats.quantize(torch.randn(n, k, generator=g) * 0.05, WeightFormat.parse(fmt))
    bias = torch.randn(n, generator=g)
    for rows in (1, 6):
        x = torch.randn(rows, k, generator=g)
        y = cpu_codegen.linear(x, q.qweight, q.scale, q.zero, bias, fmt, k, isa="avx2")
        reference = ops.wo_linear_reference(x.double(), q.qweight, q.scale, q.zero, bias.double(), fmt, k)
        assert formats.sqnr_db(reference, y.double()) >= _floor(fmt)
        native = cpu_codegen.linear(x, q.qweight, q.scale, q.zero, bias, fmt, k)
        assert formats.sqnr_db(native.double(), y.double()) >= 110.0  # the paths agree to float32 rounding


@pytest.mark.skipif(not {"avx2", "fma"} <= _HOST, reason="the host has no AVX2 + FMA to run an AVX2 build")
def test_avx2_builds_of_the_integer_kernels():
    """W8A8 (maddubs instead of VNNI's vpdpbusd) exact, and the int8-activation int4 kernel equal
    to the native one, in the AVX2 build."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-127, 128, (5, 300), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (19, 300), dtype=torch.int8, generator=g)
    x[0], w[0] = 127, -128
    y = cpu_codegen.int8_matmul(x, w, isa="avx2")
    assert cpu_codegen.isa_of(cpu_codegen.kernel(cpu_codegen.W8A8, isa="avx2")) == "avx2"
    assert torch.equal(y.long(), x.long() @ w.long().T)
    q = formats.quantize(torch.randn(37, 512, generator=g) * 0.05, WeightFormat.parse("int4_g64_asym"))
    xf = torch.randn(3, 512, generator=g)
    avx2 = cpu_codegen.linear(xf, q.qweight, q.scale, q.zero, None, "int4_g64_asym", 512, int8_activations=True,
                              isa="avx2")
    native = cpu_codegen.linear(xf, q.qweight, q.scale, q.zero, None, "int4_g64_asym", 512, int8_activations=True)
    assert formats.sqnr_db(native.double(), avx2.double()) >= 110.0  # integer sums: equal up to float rounding


def test_compressed_and_compiled_models_run_the_generated_kernel(monkeypatch):
    """Decode-sized calls (9 rows) of a w4a16 model, eager after ``compress`` and under
    ``torch.compile``, run the generated kernel; they match torch's packed path (bf16 compute,
    LOWBIT_CPU_CODEGEN=0) within a floor: the two differ only in bf16 rounding of activations."""
    from lowbit_compiler import compress
    from tests.conftest import make_model, prompt
    from tests.helpers import Recorder

    ids = prompt()  # 9 tokens: 9 rows per linear
    name = cpu_codegen.kernel_name("int4_g128_asym")
    with torch.no_grad():
        compiled_model = make_model("llama")
        rec = Recorder(recipe="w4a16", strict=True)
        before = dict(cpu_codegen.calls)
        compiled = torch.compile(compiled_model, backend=rec)(ids).logits
        ran = {k: v - before.get(k, 0) for k, v in cpu_codegen.calls.items() if v != before.get(k, 0)}
        # per layer o and down alone with the residual add in the call (_ext), q/k/v in one call and
        # gate.up + SiLU * mul in one, each with its RMSNorm in the call (_ext); the LM head with the
        # final norm (HF's logits_to_keep slice moved before it)
        assert ran == {name + "_ext": 5, name + "_x3_ext": 2, name + "_silu_mul_ext": 2}
        implementations = collections.Counter(r["implementation"] for r in rec.summaries[0]["implementations"])
        packed = "cpu_kernels.packed_linear (packed int4_g128_asym weights, bfloat16 compute)"
        norm = " with the RMSNorm prologue in torch"
        assert implementations == {
            f"generated C kernel {name}_ext (M <= 16 rows, float32, RMSNorm prologue), else {packed}{norm}": 1,
            f"generated C kernel {name}_ext (M <= 16 rows, float32, residual add), else {packed} with the residual "
            "add in torch": 4,
            f"generated C kernel {name}_multi_ext (3 weights of one input, RMSNorm prologue; M <= 16 rows, float32), "
            f"else {packed} per weight{norm}": 6,
            f"generated C kernel {name}_multi_ext (gate.up + SiLU * mul, RMSNorm prologue; M <= 16 rows, float32), "
            f"else {packed} per weight{norm}": 4}

        model = compress(make_model("llama"), "w4a16")
        assert model.lowbit_summary["eager_groups"] == 4  # q/k/v and gate/up per layer (backends/eager_groups.py)
        before = dict(cpu_codegen.calls)
        generated = model(ids).logits
        ran = {k: v - before.get(k, 0) for k, v in cpu_codegen.calls.items() if v != before.get(k, 0)}
        assert ran == {name: 5, name + "_x3": 2, name + "_x2": 2}  # eager: gate and up side by side
        before = dict(cpu_codegen.calls)
        monkeypatch.setenv(cpu_codegen.ENV, "0")
        packed = model(ids).logits
        assert dict(cpu_codegen.calls) == before  # turned off: torch's packed kernels ran
    assert formats.sqnr_db(packed.double(), generated.double()) >= 40.0  # measured 46.8 dB
    assert formats.sqnr_db(generated.double(), compiled.double()) >= 100.0  # the same kernel: measured identical


def _group_of_three(fmt: str, seed: int):
    """Three weights of one input (odd, unequal N: 67, 33, 33; K ragged for int8; for 2:4 a last block
    of 128 columns) bound to their kernel, with biases, as a side-by-side group and the last two as
    gate.up + SiLU * mul."""
    g = torch.Generator().manual_seed(seed)
    k = 256 + {"int8": 24, "s24+int8": 128}.get(fmt, 0)
    qs = [formats.quantize(torch.randn(n, k, generator=g) * 0.05, WeightFormat.parse(fmt)) for n in (67, 33, 33)]
    bound = [cpu_codegen.bind(q.qweight, q.scale, q.zero, fmt, k) for q in qs]
    biases = [torch.randn(b.n, generator=g) for b in bound]
    return g, k, qs, bound, biases, cpu_codegen.bind_group(bound), cpu_codegen.bind_group(bound[1:], cpu_codegen.SILU_MUL)


@pytest.mark.parametrize("fmt", ["int8", "int4_g128_asym", "int4_g32_sym", "nf4_g64", "s24+int8", "s24+int4_g64_asym"])
def test_fused_calls_equal_the_separate_kernels(fmt):
    """The several-weights entry point (a CPU fusion group): q/k/v-like weights of one input (odd,
    unequal N, biases) side by side equal the separate calls bit for bit (the same per-channel
    code); gate.up with SiLU * mul matches the float64 SiLU of the separate outputs times up."""
    g, k, qs, bound, biases, side, gate_up = _group_of_three(fmt, seed=11)
    assert cpu_codegen.bind_group(bound[:2], cpu_codegen.SILU_MUL) is None  # unequal N: no SiLU * mul
    for rows in (1, 6):
        x = torch.randn(rows, k, generator=g)
        assert torch.equal(side(x, biases), torch.cat([b(x, bias) for b, bias in zip(bound, biases)], dim=1))
        reference = torch.nn.functional.silu(ops.wo_linear_reference(
            x.double(), qs[1].qweight, qs[1].scale, qs[1].zero, biases[1].double(), fmt, k)) * ops.wo_linear_reference(
            x.double(), qs[2].qweight, qs[2].scale, qs[2].zero, biases[2].double(), fmt, k)
        assert formats.sqnr_db(reference, gate_up(x, biases[1:]).double()) >= _floor(fmt)


@pytest.mark.parametrize("fmt", ["int8", "int4_g128_asym", "int4_g32_sym", "nf4_g64", "s24+int8", "s24+int4_g64_asym"])
def test_ext_entries_fuse_the_rms_norm_and_the_residual(fmt):
    """The ``_ext`` entries (the CPU fusion groups' prologue and epilogue): one weight with the
    RMSNorm prologue and the residual epilogue, and a group with the prologue, against float64
    (``residual + W rms_norm(x)``; >= 110 dB, NF4's int8-table path >= 43 dB, its own floor); the
    group's outputs equal the single-weight calls bit for bit (one normalisation code); without
    norm and residual ``_ext`` is the plain call."""
    g, k, qs, bound, biases, side, gate_up = _group_of_three(fmt, seed=5)
    norm_w, eps = torch.rand(k, generator=g) + 0.5, 1e-5
    floor = 43.0 if fmt.startswith("nf4") else 110.0  # NF4: the int8-table path (test_nf4_int8_table_path_meets_its_floor)

    def ref(x, q, bias, norm=True):
        x = x.double()
        if norm:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_w.double()
        return ops.wo_linear_reference(x, q.qweight, q.scale, q.zero, bias.double(), fmt, k)

    for rows in (1, 6, cpu_codegen.MAX_ROWS):
        x = torch.randn(rows, k, generator=g) * 3
        res = torch.randn(rows, bound[0].n, generator=g)
        y = bound[0].ext(x, biases[0], norm_w, eps, res)
        assert formats.sqnr_db(res.double() + ref(x, qs[0], biases[0]), y.double()) >= floor
        assert torch.equal(bound[0].ext(x, biases[0], None, 0.0, None), bound[0](x, biases[0]))
        assert formats.sqnr_db(ref(x, qs[0], biases[0], norm=False), bound[0].ext(x, biases[0], None, 0.0, None)
                               .double()) >= floor
        singles = torch.cat([b.ext(x, bias, norm_w, eps, None) for b, bias in zip(bound, biases)], dim=1)
        assert torch.equal(side.ext(x, biases, norm_w, eps), singles)
        expected = torch.nn.functional.silu(ref(x, qs[1], biases[1])) * ref(x, qs[2], biases[2])
        assert formats.sqnr_db(expected, gate_up.ext(x, biases[1:], norm_w, eps).double()) >= floor


@pytest.mark.parametrize("fmt", ["int8", "int4_g128_asym", "s24+int8"])
def test_ext_entries_threshold_in_their_prologue(fmt):
    """The ``_ext`` entries' threshold step (what an activation-sparse layer runs where its sparse
    kernel does not pay): ``lowbit::act_sparsify`` with one threshold, or per-channel thresholds
    and WINA's column scales, a NaN input dropped. Without a norm the outputs equal the plain call
    on torch's thresholded row bit for bit (one weight, q/k/v side by side, gate.up); after the
    RMSNorm they meet the float64 reference of the normalised, thresholded row (>= 110 dB)."""
    g, k, qs, bound, biases, side, gate_up = _group_of_three(fmt, seed=7)
    norm_w, eps = torch.rand(k, generator=g) + 0.5, 1e-5
    for thr, cs in ((torch.tensor([0.8]), None), (torch.rand(k, generator=g), torch.rand(k, generator=g) + 0.5)):
        for rows in (1, 3):
            x = torch.randn(rows, k, generator=g) * 2
            x[0, 3] = float("nan")
            xs = ops.act_sparsify_reference(x, thr, cs)
            assert 0 < int((xs != 0).sum()) < xs.numel() and not xs.isnan().any()
            assert torch.equal(bound[0].ext(x, biases[0], None, 0.0, None, thr, cs), bound[0](xs, biases[0]))
            assert torch.equal(side.ext(x, biases, None, 0.0, thr, cs), side(xs, biases))
            assert torch.equal(gate_up.ext(x, biases[1:], None, 0.0, thr, cs), gate_up(xs, biases[1:]))
            x[0, 3] = 1.0
            xn = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps) * norm_w.double()
            reference = ops.wo_linear_reference(ops.act_sparsify_reference(xn, thr.double(), cs), qs[0].qweight,
                                                qs[0].scale, qs[0].zero, biases[0].double(), fmt, k)
            y = bound[0].ext(x, biases[0], norm_w, eps, None, thr, cs)
            assert formats.sqnr_db(reference, y.double()) >= 110.0


@pytest.mark.heavy
def test_cpu_fusion_groups_keep_the_model_output(monkeypatch):
    """A compiled w8a16 Llama with the CPU fusion groups (q/k/v, gate.up + SiLU * mul) gives the
    logits of the same model compiled without them (LOWBIT_CPU_FUSE=0) to float32 rounding, at
    decode sizes (fused) and past MAX_ROWS (the members one by one)."""
    from tests.conftest import make_model

    name = cpu_codegen.kernel_name("int8")
    with torch.no_grad():
        model = make_model("llama")
        short = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(0))
        long = torch.randint(0, 100, (1, cpu_codegen.MAX_ROWS + 3), generator=torch.Generator().manual_seed(1))
        fused = torch.compile(model, backend="lowbit", options={"recipe": "w8a16"}, dynamic=False)
        before = dict(cpu_codegen.calls)
        out_short, out_long = fused(short).logits, fused(long).logits
        ran = {k: v - before.get(k, 0) for k, v in cpu_codegen.calls.items() if v != before.get(k, 0)}
        # only the short call ran the generated kernels: per layer q/k/v and gate.up + SiLU * mul
        # with their RMSNorm, o and down with the residual add, the LM head with the final norm;
        # the long one ran the norms and adds in torch around the members
        assert ran == {name + "_ext": 5, name + "_x3_ext": 2, name + "_silu_mul_ext": 2}
        torch._dynamo.reset()
        monkeypatch.setenv(cpu_codegen.FUSE_ENV, "0")
        plain = torch.compile(make_model("llama"), backend="lowbit", options={"recipe": "w8a16"}, dynamic=False)
        before = dict(cpu_codegen.calls)
        ref_short, ref_long = plain(short).logits, plain(long).logits
        assert not any(k.endswith(("_silu_mul", "_ext")) and v != before.get(k, 0) for k, v in cpu_codegen.calls.items())
    assert formats.sqnr_db(ref_short.double(), out_short.double()) >= 110.0
    assert torch.equal(ref_long, out_long)


@pytest.mark.parametrize("rows, n, k, portable", [(1, 37, 4104, False), (5, 64, 300, False), (16, 33, 1024, False),
                                                   (6, 19, 200, True)])
def test_w8a8_kernel_is_exact(rows, n, k, portable):
    """int8 x int8 in int32: equal to the int64 product, including the extremes (|w| = 128 against
    x = 127 in every lane: pairs at the edge of int16 saturation) and K not a multiple of 32."""
    g = torch.Generator().manual_seed(rows * 100 + n)
    x = torch.randint(-127, 128, (rows, k), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    x[0], w[0] = 127, -128
    y = cpu_codegen.int8_matmul(x, w, portable=portable)
    assert y is not None and y.dtype == torch.int32
    assert torch.equal(y.long(), x.long() @ w.long().T)
    x[0, 0] = -128  # the sign trick cannot take it: declined, torch._int_mm runs
    assert cpu_codegen.int8_matmul(x, w, portable=portable) is None


@pytest.mark.slow  # a second model compile; the kernel itself is covered by test_w8a8_kernel_is_exact
def test_w8a8_model_runs_the_generated_kernel():
    """A W8A8 model's decode-sized calls (eager op after lowering) run the generated kernel and give
    what torch._int_mm gives (the kernel is exact: identical logits)."""
    from tests.conftest import make_model, prompt

    name = cpu_codegen.kernel_name(cpu_codegen.W8A8)
    model = make_model("llama")
    compiled = torch.compile(model, backend="lowbit", options={"recipe": "w8a8"})
    with torch.no_grad():
        before = cpu_codegen.calls[name]
        generated = compiled(prompt()).logits
        assert cpu_codegen.calls[name] - before == 15
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(cpu_codegen.ENV, "0")
            reference = compiled(prompt()).logits
        assert cpu_codegen.calls[name] - before == 15
    assert torch.equal(generated, reference)


@pytest.mark.parametrize("fmt, rows, portable", [("int4_g128_asym", 1, False), ("int4_g32_sym", 5, False),
                                                  ("int4_g64_asym", 16, False), ("int4_g128_sym", 3, True)])
def test_int8_activation_kernel_meets_its_floor(fmt, rows, portable, monkeypatch):
    """The opt-in int4 kernel that quantizes x per group to int8 (maddubs): lossy, so a floor
    against float64 (measured 42.5-46.6 dB on these shapes), not the float kernel's 110 dB; the
    portable build gives the same result."""
    g = torch.Generator().manual_seed(rows)
    n, k = 37, 512
    q = formats.quantize(torch.randn(n, k, generator=g) * 0.05, WeightFormat.parse(fmt))
    x = torch.randn(rows, k, generator=g)
    reference = ops.wo_linear_reference(x.double(), q.qweight, q.scale, q.zero, None, fmt, k)
    y = cpu_codegen.linear(x, q.qweight, q.scale, q.zero, None, fmt, k, portable=portable, int8_activations=True)
    assert y is not None and 38.0 <= formats.sqnr_db(reference, y.double()) < 80.0  # lossy, but not the float path
    if portable:
        native = cpu_codegen.linear(x, q.qweight, q.scale, q.zero, None, fmt, k, int8_activations=True)
        assert formats.sqnr_db(native.double(), y.double()) >= 110.0
    bad = x.clone()
    bad[0, 7] = float("inf")  # no int8 code for it: the float kernel runs and the inf shows
    assert not torch.isfinite(cpu_codegen.linear(bad, q.qweight, q.scale, q.zero, None, fmt, k, portable=portable,
                                                 int8_activations=True)[0]).all()
    # dispatch takes it only when asked
    from lowbit_compiler.backends import cpu_kernels

    packed = cpu_kernels.prepack(q.qweight, q.scale, q.zero, fmt, k, torch.bfloat16)
    name = cpu_codegen.kernel_name(fmt + cpu_codegen.A8)
    before = cpu_codegen.calls[name]
    cpu_kernels.packed_linear(x, packed, None, torch.bfloat16)
    assert cpu_codegen.calls[name] == before
    monkeypatch.setenv(cpu_codegen.INT8_ACTIVATIONS_ENV, "1")
    assert torch.equal(cpu_kernels.packed_linear(x, packed, None, torch.bfloat16),
                       cpu_codegen.linear(x, q.qweight, q.scale, q.zero, None, fmt, k, int8_activations=True))
    assert cpu_codegen.calls[name] == before + 2


def test_torch_layout_is_built_only_for_calls_past_the_generated_kernel():
    """An int4 weight the generated kernel covers holds no second (int4pack) copy of its codes until
    a call of more than MAX_ROWS rows needs torch's kernel; that call matches the float reference,
    and the decode-sized calls before it did not build the copy."""
    from lowbit_compiler.backends import cpu_kernels

    g = torch.Generator().manual_seed(3)
    fmt, n, k = "int4_g64_asym", 40, 256
    q = formats.quantize(torch.randn(n, k, generator=g) * 0.05, WeightFormat.parse(fmt))
    packed = cpu_kernels._pack(q.qweight, q.scale, q.zero, fmt, k, torch.float32)
    small, large = torch.randn(3, k, generator=g), torch.randn(cpu_codegen.MAX_ROWS + 5, k, generator=g)
    cpu_kernels.packed_linear(small, packed, None, torch.float32)
    assert packed.weight is None and packed.scales is None and "not built" in repr(packed)
    y = cpu_kernels.packed_linear(large, packed, None, torch.float32)
    assert packed.weight is not None and packed.weight.dtype != torch.float32
    reference = ops.wo_linear_reference(large.double(), q.qweight, q.scale, q.zero, None, fmt, k)
    assert formats.sqnr_db(reference, y.double()) >= 60.0
    unpacked = cpu_kernels._pack(q.qweight, q.scale, q.zero, fmt, k - 6, torch.float32)  # K padded to a group
    assert unpacked.weight is not None  # no generated kernel for a padded K: torch layout built at once


@pytest.mark.parametrize("fmt, k", [("int8", 2112), ("int4_g128_asym", 768)] + [  # four builds each: the rest slow
    pytest.param(f, k, marks=pytest.mark.slow)
    for f, k in (("int8", 544), ("int4_g64_asym", 512), ("int4_g128_sym", 768), ("int4_g256_asym", 1024))])
@pytest.mark.heavy
def test_split8_path_matches_the_float_reference(fmt, k):
    """The split-int8 integer path (x as three int8 parts per block, u8 x s8 dot products: vpdpbusd
    with VNNI; maddubs + madd in the AVX2 build for int4 at one row) against float64, against the float path
    of the same kernel built without it (``split8=False``), with an outlier 100x the rest in one
    block (the parts are scaled per block / group, so the other blocks keep their precision).
    int8 K = 2112 ends in a partial 64-column block."""
    g = torch.Generator().manual_seed(k)
    n = 45
    q = formats.quantize(torch.randn(n, k, generator=g) * 0.05, WeightFormat.parse(fmt))
    assert cpu_codegen.source(fmt) != cpu_codegen.source(fmt, split8=False)  # the path is compiled out
    isas = ["native"] + (["avx2"] if {"avx2", "fma"} <= _HOST else [])
    for isa in isas:
        split, plain = cpu_codegen._build(fmt, isa, True), cpu_codegen._build(fmt, isa, False)
        for rows in (1, 3, 6, 16):
            x = torch.randn(rows, k, generator=g)
            x[0, 7] = 100.0
            reference = ops.wo_linear_reference(x.double(), q.qweight, q.scale, q.zero, None, fmt, k)
            y = cpu_codegen.Bound(split, fmt, q.qweight, q.scale, q.zero, fmt, k)(x, None)
            y0 = cpu_codegen.Bound(plain, fmt, q.qweight, q.scale, q.zero, fmt, k)(x, None)
            assert formats.sqnr_db(reference, y.double()) >= 110.0, (isa, rows)  # measured 114-139 dB
            assert formats.sqnr_db(reference, y0.double()) >= 110.0
            assert formats.sqnr_db(y0.double(), y.double()) >= 105.0  # two float32-accurate paths
            if cpu_codegen.isa_of(split) == "avx512_vnni" or (fmt != "int8" and rows == 1):
                assert not torch.equal(y, y0)  # the integer path ran (without VNNI: int4, one row only)
            else:
                assert torch.equal(y, y0)


@pytest.mark.parametrize("fmt", ["int4_g128_asym", "int4_g256_sym"])
def test_one_row_channel_pairs_equal_single_channels(fmt):
    """One row (decode) on AVX-512 VNNI with groups of 128+: output channels run in pairs (one pass
    over x for two channels' codes), an odd N's last channel paired with itself. A channel's output is the same
    bit for bit whichever partner it had (the weight shifted by one row pairs every channel
    differently) and meets float64 (>= 110 dB). Hosts without the path run single channels: the
    same holds."""
    g = torch.Generator().manual_seed(3)
    k = 512
    q = formats.quantize(torch.randn(37, k, generator=g) * 0.05, WeightFormat.parse(fmt))
    x = torch.randn(1, k, generator=g)
    y = cpu_codegen.bind(q.qweight, q.scale, q.zero, fmt, k)(x, None)
    shifted = cpu_codegen.bind(q.qweight[1:], q.scale[1:], None if q.zero is None else q.zero[1:], fmt, k)(x, None)
    assert torch.equal(y[:, 1:], shifted)
    reference = ops.wo_linear_reference(x.double(), q.qweight, q.scale, q.zero, None, fmt, k)
    assert formats.sqnr_db(reference, y.double()) >= 110.0


def test_split8_switch_is_read_per_call(monkeypatch):
    """``LOWBIT_CPU_SPLIT8=0`` (before/after comparisons) binds the build without the integer path."""
    q = formats.quantize(torch.randn(16, 256) * 0.05, WeightFormat.parse("int4_g128_asym"))
    on = cpu_codegen.kernel("int4_g128_asym")
    monkeypatch.setenv(cpu_codegen.SPLIT8_ENV, "0")
    off = cpu_codegen.kernel("int4_g128_asym")
    assert on is not off and off is cpu_codegen._build("int4_g128_asym", "native", False)
    x = torch.randn(1, 256)
    assert formats.sqnr_db(cpu_codegen.linear(x, q.qweight, q.scale, q.zero, None, "int4_g128_asym", 256).double(),
                           (x.double() @ formats.dequantize(q).double().T)) >= 110


def test_eager_groups_of_a_compressed_model(monkeypatch):
    """``compress`` links the linears that read one input (q/k/v, gate/up); run eagerly, the first
    member's call runs them all in one generated call and the others return their part: logits
    bit for bit those of the unfused calls (``LOWBIT_CPU_FUSE=0``), one group call per group and
    step; more rows than ``MAX_ROWS``, a member called on another tensor and an inference tensor
    (no version counter to tell an in-place change) run alone."""
    from lowbit_compiler import compress
    from lowbit_compiler.backends import eager_groups
    from tests.conftest import make_model, prompt

    with torch.no_grad():
        model = compress(make_model("llama"), "w4a16")
        attn = model.model.layers[0].self_attn
        group = attn.q_proj._eager_group
        assert isinstance(group, eager_groups.EagerGroup) and attn.k_proj._eager_group is group
        assert "_eager_group" not in vars(attn.o_proj)  # reads another input
        ids = prompt()
        fused = model(ids).logits
        assert group.calls == 1
        monkeypatch.setenv(cpu_codegen.FUSE_ENV, "0")
        alone = model(ids).logits
        assert group.calls == 1 and torch.equal(fused, alone)
        monkeypatch.delenv(cpu_codegen.FUSE_ENV)
        x = torch.randn(1, 3, attn.q_proj.in_features)
        q = attn.q_proj(x)
        assert group.calls == 2
        x[0, 0, 0] += 1.0  # changed in place after q: the outputs kept for k and v are stale
        monkeypatch.setenv(cpu_codegen.FUSE_ENV, "0")
        k_alone = attn.k_proj(x)
        monkeypatch.delenv(cpu_codegen.FUSE_ENV)
        assert torch.equal(attn.k_proj(x), k_alone) and group.calls == 3  # recomputed, not the kept one
        big = torch.randn(1, cpu_codegen.MAX_ROWS + 1, attn.q_proj.in_features)
        before = group.calls
        attn.q_proj(big)
        assert group.calls == before  # prefill sizes: each member its own call
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, alone) and group.calls == before  # each member alone
    assert q.shape[-1] == attn.q_proj.out_features


def test_nf4_int8_table_rounds_the_grid_finely():
    """The NF4 table path's codebook (bytes u, ``NF4_GRID[c] ~ P u + Q``): every byte in [0, 255],
    rms error 0.0013 of the absmax scale (the plain round(127.5 (v + 1)) gives 0.0021), at most
    0.0025, and P u + Q monotone in the code like the grid."""
    u, p, q = cpu_codegen.nf4_int8_table()
    grid = torch.tensor(formats.NF4_GRID, dtype=torch.float64)
    approx = p * torch.tensor(u, dtype=torch.float64) + q
    assert all(0 <= c <= 255 for c in u) and len(set(u)) == 16 and list(u) == sorted(u)
    err = approx - grid
    assert float(err.pow(2).mean().sqrt()) < 0.0014 and float(err.abs().max()) < 0.0026
    plain = torch.round(127.5 * (grid + 1)) / 127.5 - 1
    assert float((plain - grid).pow(2).mean().sqrt()) > 0.002  # what the searched ALPHA / BETA improve on


def _nf4_cases():
    """Every group, every row count 1-16 (row tiles of 4: each remainder), ragged N; K a multiple
    of 64 (the table path) and for group 32 one that is not (K = 96: the float path)."""
    rows = itertools.cycle(range(1, cpu_codegen.MAX_ROWS + 1))
    for group, k in ((32, 320), (32, 96), (64, 384), (128, 640), (256, 512)):
        for _ in range(4):
            yield group, k, next(rows)


@pytest.mark.parametrize("group, k, rows", list(_nf4_cases()))
@pytest.mark.heavy
def test_nf4_int8_table_path_meets_its_floor(group, k, rows):
    """NF4 through the int8 table (pshufb on the nibbles, maddubs against x in two int8 parts)
    against float64 of the dequantized weight: the table's rounding is the added error, so a floor
    (43 dB; measured 45.3-50.7, lowest for groups of 256), not the float path's 110 dB; the float
    path (built without the table path) stays at 110 dB, and K not a multiple of 64 takes it."""
    fmt = f"nf4_g{group}"
    g = torch.Generator().manual_seed(group * 100 + rows)
    n = 29 + rows  # odd and even N
    q = formats.quantize(torch.randn(n, k, generator=g) * 0.05, WeightFormat.parse(fmt))
    x = torch.randn(rows, k, generator=g)
    bias = torch.randn(n, generator=g) if rows % 2 else None
    reference = ops.wo_linear_reference(x.double(), q.qweight, q.scale, q.zero,
                                        None if bias is None else bias.double(), fmt, k)
    y = cpu_codegen.linear(x, q.qweight, q.scale, q.zero, bias, fmt, k)
    plain = cpu_codegen.Bound(cpu_codegen._build(fmt, "native", False), fmt, q.qweight, q.scale, q.zero, fmt, k)
    y0 = plain(x, bias)
    assert formats.sqnr_db(reference, y0.double()) >= 110.0
    table = k % 64 == 0 and {"avx2", "fma"} <= _HOST
    if table:
        assert NF4_TABLE_FLOOR <= formats.sqnr_db(reference, y.double()) < 80.0  # lossy: the table path ran
    else:
        assert torch.equal(y, y0)


@pytest.mark.parametrize("fmt", ["nf4_g32", "nf4_g64"])
def test_nf4_table_path_turns_a_non_finite_activation_into_a_nan_row(fmt):
    """An inf or NaN in a row of x has no int8 parts: that row's outputs are all NaN (documented),
    the other rows are untouched (equal to the same rows computed alone)."""
    g = torch.Generator().manual_seed(5)
    q = formats.quantize(torch.randn(21, 256, generator=g) * 0.05, WeightFormat.parse(fmt))
    for rows in (1, 3, 6):
        for bad in (float("inf"), float("-inf"), float("nan")):
            x = torch.randn(rows, 256, generator=g)
            x[0, 5] = bad
            y = cpu_codegen.linear(x, q.qweight, q.scale, q.zero, None, fmt, 256)
            assert torch.isnan(y[0]).all()
            if rows > 1:
                assert torch.isfinite(y[1:]).all()


@pytest.mark.parametrize("fmt", ["nf4_g32", "nf4_g128"])
def test_nf4_portable_build_matches_the_float_reference(fmt):
    """A host without AVX2 + FMA runs the portable float loops (no table path): float32-accurate."""
    g = torch.Generator().manual_seed(2)
    q = formats.quantize(torch.randn(37, 256, generator=g) * 0.05, WeightFormat.parse(fmt))
    x = torch.randn(5, 256, generator=g)
    y = cpu_codegen.linear(x, q.qweight, q.scale, q.zero, None, fmt, 256, portable=True)
    reference = ops.wo_linear_reference(x.double(), q.qweight, q.scale, q.zero, None, fmt, 256)
    assert formats.sqnr_db(reference, y.double()) >= 110.0


@pytest.mark.parametrize("fmt", ["nf4_g32", "nf4_g64"])
@pytest.mark.heavy
def test_nf4_kernel_compiles_for_avx512(fmt, tmp_path):
    """This host cannot run AVX-512; the build an AVX-512 (+ VNNI) host takes must at least compile.
    There the table path is the AVX2 code above (maddubs, no VNNI variant), so what runs is what
    the AVX2 tests check."""
    import subprocess

    compiler = cpu_codegen._compiler()
    if compiler is None:
        pytest.fail("no C compiler: the generated kernels cannot be built at all")
    src = tmp_path / "k.c"
    src.write_text(cpu_codegen.source(fmt))
    for extra in (["-mavx512f", "-mavx512bw", "-mavx512vl"], ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]):
        result = subprocess.run([compiler, "-O2", "-mavx2", "-mfma", *extra, "-fopenmp", "-std=c11", "-c", str(src),
                                 "-o", str(tmp_path / "k.o")], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[:2000]


def test_nf4_models_run_the_generated_kernel_compressed_and_compiled(monkeypatch):
    """``compress(model, "nf4")`` and ``torch.compile(..., recipe="nf4")``: decode-sized calls (9
    rows) run the generated NF4 kernel (no fallback), compiled with q/k/v and gate.up fused; the
    logits match the float reference's (LOWBIT_CPU_CODEGEN=0: every call dequantises) within the
    table path's floor, and the two flows match each other."""
    from lowbit_compiler import compress, pass_base
    from tests.conftest import make_model, prompt
    from tests.helpers import Recorder

    ids = prompt()
    name = cpu_codegen.kernel_name("nf4_g64")
    with torch.no_grad():
        rec = Recorder(recipe="nf4", strict=True)
        before = dict(cpu_codegen.calls)
        compiled = torch.compile(make_model("llama"), backend=rec)(ids).logits
        ran = {k: v - before.get(k, 0) for k, v in cpu_codegen.calls.items() if v != before.get(k, 0)}
        # as w4a16: the norms and residual adds folded into the calls (_ext)
        assert ran == {name + "_ext": 5, name + "_x3_ext": 2, name + "_silu_mul_ext": 2}
        assert not rec.summaries[0]["fallbacks"]
        model = compress(make_model("llama"), "nf4")
        before, fallbacks = dict(cpu_codegen.calls), sum(pass_base.fallback_counter.values())
        generated = model(ids).logits
        ran = {k: v - before.get(k, 0) for k, v in cpu_codegen.calls.items() if v != before.get(k, 0)}
        assert ran == {name: 5, name + "_x3": 2, name + "_x2": 2}
        assert sum(pass_base.fallback_counter.values()) == fallbacks
        record = model.lowbit_summary["layers"]["model.layers.0.mlp.down_proj"]["cpu_kernel"]
        assert record["9-16 rows"].startswith("the generated C kernel (float32)")
        monkeypatch.setenv(cpu_codegen.ENV, "0")
        reference = model(ids).logits
        assert sum(pass_base.fallback_counter.values()) > fallbacks  # the reference ran, counted
    assert formats.sqnr_db(reference.double(), generated.double()) >= 35.0  # measured 42.3 dB
    # The compiled flow folds each RMSNorm into its C call, whose float32 rounding may differ from
    # torch's rms_norm by an ulp (bit-equal on the Intel host, not on AMD Zen 4); the NF4 table path
    # quantizes each group of x to steps of absmax / 2048, so such an ulp now and then moves one
    # activation a step: 69 dB between the flows on Zen 4. Without that path (the float kernels,
    # LOWBIT_CPU_SPLIT8=0) or without the folds (LOWBIT_CPU_FUSE=0) the flows are bit-identical.
    assert formats.sqnr_db(generated.double(), compiled.double()) >= 60.0


@pytest.mark.heavy
def test_assisted_decoding_with_a_compiled_model_gives_the_greedy_tokens():
    """Assisted (speculative) decoding verifies the draft tokens with a graph whose LM-head slice
    (logits_to_keep) is symbolic: the final norm's fold must not move that slice above the node
    computing its bound (it crashed: 'used before it has been defined'). Greedy assisted decoding
    gives the greedy tokens."""
    from tests.conftest import make_model

    torch._dynamo.reset()
    model = make_model("llama").eval()
    model.compile(backend="lowbit", options={"recipe": "w4a16"})
    assistant = make_model("llama", seed=1).eval()
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=12, do_sample=False)
        assisted = model.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=assistant)
    assert torch.equal(assisted, greedy)
