"""The generated blocked GEMM (``cpu_dispatch.gemm_group``, candidate ``gemm_bf16``): x rounded
to bf16 and packed once, the weight dequantized to bf16 tile by tile, bf16 products accumulated
in float32. Its products are exact and only the float32 accumulation rounds, so it is checked
against the float64 product of the *rounded* operands (>= 110 dB) over formats, ragged rows and
columns, K padded to the group and odd, dtypes and bias; the fusion groups' prologue and epilogues
(RMSNorm while packing, residual and SiLU * mul in the store) against float64 references; q/k/v
sharing one packing bit for bit with separate calls; and a compiled Llama whose prompt runs it
(``LOWBIT_CPU_DISPATCH=gemm``) against the same model on the dequantize-then-matmul path."""
from __future__ import annotations

import pytest
import torch

from lowbit_compiler.backends import cpu_codegen, cpu_dispatch, cpu_kernels
from lowbit_compiler.formats import WeightFormat, dequantize_parts, quantize, sqnr_db

pytestmark = pytest.mark.skipif(cpu_dispatch.gemm_kernel() is None,
                                reason="no generated GEMM here (needs a C compiler and AVX512_BF16): "
                                       f"{cpu_codegen._disabled_reason or 'this host has no AVX512_BF16'}")


def _weight(fmt: str, n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(n, k, generator=gen) * 0.05, WeightFormat.parse(fmt))


def _w(q, k: int) -> torch.Tensor:
    """The weight as the kernel multiplies it: dequantized, rounded to bf16 (float64)."""
    return dequantize_parts(q.format, q.qweight, q.scale, q.zero)[:, :k].bfloat16().double()


def _args(q, bias=None):
    return (q.qweight, q.scale, q.zero, bias)


# (format, M, N, K): ragged M (not a multiple of the 32-row block, one row), N not a multiple of the
# 12-row tile, K padded to the group (200 of 256, 130 of 160 / 192), K odd (int8 per channel)
CASES = [("int8", 40, 200, 256), ("int8", 1, 7, 131), ("int8", 65, 25, 96),
         ("int4_g128_asym", 33, 13, 200), ("int4_g128_asym", 64, 24, 256), ("int4_g32_sym", 70, 25, 130),
         ("nf4_g64", 40, 37, 256), ("nf4_g64", 17, 12, 130),
         ("int3_g128_asym", 40, 30, 256), ("int3_g32_sym", 33, 13, 200), ("int2_g64_asym", 20, 25, 130)]


@pytest.mark.parametrize("fmt,m,n,k", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gemm_is_the_rounded_operands_product(fmt, m, n, k, dtype):
    q = _weight(fmt, n, k, seed=m + n)
    gen = torch.Generator().manual_seed(k)
    x, bias = torch.randn(m, k, generator=gen).to(dtype), torch.randn(n, generator=gen)
    ref = x.bfloat16().double() @ _w(q, k).T + bias.double()
    y = cpu_dispatch.gemm_linear(x, *_args(q, bias), fmt, k, dtype)
    assert y.shape == (m, n) and y.dtype == dtype and y.is_contiguous()
    if dtype == torch.float32:  # the float32 accumulation is the only rounding
        assert sqnr_db(ref, y.double()) >= 110, sqnr_db(ref, y.double())
    else:  # rounded once more, to the output's bf16: within one bf16 step of the reference
        assert ((y.double() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-6).all()
    # no bias, an unusual output dtype (float16: computed in float32, then cast)
    y16 = cpu_dispatch.gemm_linear(x, *_args(q), fmt, k, torch.float16)
    assert y16.dtype == torch.float16 and sqnr_db(ref - bias.double(), y16.double()) >= 60


def test_the_gemm_reads_strided_rows():
    """A row-strided x (a slice of a wider tensor) is read in place, with the same result."""
    q = _weight("int4_g128_asym", 40, 256, seed=3)
    wide = torch.randn(50, 300)
    x = wide[:, 20:276]
    assert x.stride(0) == 300
    y = cpu_dispatch.gemm_linear(x, *_args(q), "int4_g128_asym", 256, torch.float32)
    assert torch.equal(y, cpu_dispatch.gemm_linear(x.contiguous(), *_args(q), "int4_g128_asym", 256, torch.float32))


@pytest.mark.parametrize("fmt", ["int8", "int4_g128_asym", "nf4_g64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_prologue_and_epilogues(fmt, dtype):
    """RMSNorm computed while packing x, the residual added and SiLU(gate) * up computed in the
    store, against float64 references of the unfused computation (the norm's output rounded to
    bf16 by the kernel and not by the reference: the bf16 floors); q/k/v sharing one packing give
    the separate calls' outputs bit for bit."""
    m, n, k, eps = 45, 30, 256, 1e-5
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    norm_w, res = torch.rand(k, generator=gen) + 0.5, torch.randn(m, n, generator=gen).to(dtype)
    b0, b1 = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    q0, q1, q2 = _weight(fmt, n, k, 1), _weight(fmt, n, k, 2), _weight(fmt, 12, k, 3)
    xn = torch.nn.functional.rms_norm(x.double(), (k,), norm_w.double(), eps)
    floor = 45  # what dequant_bf16 meets (test_cpu_dispatch.FLOORS): x's rounding to bf16 dominates

    y, = cpu_dispatch.gemm_group(x, [_args(q0, b0)], fmt, k, dtype, norm_weight=norm_w, eps=eps, residual=res)
    ref = res.double() + xn @ _w(q0, k).T + b0.double()
    assert y.dtype == dtype and sqnr_db(ref, y.double()) >= floor

    y, = cpu_dispatch.gemm_group(x, [_args(q0, b0), _args(q1, b1)], fmt, k, dtype, norm_weight=norm_w, eps=eps,
                                 silu_mul=True)
    ref = torch.nn.functional.silu(xn @ _w(q0, k).T + b0.double()) * (xn @ _w(q1, k).T + b1.double())
    assert y.shape == (m, n) and sqnr_db(ref, y.double()) >= floor

    # without the norm the operands are exact: SiLU * mul at the float32 floor of its exp
    y, = cpu_dispatch.gemm_group(x, [_args(q0, b0), _args(q1, b1)], fmt, k, torch.float32, silu_mul=True)
    xr = x.bfloat16().double()
    ref = torch.nn.functional.silu(xr @ _w(q0, k).T + b0.double()) * (xr @ _w(q1, k).T + b1.double())
    assert sqnr_db(ref, y.double()) >= 100, sqnr_db(ref, y.double())

    outs = cpu_dispatch.gemm_group(x, [_args(q0, b0), _args(q1), _args(q2)], fmt, k, dtype)
    for out, (qq, b) in zip(outs, ((q0, b0), (q1, None), (q2, None))):
        assert torch.equal(out, cpu_dispatch.gemm_linear(x, *_args(qq, b), fmt, k, dtype))


def test_silu_mul_needs_two_weights_of_one_size():
    q0, q1 = _weight("int8", 24, 128, 1), _weight("int8", 36, 128, 2)
    x = torch.randn(20, 128)
    assert cpu_dispatch.gemm_group(x, [_args(q0), _args(q1)], "int8", 128, torch.float32, silu_mul=True) is None
    assert cpu_dispatch.gemm_group(x, [_args(q0)], "int8", 128, torch.float32, silu_mul=True) is None


def test_the_packed_x_is_reused_but_results_are_not_overwritten():
    """x is packed into a reused per-thread temporary; each call's output is its own tensor."""
    q = _weight("int4_g128_asym", 40, 256, seed=5)
    x1, x2 = torch.randn(50, 256), torch.randn(70, 256)
    first = cpu_dispatch.gemm_linear(x1, *_args(q), "int4_g128_asym", 256, torch.float32)
    kept = first.clone()
    cpu_dispatch.gemm_linear(x2, *_args(q), "int4_g128_asym", 256, torch.float32)
    assert torch.equal(first, kept)


def test_the_override_and_the_candidates(monkeypatch):
    """``gemm_bf16`` is a candidate above MAX_ROWS in bf16 compute only; ``LOWBIT_CPU_DISPATCH=gemm``
    runs it there (counted, recorded) and the static rule elsewhere."""
    fmt, n, k = "int4_g128_asym", 48, 256
    q = _weight(fmt, n, k, seed=9)
    packed = cpu_kernels.prepack(q.qweight, q.scale, q.zero, fmt, k, torch.bfloat16)
    assert "gemm_bf16" in cpu_dispatch.candidates(packed, 40, torch.bfloat16)
    assert "gemm_bf16" not in cpu_dispatch.candidates(packed, cpu_codegen.MAX_ROWS, torch.bfloat16)
    assert "gemm_bf16" not in cpu_dispatch.candidates(packed, 40, torch.float32)
    monkeypatch.setenv(cpu_dispatch.ENV, "gemm")
    x = torch.randn(40, k)
    before = cpu_dispatch.counter[(fmt, "gemm_bf16")]
    y = cpu_kernels.packed_linear(x, packed, None, torch.bfloat16)
    assert cpu_dispatch.counter[(fmt, "gemm_bf16")] == before + 1
    assert sqnr_db(x.bfloat16().double() @ _w(q, k).T, y.double()) >= 110
    assert cpu_dispatch.layer_record(fmt, n, k, torch.bfloat16)["17-64 rows"].endswith(f"{cpu_dispatch.ENV}=gemm")
    before = dict(cpu_dispatch.counter)
    packed32 = cpu_kernels.prepack(q.qweight, q.scale, q.zero, fmt, k, torch.float32)
    cpu_kernels.packed_linear(x, packed32, None, torch.float32)  # float32 compute: not the GEMM's
    assert cpu_dispatch.counter[(fmt, "gemm_bf16")] == before[(fmt, "gemm_bf16")]
    assert "the generated GEMM does not take this call" in cpu_dispatch.layer_record(fmt, n, k, torch.float32)[
        "17-64 rows"]


def test_a_compiled_prompt_runs_the_fused_gemm(monkeypatch):
    """A compiled w4a16 Llama's 40-token prompt with ``LOWBIT_CPU_DISPATCH=gemm``: every projection
    runs the GEMM, q/k/v and gate.up as groups with their RMSNorm in the packing, o and down with
    the residual in the store, the head with the final norm; the logits equal (to bf16 rounding of
    the norms' outputs) the same compiled model on dequantize + bf16 matmul with the norms, SiLU *
    mul and adds in torch."""
    from tests.conftest import make_model

    seen = []
    real = cpu_kernels._gemm

    def spy(members, x, biases, norm_weight, eps, residual=None, silu_mul=False):
        seen.append((len(members), norm_weight is not None, residual is not None, silu_mul))
        return real(members, x, biases, norm_weight, eps, residual, silu_mul)

    monkeypatch.setattr(cpu_kernels, "_gemm", spy)
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        monkeypatch.setenv(cpu_dispatch.ENV, "gemm")
        compiled = torch.compile(make_model("llama"), backend="lowbit", options={"recipe": "w4a16"}, dynamic=False)
        before = sum(v for (f, c), v in cpu_dispatch.counter.items() if c == "gemm_bf16")
        out = compiled(ids).logits
        ran = sum(v for (f, c), v in cpu_dispatch.counter.items() if c == "gemm_bf16") - before
        torch._dynamo.reset()
        monkeypatch.setenv(cpu_dispatch.ENV, "dequant")
        ref = torch.compile(make_model("llama"), backend="lowbit", options={"recipe": "w4a16"}, dynamic=False)(ids).logits
    assert ran == 2 * 7 + 1  # 2 layers x (q, k, v, o, gate, up, down) + the head
    layer = [(3, True, False, False), (2, True, False, True), (1, False, True, False), (1, False, True, False)]
    assert sorted(seen) == sorted(layer * 2 + [(1, True, False, False)])
    assert sqnr_db(ref.double(), out.double()) >= 35, sqnr_db(ref.double(), out.double())


def test_a_group_runs_the_gemm_when_one_members_plan_chose_it(monkeypatch):
    """q/k/v where the plan gave q the GEMM and k, v dequantize + bf16 matmul (a near tie at small
    N): the group still runs as one GEMM call (one packing, the norm inside), each output what the
    member's own GEMM call gives; with no member on the GEMM it runs member by member."""
    fmt, k = "int4_g128_asym", 256
    qs = [_weight(fmt, n, k, seed=n) for n in (48, 24, 24)]
    members = [cpu_kernels.prepack(q.qweight, q.scale, q.zero, fmt, k, torch.bfloat16) for q in qs]
    fused = cpu_kernels.FusedWeights(members)
    x, norm_w = torch.randn(40, k), torch.rand(k) + 0.5
    calls = []
    real = cpu_kernels._gemm
    monkeypatch.setattr(cpu_kernels, "_gemm", lambda *a, **kw: calls.append(len(a[0])) or real(*a, **kw))
    monkeypatch.setattr(cpu_dispatch, "choose",
                        lambda m, rows, dtype, env=None: "gemm_bf16" if m is members[0] else "dequant_bf16")
    outs = cpu_kernels.fused_linear(x, fused, (None,) * 3, torch.bfloat16, norm_w, 1e-5)
    assert calls == [3]
    xn = torch.nn.functional.rms_norm(x, (k,), norm_w, 1e-5)
    for out, q in zip(outs, qs):
        assert sqnr_db(xn.double() @ _w(q, k).T, out.double()) >= 45
    monkeypatch.setattr(cpu_dispatch, "choose", lambda m, rows, dtype, env=None: "dequant_bf16")
    cpu_kernels.fused_linear(x, fused, (None,) * 3, torch.bfloat16, norm_w, 1e-5)
    assert calls == [3]  # member by member: no group GEMM


def test_the_epilogues_refuse_what_they_cannot_add_and_follow_torch_on_the_rest(monkeypatch):
    """A residual that is not of the output's shape (one that torch would broadcast), or given with
    several weights or SiLU * mul, is refused (None: the caller adds it in torch), never read past
    its end; bf16 rows with a float32 residual give float32 as ``residual + y`` does; eps=None is
    ``F.rms_norm``'s (the dtype's eps: an all-zero row stays zero, not NaN)."""
    fmt, m, n, k = "int8", 20, 40, 128
    q, q2 = _weight(fmt, n, k, 1), _weight(fmt, n, k, 2)
    x = torch.randn(m, k)
    for bad in (torch.randn(n), torch.randn(1, n), torch.randn(m, n // 2)):
        assert cpu_dispatch.gemm_group(x, [_args(q)], fmt, k, torch.float32, residual=bad) is None
    res = torch.randn(m, n)
    assert cpu_dispatch.gemm_group(x, [_args(q), _args(q2)], fmt, k, torch.float32, residual=res) is None
    assert cpu_dispatch.gemm_group(x, [_args(q), _args(q2)], fmt, k, torch.float32, residual=res,
                                   silu_mul=True) is None
    # through packed_linear: the broadcast residual is added by torch, as before
    monkeypatch.setenv(cpu_dispatch.ENV, "gemm")
    packed = cpu_kernels.prepack(q.qweight, q.scale, q.zero, fmt, k, torch.bfloat16)
    row = torch.randn(n)
    y = cpu_kernels.packed_linear(x, packed, None, torch.bfloat16, residual=row)
    assert sqnr_db(row.double() + x.bfloat16().double() @ _w(q, k).T, y.double()) >= 110
    y = cpu_kernels.packed_linear(x.bfloat16(), packed, None, torch.bfloat16, residual=res)
    assert y.dtype == torch.float32
    assert sqnr_db(res.double() + x.bfloat16().double() @ _w(q, k).T, y.double()) >= 110
    zero_row = torch.zeros(m, k)
    y, = cpu_dispatch.gemm_group(zero_row, [_args(q)], fmt, k, torch.float32, norm_weight=torch.ones(k))
    assert torch.equal(y, torch.zeros(m, n))


def test_the_huge_page_hint_stays_inside_the_tensor():
    from lowbit_compiler import memory

    big = torch.empty(40 << 20, dtype=torch.uint8)
    assert memory.advise_huge_pages(big) in (True, False)  # a hint: whether Linux takes it is the host's
    assert not memory.advise_huge_pages(torch.empty(1 << 20, dtype=torch.uint8))  # small: left alone
    assert not memory.advise_huge_pages(big.view(-1, 2).t())  # not contiguous: left alone
