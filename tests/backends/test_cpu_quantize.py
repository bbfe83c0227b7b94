"""The one-pass quantization kernel (backends/cpu_quantize.py): bit-identical codes, scales and
zero points to the torch path (formats.quantize) for every int format, dtype and build, on random
and adversarial weights; the SQNR sums against formats.weight_sqnr_db; inf/NaN refused naming the
layer on both paths; the torch path as the logged fallback; the quantizing pass using it."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from lowbit_compiler import formats
from lowbit_compiler.backends import cpu_codegen, cpu_quantize
from lowbit_compiler.formats import FormatError, WeightFormat

from tests.conftest import make_model, prompt

FORMATS = ("int8", "int4_g128_sym", "int4_g32_asym", "int3_g64_sym", "int3_g128_asym", "int2_g64_asym",
           "int2_g256_sym", "int4_g256_asym")
QUANTIZED = FORMATS + ("nf4_g64", "nf4_g128")  # the quantizer does NF4 too; the dequantiser int only


def _kernel(isa: str = "native"):
    fn = cpu_quantize.kernel(isa)
    if fn is None:
        pytest.fail(f"no quantization kernel ({isa}): {cpu_codegen._disabled_reason}")
    return fn


def _assert_same(w: torch.Tensor, fmt: WeightFormat, isa: str = "native") -> tuple[float, float]:
    ref = formats.quantize(w, fmt)
    got = cpu_quantize.quantize_with_sums(w, fmt, isa)
    assert got is not None
    qw, sums = got
    assert qw.qweight.dtype == ref.qweight.dtype and torch.equal(qw.qweight, ref.qweight), fmt.key
    assert qw.scale.dtype == ref.scale.dtype and torch.equal(qw.scale.view(torch.int16), ref.scale.view(torch.int16))
    assert (qw.zero is None) == (ref.zero is None)
    if ref.zero is not None:
        assert torch.equal(qw.zero, ref.zero)
    assert qw.in_features == ref.in_features
    signal, noise = float(sums[:, 0].sum()), float(sums[:, 1].sum())
    return signal, noise


@pytest.mark.parametrize("isa", cpu_quantize.ISA_FLAGS)
@pytest.mark.parametrize("key", QUANTIZED)
def test_codes_and_scales_are_bit_identical_to_the_torch_path(key, isa):
    """Random weights of several scales, float32 and bf16, odd N, K ragged against the group
    (padded as pad_to_group pads); the SQNR from the kernel's sums equals weight_sqnr_db's."""
    assert cpu_codegen.isa_of(_kernel(isa)) == (cpu_codegen.host_isa() if isa == "native" else isa)
    fmt = WeightFormat.parse(key)
    g = torch.Generator().manual_seed(hash(key) % 1000)
    shapes = [(37, 512), (5, 1000 if fmt.group_size else 999)]
    for (n, k), dtype in zip(shapes * 2, (torch.float32, torch.float32, torch.bfloat16, torch.bfloat16)):
        w = (torch.randn(n, k, generator=g) * torch.logspace(-4, 1, n)[:, None]).to(dtype)
        signal, noise = _assert_same(w, fmt, isa)
        ref_db = formats.weight_sqnr_db(w, formats.quantize(w, fmt))
        assert 10 * math.log10(signal / noise) == pytest.approx(ref_db, abs=1e-9)


@pytest.mark.parametrize("key", QUANTIZED)
def test_adversarial_weights_are_bit_identical(key):
    """Exact ties of round-half-to-even (values k + 1/2 of a scale that is exact in bf16; NF4: the
    midpoints between table values that float32 holds exactly, ties to the even index), all-zero
    groups, constant groups, signed zeros, subnormals, huge values, one outlier."""
    fmt = WeightFormat.parse(key)
    k = 512
    g = fmt.group_size or k
    rows = []
    # ties: the group's range makes the scale exactly 1 (sym int4: 7.5 / 7.5; asym: 15 / 15; int8: 127 / 127)
    top = 127.0 if fmt.bits == 8 else (2 ** fmt.bits - 1) / 2
    ties = torch.arange(k, dtype=torch.float32) % (2 * top) - top + 0.5
    ties[::g] = top
    ties[1::g] = -top
    if fmt.kind == "nf4":  # absmax 1 (scale exactly 1); midpoints m with float32(m) == m exactly
        grid = formats.NF4_GRID
        mids = [(grid[i] + grid[i + 1]) / 2 for i in range(15)]
        exact = torch.tensor([m for m in mids if float(torch.tensor(m, dtype=torch.float32)) == m])
        assert len(exact) >= 4  # ties between an odd and an even index both ways round
        ties = exact.repeat(k // len(exact) + 1)[:k].float()
        ties[::g] = 1.0
        codes = formats.round_to_grid(ties, torch.tensor(grid, dtype=torch.float64))
        assert bool((codes[1:g] % 2 == 0).all())  # what the reference picks at a tie: the even index
    rows.append(ties)
    rows.append(torch.zeros(k))
    rows.append(torch.full((k,), -0.0))
    rows.append(torch.full((k,), 0.3))
    rows.append(torch.full((k,), -2.5))
    sub = torch.zeros(k)
    sub[::3] = 1e-40
    sub[1::7] = -3e-39
    rows.append(sub)
    huge = torch.randn(k) * 1e30
    rows.append(huge)
    outlier = torch.randn(k) * 1e-3
    outlier[::g] = 50.0
    rows.append(outlier)
    half_zero = torch.randn(k)
    half_zero[: k // 2] = 0.0
    rows.append(half_zero)
    w = torch.stack(rows)
    for dtype in (torch.float32, torch.bfloat16):
        _assert_same(w.to(dtype), fmt)


def test_other_dtypes_and_transposed_views_take_float32_slices():
    fmt = WeightFormat.parse("int4_g64_asym")
    w = torch.randn(96, 256, dtype=torch.float16)
    _assert_same(w, fmt)
    wt = torch.randn(256, 96).t()  # a Conv1D-style [in, out] parameter read transposed
    _assert_same(wt, fmt)


@pytest.mark.parametrize("kind, bits, group", [("nf4", 4, 64), ("fp8_e4m3", 8, None), ("mxfp4", 4, 32)])
def test_table_formats_refuse_the_symmetric_flag_off(kind, bits, group):
    """symmetric=False means integer zero points: a table format has none, so a recipe that says
    so is refused naming the format and the fix (the NF4 quantizer kernel, handed such a format,
    wrote zero points through a NULL pointer before)."""
    with pytest.raises(FormatError, match=f"format {kind}: symmetric=False applies to int formats only.*drop"):
        WeightFormat(bits, group, False, kind)


def test_table_formats_but_nf4_are_left_to_the_torch_path():
    for key in ("fp8_e4m3", "mxfp4", "nvfp4"):
        assert cpu_quantize.quantize_with_sums(torch.randn(8, 64), WeightFormat.parse(key)) is None
    qw = formats.quantize(torch.randn(8, 64), WeightFormat.parse("nf4_g64"))  # the C dequantiser is int only
    assert cpu_quantize.dequantize(qw.format, qw.qweight, qw.scale, qw.zero) is None


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_weights_are_refused_with_the_layer_name(bad):
    w = torch.randn(16, 128)
    w[3, 77] = bad
    with pytest.raises(FormatError, match=r"layer model\.layers\.0\.mlp\.up_proj: .*inf or NaN.*\(3, 77\)"):
        cpu_quantize.quantize_with_sqnr(w, WeightFormat.parse("int4_g64_sym"), "model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("kernel_on", ["1", "0"])
def test_the_pass_refuses_non_finite_weights_on_both_paths(monkeypatch, kernel_on):
    from lowbit_compiler import compress

    monkeypatch.setenv(cpu_quantize.ENV, kernel_on)
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[2, 5] = math.nan
    with pytest.raises(FormatError, match=r"layer model\.layers\.1\.self_attn\.o_proj: the weight holds inf or NaN"):
        compress(model, "w4a16")


def test_the_quantizing_pass_uses_the_kernel_and_matches_the_torch_path(monkeypatch, caplog):
    """compress w4a16 with the kernel and with LOWBIT_QUANTIZE_KERNEL=0 (the fallback, logged):
    the same codes, scales and layer records; the kernel ran once per linear."""
    from lowbit_compiler import compress
    def run():
        model = compress(make_model("llama"), "w4a16")
        state = {k: v.clone() for k, v in model.state_dict().items()}
        return state, model(prompt()).logits

    before = cpu_quantize.calls
    fast_state, fast_logits = run()
    assert cpu_quantize.calls - before == 15  # 7 linears in each of 2 layers, and the LM head
    monkeypatch.setenv(cpu_quantize.ENV, "0")
    monkeypatch.setattr(cpu_codegen, "_disabled_reason", [])
    with caplog.at_level(logging.WARNING, logger="lowbit_compiler"):
        slow_state, slow_logits = run()
    assert cpu_quantize.calls - before == 15  # the fallback ran
    assert any(f"{cpu_quantize.ENV}=0" in r.getMessage() for r in caplog.records)
    assert fast_state.keys() == slow_state.keys()
    for key in fast_state:
        assert torch.equal(fast_state[key], slow_state[key]), key
    assert torch.equal(fast_logits, slow_logits)


@pytest.mark.parametrize("isa", ("native", "portable"))
@pytest.mark.parametrize("key", FORMATS)
def test_dequantize_and_unpack_are_bit_identical_to_the_torch_reference(key, isa):
    """The C dequantiser the float reference runs (int3/int2 calls of more than 16 rows) and the
    C unpacking behind torch's int4pack layout and the lookup-table relayout: the same bits as
    formats.dequantize_parts / unpack_codes, without their int64 temporaries."""
    fmt = WeightFormat.parse(key)
    qw = formats.quantize(torch.randn(45, 1000 if fmt.group_size else 512) * 0.1, fmt)
    got = cpu_quantize.dequantize(fmt, qw.qweight, qw.scale, qw.zero, isa)
    assert got is not None and torch.equal(got, formats.dequantize_parts(fmt, qw.qweight, qw.scale, qw.zero))
    if fmt.bits < 8:
        ref = formats.unpack_codes(qw.qweight, fmt.bits)
        assert torch.equal(cpu_quantize.unpack_codes(qw.qweight, fmt.bits, isa=isa), ref)
        wide = cpu_quantize.unpack_codes(qw.qweight, fmt.bits, torch.int32, isa=isa)
        assert wide.dtype == torch.int32 and torch.equal(wide, ref.to(torch.int32))


def test_int3_prefill_reference_uses_the_c_dequantiser(monkeypatch):
    from lowbit_compiler import ops

    monkeypatch.setattr(ops, "dequantize_parts", lambda *a: pytest.fail("the torch dequantiser ran"))
    fmt = WeightFormat.parse("int3_g64_asym")
    qw = formats.quantize(torch.randn(70, 256), fmt)
    x = torch.randn(40, 256)
    expected = torch.nn.functional.linear(x, formats.dequantize(qw))
    assert torch.equal(ops.wo_linear_reference(x, qw.qweight, qw.scale, qw.zero, None, fmt.key, 256), expected)


@pytest.mark.parametrize("key", ["int4_g128_asym", "int8", "int3_g64_sym"])
def test_the_explicit_avx512_loops_sum_what_the_portable_loops_sum(key):
    """The AVX-512 build's min/max and signal/noise loops (intrinsics) give the portable build's
    scales, codes and float64 sums bit for bit (the same comparisons, the same order of adds)."""
    if cpu_codegen.isa_of(_kernel("native")) not in ("avx512", "avx512_vnni"):
        pytest.skip("no AVX-512 on this host: the portable loops are the only ones")
    fmt = WeightFormat.parse(key)
    w = torch.randn(33, 1000, generator=torch.Generator().manual_seed(5)) * 0.05
    w[0, :7] = 0.0
    native, portable = (cpu_quantize.quantize_with_sums(w, fmt, isa) for isa in ("native", "portable"))
    assert torch.equal(native[0].qweight, portable[0].qweight)
    assert torch.equal(native[0].scale.view(torch.int16), portable[0].scale.view(torch.int16))
    assert torch.equal(native[1], portable[1])
