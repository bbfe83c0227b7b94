"""Every weight format against an independent float64 implementation written here from the specs
(not from lowbit_compiler.formats), plus the edge cases that must not produce NaN or Inf."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit_compiler.formats import (E2M1_GRID, FormatError, WeightFormat, dequantize, pack_codes, quantize,
                                     sqnr_db, unpack_codes)
from lowbit_compiler.ops import wo_linear_reference

ALL = ["int8", "int4_g128_asym", "int4_g32_sym", "int3_g64_asym", "int3_g128_sym", "int2_g32_asym",
       "int2_g64_sym", "nf4_g64", "fp8_e4m3", "mxfp4", "nvfp4"]

# ---- independent references (float64, Python scalars where the spec is elementwise) ---------

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]


def fp8_e4m3_values() -> list[float]:
    """All finite e4m3fn values, decoded from the bit layout (1 sign, 4 exponent bias 7, 3 mantissa;
    exponent 15 with mantissa 7 is NaN; no infinities)."""
    values = []
    for bits in range(256):
        sign, exp, man = bits >> 7, (bits >> 3) & 15, bits & 7
        if exp == 15 and man == 7:
            continue
        v = (man / 8) * 2.0 ** -6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
        values.append(-v if sign else v)
    return values


def nearest(v: float, grid: list[float], even_index_wins=True) -> int:
    best = min(abs(v - g) for g in grid)
    ties = [i for i, g in enumerate(grid) if abs(v - g) == best]
    even = [i for i in ties if i % 2 == 0]
    return (even or ties)[0] if even_index_wins else ties[0]


def round_e4m3(v: float) -> float:
    """RNE onto e4m3fn, saturating at 448: ties go to the value whose mantissa is even."""
    v = max(-448.0, min(448.0, v))
    grid = sorted(set(fp8_e4m3_values()))
    best = min(abs(v - g) for g in grid)
    ties = [g for g in grid if abs(v - g) == best]
    if len(ties) == 1:
        return ties[0]
    return next(g for g in ties if _e4m3_mantissa(g) % 2 == 0)


def _e4m3_mantissa(v: float) -> int:
    if v == 0:
        return 0
    m, e = math.frexp(abs(v))  # v = m * 2^e, m in [0.5, 1)
    if e - 1 < -6:  # subnormal
        return round(abs(v) / 2.0 ** -9)
    return round((m * 2 - 1) * 8)


def ref_quant_dequant(w: torch.Tensor, key: str) -> torch.Tensor:
    """Quantize then dequantize, the spec way, in float64 (scales stored as the format says)."""
    fmt = WeightFormat.parse(key)
    w = w.double()
    n, k = w.shape
    bf16 = lambda x: float(torch.tensor(x, dtype=torch.float64).to(torch.bfloat16).double())  # noqa: E731
    out = torch.empty_like(w)
    if key == "int8":
        for r in range(n):
            s = bf16(max(w[r].abs().max().item() / 127, 1e-12))
            out[r] = torch.tensor([max(-128, min(127, round(v / s))) * s for v in w[r].tolist()])
        return out
    if key == "fp8_e4m3":
        for r in range(n):
            s = bf16(max(w[r].abs().max().item() / 448, 1e-12))
            out[r] = torch.tensor([round_e4m3(v / s) * s for v in w[r].tolist()])
        return out
    g = fmt.group_size
    if key == "nvfp4":
        amax = w.abs().max().item()
        glob = float(torch.tensor(amax / (6 * 448) if amax > 0 else 1.0, dtype=torch.float32))
    for r in range(n):
        for c in range(0, k, g):
            vals = w[r, c:c + g].tolist()
            amax = max(abs(v) for v in vals)
            if fmt.kind == "int":
                top, half = 2 ** fmt.bits - 1, 2 ** (fmt.bits - 1)
                if fmt.symmetric:
                    s, z = bf16(max(amax / (half - 0.5), 1e-12)), half
                else:
                    lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
                    s = bf16(max((hi - lo) / top, 1e-12))
                    z = min(max(round(-lo / s), 0), top)
                deq = [(min(max(round(v / s) + z, 0), top) - z) * s for v in vals]
            elif fmt.kind == "nf4":
                s = bf16(max(amax, 1e-12))
                deq = [NF4[nearest(v / s, NF4)] * s for v in vals]
            elif key == "mxfp4":
                e = -127 if amax == 0 else max(-127, min(127, math.floor(math.log2(amax)) - 2))
                deq = [math.copysign(E2M1_GRID[nearest(min(abs(v) / 2.0 ** e, 6.0), list(E2M1_GRID))], v) * 2.0 ** e
                       for v in vals]
            else:  # nvfp4
                s = round_e4m3(amax / 6 / glob)
                block = s * glob
                deq = [math.copysign(E2M1_GRID[nearest(min(abs(v) / block, 6.0), list(E2M1_GRID))], v) * block
                       if block > 0 else 0.0 for v in vals]
            out[r, c:c + g] = torch.tensor(deq)
    return out


# ---- tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ALL)
def test_round_trip_matches_the_independent_reference(key):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 256, generator=g) * 0.05
    w[0, :32] *= 40  # an outlier block
    ours = dequantize(quantize(w, WeightFormat.parse(key))).double()
    ref = ref_quant_dequant(w, key).float().double()  # dequantised weights are float32
    assert torch.equal(ours, ref), f"{key}: max diff {(ours - ref).abs().max().item():.3g}"


def test_e2m1_grid_is_the_ocp_mx_one_and_mx_scales_are_powers_of_two():
    assert E2M1_GRID == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    w = torch.tensor([[0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 4])  # every tie of the grid
    qw = quantize(w, WeightFormat.parse("mxfp4"))
    assert qw.scale.tolist() == [[127]]  # amax 5 -> 2^(2 - 2) = 1, e8m0 biased by 127
    assert dequantize(qw)[0, :8].tolist() == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # ties to even mantissa


@pytest.mark.parametrize("key", ALL)
@pytest.mark.parametrize("case", ["all_zero_group", "constant_group", "fp16_overflow_range"])
def test_no_nan_or_inf(key, case):
    w = torch.randn(4, 256) * 0.02
    if case == "all_zero_group":
        w[1, :128] = 0
        w[2] = 0
    elif case == "constant_group":
        w[1, :128] = 0.37
        w[2] = -5.0
    else:
        w = (torch.rand(4, 256) * 2 - 1) * 65504.0  # the whole fp16 range, stored in fp16
        w = w.half()
    qw = quantize(w, WeightFormat.parse(key))
    deq = dequantize(qw)
    for t in (qw.scale, qw.zero, deq):
        if t is not None:
            assert torch.isfinite(t.float()).all(), f"{key} {case}"
    x = torch.randn(3, 256).to(w.dtype)
    y = wo_linear_reference(x, qw.qweight, qw.scale, qw.zero, None, qw.format.key, 256)
    assert torch.isfinite(y.float()).all() or w.dtype == torch.float16  # fp16 outputs may overflow by value
    assert sqnr_db(w.float(), deq) > (5 if "int2" in key else 9)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bit_packing_round_trip_and_layout(bits):
    q = torch.randint(0, 2 ** bits, (5, 64), dtype=torch.uint8)
    packed = pack_codes(q, bits)
    assert packed.shape == (5, 64 * bits // 8) and torch.equal(unpack_codes(packed, bits), q)
    # little-endian bit stream: code i sits at bits [b*i, b*(i+1)) of the row
    row = int.from_bytes(bytes(packed[0].tolist()), "little")
    assert [(row >> (bits * i)) & (2 ** bits - 1) for i in range(64)] == q[0].tolist()


@pytest.mark.parametrize("key, bits_per_weight", [
    ("int3_g128_asym", 3 + 24 / 128), ("int2_g64_sym", 2 + 16 / 64), ("nf4_g64", 4 + 16 / 64),
    ("fp8_e4m3", 8 + 16 / 4096), ("mxfp4", 4 + 8 / 32), ("nvfp4", 4 + 8 / 16 + 32 / (4096 * 4096)),
])
def test_bytes_are_the_true_storage(key, bits_per_weight):
    fmt = WeightFormat.parse(key)
    assert fmt.bits_per_weight(4096, 4096) == pytest.approx(bits_per_weight)
    qw = quantize(torch.randn(64, 256), fmt)
    assert qw.nbytes() == fmt.storage_bytes(64, 256)
    for name, want in fmt.layout(64, 256).items():
        got = getattr(qw, name)
        assert (got is None) == (want is None) and (got is None or (got.dtype, tuple(got.shape)) == want)


def test_format_keys_round_trip_and_unknown_keys_name_the_choices():
    for key in ALL:
        assert WeightFormat.parse(key).key == key
    with pytest.raises(FormatError, match="expected 'int8', 'int<2|3|4>_g<G>_<sym|asym>', 'nf4_g<G>'"):
        WeightFormat.parse("int5_g64_sym")


@pytest.mark.parametrize("arch, recipe, floor", [
    ("llama", "w3a16", 5.0), ("llama", "nf4", 10.0), ("qwen2", "mxfp4", 10.0), ("bert", "nvfp4", 35.0),
])
@pytest.mark.heavy
def test_new_format_presets_run_through_both_flows(arch, recipe, floor):
    """Logits SQNR against the float model (tiny random models: low absolute numbers; w4a16 gives
    12.7 / 13.6 / 40.0 dB on the same models). Formats without a CPU kernel use the reference
    path, with that reason; int3 runs the generated lookup-table kernel and NF4 the generated NF4
    kernel (9 rows), no fallback."""
    from lowbit_compiler import compress
    from tests.conftest import make_model, prompt
    from tests.helpers import Recorder

    ids = prompt()
    model = make_model(arch)
    rec = Recorder(recipe=recipe, debug=True)  # debug: the IR verifier checks every stored tensor's layout
    with torch.no_grad():
        ref = model(ids)[0]
        out = torch.compile(model, backend=rec)(ids)[0]
        offline = compress(make_model(arch), recipe)(ids)[0]
    assert sqnr_db(ref, out) >= floor
    if recipe == "nf4":  # the NF4 table path's activation steps (tests/backends/test_cpu_codegen.py)
        assert sqnr_db(offline.double(), out.double()) >= 60.0
    else:
        torch.testing.assert_close(offline, out)
    summary = rec.summaries[0]
    fmt = WeightFormat.parse(next(iter(summary["layers"].values()))["format"])
    assert fmt.key == {"w3a16": "int3_g128_asym", "nf4": "nf4_g64", "mxfp4": "mxfp4", "nvfp4": "nvfp4"}[recipe]
    expected = ([] if recipe in ("w3a16", "nf4")
                else [f"format {fmt.key} has no packed CPU kernel (torch has int8 and int4 ones)"])
    assert list(summary["fallbacks"]) == expected
