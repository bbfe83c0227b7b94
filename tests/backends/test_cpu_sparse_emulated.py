"""The activation-sparse kernel's AVX-512 VNNI paths (``sp_quads`` / ``sp_vnni_task`` in
``backends/cpu_sparse.py``) on any x86 host: its source built against SIMDe (SIMD Everywhere,
Debian's ``libsimde-dev``), whose header implements the AVX-512 intrinsics in portable C, so the
integer paths an AVX-512 VNNI host runs are checked against float64 on hosts without AVX-512 too
(an AVX2-only CI machine would otherwise never run them). The few intrinsics SIMDe 0.7 lacks are
given below in plain C. CI installs the header (``.ci/run``) and sets ``LOWBIT_REQUIRE_SIMDE=1``,
which turns a missing header from a skip into a failure."""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess

import pytest
import torch

from lowbit_compiler.backends import cpu_sparse
from lowbit_compiler.formats import WeightFormat, dequantize, quantize

HEADER = "/usr/include/simde/x86/avx512.h"

if not os.path.exists(HEADER) or shutil.which("gcc") is None:
    if os.environ.get("LOWBIT_REQUIRE_SIMDE") == "1":
        raise RuntimeError(f"LOWBIT_REQUIRE_SIMDE=1 but {HEADER} (apt-get install libsimde-dev) or gcc is missing")
    pytest.skip(f"no SIMDe header ({HEADER}: apt-get install libsimde-dev) or no gcc", allow_module_level=True)

# what SIMDe 0.7.4 (Debian 12) does not implement, in plain C over its private unions
SHIM = r"""
#include <math.h>
#define EMU_UNARY(name, tin, tout, fin, fout, expr) \
    static inline simde__##tout name(simde__##tin a) { simde__##tin##_private p = simde__##tin##_to_private(a); \
        simde__##tout##_private r; for (int i = 0; i < 16; i++) r.fout[i] = (expr); return simde__##tout##_from_private(r); }
EMU_UNARY(emu_cvtepi32_ps, m512i, m512, i32, f32, (float)p.i32[i])
EMU_UNARY(emu_cvtps_epi32, m512, m512i, f32, i32, (int32_t)nearbyintf(p.f32[i]))
EMU_UNARY(emu_cvtepi8_epi32, m128i, m512i, i8, i32, p.i8[i])
EMU_UNARY(emu_cvtepu8_epi32, m128i, m512i, u8, i32, p.u8[i])
EMU_UNARY(emu_cvtepu16_epi32, m256i, m512i, u16, i32, p.u16[i])
static inline void emu_mask_storeu_epi32(void* d, simde__mmask16 m, simde__m512i a) {
    simde__m512i_private p = simde__m512i_to_private(a);
    for (int i = 0; i < 16; i++) if (m >> i & 1) ((int32_t*)d)[i] = p.i32[i]; }
static inline simde__m512i emu_maskz_loadu_epi32(simde__mmask16 m, const void* s) {
    simde__m512i_private r; for (int i = 0; i < 16; i++) r.i32[i] = (m >> i & 1) ? ((const int32_t*)s)[i] : 0;
    return simde__m512i_from_private(r); }
static inline simde__m512 emu_maskz_loadu_ps(simde__mmask16 m, const void* s) {
    simde__m512_private r; for (int i = 0; i < 16; i++) r.f32[i] = (m >> i & 1) ? ((const float*)s)[i] : 0.0f;
    return simde__m512_from_private(r); }
static inline float emu_reduce_max_ps(simde__m512 a) {
    simde__m512_private p = simde__m512_to_private(a); float m = p.f32[0];
    for (int i = 1; i < 16; i++) m = p.f32[i] > m ? p.f32[i] : m; return m; }
static inline float emu_reduce_add_ps(simde__m512 a) {
    simde__m512_private p = simde__m512_to_private(a); float m = 0.0f; for (int i = 0; i < 16; i++) m += p.f32[i];
    return m; }
static inline void emu_mask_cvtsepi32_storeu_epi8(void* d, simde__mmask16 m, simde__m512i a) {
    simde__m512i_private p = simde__m512i_to_private(a);
    for (int i = 0; i < 16; i++) if (m >> i & 1) {
        int32_t v = p.i32[i]; ((int8_t*)d)[i] = (int8_t)(v > 127 ? 127 : v < -128 ? -128 : v); } }
#define simde_mm512_cvtepi32_ps emu_cvtepi32_ps
#define simde_mm512_cvtps_epi32 emu_cvtps_epi32
#define simde_mm512_cvtepi8_epi32 emu_cvtepi8_epi32
#define simde_mm512_cvtepu8_epi32 emu_cvtepu8_epi32
#define simde_mm512_cvtepu16_epi32 emu_cvtepu16_epi32
#define simde_mm512_mask_storeu_epi32 emu_mask_storeu_epi32
#define simde_mm512_maskz_loadu_epi32 emu_maskz_loadu_epi32
#define simde_mm512_maskz_loadu_ps emu_maskz_loadu_ps
#define simde_mm512_reduce_max_ps emu_reduce_max_ps
#define simde_mm512_reduce_add_ps emu_reduce_add_ps
#define simde_mm512_mask_cvtsepi32_storeu_epi8 emu_mask_cvtsepi32_storeu_epi8
"""


def emulated_source(fmt: str) -> str:
    """The kernel's source with the AVX-512 (+ VNNI) branches on and the intrinsics SIMDe's."""
    src = cpu_sparse.source(fmt)
    head = "#if defined(__AVX512F__)\n#include <immintrin.h>"
    vnni = "defined(SP_AVX512) && defined(__AVX512VNNI__) && defined(__AVX512BW__)"
    assert head in src and vnni in src, "the kernel's ISA selection changed: update this emulation"
    src = src.replace(head, "#if 1\n#include <simde/x86/avx512.h>\n#include <simde/x86/sse.h>\n" + SHIM)
    src = src.replace(vnni, "defined(SP_AVX512)")
    src = re.sub(r"\b(_mm512_|_mm256_|_mm_)", r"simde\1", src)
    src = re.sub(r"\b(__m512i|__m512|__m256i|__m256|__m128i|__m128|__mmask16)\b", r"simde\1", src)
    return re.sub(r"\b_(MM_HINT_T0|CMP_[A-Z_]+|MM_FROUND_[A-Z_]+)\b", r"SIMDE_\1", src)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """fmt -> the kernel built with SIMDe (a ctypes function with the real kernel's signature)."""
    built = {}

    def get(fmt: str):
        if fmt not in built:
            d = tmp_path_factory.mktemp("simde")
            c, so = d / "kernel.c", d / "kernel.so"
            c.write_text(emulated_source(fmt))
            r = subprocess.run(["gcc", "-O1", "-fopenmp", "-shared", "-fPIC", "-std=gnu11", "-Werror=implicit-function-declaration",
                                str(c), "-o", str(so), "-lm"], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-3000:]
            fn = getattr(ctypes.CDLL(str(so)), cpu_sparse.kernel_name(fmt))
            fn.argtypes = cpu_sparse.ARGTYPES
            fn.restype = ctypes.c_int64
            built[fmt] = fn
        return built[fmt]
    return get


@pytest.mark.parametrize("fmt", ["int8", "int4_g128_asym", "int4_g32_sym"])
def test_vnni_paths_match_float64(fmt, emulated, monkeypatch):
    """Integer dot products over quads of kept rows (three int8 parts of x) against float64: one
    tile and the kept inputs split over two threads (int8: whole quads per thread), padded N,
    several tiles, whole groups zeroed; the SiLU * mul epilogue; a kept inf reaches the output
    (the float path runs that call)."""
    real = cpu_sparse._build  # the host's own builds: the AVX2 one (float FMAs) for the comparison
    monkeypatch.setattr(cpu_sparse, "_build", lambda f, isa: emulated(f) if isa == "native" else real(f, isa))
    before = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    try:
        for (n, k), t in (((128, 512), 2), ((300, 1024), 2), ((1100, 256), 1)):
            torch.set_num_threads(t)
            qw = quantize(torch.randn(n, k, generator=gen), WeightFormat.parse(fmt))
            w = cpu_sparse.make_kmajor_cpu(qw.qweight, qw.scale, qw.zero, fmt, k)
            # magnitudes spread over ~3 decades (the x parts' residuals carry the small ones)
            x = torch.randn(k, generator=gen) * torch.rand(k, generator=gen) * 4
            x = torch.where(x.abs() > 0.5, x, torch.zeros(()))
            x[: k // 4] = 0
            bias = torch.randn(n, generator=gen)
            ref = x.double() @ dequantize(qw).double()[:, :k].T + bias.double()
            y = cpu_sparse.run(x, w, bias, fmt, k).double()
            assert (y - ref).abs().max() <= 1e-5 * ref.abs().max(), (fmt, n, k, t)
            assert not torch.equal(y.float(), cpu_sparse.run(x, w, bias, fmt, k, isa="avx2"))  # the integer path ran
            if n % 2 == 0:
                y2 = cpu_sparse.run(x, w, bias, fmt, k, lead=(1,), silu_first=n // 2).double()[0]
                r2 = torch.nn.functional.silu(y[: n // 2]) * y[n // 2:]  # the epilogue on the checked outputs
                assert (y2 - r2).abs().max() <= 1e-5 * r2.abs().max(), (fmt, n, k, t)
            x[int((x != 0).nonzero()[0])] = float("inf")
            assert not bool(cpu_sparse.run(x, w, bias, fmt, k).isfinite().all())
    finally:
        torch.set_num_threads(before)


def test_x_parts_carry_remainders_near_half_a_step(emulated, monkeypatch):
    """x / s with a fractional part just under 1/2 (s = 1 here: the group's largest |x| is 127):
    the remainder's part must not need clamping. With parts of 1/256 it rounded to 128, clamped to
    127, and each such x came out ~s/1024 low; per column that adds up over the 127 such inputs to
    ~6e-5 of sum |x w|, where float32 rounding gives ~1e-6. int8 only: the quads are the same for
    int4, whose own float error with zero points (the AVX2 float path: ~5e-5 here) hides it."""
    fmt = "int8"
    monkeypatch.setattr(cpu_sparse, "_build", lambda f, isa: emulated(f))
    gen = torch.Generator().manual_seed(1)
    n, k = 256, 256
    qw = quantize(torch.randn(n, k, generator=gen), WeightFormat.parse(fmt))
    w = cpu_sparse.make_kmajor_cpu(qw.qweight, qw.scale, qw.zero, fmt, k)
    x = torch.zeros(k)
    x[0], x[1:128] = 127.0, 0.499
    x[128], x[129:256] = -127.0, -0.4985
    wd = dequantize(qw).double()[:, :k]
    ref = x.double() @ wd.T
    y = cpu_sparse.run(x, w, None, fmt, k).double()
    scale = x.double().abs() @ wd.abs().T  # per column: sum |x_k w_nk|
    assert ((y - ref).abs() / scale).max() <= 2e-6, fmt
