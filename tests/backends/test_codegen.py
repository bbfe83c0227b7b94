"""Generated kernels against their float reference under Triton's interpreter, their byte counts,
their GPU compile, and their caches."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

from lowbit_compiler.backends import _triton_adapter, codegen, kernel_cache
from lowbit_compiler.formats import sqnr_db
from tests.helpers import covers_all_pairs, pairwise

FACTORS = {
    "rows": [1, 3, 12, 17, 64],  # FMA decode, FMA decode (4-row tile), tl.dot decode, gemm, gemm
    "fmt": ["int8", "int4_g32_sym", "int4_g64_asym", "int4_g128_sym", "int4_g128_asym"],
    "k": [256, 200],  # 200: not a multiple of any block (int4 pads the weight to the group)
    "n": [97, 128],
    "prologue": [None, "rms", "layer"],
    "epilogue": ["none", "bias", "silu", "gelu", "gelu_tanh", "residual", "row", "gated"],
    "dtype": ["float32", "float16", "bfloat16"],
}
EPILOGUES = {
    "none": {},
    "bias": {"bias": True},
    "silu": {"steps": (("silu", ("acc0",)),)},
    "gelu": {"bias": True, "steps": (("gelu", ("acc0",)),)},
    "gelu_tanh": {"steps": (("gelu_tanh", ("acc0",)),)},
    "residual": {"steps": (("add", ("acc0", "e0")),), "externals": ("full",)},
    "row": {"steps": (("mul", ("acc0", "e0")), ("add", ("t0", "0.5"))), "externals": ("row",)},
    "gated": {"n_weights": 2, "steps": (("silu", ("acc0",)), ("mul", ("t0", "acc1")))},
    "qkv": {"parts": 3},  # three weights side by side, one output each
}
PROLOGUES = {None: {}, "rms": {"prologue": "rms", "norm_weight": True},
             "layer": {"prologue": "layer", "norm_weight": True, "norm_bias": True}}
# kernel vs float32 reference: only the final rounding to the output dtype differs (and fp32 sums)
FLOORS = {"float32": 90.0, "float16": 60.0, "bfloat16": 40.0}


def make_spec(rows, fmt, prologue, epilogue, dtype, on_gpu=False, n=None, k=None):
    from lowbit_compiler.formats import WeightFormat

    tiling = codegen.choose_variant(WeightFormat.parse(fmt), rows, on_gpu, dtype, n=n, k=k)
    return codegen.KernelSpec(fmt=fmt, **tiling, x_dtype=dtype, out_dtype=dtype, **PROLOGUES[prologue],
                              **EPILOGUES[epilogue])


def check_case(rows, fmt, k, n, prologue, epilogue, dtype):
    spec = make_spec(rows, fmt, prologue, epilogue, dtype, n=n, k=k)  # decode rows: split-K as for this shape
    assert (spec.split_k > 1) == (rows <= codegen.GEMV_MAX_ROWS)
    kernel = kernel_cache.get_kernel(spec, interpret=True)
    args = codegen.make_inputs(spec, rows, n, k, seed=rows + n + k)
    out = kernel.launch(*args)
    ref = kernel.reference(*args)
    assert out.shape == (rows, n) and out.dtype == getattr(torch, dtype)
    db = sqnr_db(ref.float(), out.float())
    assert db >= FLOORS[dtype], f"{spec.name} M={rows} N={n} K={k}: {db:.1f} dB"


PAIRWISE = pairwise(FACTORS)


def test_the_default_grid_covers_every_pair_of_values():
    assert covers_all_pairs(PAIRWISE, FACTORS)
    assert len(PAIRWISE) < 60  # vs 5760 for the full cross product


@pytest.mark.parametrize("case", PAIRWISE, ids=lambda c: "-".join(map(str, c.values())))
def test_kernel_matches_reference_pairwise(case):
    check_case(**case)


@pytest.mark.slow
@pytest.mark.parametrize("values", list(itertools.product(*FACTORS.values())),
                         ids=lambda v: "-".join(map(str, v)))
def test_kernel_matches_reference_full_grid(values):
    check_case(**dict(zip(FACTORS, values)))


@pytest.mark.parametrize("rows, fmt, k, prologue, epilogue, dtype", [
    (1, "nf4_g64", 256, "rms", "gated", "float32"),            # FMA decode, split-K, table in registers
    (12, "int3_g64_asym", 200, None, "residual", "float16"),   # tl.dot decode, 8 codes in 3 bytes, padded K
    (3, "int2_g32_sym", 128, "layer", "bias", "bfloat16"),     # FMA decode, 4 codes a byte
    (17, "int3_g128_sym", 256, "rms", "silu", "float32"),      # gemm: 32 columns of a 128-group per step
    (20, "nf4_g64", 128, None, "none", "float16"),             # gemm
    (1, "mxfp4", 256, "rms", "gated", "float32"),              # e2m1 codes, 4 e8m0 block scales per step
    (3, "nvfp4", 200, None, "residual", "float16"),            # e4m3 block scales + fp32 tensor scale, padded K
    (12, "mxfp4", 200, "layer", "bias", "bfloat16"),           # tl.dot decode
    (17, "nvfp4", 256, "rms", "silu", "float32"),              # gemm: 2 blocks of 16 per 32-column step
])
def test_packed_lookup_and_e2m1_templates_match_the_reference(rows, fmt, k, prologue, epilogue, dtype):
    """The formats that dequantised the whole weight per call: codes unpacked from the bit stream and
    (NF4) looked up in registers, against formats.dequantize_parts; bytes as the model counts them."""
    assert codegen.has_template(fmt) and not codegen.has_template(fmt, "int8")
    spec = make_spec(rows, fmt, prologue, epilogue, dtype, n=40, k=k)
    kernel = kernel_cache.get_kernel(spec, interpret=True)
    args = codegen.make_inputs(spec, rows, 40, k, seed=rows)
    out = kernel.launch(*args)
    assert out.shape == (rows, 40)
    db = sqnr_db(kernel.reference(*args).float(), out.float())
    assert db >= FLOORS[dtype], f"{spec.name}: {db:.1f} dB"
    if dtype == "float16":
        check_bytes(spec, rows, 40, k)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_e2m1_templates_decode_every_code_and_scale_exactly(fmt):
    """Every e2m1 code under arbitrary stored block scales (e8m0 exponents 0..254, the subnormal
    2^-127 included; random finite e4m3 values) and a per-tensor scale: one-hot activations pick
    the weight's columns, so the kernel must equal the reference dequantiser bit for bit (the
    products are exact; NVFP4's tensor scale rounds once, as the float64 reference does)."""
    from lowbit_compiler.formats import dequantize_parts

    n, k = 16, 64
    spec = make_spec(64, fmt, None, "none", "float32", n=n, k=k)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    codes[:, :16] = torch.arange(16, dtype=torch.uint8)  # every code in every row
    qw = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    if fmt == "mxfp4":
        scale = torch.randint(0, 255, (n, k // 32), generator=g).to(torch.uint8)
        scale[0, 0], scale[1, 0] = 0, 1
        args = [qw, scale]
    else:
        bits = torch.randint(0, 256, (n, k // 16), generator=g).to(torch.uint8)
        bits[(bits & 0x7F) == 0x7F] = 0x38  # e4m3fn's NaN patterns -> 1.0
        args = [qw, bits.view(torch.float8_e4m3fn), torch.tensor([0.37], dtype=torch.float32)]
    kernel = kernel_cache.get_kernel(spec, interpret=True)
    out = kernel.launch(torch.eye(k), *args)
    expected = dequantize_parts(spec.format, *args, *([None] if fmt == "mxfp4" else [])).T
    assert torch.equal(out, expected)


@pytest.mark.parametrize("rows, fmt, k, prologue, epilogue, dtype", [
    (1, "int3_g64_asym", 256, "rms", "none", "float32"),       # FMA decode, split-K: the last split reads them
    (3, "int4_g128_asym", 200, "layer", "residual", "float16"),  # gathered x normalised (mean, rstd, w, b)
    (17, "int4_g64_sym", 200, "rms", "silu", "float32"),        # gemm
])
def test_spqr_outliers_are_a_sparse_side_read_in_the_kernel(rows, fmt, k, prologue, epilogue, dtype):
    """SpQR's outliers (CSR by output channel) added inside the kernel, before the fused epilogue,
    against the reference with the outliers densified; the side-read's bytes as the model counts them."""
    import dataclasses

    spec = dataclasses.replace(make_spec(rows, fmt, prologue, epilogue, dtype, n=40, k=k), outliers=True)
    kernel = kernel_cache.get_kernel(spec, interpret=True)
    args = codegen.make_inputs(spec, rows, 40, k, seed=rows)
    named = dict(zip(codegen.launcher_params(spec), args))
    assert named["ocol0"].numel() > 20
    out = kernel.launch(*args)
    db = sqnr_db(kernel.reference(*args).float(), out.float())
    assert db >= FLOORS[dtype], f"{spec.name}: {db:.1f} dB"
    without = list(args)
    without[codegen.launcher_params(spec).index("oval0")] = torch.zeros_like(named["oval0"])
    assert sqnr_db(kernel.reference(*args).float(), kernel.launch(*without).float()) < 40  # they matter
    if dtype == "float16":
        itemsize = {p: a.element_size() for p, a in named.items() if isinstance(a, torch.Tensor)}
        itemsize.update(out=2, bias=2)
        with _triton_adapter.count_traffic() as moved:
            kernel.launch(*args)
        model = codegen.traffic(spec, 40, k, itemsize, nnz=named["ocol0"].numel()).at(rows)
        assert (model["loaded"], model["stored"], model["atomic"]) == (moved["read"], moved["written"], moved["atomic"])


@pytest.mark.parametrize("rows, fmt, k, prologue, bias, dtype", [
    (1, "int4_g64_asym", 256, "rms", False, "float32"),   # FMA decode, split-K: each weight its workspace block
    (3, "int8", 200, "layer", True, "float16"),           # per-weight biases
    (12, "int4_g128_sym", 256, None, True, "float32"),   # tl.dot decode
    (17, "nf4_g64", 200, "rms", False, "float16"),        # gemm
])
def test_side_by_side_weights_share_one_launch(rows, fmt, k, prologue, bias, dtype):
    """q, k, v (k and v narrower, as with grouped KV heads) in one kernel: each column tile belongs
    to one weight; each output against its own reference; the lanes' bytes as the model counts them
    (x and the norm statistics once per call for the three)."""
    import dataclasses

    ns = (40, 16, 24)
    spec = dataclasses.replace(make_spec(rows, fmt, prologue, "qkv", dtype, n=sum(ns), k=k), bias=bias)
    kernel = kernel_cache.get_kernel(spec, interpret=True)
    args = codegen.make_inputs(spec, rows, ns, k, seed=rows)
    outs, refs = kernel.launch(*args), kernel.reference(*args)
    assert [tuple(o.shape) for o in outs] == [(rows, n) for n in ns]
    for out, ref in zip(outs, refs):
        assert sqnr_db(ref.float(), out.float()) >= FLOORS[dtype]
    if dtype == "float16":
        named = dict(zip(codegen.launcher_params(spec), args))
        itemsize = {p: a.element_size() for p, a in named.items() if isinstance(a, torch.Tensor)}
        itemsize.update(out=2, bias=2)
        with _triton_adapter.count_traffic() as moved:
            kernel.launch(*args)
        model = codegen.traffic(spec, ns, k, itemsize).at(rows)
        assert (model["loaded"], model["stored"], model["atomic"]) == (moved["read"], moved["written"], moved["atomic"])


def test_generated_kernels_never_compute_in_16_bit_floats():
    for case in PAIRWISE:
        spec = make_spec(case["rows"], case["fmt"], case["prologue"], case["epilogue"], case["dtype"])
        assert codegen.arithmetic_violations(codegen.render(spec)) == []
    # the check can fail: a kernel that loads bf16 and computes with it, and one that downcasts
    bad = codegen.render(make_spec(17, "int8", None, "residual", "bfloat16"))
    bad_load = bad.replace(
        "mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)", "mask=mask_m[:, None] & mask_n[None, :], other=0.0)")
    assert any("not upcast" in p for p in codegen.arithmetic_violations(bad_load))
    bad_dot = codegen.render(make_spec(17, "int8", None, "none", "bfloat16", on_gpu=True))
    assert any("tl.bfloat16" in p for p in codegen.arithmetic_violations(bad_dot))


# Quantized activations (lowbit::qa_linear): weight format / activation scheme pairs
SCHEMES = {"w8a8": ("int8", "int8", False), "w4a8-asym": ("int4_g64_asym", "int8", False),
           "w4a8-sym": ("int4_g128_sym", "int8", False), "w8a8-static": ("int8", "int8", True),
           "w4a8-static": ("int4_g32_sym", "int8", True), "fp8": ("fp8_e4m3", "fp8_e4m3", False),
           "w4a4": ("int4_g128_sym", "int4", False)}
QA_FACTORS = {
    "rows": [1, 3, 12, 17, 64],  # FMA decode, FMA decode (4-row tile), tl.dot decode, gemm, gemm
    "scheme": list(SCHEMES),
    "k": [256, 200],
    "n": [97, 128],
    "prologue": [None, "rms", "layer"],
    "epilogue": ["none", "bias", "residual", "gated"],
    "dtype": ["float32", "float16", "bfloat16"],
}
QA_PAIRWISE = pairwise(QA_FACTORS)


def make_qa_spec(rows, scheme, prologue, epilogue, dtype, on_gpu=False, n=None, k=None):
    from lowbit_compiler.formats import WeightFormat

    fmt, act, static = SCHEMES[scheme]
    epilogue = EPILOGUES[epilogue]
    if static and epilogue.get("n_weights") == 2:  # static scales are per layer: no gate.up pairing
        epilogue = EPILOGUES["silu"]
    tiling = codegen.choose_variant(WeightFormat.parse(fmt), rows, on_gpu, dtype, act, n=n, k=k)
    return codegen.KernelSpec(fmt=fmt, **tiling, x_dtype=dtype, out_dtype=dtype, **PROLOGUES[prologue],
                              **epilogue, act=act, act_static=static)


@pytest.mark.parametrize("case", QA_PAIRWISE, ids=lambda c: "-".join(map(str, c.values())))
def test_quantized_activation_kernel_matches_reference_pairwise(case):
    """The kernel quantizes the (normalised) activations itself, per token or with the static
    scale, and multiplies codes (int8 x int8 -> int32, or exact fp8 products)."""
    rows, k, n, dtype = case["rows"], case["k"], case["n"], case["dtype"]
    spec = make_qa_spec(rows, case["scheme"], case["prologue"], case["epilogue"], dtype, n=n, k=k)
    assert codegen.arithmetic_violations(codegen.render(spec)) == []
    kernel = kernel_cache.get_kernel(spec, interpret=True)
    args = codegen.make_inputs(spec, rows, n, k, seed=rows + n + k)
    out = kernel.launch(*args)
    assert out.shape == (rows, n) and out.dtype == getattr(torch, dtype)
    # the fused norm may round an activation across a code boundary the reference's F.rms_norm
    # does not: one code step in 127 shows as ~50 dB on that row
    floor = FLOORS[dtype] if case["prologue"] is None else min(FLOORS[dtype], 40.0)
    db = sqnr_db(kernel.reference(*args).float(), out.float())
    assert db >= floor, f"{spec.name} M={rows} N={n} K={k}: {db:.1f} dB"


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8-asym", "w4a8-static", "w4a4", "fp8"])
@pytest.mark.parametrize("rows", [3, 17])
def test_quantized_activation_kernel_equals_the_cpu_integer_matmul(scheme, rows):
    """Same codes, same integer products, same order of float scalings as lowbit::qa_linear's CPU
    implementation (torch._int_mm): bit-identical for int8 activations; fp8 sums in another order."""
    spec = make_qa_spec(rows, scheme, None, "bias", "float32")
    kernel = kernel_cache.get_kernel(spec, interpret=True)
    x, *rest = codegen.make_inputs(spec, rows, 97, 256, seed=rows)
    fmt, act, static = SCHEMES[scheme]
    x_scale = rest.pop(0) if static else None
    qweight, scale, *rest = rest
    zero = rest.pop(0) if fmt.endswith("asym") else None
    bias = rest.pop(0)
    cpu = torch.ops.lowbit.qa_linear(x, qweight, scale, zero, bias, fmt, 256, act, x_scale)
    out = kernel.launch(*([x] + ([x_scale] if static else []) + [qweight, scale] + ([zero] if zero is not None else [])
                          + [bias]))
    if act in ("int8", "int4"):
        assert torch.equal(out, cpu)
    else:
        assert sqnr_db(cpu, out) >= 120


@pytest.mark.parametrize("rows, fmt, k, n, prologue, epilogue", [
    (1, "int4_g64_asym", 256, 97, "rms", "gated"),        # gemv (FMA), split-K 4, two weights, norm statistics
    (3, "int8", 200, 97, None, "row"),                     # gemv (FMA), split-K 2, ragged K, row operand
    (9, "int4_g32_sym", 200, 97, "layer", "residual"),     # gemv (tl.dot), split-K 7, padded int4
    (17, "int4_g32_sym", 200, 128, "layer", "residual"),   # gemm, padded int4, both norm tensors
    (64, "int8", 256, 97, None, "bias"),                   # gemm, per-channel scale after the loop
])
def test_analytic_bytes_equal_bytes_the_interpreter_moves(rows, fmt, k, n, prologue, epilogue):
    spec = make_spec(rows, fmt, prologue, epilogue, "float16", n=n, k=k)  # the split-K count of this shape
    assert (spec.split_k > 1) == (rows <= codegen.GEMV_MAX_ROWS)
    check_bytes(spec, rows, n, k)


@pytest.mark.parametrize("rows, scheme, prologue, epilogue", [
    (1, "w4a8-asym", "rms", "gated"),   # gemv, per-token absmax pass through the norm
    (17, "w8a8", "layer", "residual"),  # gemm, int32 accumulator
    (17, "w4a8-static", None, "bias"),  # the static scale: one load per program
    (3, "fp8", "rms", "none"),
    (12, "w8a8", "rms", "bias"),        # gemv (int8 tl.dot), split-K into an int32 workspace
])
def test_analytic_bytes_of_quantized_activation_kernels(rows, scheme, prologue, epilogue):
    check_bytes(make_qa_spec(rows, scheme, prologue, epilogue, "float16", n=97, k=200), rows, 97, 200)


def check_bytes(spec, rows, n, k):
    kernel = kernel_cache.get_kernel(spec, interpret=True)
    args = codegen.make_inputs(spec, rows, n, k)
    itemsize = {name: a.element_size() for name, a in zip(codegen.launcher_params(spec), args)
                if isinstance(a, torch.Tensor)}
    itemsize.update(out=2, bias=2)
    with _triton_adapter.count_traffic() as moved:
        kernel.launch(*args)
    model = codegen.traffic(spec, n, k, itemsize).at(rows)
    assert (model["loaded"], model["stored"], model["atomic"]) == (moved["read"], moved["written"], moved["atomic"])
    assert model["min_read"] <= model["read"] <= model["loaded"] + model["atomic"]
    assert model["min_written"] <= model["written"] <= model["stored"] + model["atomic"]


def test_grid_and_bytes_are_symbolic_in_the_row_count():
    spec = make_spec(None, "int4_g128_asym", "rms", "none", "bfloat16")  # symbolic M: prefill tiling
    gm, gn, gk = codegen.grid(spec, 4096)
    assert str(gm) == "ceiling(M/64)" and int(gn) == 64 and int(gk) == 1
    assert codegen.to_python(gm) == "triton.cdiv(M, 64)"
    t = codegen.traffic(spec, 4096, 4096, {"x": 2, "out": 2, "norm_w": 2})
    assert t.min_written == 2 * 4096 * codegen.M
    assert t.written == (2 * 4096 + 4) * codegen.M  # + each row's rstd from the statistics kernel
    # DRAM: the activations once while they fit in L2 (25 MB = 3200 rows of 4096 bf16), else per column tile
    assert t.at(3200)["read"] - t.at(3200)["min_read"] == 3200 * 4
    assert t.at(3201)["read"] - t.at(3201)["min_read"] == 3201 * 4 + 63 * 3201 * 4096 * 2
    # weight codes + scales + zeros once per row tile
    assert t.at(64)["min_read"] == 64 * 4096 * 2 + 4096 * 2 + 4096 * 2048 + 4096 * 32 * 3


@pytest.mark.heavy
def test_gpu_compile_for_sm90_reports_resources():
    """Every kernel family compiles for Hopper (no GPU needed): the interpreter misses GPU-only errors."""
    families = [make_spec(1, "int4_g128_asym", "rms", "gated", "bfloat16"),
                make_spec(64, "int8", "layer", "residual", "float32"),
                make_spec(64, "int4_g32_sym", None, "gelu_tanh", "float16", on_gpu=True),
                make_spec(64, "int4_g64_asym", "rms", "gated", "bfloat16", on_gpu=True),
                # quantized activations: int8 x int8 -> int32 and fp8 x fp8 tensor-core dots
                make_qa_spec(1, "w4a8-asym", "rms", "gated", "bfloat16", on_gpu=True),
                make_qa_spec(64, "w8a8", "layer", "residual", "float16", on_gpu=True),
                make_qa_spec(64, "w4a8-static", None, "bias", "bfloat16", on_gpu=True),
                make_qa_spec(64, "fp8", "rms", "none", "bfloat16", on_gpu=True)]
    items = [(spec, codegen.make_inputs(spec, 64, 96, 256)) for spec in families]
    reports = kernel_cache.gpu_reports(items)
    for spec, report in zip(families, reports):
        assert report["arch"] == "sm_90" and 0 < report["registers"] <= 255, (spec.name, report)
        assert report["shared_bytes"] >= 0 and report["spill_bytes"] >= 0
    before = kernel_cache.stats["gpu_reports"]
    assert kernel_cache.gpu_reports(items) == reports and kernel_cache.stats["gpu_reports"] == before  # cached


def test_specs_are_cached_in_memory_and_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernel_cache, "_loaded", {})
    spec = make_spec(17, "int4_g64_asym", "rms", "silu", "float32")
    rendered = kernel_cache.stats["rendered"]
    first = kernel_cache.get_kernel(spec, interpret=True)
    assert kernel_cache.stats["rendered"] == rendered + 1
    assert kernel_cache.get_kernel(spec, interpret=True) is first  # memory
    monkeypatch.setattr(kernel_cache, "_loaded", {})
    hits = kernel_cache.stats["disk_hits"]
    again = kernel_cache.get_kernel(spec, interpret=True)
    assert kernel_cache.stats["rendered"] == rendered + 1 and kernel_cache.stats["disk_hits"] == hits + 1
    assert again.source == first.source and again.path == tmp_path / "kernels" / f"{spec.name}.py"
    # a different specialisation is a different file
    other = make_spec(17, "int4_g64_sym", "rms", "silu", "float32")
    assert other.name != spec.name


SECOND_PROCESS = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, {root!r})
from tests.backends.test_codegen import make_spec
from lowbit_compiler.backends import codegen, kernel_cache
spec = make_spec(3, "int8", "rms", "gated", "float32")
kernel = kernel_cache.get_kernel(spec, interpret=True)
kernel.launch(*codegen.make_inputs(spec, 3, 64, 128))
print("rendered", kernel_cache.stats["rendered"])
"""


@pytest.mark.slow  # 11-30 s: the default suite's 10-minute budget (make test-slow runs it)
def test_a_second_process_renders_no_new_source(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "LOWBIT_CACHE_DIR": str(tmp_path)}
    script = SECOND_PROCESS.format(root=root)
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    assert [r.stdout.split()[-1] for r in runs] == ["1", "0"]


@pytest.mark.heavy
def test_a_generated_file_runs_its_own_self_check(tmp_path):
    spec = make_spec(3, "int4_g32_sym", "layer", "gelu", "float16")
    kernel = kernel_cache.get_kernel(spec, interpret=True)
    path = tmp_path / f"{spec.name}.py"
    path.write_text(kernel.source)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the file sets it itself
    run = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("SQNR vs reference") == 2


@pytest.mark.heavy
def test_autotune_hook_is_off_here_and_its_candidates_are_valid_kernels(caplog):
    from lowbit_compiler.backends import autotune
    from tests.conftest import make_model, prompt
    from tests.helpers import Recorder

    spec = make_spec(17, "int4_g64_asym", "rms", "gated", "float32")
    candidates = autotune.candidates(spec)
    assert len({c.name for c in candidates}) == len(candidates) > 10
    assert all(c.block_k == spec.block_k and codegen.arithmetic_violations(codegen.render(c)) == []
               for c in candidates[:4])
    rec = Recorder(recipe="w8a16", target="triton", autotune=True)
    with caplog.at_level("INFO", logger="lowbit_compiler"), torch.no_grad():
        torch.compile(make_model("llama"), backend=rec)(prompt())
    assert "autotune is off under the Triton interpreter" in caplog.text
    # 9 rows: the decode class (all rows in one 16-row tl.dot tile, split-K)
    assert {r["kernel"].split("_")[0] for r in rec.summaries[0]["generated_kernels"]} == {"gemv"}


def test_fp32_dots_state_their_precision():
    """ieee products under the interpreter, tf32 named explicitly on a GPU; gemv has no tl.dot."""
    assert 'input_precision="ieee"' in codegen.render(make_spec(17, "int8", None, "none", "float32"))
    assert 'input_precision="tf32"' in codegen.render(make_spec(17, "int8", None, "none", "float32", on_gpu=True))
    assert "tl.dot" not in codegen.render(make_spec(1, "int8", None, "none", "float32"))


@pytest.mark.parametrize("fmt, rows, dtype", [("mxfp4", 1, "float32"), ("nvfp4", 5, "float16"),
                                              ("int3_g64_asym", 20, "bfloat16"), ("nf4_g64", 2, "float32")])
def test_eager_calls_on_cuda_run_the_generated_kernel(fmt, rows, dtype):
    """A compressed model on CUDA runs its linears eagerly: lowbit::wo_linear takes the format's
    generated kernel (decode: split-K at this layer's shape; prefill: the symbolic-M spec) instead
    of dequantising the whole weight per call. Checked here under the interpreter on CPU tensors."""
    from lowbit_compiler import ops
    from lowbit_compiler.formats import WeightFormat, quantize

    g = torch.Generator().manual_seed(rows)
    n, k = 48, 192
    qw = quantize(torch.randn(n, k, generator=g) / k ** 0.5, WeightFormat.parse(fmt))
    x = torch.randn(rows, k, generator=g).to(getattr(torch, dtype))
    bias = torch.randn(n, generator=g).to(x.dtype)
    out = kernel_cache.eager_wo_linear(x, qw.qweight, qw.scale, qw.zero, bias, fmt, k)
    ref = ops.wo_linear_reference(x, qw.qweight, qw.scale, qw.zero, bias, fmt, k)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert sqnr_db(ref.float(), out.float()) >= FLOORS[dtype]
    assert ops.wo_linear_fallback_reason(fmt, x.dtype, "cuda") is None
    assert "no generated-kernel template" in ops.wo_linear_fallback_reason("s24+int8", x.dtype, "cuda")


@pytest.mark.skipif(not torch.cuda.is_available() or _triton_adapter.interpreting(), reason="needs a CUDA device")
def test_eager_wo_linear_on_cuda_never_runs_the_reference(monkeypatch):
    from lowbit_compiler import ops
    from lowbit_compiler.formats import WeightFormat, quantize

    monkeypatch.setattr(ops, "wo_linear_reference", lambda *a: pytest.fail("the float reference ran on CUDA"))
    for fmt in ("int4_g128_asym", "int3_g128_asym", "nf4_g64", "mxfp4", "nvfp4"):
        qw = quantize(torch.randn(64, 256), WeightFormat.parse(fmt))
        x = torch.randn(3, 256, device="cuda", dtype=torch.float16)
        ops.wo_linear_eager(x, qw.qweight.cuda(), qw.scale.cuda(), None if qw.zero is None else qw.zero.cuda(),
                            None, fmt, 256)


@pytest.mark.parametrize("rows, fmt, prologue, epilogue", [
    (12, "int4_g128_asym", "rms", "gated"),  # tl.dot decode: two fp16 tensor-core dots, split-K
    (17, "int8", None, "residual"),          # gemm
    (9, "nvfp4", "layer", "bias"),           # e2m1 + block scales narrowed to fp16 for the dot
    (16, "int4_g64_sym", None, "qkv"),       # q/k/v side by side
])
def test_the_fp16_gpu_variant_computes_correctly_under_the_interpreter(rows, fmt, prologue, epilogue):
    """The variant lowering builds on CUDA for fp16 models (fp16 operands into tl.dot, fp32
    accumulation), run under the interpreter, which computes fp16 dots correctly (bf16 it does
    not): within fp16 rounding of the operands of the float32 reference."""
    spec = make_spec(rows, fmt, prologue, epilogue, "float16", on_gpu=True, n=48, k=256)
    assert spec.dot == "float16" and "tl.float16" in codegen.render(spec)
    kernel = kernel_cache.get_kernel(spec, interpret=True, gpu_variant=True)
    args = codegen.make_inputs(spec, rows, 48, 256, seed=rows)
    out, ref = kernel.launch(*args), kernel.reference(*args)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for o, r in zip(outs, refs):
        assert sqnr_db(r.float(), o.float()) >= 55
