"""int3/int2 CPU kernels through lookup tables (backends/cpu_lut.py): numerics against the op's
float64 reference and against an emulation of the int8 tables, the AVX2 and portable builds
forced, the weight re-layout, and dispatch (eager op, compress, torch.compile, fallbacks)."""
from __future__ import annotations

import itertools
import logging

import pytest
import torch

from lowbit_compiler import formats, ops, pass_base
from lowbit_compiler.backends import cpu_codegen, cpu_dispatch, cpu_lut
from lowbit_compiler.formats import WeightFormat

FORMATS = ("int3_g64_sym", "int3_g128_asym", "int3_g256_asym", "int2_g32_sym", "int2_g64_asym", "int2_g128_sym")
ROWS = (1, 3, 16)  # row tiles of 4: a partial one, and four full ones
# odd N (a partial tile of 32 output channels); K a multiple of every group; one K padded to the group
SHAPES = ((37, 512), (97, 256), (33, 1000))
DTYPES = (torch.float32, torch.bfloat16)
# The kernel's only error besides float32 rounding is the int8 rounding of the tables: each
# looked-up partial sum (bits as +-1/2 times 4 activations) is off by at most amax/508, amax the
# block's largest sum of 4 |x|. For Gaussian x that is 41-47 dB against float64 (measured on this
# grid); the weights' own int3 error is about 20 dB, int2's about 10 dB.
FLOOR_DB = 38.0


def _grid():
    others = itertools.cycle(itertools.product(SHAPES, (True, False), DTYPES))
    for fmt, rows in itertools.product(FORMATS, ROWS):
        (n, k), bias, dtype = next(others)
        if WeightFormat.parse(fmt).group_size > 128 and k == 1000:
            k = 1024
        yield pytest.param(fmt, rows, n, k, bias, dtype, id=f"{fmt}-M{rows}-N{n}-K{k}-{'bias' if bias else 'nobias'}-"
                                                           f"{str(dtype).split('.')[-1]}")


def _case(fmt: str, rows: int, n: int, k: int, bias: bool, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed + rows * 1000 + n)
    f = WeightFormat.parse(fmt)
    q = formats.quantize(torch.randn(n, k, generator=g) * 0.05, f)  # K padded to the group where needed
    x = torch.randn(rows, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g) if bias else None
    return q, x, b


def _reference(q, x, b, fmt, k):
    return ops.wo_linear_reference(x.double(), q.qweight, q.scale, q.zero, None if b is None else b.double(), fmt, k)


def _with_int8_tables(q, x, b, fmt, k):
    """What the kernel computes, in float64 torch: the same int8 tables, looked up per bit plane."""
    f = WeightFormat.parse(fmt)
    blk = cpu_lut.block(f)
    codes = formats.unpack_codes(q.qweight, f.bits).long()  # [N, Kp]
    n, kp = codes.shape
    xf = torch.nn.functional.pad(x.float(), (0, kp - k)).double()
    xc = xf.view(x.shape[0], kp // 4, 4)
    bits = (torch.arange(16)[:, None] >> torch.arange(4)) & 1  # [16, 4]
    table = (bits.double() - 0.5) @ xc.transpose(1, 2)  # [M, 16, C]: sum_j (bit_j(i) - 1/2) x_j
    amax = xc.abs().sum(-1).view(x.shape[0], kp // blk, blk // 4).amax(-1)  # [M, blocks]
    ts = amax.float().double() / 254.0
    inv = torch.where(amax > 0, 254.0 / amax, torch.zeros_like(amax)).repeat_interleave(blk // 4, dim=1)
    tq = torch.round(table * inv[:, None, :]).clamp(-127, 127)  # [M, 16, C]
    acc = torch.zeros(x.shape[0], n, kp // 4, dtype=torch.float64)
    for bit in range(f.bits):
        index = (((codes >> bit) & 1).view(n, kp // 4, 4) * torch.tensor([1, 2, 4, 8])).sum(-1)  # [N, C]
        acc += (2 ** bit) * tq.transpose(1, 2)[:, torch.arange(kp // 4)[None, :], index]  # [M, N, C]
    acc_blk = acc.view(x.shape[0], n, kp // blk, blk // 4).sum(-1)  # [M, N, blocks]
    s = q.scale.double().repeat_interleave(f.group_size // blk, dim=1)  # [N, blocks]
    z = (torch.full_like(q.scale, 2 ** (f.bits - 1), dtype=torch.float64) if q.zero is None
         else q.zero.double()).repeat_interleave(f.group_size // blk, dim=1)
    xs = xf.view(x.shape[0], kp // blk, blk).sum(-1)  # [M, blocks]
    y = (s * (ts[:, None, :] * acc_blk + ((2 ** f.bits - 1) / 2 - z) * xs[:, None, :])).sum(-1)
    return y if b is None else y + b.double()


@pytest.mark.parametrize("fmt, rows, n, k, with_bias, dtype", list(_grid()))
def test_lut_kernel_matches_the_float_reference(fmt, rows, n, k, with_bias, dtype):
    if cpu_lut.kernel(fmt) is None:
        pytest.fail(f"no lookup-table kernel for {fmt}: {cpu_codegen._disabled_reason}")
    q, x, b = _case(fmt, rows, n, k, with_bias, dtype)
    y = cpu_lut.linear(x, q.qweight, q.scale, q.zero, b, fmt, k)
    assert y is not None and y.dtype == torch.float32 and y.shape == (rows, n)
    assert formats.sqnr_db(_reference(q, x, b, fmt, k), y.double()) >= FLOOR_DB
    # and the error is the tables' rounding, nothing else: the same int8 tables built in float64
    # agree far closer than the reference does (not bit for bit: the kernel builds the tables in
    # float32, so an entry near a rounding tie can land one step away; measured 68-90 dB)
    assert formats.sqnr_db(_with_int8_tables(q, x, b, fmt, k), y.double()) >= 60.0


@pytest.mark.parametrize("isa", ["avx2", "portable"])
@pytest.mark.parametrize("fmt, rows, n, k", [("int3_g128_asym", 5, 37, 512), ("int2_g64_sym", 16, 97, 256)])
def test_forced_builds_compute_the_same_integers(fmt, rows, n, k, isa):
    """The AVX2 build (no AVX-512: what an AVX2-only host runs) and the portable loops (no SIMD
    intrinsics) sum the same int8 table entries exactly: they differ from the host build only in
    float32 rounding of the per-block scaling."""
    if cpu_lut.kernel(fmt, isa) is None:
        pytest.fail(f"no {isa} build of {fmt}: {cpu_codegen._disabled_reason}")
    assert "_mm256_shuffle_epi8" in cpu_lut.source(fmt) and "_mm512_shuffle_epi8" in cpu_lut.source(fmt)
    q, x, b = _case(fmt, rows, n, k, True)
    native = cpu_lut.linear(x, q.qweight, q.scale, q.zero, b, fmt, k)
    forced = cpu_lut.linear(x, q.qweight, q.scale, q.zero, b, fmt, k, isa=isa)
    assert formats.sqnr_db(native.double(), forced.double()) >= 110.0
    assert formats.sqnr_db(_reference(q, x, b, fmt, k), forced.double()) >= FLOOR_DB


def test_relayout_holds_the_codes_bytes_and_decodes_back():
    """The bit-plane layout is the stored codes' bytes (N padded to 32) and reassembles them."""
    fmt, n, k = "int3_g64_asym", 45, 256
    q, _, _ = _case(fmt, 1, n, k, False)
    w = cpu_lut.relayout(q.qweight, q.scale, q.zero, fmt)
    assert w is cpu_lut.relayout(q.qweight, q.scale, q.zero, fmt)  # cached per quantized tensor
    assert w.idx.numel() == 64 * k * 3 // 8 and w.idx.shape == (2, k // 8, 3, 32)
    codes = torch.zeros(64, k, dtype=torch.long)
    for b in range(3):
        pairs = w.idx[:, :, b, :].transpose(1, 2).reshape(64, k // 8).long()  # [rows, K/8]
        nib = torch.stack([pairs & 15, pairs >> 4], -1).reshape(64, k // 4)
        codes += (((nib[..., None] >> torch.arange(4)) & 1).reshape(64, k)) << b
    assert torch.equal(codes[:n], formats.unpack_codes(q.qweight, 3).long())
    assert torch.all(w.sc[:, :, n % 32:][-1] == 0)  # padded channels have scale 0


def test_declines_what_it_does_not_cover():
    assert cpu_lut.supported("int4_g128_asym") is not None and cpu_lut.supported("nf4_g64") is not None
    q, x, _ = _case("int3_g128_sym", 17, 33, 256, False)
    assert cpu_lut.linear(x, q.qweight, q.scale, q.zero, None, "int3_g128_sym", 256) is None  # 17 rows
    assert "17 rows" in cpu_lut.unsupported_reason(x, "int3_g128_sym", 17)
    assert cpu_lut.linear(x[:2].double(), q.qweight, q.scale, q.zero, None, "int3_g128_sym", 256) is None
    bad = x[:2].clone()
    bad[1, 7] = float("inf")
    assert cpu_lut.linear(bad, q.qweight, q.scale, q.zero, None, "int3_g128_sym", 256) is None


def _records(caplog, prefix):
    return [r for r in caplog.records if r.getMessage().startswith("lowbit fallback: " + prefix)]


def test_eager_op_runs_the_kernel_for_decode_and_reports_the_rest(caplog, monkeypatch):
    """``lowbit::wo_linear`` over int3/int2: <= 16 rows run the kernel, more rows the CPU dispatch's
    kernels (the static rule here: dequantize + float32 matmul, the reference's numerics), nothing
    reported; non-finite activations run the float reference, and so do more rows without the
    generated kernels, each logged once with its reason."""
    fmt = "int2_g64_asym"
    q, x, b = _case(fmt, 1, 33, 256, True, seed=1)
    name = cpu_lut.kernel_name(fmt)
    assert ops.wo_linear_fallback_reason(fmt, torch.float32, "cpu") is None
    assert ops.wo_linear_fallback_reason(fmt, torch.bfloat16, "cpu", 16) is None
    big = torch.randn(2, 10, 256)
    before, counts = cpu_codegen.calls[name], pass_base.fallback_counter.copy()
    with caplog.at_level(logging.WARNING, logger="lowbit_compiler"):
        small = torch.ops.lowbit.wo_linear(big[:1, :5], q.qweight, q.scale, q.zero, b, fmt, 256)  # 5 rows
        assert _records(caplog, "lowbit::wo_linear") == [] and pass_base.fallback_counter == counts
        assert cpu_codegen.calls[name] - before == 1
        large = torch.ops.lowbit.wo_linear(big, q.qweight, q.scale, q.zero, b, fmt, 256)  # 20 rows
        torch.ops.lowbit.wo_linear(big, q.qweight, q.scale, q.zero, b, fmt, 256)
        bad = big[:1, :2].clone()
        bad[0, 1, 3] = float("nan")
        nan_out = torch.ops.lowbit.wo_linear(bad, q.qweight, q.scale, q.zero, b, fmt, 256)
    assert cpu_codegen.calls[name] - before == 1
    messages = [r.getMessage() for r in _records(caplog, "lowbit::wo_linear")]
    assert len(messages) == 1 and "non-finite activations" in messages[0]
    assert ops.wo_linear_fallback_reason(fmt, torch.float32, "cpu", 20) is None
    assert cpu_dispatch.counter[(fmt, "dequant_fp32")] >= 2
    ref = ops.wo_linear_reference(big, q.qweight, q.scale, q.zero, b, fmt, 256)
    assert formats.sqnr_db(ref.double(), large.double()) >= 110
    assert formats.sqnr_db(ref[:1, :5].double(), small.double()) >= FLOOR_DB
    assert torch.isnan(nan_out[0, 1]).all() and torch.isfinite(nan_out[0, 0]).all()
    monkeypatch.setenv(cpu_codegen.ENV, "0")  # no generated kernels: more rows run the reference, saying why
    reason = ops.wo_linear_fallback_reason(fmt, torch.float32, "cpu", 20)
    assert f"format {fmt} with more than 16 rows needs the generated dequantization kernel" in reason
    assert "LOWBIT_CPU_CODEGEN=0" in reason


def test_w3a16_models_run_the_lut_kernel_compressed_and_compiled(monkeypatch):
    """A w3a16 model (int3_g128_asym), eager after ``compress`` and under ``torch.compile``, runs the
    lookup-table kernel on all 15 linears for decode-sized calls (9 rows), within the table floor
    of the float reference (LOWBIT_CPU_CODEGEN=0)."""
    from lowbit_compiler import compress
    from tests.conftest import make_model, prompt
    from tests.helpers import Recorder

    ids = prompt()
    fmt = "int3_g128_asym"
    name = cpu_lut.kernel_name(fmt)
    with torch.no_grad():
        rec = Recorder(recipe="w3a16", strict=True)
        before = cpu_codegen.calls[name]
        compiled = torch.compile(make_model("llama"), backend=rec)(ids).logits
        assert cpu_codegen.calls[name] - before == 15
        implementations = {r["implementation"] for r in rec.summaries[0]["implementations"]}
        assert implementations == {"eager op (lowbit_compiler/ops.py): the generated lookup-table C kernel "
                                   f"{name} for M <= 16 rows, the kernel cpu_dispatch picks above (the generated "
                                   "GEMM or dequantize + matmul)"}
        model = compress(make_model("llama"), "w3a16")
        before = cpu_codegen.calls[name]
        generated = model(ids).logits
        assert cpu_codegen.calls[name] - before == 15
        monkeypatch.setenv(cpu_codegen.ENV, "0")
        reference = model(ids).logits
        assert cpu_codegen.calls[name] - before == 15  # turned off: the float reference ran
    assert formats.sqnr_db(reference.double(), generated.double()) >= 30.0
    assert formats.sqnr_db(generated.double(), compiled.double()) >= 100.0


def test_packed_linear_runs_the_kernel_for_decode_sized_calls():
    """``cpu_kernels.packed_linear`` over an int3/int2 weight (what stacked experts and the dense
    copy of an N:M weight call) takes the lookup-table kernel up to 16 rows, with the norm prologue
    and the residual in torch around it, and the dispatch above."""
    from lowbit_compiler.backends import cpu_kernels

    fmt = "int3_g128_asym"
    q, x, b = _case(fmt, 3, 40, 256, True, seed=3)
    packed = cpu_kernels.prepack(q.qweight, q.scale, q.zero, fmt, 256, torch.bfloat16)
    name = cpu_lut.kernel_name(fmt)
    norm_w, res = torch.rand(256) + 0.5, torch.randn(3, 40)
    before = cpu_codegen.calls[name]
    y = cpu_kernels.packed_linear(x, packed, b, torch.bfloat16, norm_w, 1e-5, res)
    assert cpu_codegen.calls[name] - before == 1
    xn = torch.nn.functional.rms_norm(x, (256,), norm_w, 1e-5)
    ref = res.double() + ops.wo_linear_reference(xn, q.qweight, q.scale, q.zero, b, fmt, 256).double()
    assert formats.sqnr_db(ref, y.double()) >= FLOOR_DB
    big = torch.randn(20, 256)
    before_dq = cpu_dispatch.counter[(fmt, "dequant_fp32")]
    cpu_kernels.packed_linear(big, packed, b, torch.bfloat16)
    assert cpu_codegen.calls[name] - before == 1 and cpu_dispatch.counter[(fmt, "dequant_fp32")] == before_dq + 1
