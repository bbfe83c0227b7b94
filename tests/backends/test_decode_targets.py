"""Issue 15's cost-model targets at Llama-2-7B shapes (hidden 4096, intermediate 11008, 32 heads,
no grouped KV), checked without a GPU: modelled DRAM bytes against the minimum, the launch grid
against an H100's 132 SMs, and the sm_90 compile (registers, spills) of the variant a GPU runs.

The groups are the four kernels per decoder layer that ``fusion.find_groups`` builds for Llama
(asserted on the test model in tests/backends/test_fusion.py): q, k and v side by side with the
RMSNorm (one launch), o + residual, gate.up + RMSNorm + SiLU.mul, down + residual.
"""
from __future__ import annotations

import dataclasses

import pytest

from lowbit_compiler.backends import codegen, kernel_cache
from tests.backends.test_codegen import make_spec

HIDDEN, INTERMEDIATE = 4096, 11008
GROUPS = {  # name: (N, K, prologue, epilogue)
    "q/k/v": ((HIDDEN,) * 3, HIDDEN, "rms", "qkv"),
    "o": (HIDDEN, HIDDEN, None, "residual"),
    "gate.up": (INTERMEDIATE, HIDDEN, "rms", "gated"),
    "down": (HIDDEN, INTERMEDIATE, None, "residual"),
}
FORMATS = ["int4_g128_asym", "int8"]  # w4a16's and w8a16's weight formats
DECODE_ROWS, PREFILL_ROWS = (1, 4, 16), 512
DTYPE = "float16"
ITEMSIZE = {"x": 2, "out": 2, "norm_w": 2, "e0": 2, "bias": 2}


def total(n) -> int:
    return sum(n) if isinstance(n, tuple) else n


def spec(group: str, fmt: str, rows: int):
    n, k, prologue, epilogue = GROUPS[group]
    return make_spec(rows, fmt, prologue, epilogue, DTYPE, on_gpu=True, n=total(n), k=k)


def cost(group: str, fmt: str, rows: int) -> tuple[float, int]:
    """(modelled DRAM bytes read / the minimum, programs launched)."""
    n, k, _, _ = GROUPS[group]
    s = spec(group, fmt, rows)
    t = codegen.traffic(s, n, k, ITEMSIZE).at(rows)
    return t["read"] / t["min_read"], int(codegen.programs(s, n).subs(codegen.M, rows))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group", list(GROUPS))
def test_decode_reads_each_byte_about_once_and_fills_the_sms(group, fmt):
    for rows in DECODE_ROWS:
        ratio, programs = cost(group, fmt, rows)
        assert ratio <= 1.1, f"{group} {fmt} M={rows}: reads {ratio:.3f}x the minimum"
        assert programs >= codegen.MIN_DECODE_PROGRAMS, f"{group} {fmt} M={rows}: {programs} programs"
        s = spec(group, fmt, rows)
        assert s.variant == "gemv" and s.fma == (rows <= 4)
    ratio, _ = cost(group, fmt, PREFILL_ROWS)
    assert ratio <= 1.5, f"{group} {fmt} M={PREFILL_ROWS}: reads {ratio:.3f}x the minimum"


def test_the_targets_can_fail():
    """The same model flags what the issue measured: one program per row (weights streamed M
    times) and the statistics pass per column tile (the lanes' loads, ~2x the activations)."""
    n, k, _, _ = GROUPS["q/k/v"]
    per_row = codegen.KernelSpec(fmt="int4_g128_asym", variant="gemv", block_m=1, block_n=8, block_k=128,
                                 num_warps=4, x_dtype=DTYPE, out_dtype=DTYPE)
    t = codegen.traffic(per_row, k, k, ITEMSIZE)
    assert t.at(4)["loaded"] > 3.5 * t.at(4)["min_read"]  # M = 4 rows, each streaming the weight
    unsplit = dataclasses.replace(spec("o", "int4_g128_asym", 1), split_k=1)
    assert int(codegen.programs(unsplit, k).subs(codegen.M, 1)) < codegen.MIN_DECODE_PROGRAMS  # 512 of 528
    # a split-K workspace (M x N fp32) comparable to the weight (here K = 64) breaks the 1.1x bound
    t = codegen.traffic(spec("o", "int8", 16), k, 64, ITEMSIZE).at(16)
    assert t["read"] > 1.1 * t["min_read"]


@pytest.mark.parametrize("rows", DECODE_ROWS)
def test_qkv_side_by_side_reads_the_activations_and_statistics_once(rows):
    """One launch for q, k and v instead of three: the DRAM model saves exactly two reads of x, of
    the norm weight and of the per-row statistics (and the split-K workspace where three times the
    column tiles fill the SMs without splitting), and launches no more programs than three kernels
    each split to fill the SMs on its own."""
    fused = spec("q/k/v", "int4_g128_asym", rows)
    alone = make_spec(rows, "int4_g128_asym", "rms", "none", DTYPE, on_gpu=True, n=HIDDEN, k=HIDDEN)
    t3 = codegen.traffic(fused, (HIDDEN,) * 3, HIDDEN, ITEMSIZE).at(rows)
    t1 = codegen.traffic(alone, HIDDEN, HIDDEN, ITEMSIZE).at(rows)
    saved = 2 * (rows * HIDDEN * ITEMSIZE["x"] + HIDDEN * ITEMSIZE["norm_w"] + rows * len(fused.stats) * 4)

    def workspace(s, n):  # the split-K partial sums, read back once (none when the tiles alone fill the SMs)
        return rows * n * 4 if s.split_k > 1 else 0

    saved += 3 * workspace(alone, HIDDEN) - workspace(fused, 3 * HIDDEN)
    assert 3 * t1["read"] - t3["read"] == saved
    programs = int(codegen.programs(fused, (HIDDEN,) * 3).subs(codegen.M, rows))
    assert codegen.MIN_DECODE_PROGRAMS <= programs <= 3 * int(codegen.programs(alone, HIDDEN).subs(codegen.M, rows))


def gpu_cases(full: bool):
    if not full:  # default suite: gate.up int4 (two dequantised tiles, the most registers) per decode kernel
        return [("gate.up", "int4_g128_asym", 4), ("gate.up", "int4_g128_asym", 16), ("gate.up", "nvfp4", 16),
                ("q/k/v", "int8", 16)]
    return [(g, f, r) for g in GROUPS for f in FORMATS for r in (1, 4, 16, PREFILL_ROWS)]


def check_sm90(cases):
    specs = [spec(*c) for c in cases]
    reports = kernel_cache.gpu_reports([(s, codegen.make_inputs(s, 4, 64, 256)) for s in specs])
    for case, report, s in zip(cases, reports, specs):
        assert report["arch"] == "sm_90" and 0 < report["registers"] <= 255, (case, report)
        assert report["spill_bytes"] == 0, (case, report)
        if s.stats:  # the statistics kernel is compiled and reported too
            assert 0 < report["stats_kernel"]["registers"] <= 255 and report["stats_kernel"]["spill_bytes"] == 0, (
                case, report)
        else:
            assert "stats_kernel" not in report
    return reports


@pytest.mark.heavy
def test_decode_variants_compile_for_sm90_without_spills():
    """The GPU variant (fp16 tensor-core dots, native conversions), as lowering builds it on CUDA."""
    check_sm90(gpu_cases(full=False))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int3_g128_asym", "int2_g64_sym", "nf4_g64", "mxfp4", "nvfp4"])
def test_packed_lookup_and_e2m1_formats_compile_for_sm90_without_spills(fmt):
    check_sm90([(g, fmt, r) for g in GROUPS for r in (1, 4, 16, PREFILL_ROWS)])


@pytest.mark.slow
def test_spqr_side_read_compiles_for_sm90_without_spills():
    """int3 + SpQR outliers (w4a16-spqr): the CSR loop in the epilogue, every group and shape class."""
    cases = [(g, "int3_g128_asym", r) for g in GROUPS for r in (1, 4, 16, PREFILL_ROWS)]
    specs = [dataclasses.replace(spec(*c), outliers=True) for c in cases]
    reports = kernel_cache.gpu_reports([(s, codegen.make_inputs(s, 4, 64, 256)) for s in specs])
    for case, report in zip(cases, reports):
        assert 0 < report["registers"] <= 255 and report["spill_bytes"] == 0, (case, report)


@pytest.mark.slow
def test_every_group_and_shape_class_compiles_for_sm90_without_spills():
    check_sm90(gpu_cases(full=True))


if __name__ == "__main__":  # the README's table: python -m tests.backends.test_decode_targets
    cases = gpu_cases(full=True)
    reports = dict(zip(cases, kernel_cache.gpu_reports([(spec(*c), codegen.make_inputs(spec(*c), 4, 64, 256))
                                                         for c in cases])))
    print("| group | format | M | kernel | split-K | programs | DRAM read / min | lane loads / min | registers | spills "
          "| stats kernel registers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for g, f, r in cases:
        n, k, _, _ = GROUPS[g]
        s = spec(g, f, r)
        t = codegen.traffic(s, n, k, ITEMSIZE).at(r)
        ratio, programs = cost(g, f, r)
        kind = "gemm" if s.variant == "gemm" else "gemv (FMA)" if s.fma else "gemv (tl.dot)"
        rep = reports[(g, f, r)]
        print(f"| {g} | {f} | {r} | {kind} | {s.split_k} | {programs} | {ratio:.3f} | {t['loaded'] / t['min_read']:.2f} "
              f"| {rep['registers']} | {rep['spill_bytes']} | {rep.get('stats_kernel', {}).get('registers', '-')} |")
