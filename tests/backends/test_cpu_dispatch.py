"""The CPU dispatch (``backends/cpu_dispatch.py``): every candidate kernel of a weight-only linear
against a float64 reference on the same inputs, the dequantization kernel's builds bit for bit,
the measured choice (with a fake clock: real timings on a shared machine would make the decisions
vary) honoured per row class and cached on disk, the overrides, and the layer record."""
from __future__ import annotations

import collections
import json
import logging

import pytest
import torch

from lowbit_compiler.backends import cpu_codegen, cpu_dispatch, cpu_kernels
from lowbit_compiler.formats import WeightFormat, dequantize_parts, quantize, sqnr_db

pytestmark = pytest.mark.skipif(cpu_dispatch.dequant_kernel() is None,
                                reason=f"no C compiler: {cpu_codegen._disabled_reason}")

# float64-reference floors (dB) per candidate; measured on the test shapes: generated 132-145,
# dequant_fp32 138-139, torch's (bf16 activations and output) 51-52, dequant_bf16 (bf16 activations,
# weights and output) 51: the weights' rounding to bf16 costs about nothing next to the output's
FLOORS = {"generated": 110, "dequant_fp32": 110, "torch": 45, "dequant_bf16": 45, "gemm_bf16": 45}
# the generated GEMM is a candidate where it is built (AVX512_BF16): tests/backends/test_cpu_gemm.py
GEMM = ["gemm_bf16"] if cpu_dispatch.gemm_kernel() is not None else []


def _weight(fmt: str, n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = quantize(torch.randn(n, k, generator=gen) * 0.05, WeightFormat.parse(fmt))
    return q, cpu_kernels.prepack(q.qweight, q.scale, q.zero, fmt, k, torch.bfloat16)


def _reference(x: torch.Tensor, q, k: int, bias: torch.Tensor | None) -> torch.Tensor:
    w = dequantize_parts(q.format, q.qweight, q.scale, q.zero)[:, :k].double()
    return x.double() @ w.T + (0 if bias is None else bias.double())


@pytest.mark.parametrize("fmt", ["int8", "int4_g128_asym", "int4_g32_sym"])
def test_every_candidate_meets_the_float64_reference(fmt):
    """Each kernel the dispatch may pick, on the same inputs: odd N (torch's int4 layout pads it),
    decode and prefill row counts, bias; the counter shows that candidate ran (no silent
    fallback to torch's)."""
    n, k = 200, 256
    q, packed = _weight(fmt, n, k)
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(n, generator=gen)
    for rows in (3, 40):
        x = torch.randn(rows, k, generator=gen)
        names = cpu_dispatch.candidates(packed, rows, torch.bfloat16)
        assert names == (["generated", "torch"] if rows <= cpu_codegen.MAX_ROWS
                         else ["torch", *GEMM, "dequant_bf16", "dequant_fp32"])
        ref = _reference(x, q, k, bias)
        for name in names:
            before = cpu_dispatch.counter[(fmt, name)]
            y = cpu_kernels.run_candidate(name, x, packed, bias, torch.bfloat16)
            assert cpu_dispatch.counter[(fmt, name)] == before + 1, name
            # contiguous: a strided output would send the attention after q/k/v to SDPA's slow math path
            assert y.shape == (rows, n) and y.dtype == torch.float32 and y.is_contiguous()
            assert sqnr_db(ref, y.double()) >= FLOORS[name], (name, rows, sqnr_db(ref, y.double()))


def test_k_padded_to_the_group_has_no_generated_candidate_and_dequantizes_right():
    """K = 200 with groups of 128 (stored padded to 256): the generated kernel does not take it, the
    dequantize candidates read only the 200 real columns."""
    fmt, n, k = "int4_g128_asym", 72, 200
    q, packed = _weight(fmt, n, k, seed=9)
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(9))
    assert cpu_dispatch.candidates(packed, 3, torch.bfloat16) == ["torch"]
    ref = _reference(x, q, k, None)
    for name in ("dequant_bf16", "dequant_fp32"):
        assert sqnr_db(ref, cpu_kernels.run_candidate(name, x, packed, None, torch.bfloat16).double()) >= FLOORS[name]


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
def test_dequantization_kernel_is_exact_on_every_build(isa):
    """bf16 and float32 rows equal the reference dequantiser (rounded once to bf16) bit for bit:
    int8, int4 sym/asym at groups 32-128, NF4 (its table looked up in registers), int3 / int2 (bit
    streams; codes across byte boundaries), K padded to the group (200 of 256, 72 of 96-128
    columns), a block of rows from the middle."""
    for fmt in ("int8", "int4_g128_asym", "int4_g32_sym", "int4_g64_asym", "nf4_g64", "nf4_g32",
                "int3_g128_asym", "int3_g32_sym", "int2_g64_asym", "int2_g32_sym"):  # int3 / int2: bit streams
        for k in (256, 200, 72):
            q, _ = _weight(fmt, 37, k, seed=2)
            ref = dequantize_parts(q.format, q.qweight, q.scale, q.zero)[:, :k]
            for dtype in (torch.float32, torch.bfloat16):
                out = cpu_dispatch.dequant_rows(q.qweight, q.scale, q.zero, fmt, k, 3, 30, dtype, isa=isa)
                assert torch.equal(out, ref[3:33].to(dtype)), (fmt, k, dtype)
    built = cpu_codegen.isa_of(cpu_dispatch._dequant_build(isa))
    assert built == {"avx2": "avx2", "portable": "portable"}.get(isa, built)
    if isa == "native" and "avx512_bf16" in cpu_codegen._host_flags().split():
        assert built == "avx512_bf16"


def test_blocks_of_rows_give_the_one_block_result(monkeypatch):
    """dequantize-then-matmul over several blocks of rows (a last, shorter block; bias; output cast)
    equals one block."""
    q, packed = _weight("int4_g128_asym", 200, 256, seed=3)
    gen = torch.Generator().manual_seed(3)
    x, bias = torch.randn(40, 256, generator=gen), torch.randn(200, generator=gen)
    args = (q.qweight, q.scale, q.zero, bias, q.format.key, 256)
    whole = cpu_dispatch.dequant_linear(x, *args, torch.float32)
    monkeypatch.setattr(cpu_dispatch, "BLOCK_BYTES", 64 * 256 * 4)  # 64 rows per block: 64, 64, 64, 8
    assert cpu_dispatch.block_rows(256, torch.float32, 200) == 64
    blocks = cpu_dispatch.dequant_linear(x, *args, torch.float32)
    assert blocks.is_contiguous() and sqnr_db(whole.double(), blocks.double()) >= 130
    assert sqnr_db(_reference(x, q, 256, bias), blocks.double()) >= FLOORS["dequant_fp32"]
    halves = cpu_dispatch.dequant_linear(x, *args, torch.bfloat16, torch.float32)
    assert halves.dtype == torch.float32 and halves.is_contiguous()
    assert sqnr_db(_reference(x, q, 256, bias), halves.double()) >= FLOORS["dequant_bf16"]



@pytest.mark.parametrize("blocked", [False, True])
def test_dequant_linear_returns_tensors_its_reused_temporaries_do_not_alias(monkeypatch, blocked):
    """The cast rows and the bf16 products live in reused per-thread temporaries: a result must
    survive the next call (another x, another weight), equal to a fresh computation, bit for bit."""
    if blocked:
        monkeypatch.setattr(cpu_dispatch, "BLOCK_BYTES", 64 * 256 * 2)  # bf16: 64 rows per block
    q, _ = _weight("int4_g128_asym", 200, 256, seed=4)
    q2, _ = _weight("int4_g128_asym", 72, 256, seed=5)
    gen = torch.Generator().manual_seed(4)
    x, x2 = torch.randn(40, 256, generator=gen), torch.randn(40, 256, generator=gen)
    args = (q.qweight, q.scale, q.zero, None, q.format.key, 256)
    first = cpu_dispatch.dequant_linear(x, *args, torch.bfloat16, torch.float32)
    kept = first.clone()
    other = cpu_dispatch.dequant_linear(x2, q2.qweight, q2.scale, q2.zero, None, q2.format.key, 256,
                                        torch.bfloat16, torch.float32)
    same_bf16 = cpu_dispatch.dequant_linear(x.bfloat16(), *args, torch.bfloat16)  # no cast: the product itself
    assert torch.equal(first, kept)  # not overwritten by the later calls
    w = dequantize_parts(q.format, q.qweight, q.scale, q.zero)[:, :256].bfloat16()
    w2 = dequantize_parts(q2.format, q2.qweight, q2.scale, q2.zero)[:, :256].bfloat16()
    assert torch.equal(first, (x.bfloat16() @ w.t()).float())  # what torch gives with fresh tensors
    assert torch.equal(other, (x2.bfloat16() @ w2.t()).float())
    assert torch.equal(same_bf16, x.bfloat16() @ w.t())
    assert torch.equal(first, kept)  # nor by the uncast call (its product is the returned tensor)

@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Measured dispatch with a private plan file and memory and a fake clock: ``times[rows]`` maps
    each candidate to the seconds it takes at that many rows; ``times["calls"]`` counts timings."""
    monkeypatch.setenv(cpu_dispatch.ENV, "measure")
    monkeypatch.setattr(cpu_dispatch, "dispatch_file", lambda: tmp_path / "dispatch.json")
    monkeypatch.setattr(cpu_dispatch, "_PLANS", {})
    monkeypatch.setattr(cpu_dispatch, "_RECORDS", {})
    monkeypatch.setattr(cpu_dispatch, "_load", lambda: (0.5, 2))  # a quiet machine (see the busy test)
    times: dict = {"calls": 0}

    def fastest(calls, repeats=cpu_dispatch.REPEATS, cold=None, clock=None, drop_above=None):
        times["calls"] += 1
        assert set(cold) == set(calls)  # every contender's weights are evicted before its timing
        for call in calls.values():
            call()  # the real calls still run (and must work)
        rows = times["rows"]
        return {name: times[rows][name] for name in calls}

    monkeypatch.setattr(cpu_dispatch, "fastest", fastest)
    return times


def test_the_measured_choice_is_honoured_per_row_class_and_cached_on_disk(measured, caplog):
    fmt, n, k = "int4_g128_asym", 200, 256
    q, packed = _weight(fmt, n, k, seed=4)
    measured[1] = {"generated": 1.04e-3, "torch": 1.0e-3}  # torch within the 5% margin: the static rule stays
    measured[4] = {"generated": 2.0e-3, "torch": 1.0e-3}  # torch clearly faster
    measured[512] = {"torch": 9e-3, "dequant_bf16": 3e-3, "dequant_fp32": 6e-3, "gemm_bf16": 4e-3}
    x1, x3, x300 = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) for m in (1, 3, 300))
    with caplog.at_level(logging.INFO, logger="lowbit_compiler"):
        for rows, x, want in ((1, x1, "generated"), (4, x3, "torch"), (512, x300, "dequant_bf16")):
            measured["rows"] = rows
            cpu_kernels.packed_linear(x, packed, None, torch.bfloat16)  # timed (the candidates run) and decided
            before = cpu_dispatch.counter[(fmt, want)]
            y = cpu_kernels.packed_linear(x, packed, None, torch.bfloat16)
            assert cpu_dispatch.counter[(fmt, want)] == before + 1, (rows, want)
            assert torch.equal(y, cpu_kernels.run_candidate(want, x, packed, None, torch.bfloat16))
    assert measured["calls"] == 3
    record = cpu_dispatch.layer_record(fmt, n, k, torch.bfloat16)
    assert "timed per row class" in record["rule"]
    assert record["1 row"].startswith("the generated C kernel") and "no other kernel was 5% faster" in record["1 row"]
    assert record["3-4 rows"].startswith("torch's packed kernel: measured at 4 rows: torch 1.000 ms, generated 2.000")
    assert record["257+ rows"].startswith("dequantize (generated C) + bf16 matmul")
    assert "CPU dispatch int4_g128_asym 200x256, 3-4 rows" in caplog.text
    stored = json.loads((cpu_dispatch.dispatch_file()).read_text())
    assert len(stored) == 3 and all(key.startswith(f"dense-v{cpu_dispatch.VERSION}|{fmt}|N=200|K=256|")
                                    for key in stored)
    assert sorted(v["choice"] for v in stored.values()) == ["dequant_bf16", "generated", "torch"]

    # a new process: plans from disk, nothing timed again; same rows, same choices
    cpu_dispatch._PLANS.clear()
    packed.forget_choices()
    for rows, x, want in ((1, x1, "generated"), (4, x3, "torch"), (512, x300, "dequant_bf16")):
        before = cpu_dispatch.counter[(fmt, want)]
        cpu_kernels.packed_linear(x, packed, None, torch.bfloat16)
        assert cpu_dispatch.counter[(fmt, want)] == before + 1
    assert measured["calls"] == 3


def test_a_plan_timed_on_a_busy_machine_is_not_kept_on_disk(measured, monkeypatch):
    monkeypatch.setattr(cpu_dispatch, "_load", lambda: (9.5, 2))
    q, packed = _weight("int8", 64, 128, seed=8)
    measured["rows"], measured[2] = 2, {"generated": 1e-3, "torch": 2e-3}
    cpu_kernels.packed_linear(torch.randn(2, 128), packed, None, torch.bfloat16)
    record = cpu_dispatch.layer_record("int8", 64, 128, torch.bfloat16)["2 rows"]
    assert "timed while the machine was busy (load 9.5 on 2 CPUs): kept for this process only" in record
    assert not cpu_dispatch.dispatch_file().exists() and measured["calls"] == 1
    packed.forget_choices()  # the same process: the plan from memory, not timed again
    cpu_kernels.packed_linear(torch.randn(2, 128), packed, None, torch.bfloat16)
    assert measured["calls"] == 1


def test_torchs_layout_is_dropped_when_only_timed(measured):
    """int4: torch's layout (a second copy of the weight) is built to time torch's kernel and
    freed again when the generated kernel wins."""
    fmt, k = "int4_g64_asym", 256
    q, packed = _weight(fmt, 128, k, seed=5)
    assert packed.weight is None
    measured["rows"], measured[1] = 1, {"generated": 1e-3, "torch": 2e-3}
    cpu_kernels.packed_linear(torch.randn(1, k), packed, None, torch.bfloat16)
    assert packed.weight is None and packed._dispatch and set(packed._dispatch.values()) == {"generated"}


@pytest.mark.parametrize("mode,rows,want", [("torch", 1, "torch"), ("torch", 40, "torch"),
                                            ("generated", 2, "generated"), ("generated", 40, "torch"),
                                            ("dequant", 40, "dequant_bf16"), ("dequant", 1, "dequant_bf16")])
def test_the_override_is_honoured(monkeypatch, mode, rows, want):
    monkeypatch.setenv(cpu_dispatch.ENV, mode)
    fmt, k = "int8", 128
    q, packed = _weight(fmt, 64, k, seed=6)
    before = cpu_dispatch.counter[(fmt, want)]
    cpu_kernels.packed_linear(torch.randn(rows, k), packed, None, torch.bfloat16)
    assert cpu_dispatch.counter[(fmt, want)] == before + 1
    label = cpu_dispatch.class_label(cpu_dispatch.row_class(rows))
    suffix = " (the static rule)" if mode == "generated" else ""
    assert cpu_dispatch.layer_record(fmt, 64, k, torch.bfloat16)[label].endswith(f"{cpu_dispatch.ENV}={mode}{suffix}")


def test_the_memoised_decode_path_follows_the_environment_between_calls(monkeypatch):
    """``packed_linear`` / ``fused_linear`` keep the bound kernel per (rows, environment): a variable
    changed between two calls of one weight takes effect at the next call, and back again."""
    fmt, k = "int4_g128_asym", 256
    q, packed = _weight(fmt, 64, k, seed=8)
    x = torch.randn(1, k)
    ref = _reference(x, q, k, None)
    runs = []
    for mode in ("generated", "torch", "generated"):
        monkeypatch.setenv(cpu_dispatch.ENV, mode)
        before = collections.Counter(cpu_dispatch.counter)
        y = cpu_kernels.packed_linear(x, packed, None, torch.bfloat16)
        runs.append([kind for (f, kind), n in (cpu_dispatch.counter - before).items() if f == fmt and n])
        assert sqnr_db(ref, y.double()) > FLOORS[runs[-1][0]], (mode, runs[-1])
    assert runs == [["generated"], ["torch"], ["generated"]]
    fused = cpu_kernels.FusedWeights([packed, _weight(fmt, 32, k, seed=9)[1]])
    name = fused.bound().name
    calls, torch_calls = cpu_codegen.calls[name], cpu_dispatch.counter[(fmt, "torch")]
    monkeypatch.setenv(cpu_dispatch.ENV, "generated")
    outs = cpu_kernels.fused_linear(x, fused, (None, None), torch.bfloat16)
    assert cpu_codegen.calls[name] == calls + 1 and sqnr_db(ref, outs[0].double()) > FLOORS["generated"]
    monkeypatch.setenv(cpu_codegen.ENV, "0")  # generated kernels off: each weight by torch's kernel
    outs = cpu_kernels.fused_linear(x, fused, (None, None), torch.bfloat16)
    assert cpu_codegen.calls[name] == calls + 1 and cpu_dispatch.counter[(fmt, "torch")] == torch_calls + 2
    assert sqnr_db(ref, outs[0].double()) > FLOORS["torch"]


def test_the_decode_path_converts_and_keeps_its_operands(monkeypatch):
    """bf16 bias, norm weight and residual reach the fused-prologue kernel as float32 copies that
    live through the call: the result matches float64 rms_norm + linear + bias + residual."""
    monkeypatch.setenv(cpu_dispatch.ENV, "generated")
    fmt, k, n = "int4_g128_asym", 256, 64
    q, packed = _weight(fmt, n, k, seed=10)
    gen = torch.Generator().manual_seed(11)
    x, residual = torch.randn(2, k, generator=gen), torch.randn(2, n, generator=gen).bfloat16()
    bias, norm = torch.randn(n, generator=gen).bfloat16(), (1 + 0.1 * torch.randn(k, generator=gen)).bfloat16()
    before = cpu_codegen.calls[packed.generated().name + "_ext"]
    y = cpu_kernels.packed_linear(x, packed, bias, torch.bfloat16, norm_weight=norm, eps=1e-6, residual=residual)
    assert cpu_codegen.calls[packed.generated().name + "_ext"] == before + 1
    xd = x.double()
    xn = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.double()
    ref = residual.double() + _reference(xn, q, k, bias)
    assert sqnr_db(ref, y.double()) > FLOORS["generated"]


def test_an_unknown_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv(cpu_dispatch.ENV, "fastest")
    q, packed = _weight("int8", 64, 128, seed=7)
    with pytest.raises(ValueError, match="LOWBIT_CPU_DISPATCH='fastest'.*measure, generated, torch, dequant"):
        cpu_kernels.packed_linear(torch.randn(1, 128), packed, None, torch.bfloat16)


def test_compressed_and_compiled_layer_records_name_the_dispatch(measured):
    """compress: an int4 layer's record holds the live ``cpu_kernel`` entry, filled in by the calls
    (9 rows, then one); compile: the same entry, from the lowering."""
    from lowbit_compiler import compress

    from tests.helpers import Recorder

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(256, 136)).eval()

    measured[16] = {"generated": 2e-3, "torch": 1e-3}
    measured[1] = {"generated": 1e-3, "torch": 2e-3}
    compressed = compress(model(), "w4a16", example_inputs=torch.randn(2, 256), progress=False)
    record = compressed.lowbit_summary["layers"]["0"]["cpu_kernel"]
    assert set(record) == {"rule"} and "timed per row class" in record["rule"]
    with torch.no_grad():
        measured["rows"] = 16
        compressed(torch.randn(9, 256))
        measured["rows"] = 1
        compressed(torch.randn(1, 256))
    assert record["9-16 rows"].startswith("torch's packed kernel: measured at 16 rows")
    assert record["1 row"].startswith("the generated C kernel (float32): measured at 1 rows")

    rec = Recorder(recipe="w4a16", progress=False)
    with torch.no_grad():
        torch.compile(model(), backend=rec)(torch.randn(9, 256))
    assert rec.summaries[0]["layers"]["0"]["cpu_kernel"] is record  # same format and shape: one live entry


def test_nf4_runs_the_generated_kernel_and_dequantize_then_matmul():
    """NF4 has no torch kernel: decode-sized calls have the generated kernel (its int8 table: the
    table's rounding floor), larger ones the dequantize candidates (float32: the reference's
    numerics); torch's layout is never built, and each candidate's counter moves."""
    fmt, n, k = "nf4_g64", 150, 256
    q, packed = _weight(fmt, n, k, seed=12)
    gen = torch.Generator().manual_seed(12)
    bias = torch.randn(n, generator=gen)
    floors = {**FLOORS, "generated": 43}  # the NF4 table path (test_cpu_codegen: measured 45-51 dB)
    for rows in (1, 7, 40):
        x = torch.randn(rows, k, generator=gen)
        names = cpu_dispatch.candidates(packed, rows, torch.bfloat16)
        assert names == (["generated"] if rows <= cpu_codegen.MAX_ROWS else [*GEMM, "dequant_bf16", "dequant_fp32"])
        assert cpu_dispatch.static_choice(packed, rows) == ("generated" if rows <= cpu_codegen.MAX_ROWS
                                                            else "dequant_fp32")
        ref = _reference(x, q, k, bias)
        for name in names:
            before = cpu_dispatch.counter[(fmt, name)]
            y = cpu_kernels.run_candidate(name, x, packed, bias, torch.bfloat16)
            assert cpu_dispatch.counter[(fmt, name)] == before + 1, name
            assert y.shape == (rows, n) and y.dtype == torch.float32 and y.is_contiguous()
            assert sqnr_db(ref, y.double()) >= floors[name], (name, rows, sqnr_db(ref, y.double()))
    assert packed.weight is None and packed.scales is None
    with pytest.raises(RuntimeError, match="no packed CPU kernel for nf4_g64"):
        packed.torch_layout()


def test_nf4_measured_choice_above_the_generated_kernel(measured):
    fmt, n, k = "nf4_g64", 96, 256
    q, packed = _weight(fmt, n, k, seed=13)
    measured["rows"], measured[64] = 64, {"dequant_bf16": 1e-3, "dequant_fp32": 3e-3, "gemm_bf16": 2e-3}
    x = torch.randn(40, k)
    cpu_kernels.packed_linear(x, packed, None, torch.bfloat16)
    before = cpu_dispatch.counter[(fmt, "dequant_bf16")]
    cpu_kernels.packed_linear(x, packed, None, torch.bfloat16)
    assert cpu_dispatch.counter[(fmt, "dequant_bf16")] == before + 1
    record = cpu_dispatch.layer_record(fmt, n, k, torch.bfloat16)["17-64 rows"]
    assert record.startswith("dequantize (generated C) + bf16 matmul, blockwise: measured at 64 rows")
    measured["rows"] = 1
    cpu_kernels.packed_linear(torch.randn(1, k), packed, None, torch.bfloat16)  # one candidate: nothing timed
    assert measured["calls"] == 1
    assert cpu_dispatch.layer_record(fmt, n, k, torch.bfloat16)["1 row"] == (
        "the generated C kernel (float32): the only kernel for this call")


@pytest.mark.parametrize("mode,rows,want", [("torch", 1, "generated"), ("torch", 40, "dequant_fp32"),
                                            ("generated", 40, "dequant_fp32"), ("dequant", 2, "dequant_bf16")])
def test_nf4_overrides_fall_back_to_the_static_rule_without_a_torch_kernel(monkeypatch, mode, rows, want):
    monkeypatch.setenv(cpu_dispatch.ENV, mode)
    fmt, k = "nf4_g64", 128
    q, packed = _weight(fmt, 64, k, seed=14)
    before = cpu_dispatch.counter[(fmt, want)]
    cpu_kernels.packed_linear(torch.randn(rows, k), packed, None, torch.bfloat16)
    assert cpu_dispatch.counter[(fmt, want)] == before + 1
    label = cpu_dispatch.class_label(cpu_dispatch.row_class(rows))
    text = cpu_dispatch.layer_record(fmt, 64, k, torch.bfloat16)[label]
    assert (f"torch has no {fmt} kernel" in text) == (mode == "torch")


def test_nf4_without_generated_kernels_runs_the_reference_and_says_why(monkeypatch, caplog, tmp_path):
    """LOWBIT_CPU_CODEGEN=0 (as without a compiler): no kernel can take an NF4 call; the float
    reference runs (its exact result), with a warning, a fallback count and the layer record
    naming why, for decode-sized and larger calls alike; nothing is stored as a plan."""
    from lowbit_compiler import ops, pass_base

    monkeypatch.setenv(cpu_codegen.ENV, "0")
    monkeypatch.setenv(cpu_dispatch.ENV, "measure")
    monkeypatch.setattr(cpu_dispatch, "_RECORDS", {})
    monkeypatch.setattr(cpu_dispatch, "_PLANS", {})
    monkeypatch.setattr(cpu_dispatch, "dispatch_file", lambda: tmp_path / "dispatch.json")
    monkeypatch.setattr(ops, "_WARNED", set())
    fmt, n, k = "nf4_g64", 72, 128
    q, packed = _weight(fmt, n, k, seed=15)
    with caplog.at_level(logging.WARNING, logger="lowbit_compiler"):
        for rows, label, why in ((2, "2 rows", "the generated kernel is unavailable"),
                                 (40, "17-64 rows", "needs the dequantization kernel, which is unavailable")):
            x = torch.randn(rows, k)
            before = sum(pass_base.fallback_counter.values())
            y = cpu_kernels.packed_linear(x, packed, None, torch.bfloat16)
            assert torch.equal(y, ops.wo_linear_reference(x, q.qweight, q.scale, q.zero, None, fmt, k))
            assert sum(pass_base.fallback_counter.values()) == before + 1
            record = cpu_dispatch.layer_record(fmt, n, k, torch.bfloat16)[label]
            assert record.startswith("the float reference") and why in record and "LOWBIT_CPU_CODEGEN=0" in record
            assert why in caplog.text
    assert not cpu_dispatch.dispatch_file().exists()


def test_nf4_with_k_padded_to_the_group_dequantizes():
    """K = 200 with groups of 64 (stored padded to 256): no generated kernel takes it, so even a
    decode-sized call dequantizes (the real 200 columns), at the reference's float32 numerics."""
    fmt, n, k = "nf4_g64", 40, 200
    q, packed = _weight(fmt, n, k, seed=16)
    assert cpu_dispatch.candidates(packed, 1, torch.bfloat16) == ["dequant_bf16", "dequant_fp32"]
    assert cpu_dispatch.static_choice(packed, 1) == "dequant_fp32"
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(16))
    assert sqnr_db(_reference(x, q, k, None),
                   cpu_kernels.run_candidate("dequant_fp32", x, packed, None, torch.bfloat16).double()) >= 110


def test_the_gemm_keeps_a_near_tie_with_dequantize_then_matmul(measured):
    """At prefill sizes the GEMM stays the choice unless dequantize + bf16 matmul is MARGIN faster
    (it also runs the fusion groups' prologue and epilogues, which the timing does not see)."""
    if not GEMM:
        pytest.skip("no generated GEMM on this host (AVX512_BF16): nothing to tie-break")
    fmt, n, k = "int4_g128_asym", 64, 256
    for dq_ms, want in ((2.9e-3, "gemm_bf16"), (2.7e-3, "dequant_bf16")):
        q, packed = _weight(fmt, n, k, seed=21)
        cpu_dispatch._PLANS.clear()
        measured["rows"] = 512
        measured[512] = {"torch": 9e-3, "dequant_bf16": dq_ms, "dequant_fp32": 6e-3, "gemm_bf16": 3e-3}
        x = torch.randn(300, k)
        cpu_kernels.packed_linear(x, packed, None, torch.bfloat16)
        before = cpu_dispatch.counter[(fmt, want)]
        cpu_kernels.packed_linear(x, packed, None, torch.bfloat16)
        assert cpu_dispatch.counter[(fmt, want)] == before + 1, (dq_ms, want)
        packed.forget_choices()
        cpu_dispatch.dispatch_file().unlink()
