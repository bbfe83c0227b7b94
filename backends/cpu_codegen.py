"""Generated CPU kernels: low-bit matmuls for decode-sized batches, as C compiled at first use.

torch's packed int4 CPU kernel is compute-bound at batch 1 (it reaches about 40 % of the memory
bandwidth floor), and its int8 one converts the activation to bf16. For M <= ``MAX_ROWS`` rows a
weight-streaming kernel does better: each weight byte is read once, unpacked in registers and
multiplied against every row of ``x`` (float32 accumulation), threads over output channels.

One kernel per weight format (``int8``; ``int4_g{G}_{sym,asym}``; ``nf4_g{G}``), written from a template
(:func:`source`), compiled by the system C compiler (the one Inductor's CPU backend needs) with
``-O3 -march=native -fopenmp``: the compiler vectorises the inner loops for the machine's ISA
(AVX-512, AVX2 or SSE; the host's flags are part of the cache key), cached on disk under
``$LOWBIT_CACHE_DIR/cpu`` by a hash of source, compiler and flags, loaded with ``ctypes``.
Without a compiler (or when compiling fails) :func:`kernel` returns None, logs why once, and
torch's packed kernels run.

Layouts are our storage formats (``formats.py``): the generated kernels read the quantized
tensors as ``compress`` and the passes wrote them, so they need no repacked copy.

Which kernel runs (``cpu_kernels.packed_linear``): the one ``cpu_dispatch.choose`` measures fastest
on this host per shape and row class, among this module's kernel (for ``M <= MAX_ROWS`` rows),
torch's packed kernels and dequantize-then-matmul (``backends/cpu_dispatch.py``).
``LOWBIT_CPU_CODEGEN=0`` turns generated kernels off (read at every call; logged once).
"""
from __future__ import annotations

import atexit
import collections
import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

import torch

from lowbit_compiler.formats import NF4_GRID, WeightFormat
from lowbit_compiler.identity_cache import IdentityCache

log = logging.getLogger("lowbit_compiler")

MAX_ROWS = 16  # decode and small batches; larger M: torch's packed kernels or dequantize-then-matmul
ENV = "LOWBIT_CPU_CODEGEN"
# "0": the CPU lowering leaves q/k/v and gate.up as separate generated calls (read when compiling)
FUSE_ENV = "LOWBIT_CPU_FUSE"
# "1": int4 weight-only calls quantize their activations to int8 per group first (faster, lossy)
INT8_ACTIVATIONS_ENV = "LOWBIT_CPU_INT8_ACTIVATIONS"


def int8_activations_enabled() -> bool:
    """Whether dispatch runs int4 weights with int8-quantized activations (opt-in; read per call)."""
    return os.environ.get(INT8_ACTIVATIONS_ENV, "0") == "1"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
# the compiler's default target (no AVX2 on x86-64): builds the portable loops; the tests use it to
# check the fallback a host without AVX2 + FMA runs
PORTABLE_FLAGS = tuple(f for f in FLAGS if f != "-march=native")
# which ISA a build targets: "native" (the host's: AVX-512 + VNNI paths where it has them),
# "avx2" (the host's without AVX-512: what an AVX2-only machine runs), "portable" (the compiler's
# default target). Only "native" is dispatched; the others exist so that one machine tests every
# path a user's machine may take.
# which build dispatch uses (default "native"): "avx2" or "portable" run what a machine without
# AVX-512 (or AVX2) would, for comparisons on one machine (read per call)
ISA_ENV = "LOWBIT_CPU_ISA"
ISA_FLAGS = {"native": FLAGS, "avx2": FLAGS + ("-mno-avx512f",), "portable": PORTABLE_FLAGS}

# the sum of an AVX2 vector's 8 floats (the dense kernels' reductions here, the activation-sparse
# kernel's AVX2 compaction in `cpu_sparse`)
HSUM256 = r"""
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
"""[1:]

_PRELUDE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LOWBIT_AVX2 1  /* explicit AVX2 + FMA below; otherwise the portable loops the compiler vectorises */
#endif
#if defined(LOWBIT_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LOWBIT_AVX512 1  /* 16-lane paths where a kernel has one (the AVX2 code stays for the rest) */
#endif
#if defined(LOWBIT_AVX512) && defined(__AVX512VNNI__)
#define LOWBIT_VNNI 1  /* vpdpbusd: four byte products summed into int32 in one instruction */
#endif

/* which explicit path this build runs (tests and benchmarks read it) */
const char* lowbit_isa(void) {
#if defined(LOWBIT_VNNI)
    return "avx512_vnni";
#elif defined(LOWBIT_AVX512)
    return "avx512";
#elif defined(LOWBIT_AVX2)
    return "avx2";
#else
    return "portable";
#endif
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Software prefetch of a weight stream into L2: the cache lines that start in [p, p + n) shifted by
   LOWBIT_PF_BYTES, one prefetcht1 each (called once per stretch of codes a loop consumes, so every
   line of a thread's stream is asked for once, that far ahead). The hardware prefetchers alone left
   a decode GEMV at 35-40 % of the DRAM floor on an AVX-512 Xeon; 8 KB ahead into L2 gave 55-70 %
   (4-16 KB alike; into L1 or nearer: less). A prefetch never faults, so reading past the end of
   the weight is harmless. */
#ifndef LOWBIT_PF_BYTES
#define LOWBIT_PF_BYTES 8192
#endif
static inline __attribute__((always_inline)) void lowbit_prefetch(const void* p, int64_t n) {
    const uintptr_t a = (uintptr_t)p + LOWBIT_PF_BYTES;
    for (uintptr_t q = (a + 63) & ~(uintptr_t)63; q < a + (uintptr_t)n; q += 64)
        __builtin_prefetch((const void*)q, 0, 2);
}

#ifdef LOWBIT_AVX2
""" + HSUM256 + r"""
/* acc + the four u8 x s8 products of each int32 lane: vpdpbusd with VNNI (exact), else maddubs + madd
   (exact while a pair of products stays below 2^15, which the caller must guarantee) */
static inline __m256i lowbit_dot_u8s8(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
}

/* a (x / d, |a| <= 127) as h + m / 254 + l / 254^2 with h, m, l in [-127, 127]: each residual is
   computed exactly (a - round(a) is exact in float32, and the fma forms r * 254 - m without
   rounding), so what is left is at most 0.5 / 254^2 of d, ~2^-24 of the block's absmax */
static inline void lowbit_split3(float a, int8_t* h, int8_t* m, int8_t* l) {
    float vh = nearbyintf(a);
    vh = vh > 127.0f ? 127.0f : (vh < -127.0f ? -127.0f : vh);
    const float r = a - vh;
    const float vm = nearbyintf(r * 254.0f);
    float vl = nearbyintf(fmaf(r, 254.0f, -vm) * 254.0f);
    vl = vl > 127.0f ? 127.0f : (vl < -127.0f ? -127.0f : vl);
    *h = (int8_t)vh;
    *m = (int8_t)(vm > 127.0f ? 127.0f : (vm < -127.0f ? -127.0f : vm));
    *l = (int8_t)vl;
}

static inline int32_t hsum256_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}
#endif
"""

# RMSNorm of one row, the formula every generated kernel with a norm prologue uses (the dense `_ext`
# entries here, the activation-sparse kernel of `cpu_sparse`): o = (x * (1 / sqrt(mean(x^2) + eps)))
# * w, the sum of squares in double
RMS_NORM_ROW = r"""
static inline void lowbit_rms_norm_row(const float* x, const float* w, float eps, float* o, int64_t K) {
    double ss = 0.0;
    for (int64_t k = 0; k < K; k++)
        ss += (double)x[k] * (double)x[k];
    const float r = 1.0f / sqrtf((float)(ss / (double)K) + eps);
    for (int64_t k = 0; k < K; k++)
        o[k] = (x[k] * r) * w[k];
}
"""
_PRELUDE += RMS_NORM_ROW

# int4 group-wise: codes uint8 [N, K/2] (code k at bits [4k, 4k + 4) of the row: low nibble = even
# k), scale bf16 [N, K/G], zero uint8 [N, K/G] (asymmetric) or none (symmetric: codes centred on 8).
# x is split once per call into its even and odd columns, so that 8 bytes of codes widen to 8 int32
# lanes whose low nibbles meet 8 even columns and whose high nibbles meet 8 odd ones; each group's
# sum of x is computed once, so that a group contributes s * (sum q x) - s * z * sum x without a
# subtraction per weight. Rows are done in tiles of up to 4 per pass over an output channel's
# codes (the codes stream from memory once; later tiles re-read them from L1), each row with two
# independent FMA chains (low and high nibbles) so that M = 1 is not bound by FMA latency.
_INT4 = r"""
{decode_defs}
#ifdef LOWBIT_AVX2
static inline __attribute__((always_inline)) void {name}_tile(
    const uint8_t* row, const uint16_t* scale, const uint8_t* zp, const float* xe, const float* xo,
    const float* xs, float* out, int64_t half, int64_t groups, const int MT)
{{
    const int64_t G = {group};
    const __m256i low4 = _mm256_set1_epi32(15);
    __m256 acc[4];
    float zsum[4];
    for (int r = 0; r < MT; r++) {{ acc[r] = _mm256_setzero_ps(); zsum[r] = 0.0f; }}
    for (int64_t g = 0; g < groups; g++) {{
        const float s = bf16_to_f32(scale[g]);
        const float z = {zero_expr};
        const uint8_t* b = row + g * (G / 2);
        lowbit_prefetch(b, G / 2);
        __m256 dl[4], dh[4];
        for (int r = 0; r < MT; r++) {{ dl[r] = _mm256_setzero_ps(); dh[r] = _mm256_setzero_ps(); }}
        for (int64_t j = 0; j < G / 2; j += 8) {{
            const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(b + j)));
            const __m256 lo = {name}_decode(_mm256_and_si256(w, low4));
            const __m256 hi = {name}_decode(_mm256_srli_epi32(w, 4));
            const int64_t at = g * (G / 2) + j;
            for (int r = 0; r < MT; r++) {{
                dl[r] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xe + r * half + at), dl[r]);
                dh[r] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xo + r * half + at), dh[r]);
            }}
        }}
        const __m256 sv = _mm256_set1_ps(s);
        for (int r = 0; r < MT; r++) {{
            acc[r] = _mm256_fmadd_ps(sv, _mm256_add_ps(dl[r], dh[r]), acc[r]);
            zsum[r] += s * z * xs[r * groups + g];
        }}
    }}
    for (int r = 0; r < MT; r++)
        out[r] = hsum256(acc[r]) - zsum[r];
}}
#endif

#if defined(LOWBIT_AVX512) && {wide}
#define {name}_W512 1
/* 16 code bytes (32 weights) a step: vpmovzxbd to 16 int32 lanes, low nibbles against 16 even
   columns, high nibbles against 16 odd ones. One row (decode) keeps four FMA chains (two per
   nibble) so that a 64-byte group is not bound by FMA latency; tiles of 2-4 rows keep two. */
static inline __attribute__((always_inline)) void {name}_tile512(
    const uint8_t* row, const uint16_t* scale, const uint8_t* zp, const float* xe, const float* xo,
    const float* xs, float* out, int64_t half, int64_t groups, const int MT)
{{
    const int64_t G = {group};
    const __m512i low4 = _mm512_set1_epi32(15);
    __m512 acc[4];
    float zsum[4];
    for (int r = 0; r < MT; r++) {{ acc[r] = _mm512_setzero_ps(); zsum[r] = 0.0f; }}
    for (int64_t g = 0; g < groups; g++) {{
        const float s = bf16_to_f32(scale[g]);
        const float z = {zero_expr};
        const uint8_t* b = row + g * (G / 2);
        lowbit_prefetch(b, G / 2);
        const int64_t at0 = g * (G / 2);
        __m512 dl[4], dh[4];
        for (int r = 0; r < MT; r++) {{ dl[r] = _mm512_setzero_ps(); dh[r] = _mm512_setzero_ps(); }}
        int64_t j = 0;
        if (MT == 1) {{
            __m512 el = _mm512_setzero_ps(), eh = _mm512_setzero_ps();
            for (; j + 32 <= G / 2; j += 32) {{
                const __m512i w0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(b + j)));
                const __m512i w1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(b + j + 16)));
                dl[0] = _mm512_fmadd_ps({name}_decode512(_mm512_and_si512(w0, low4)), _mm512_loadu_ps(xe + at0 + j), dl[0]);
                dh[0] = _mm512_fmadd_ps({name}_decode512(_mm512_srli_epi32(w0, 4)), _mm512_loadu_ps(xo + at0 + j), dh[0]);
                el = _mm512_fmadd_ps({name}_decode512(_mm512_and_si512(w1, low4)), _mm512_loadu_ps(xe + at0 + j + 16), el);
                eh = _mm512_fmadd_ps({name}_decode512(_mm512_srli_epi32(w1, 4)), _mm512_loadu_ps(xo + at0 + j + 16), eh);
            }}
            dl[0] = _mm512_add_ps(dl[0], el);
            dh[0] = _mm512_add_ps(dh[0], eh);
        }}
        for (; j < G / 2; j += 16) {{
            const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(b + j)));
            const __m512 lo = {name}_decode512(_mm512_and_si512(w, low4));
            const __m512 hi = {name}_decode512(_mm512_srli_epi32(w, 4));
            for (int r = 0; r < MT; r++) {{
                dl[r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xe + r * half + at0 + j), dl[r]);
                dh[r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xo + r * half + at0 + j), dh[r]);
            }}
        }}
        const __m512 sv = _mm512_set1_ps(s);
        for (int r = 0; r < MT; r++) {{
            acc[r] = _mm512_fmadd_ps(sv, _mm512_add_ps(dl[r], dh[r]), acc[r]);
            zsum[r] += s * z * xs[r * groups + g];
        }}
    }}
    for (int r = 0; r < MT; r++)
        out[r] = _mm512_reduce_add_ps(acc[r]) - zsum[r];
}}
#endif

#if defined(LOWBIT_AVX2) && {split8}
#define {name}_S8 1
#ifdef LOWBIT_VNNI
#define {name}_S8_ROWS {split_rows}
#else
#define {name}_S8_ROWS 1  /* maddubs + madd: two ops per dot product; from 2 rows the float path's shared unpack wins (measured) */
#endif
/* Integer codes, x in three int8 parts (lowbit_split3, per group: d = absmax / 127), so that the
   codes meet the activations in u8 x s8 dot products (vpdpbusd with VNNI: 32 products summed into
   8 int32 lanes per instruction; maddubs + madd without, exact for codes <= 15): per 32 code bytes
   (64 weights) one load, three ops to split the nibbles, six dot products per row. The sums are
   exact integers; each group's three become float once: y = sum_g s_g (d_g (H + M/254 + L/254^2)
   - z_g sum x_g). A non-finite activation makes its row's outputs NaN. */
#if defined(LOWBIT_VNNI) && {group} % 128 == 0
#define {name}_S8_WIDE 1
/* One row of x (decode) with AVX-512 VNNI and groups a multiple of 128: the same sums 64 code
   bytes (128 weights) a step in zmm registers, x laid out [64 even | 64 odd] per 128 columns
   ({name}_prepare8 with one row), against NC output channels at once (one, or a pair: each x load
   feeds both channels' dot products). Measured on Zen 4 (2 threads, 2048-32000 x 2048 / 5632):
   5-8 % faster than the ymm loop below with one row; that loop stays for 2+ rows (there the zmm
   form was 3 % slower). vpdpbusd bounds both (six per 64 code bytes). */
static inline __attribute__((always_inline)) void {name}_tile8c(
    const uint8_t* const* rows, const uint16_t* const* scales, const uint8_t* const* zps, const int8_t* xq,
    const float* dg, const float* xs, float* out, int64_t K, int64_t groups, const int NC)
{{
    const int64_t G = {group};
    const __m512i low4 = _mm512_set1_epi8(15);
    const __m512 c1 = _mm512_set1_ps(1.0f / 254.0f), c2 = _mm512_set1_ps(1.0f / 64516.0f);
    __m512 acc[4];
    float zsum[4];
    for (int r = 0; r < NC; r++) {{ acc[r] = _mm512_setzero_ps(); zsum[r] = 0.0f; }}
    for (int64_t g = 0; g < groups; g++) {{
        __m512i h[4], m[4], l[4];
        for (int r = 0; r < NC; r++) {{
            h[r] = _mm512_setzero_si512(); m[r] = _mm512_setzero_si512(); l[r] = _mm512_setzero_si512();
            lowbit_prefetch(rows[r] + g * (G / 2), G / 2);
        }}
        for (int64_t c = 0; c < G / 2; c += 64) {{
            const int8_t* xr = xq + g * G + 2 * c;
            const __m512i he = _mm512_loadu_si512((const void*)xr), ho = _mm512_loadu_si512((const void*)(xr + 64));
            const __m512i me = _mm512_loadu_si512((const void*)(xr + K)),
                          mo = _mm512_loadu_si512((const void*)(xr + K + 64));
            const __m512i le = _mm512_loadu_si512((const void*)(xr + 2 * K)),
                          lo_ = _mm512_loadu_si512((const void*)(xr + 2 * K + 64));
            for (int r = 0; r < NC; r++) {{
                const __m512i w = _mm512_loadu_si512((const void*)(rows[r] + g * (G / 2) + c));
                const __m512i lo = _mm512_and_si512(w, low4), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
                h[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(h[r], lo, he), hi, ho);
                m[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(m[r], lo, me), hi, mo);
                l[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(l[r], lo, le), hi, lo_);
            }}
        }}
        for (int r = 0; r < NC; r++) {{
            const uint8_t* zp = zps[r];
            (void)zp;
            const float s = bf16_to_f32(scales[r][g]);
            const float z = {zero_expr};
            const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(l[r]), c2,
                                             _mm512_fmadd_ps(_mm512_cvtepi32_ps(m[r]), c1, _mm512_cvtepi32_ps(h[r])));
            acc[r] = _mm512_fmadd_ps(f, _mm512_set1_ps(s * dg[g]), acc[r]);
            zsum[r] += s * z * xs[g];
        }}
    }}
    for (int r = 0; r < NC; r++)
        out[r] = _mm512_reduce_add_ps(acc[r]) - zsum[r];
}}
#else
#define {name}_S8_WIDE 0
#endif

static inline __attribute__((always_inline)) void {name}_tile8(
    const uint8_t* row, const uint16_t* scale, const uint8_t* zp, const int8_t* xq, const float* dg,
    const float* xs, float* out, int64_t K, int64_t groups, const int MT)
{{
    const int64_t G = {group};
    const __m256i low4 = _mm256_set1_epi8(15);
    const __m256 c1 = _mm256_set1_ps(1.0f / 254.0f), c2 = _mm256_set1_ps(1.0f / 64516.0f);
    __m256 acc[4];
    float zsum[4];
    for (int r = 0; r < MT; r++) {{ acc[r] = _mm256_setzero_ps(); zsum[r] = 0.0f; }}
    for (int64_t g = 0; g < groups; g++) {{
        const float s = bf16_to_f32(scale[g]);
        const float z = {zero_expr};
        const uint8_t* b = row + g * (G / 2);
        lowbit_prefetch(b, G / 2);
        __m256i h[4], m[4], l[4];
        for (int r = 0; r < MT; r++) {{
            h[r] = _mm256_setzero_si256(); m[r] = _mm256_setzero_si256(); l[r] = _mm256_setzero_si256();
        }}
        for (int64_t c = 0; c < G / 2; c += 32) {{
            const __m256i w = _mm256_loadu_si256((const __m256i*)(b + c));
            const __m256i lo = _mm256_and_si256(w, low4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low4);
            for (int r = 0; r < MT; r++) {{  /* per 64 columns: [32 even | 32 odd] of each part */
                const int8_t* xr = xq + r * 3 * K + g * G + 2 * c;
                h[r] = lowbit_dot_u8s8(h[r], lo, _mm256_loadu_si256((const __m256i*)xr));
                h[r] = lowbit_dot_u8s8(h[r], hi, _mm256_loadu_si256((const __m256i*)(xr + 32)));
                m[r] = lowbit_dot_u8s8(m[r], lo, _mm256_loadu_si256((const __m256i*)(xr + K)));
                m[r] = lowbit_dot_u8s8(m[r], hi, _mm256_loadu_si256((const __m256i*)(xr + K + 32)));
                l[r] = lowbit_dot_u8s8(l[r], lo, _mm256_loadu_si256((const __m256i*)(xr + 2 * K)));
                l[r] = lowbit_dot_u8s8(l[r], hi, _mm256_loadu_si256((const __m256i*)(xr + 2 * K + 32)));
            }}
        }}
        for (int r = 0; r < MT; r++) {{
            const __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(l[r]), c2,
                                             _mm256_fmadd_ps(_mm256_cvtepi32_ps(m[r]), c1, _mm256_cvtepi32_ps(h[r])));
            acc[r] = _mm256_fmadd_ps(f, _mm256_set1_ps(s * dg[r * groups + g]), acc[r]);
            zsum[r] += s * z * xs[r * groups + g];
        }}
    }}
    for (int r = 0; r < MT; r++)
        out[r] = hsum256(acc[r]) - zsum[r];
}}

/* once per call: per row the three int8 parts of x (K bytes each, [B/2 even | B/2 odd] per B
   columns: 128 for {name}_tile8c (one row, {name}_S8_WIDE), else 64), then the group scales d
   [M, K/G] and sums of x [M, K/G] */
static void {name}_prepare8(const float* x, float* scratch, int64_t M, int64_t K)
{{
    const int64_t G = {group}, groups = K / G;
    int8_t* xq = (int8_t*)scratch;
    float* dg = scratch + (3 * M * K) / 4;
    float* xs = dg + M * groups;
    for (int64_t m = 0; m < M; m++) {{
        for (int64_t g = 0; g < groups; g++) {{
            const float* xg = x + m * K + g * G;
            float amax = 0.0f, t = 0.0f;
            for (int64_t k = 0; k < G; k++) {{
                const float a = fabsf(xg[k]);
                amax = a > amax ? a : amax;
                t += xg[k];
            }}
            const int finite = isfinite(amax) && isfinite(t);
            const float inv = finite && amax > 0.0f ? 127.0f / amax : 0.0f;
            const int64_t B = {name}_S8_WIDE && M == 1 ? 128 : 64, H = B / 2;
            for (int64_t c = 0; c < G; c += B) {{
                int8_t* p = xq + m * 3 * K + g * G + c;
                for (int64_t j = 0; j < H; j++) {{
                    lowbit_split3(finite ? xg[c + 2 * j] * inv : 0.0f, p + j, p + K + j, p + 2 * K + j);
                    lowbit_split3(finite ? xg[c + 2 * j + 1] * inv : 0.0f, p + H + j, p + K + H + j,
                                  p + 2 * K + H + j);
                }}
            }}
            dg[m * groups + g] = finite ? (inv > 0.0f ? 1.0f / inv : 0.0f) : NAN;
            xs[m * groups + g] = finite ? t : NAN;
        }}
    }}
}}
#endif

#if defined(LOWBIT_AVX2) && {nf4q}
#define {name}_Q8 1
/* NF4 through an int8 table: the codebook as unsigned bytes u = round(ALPHA v + BETA) (v ~ P u + Q,
   P and Q the least-squares fit of the 16 grid values; 16 bytes, one pshufb per 32 codes), x per
   group in two signed parts (d = absmax / 32: h = round(x / d), m = round((x / d - h) * 64), both
   in [-32, 32]), so that u x part products meet in maddubs (u <= 255: two maddubs summed in int16
   stay below 2^15) and madd: per 32 code bytes (64 weights) one load, three ops to split the
   nibbles, two lookups, then per row two loads, four maddubs, two adds and two madds.
   y = sum_g s_g (d_g P (U.h + U.m / 64) + d_g Q (sum h + sum m / 64)). The sums are exact
   integers; the error is the table's rounding (~52 dB below the grid's rms) and x's two-part
   rounding (~70 dB). A non-finite activation makes its row's outputs NaN. */
static const uint8_t {name}_u8[16] = {{{u8}}};

static inline __attribute__((always_inline)) __m256i {name}_dotq(__m256i acc, __m256i lo, __m256i hi,
                                                                 const int8_t* xr)
{{
    const __m256i e = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)xr));
    const __m256i o = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(xr + 32)));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_add_epi16(e, o), _mm256_set1_epi16(1)));
}}

static inline __attribute__((always_inline)) void {name}_tileq(
    const uint8_t* row, const uint16_t* scale, const int8_t* xq, const float* dq, const float* cq,
    float* out, int64_t K, int64_t groups, const int MT)
{{
    const int64_t G = {group};
    const __m256i low4 = _mm256_set1_epi8(15);
    const __m256i tab = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*){name}_u8));
    const __m256 c1 = _mm256_set1_ps(1.0f / 64.0f);
    __m256 acc[4];
    float zsum[4];
    for (int r = 0; r < MT; r++) {{ acc[r] = _mm256_setzero_ps(); zsum[r] = 0.0f; }}
#if {group} % 64 == 0
    for (int64_t g = 0; g < groups; g++) {{
        const float s = bf16_to_f32(scale[g]);
        const uint8_t* b = row + g * (G / 2);
        lowbit_prefetch(b, G / 2);
        __m256i h[4], m[4];
        for (int r = 0; r < MT; r++) {{ h[r] = _mm256_setzero_si256(); m[r] = _mm256_setzero_si256(); }}
        for (int64_t c = 0; c < G / 2; c += 32) {{
            const __m256i w = _mm256_loadu_si256((const __m256i*)(b + c));
            const __m256i lo = _mm256_shuffle_epi8(tab, _mm256_and_si256(w, low4));
            const __m256i hi = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(w, 4), low4));
            for (int r = 0; r < MT; r++) {{  /* per 64 columns: [32 even | 32 odd] of each part */
                const int8_t* xr = xq + r * 2 * K + g * G + 2 * c;
                h[r] = {name}_dotq(h[r], lo, hi, xr);
                m[r] = {name}_dotq(m[r], lo, hi, xr + K);
            }}
        }}
        for (int r = 0; r < MT; r++) {{
            const __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m[r]), c1, _mm256_cvtepi32_ps(h[r]));
            acc[r] = _mm256_fmadd_ps(f, _mm256_set1_ps(s * dq[r * groups + g]), acc[r]);
            zsum[r] += s * cq[r * groups + g];
        }}
    }}
#else  /* G = 32: a 32-byte load holds two groups (bytes 0-15 and 16-31: int32 lanes 0-3 and 4-7) */
    for (int64_t g = 0; g < groups; g += 2) {{
        const float s0 = bf16_to_f32(scale[g]), s1 = bf16_to_f32(scale[g + 1]);
        lowbit_prefetch(row + g * 16, 32);
        const __m256i w = _mm256_loadu_si256((const __m256i*)(row + g * 16));
        const __m256i lo = _mm256_shuffle_epi8(tab, _mm256_and_si256(w, low4));
        const __m256i hi = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(w, 4), low4));
        for (int r = 0; r < MT; r++) {{
            const int8_t* xr = xq + r * 2 * K + g * 32;
            const __m256i h = {name}_dotq(_mm256_setzero_si256(), lo, hi, xr);
            const __m256i m = {name}_dotq(_mm256_setzero_si256(), lo, hi, xr + K);
            const __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m), c1, _mm256_cvtepi32_ps(h));
            const float* d = dq + r * groups + g;
            acc[r] = _mm256_fmadd_ps(f, _mm256_set_m128(_mm_set1_ps(s1 * d[1]), _mm_set1_ps(s0 * d[0])), acc[r]);
            zsum[r] += s0 * cq[r * groups + g] + s1 * cq[r * groups + g + 1];
        }}
    }}
#endif
    for (int r = 0; r < MT; r++)
        out[r] = hsum256(acc[r]) + zsum[r];
}}

/* once per call: per row the two int8 parts of x (K bytes each, [32 even | 32 odd] per 64
   columns), then P d [M, K/G] and Q d (sum h + sum m / 64) [M, K/G] */
static void {name}_prepareq(const float* x, float* scratch, int64_t M, int64_t K)
{{
    const int64_t G = {group}, groups = K / G;
    int8_t* xq = (int8_t*)scratch;
    float* dq = scratch + (2 * M * K) / 4;
    float* cq = dq + M * groups;
    for (int64_t m = 0; m < M; m++) {{
        const float* xm = x + m * K;
        int8_t* p = xq + m * 2 * K;
        for (int64_t g = 0; g < groups; g++) {{
            const float* xg = xm + g * G;
            float amax = 0.0f, t = 0.0f;  /* t: NaN iff some x is inf or NaN (the max skips a NaN) */
            for (int64_t k = 0; k < G; k++) {{
                const float a = fabsf(xg[k]);
                amax = a > amax ? a : amax;
                t += xg[k] * 0.0f;
            }}
            const int finite = isfinite(amax) && isfinite(t);
            const float inv = finite && amax > 0.0f ? 32.0f / amax : 0.0f;
            int32_t sh = 0, sm = 0;
            for (int64_t k = g * G; k < (g + 1) * G; k++) {{
                const float a = finite ? xm[k] * inv : 0.0f;  /* |a| <= 32 */
                float h = nearbyintf(a);
                h = h > 32.0f ? 32.0f : (h < -32.0f ? -32.0f : h);
                float r = nearbyintf((a - h) * 64.0f);
                r = r > 32.0f ? 32.0f : (r < -32.0f ? -32.0f : r);
                /* column k of its 64-column block: even columns first, then odd */
                const int64_t at = (k & ~(int64_t)63) + ((k & 63) >> 1) + ((k & 1) << 5);
                p[at] = (int8_t)h;
                p[K + at] = (int8_t)r;
                sh += (int32_t)h;
                sm += (int32_t)r;
            }}
            const float d = finite ? (inv > 0.0f ? amax / 32.0f : 0.0f) : NAN;
            dq[m * groups + g] = {P}f * d;
            cq[m * groups + g] = {Q}f * d * ((float)sh + (float)sm / 64.0f);
        }}
    }}
}}
#endif

/* once per call: x split into even / odd columns and summed per group (scratch [M, K + K/G]);
   calls the split-int8 path takes (integer groups of 64+, at most {name}_S8_ROWS rows) get its layout
   instead */
static void {name}_prepare(const float* x, float* scratch, int64_t M, int64_t K)
{{
#if defined({name}_Q8)
    if (M <= {q8_rows} && K % 64 == 0) {{
        {name}_prepareq(x, scratch, M, K);
        return;
    }}
#endif
#if defined({name}_S8)
    if (M <= {name}_S8_ROWS) {{
        {name}_prepare8(x, scratch, M, K);
        return;
    }}
#endif
    const int64_t G = {group}, half = K / 2, groups = K / G;
    float* xe = scratch;                  /* [M, K/2] even columns of x */
    float* xo = scratch + M * half;       /* [M, K/2] odd columns */
    float* xs = scratch + 2 * M * half;   /* [M, K/G] sum of x over each group */
    for (int64_t m = 0; m < M; m++) {{
        for (int64_t j = 0; j < half; j++) {{
            xe[m * half + j] = x[m * K + 2 * j];
            xo[m * half + j] = x[m * K + 2 * j + 1];
        }}
        for (int64_t g = 0; g < groups; g++) {{
            float t = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k++)
                t += x[m * K + k];
            xs[m * groups + g] = t;
        }}
    }}
}}


/* output channel n of every row (no bias): out[m] = x[m] . dequant(W[n]) */
static inline __attribute__((always_inline)) void {name}_channel(
    const void* codes_, const uint16_t* scale, const uint8_t* zero, const float* x, const float* scratch,
    int64_t n, int64_t M, int64_t K, float* out)
{{
    (void)x;
    const int64_t G = {group}, half = K / 2, groups = K / G;
    const float* xe = scratch;
    const float* xo = scratch + M * half;
    const float* xs = scratch + 2 * M * half;
    const uint8_t* codes = (const uint8_t*)codes_;
    {{
        const uint8_t* row = codes + n * half;
        const uint16_t* sc = scale + n * groups;
        const uint8_t* zp = {zero_row};
#if defined({name}_Q8)
        if (M <= {q8_rows} && K % 64 == 0) {{  /* NF4 through its int8 table: the layout {name}_prepareq wrote */
            (void)zp;
            const float* dq = scratch + (2 * M * K) / 4;
            for (int64_t m = 0; m < M; m += 4) {{
                const int64_t t = M - m < 4 ? M - m : 4;
                const int8_t* q = (const int8_t*)scratch + m * 2 * K;
                const float *d = dq + m * groups, *c = dq + M * groups + m * groups;
                if (t == 4) {name}_tileq(row, sc, q, d, c, out + m, K, groups, 4);
                else if (t == 3) {name}_tileq(row, sc, q, d, c, out + m, K, groups, 3);
                else if (t == 2) {name}_tileq(row, sc, q, d, c, out + m, K, groups, 2);
                else {name}_tileq(row, sc, q, d, c, out + m, K, groups, 1);
            }}
            return;
        }}
#endif
#if defined({name}_S8)
        if (M <= {name}_S8_ROWS) {{  /* the layout {name}_prepare8 wrote */
            const float* dg = scratch + (3 * M * K) / 4;
#if {name}_S8_WIDE
            if (M == 1) {{  /* the one-row layout: the drivers' pairs take tile8c themselves; a lone channel too */
                {name}_tile8c(&row, &sc, &zp, (const int8_t*)scratch, dg, dg + groups, out, K, groups, 1);
                return;
            }}
#endif
            for (int64_t m = 0; m < M; m += 4) {{
                const int64_t t = M - m < 4 ? M - m : 4;
                const int8_t* q = (const int8_t*)scratch + m * 3 * K;
                const float *d = dg + m * groups, *s = dg + M * groups + m * groups;
                if (t == 4) {name}_tile8(row, sc, zp, q, d, s, out + m, K, groups, 4);
                else if (t == 3) {name}_tile8(row, sc, zp, q, d, s, out + m, K, groups, 3);
                else if (t == 2) {name}_tile8(row, sc, zp, q, d, s, out + m, K, groups, 2);
                else {name}_tile8(row, sc, zp, q, d, s, out + m, K, groups, 1);
            }}
            return;
        }}
#endif
#if defined({name}_W512)
        for (int64_t m = 0; m < M; m += 4) {{  /* constant tile sizes: the accumulators stay in registers */
            const int64_t t = M - m < 4 ? M - m : 4;
            const float *e = xe + m * half, *o = xo + m * half, *s = xs + m * groups;
            if (t == 4) {name}_tile512(row, sc, zp, e, o, s, out + m, half, groups, 4);
            else if (t == 3) {name}_tile512(row, sc, zp, e, o, s, out + m, half, groups, 3);
            else if (t == 2) {name}_tile512(row, sc, zp, e, o, s, out + m, half, groups, 2);
            else {name}_tile512(row, sc, zp, e, o, s, out + m, half, groups, 1);
        }}
#elif defined(LOWBIT_AVX2)
        for (int64_t m = 0; m < M; m += 4) {{  /* constant tile sizes: the accumulators stay in registers */
            const int64_t t = M - m < 4 ? M - m : 4;
            const float *e = xe + m * half, *o = xo + m * half, *s = xs + m * groups;
            if (t == 4) {name}_tile(row, sc, zp, e, o, s, out + m, half, groups, 4);
            else if (t == 3) {name}_tile(row, sc, zp, e, o, s, out + m, half, groups, 3);
            else if (t == 2) {name}_tile(row, sc, zp, e, o, s, out + m, half, groups, 2);
            else {name}_tile(row, sc, zp, e, o, s, out + m, half, groups, 1);
        }}
#else
        for (int64_t m = 0; m < M; m++) out[m] = 0.0f;
        for (int64_t g = 0; g < groups; g++) {{
            const float s = bf16_to_f32(sc[g]);
            const float z = {zero_expr};
            const uint8_t* b = row + g * (G / 2);
            lowbit_prefetch(b, G / 2);
            float lo[G / 2], hi[G / 2];  /* the group's codes converted once for all rows */
            #pragma omp simd
            for (int64_t j = 0; j < G / 2; j++) {{
                lo[j] = {name}_value(b[j] & 15);
                hi[j] = {name}_value(b[j] >> 4);
            }}
            for (int64_t m = 0; m < M; m++) {{
                const float* e = xe + m * half + g * (G / 2);
                const float* o = xo + m * half + g * (G / 2);
                float d = 0.0f;
                #pragma omp simd reduction(+:d)
                for (int64_t j = 0; j < G / 2; j++)
                    d += lo[j] * e[j] + hi[j] * o[j];
                out[m] += s * (d - z * xs[m * groups + g]);
            }}
        }}
#endif
    }}
}}

#if defined({name}_S8) && {name}_S8_WIDE
#define {name}_PAIR 1
/* two output channels (of one weight or of two weights of one input) in one pass over x: one row
   takes {name}_tile8c; more rows, two channel calls */
static inline __attribute__((always_inline)) void {name}_pair(
    const void* c0, const uint16_t* s0, const uint8_t* z0, int64_t n0,
    const void* c1, const uint16_t* s1, const uint8_t* z1, int64_t n1,
    const float* x, const float* scratch, int64_t M, int64_t K, float* a, float* b)
{{
    if (M != 1) {{
        {name}_channel(c0, s0, z0, x, scratch, n0, M, K, a);
        {name}_channel(c1, s1, z1, x, scratch, n1, M, K, b);
        return;
    }}
    const int64_t G = {group}, half = K / 2, groups = K / G;
    const uint8_t* rows[2] = {{(const uint8_t*)c0 + n0 * half, (const uint8_t*)c1 + n1 * half}};
    const uint16_t* scales[2] = {{s0 + n0 * groups, s1 + n1 * groups}};
    const uint8_t* zps[2] = {{z0 ? z0 + n0 * groups : 0, z1 ? z1 + n1 * groups : 0}};
    const float* dg = scratch + (3 * K) / 4;
    float out[2];
    {name}_tile8c(rows, scales, zps, (const int8_t*)scratch, dg, dg + groups, out, K, groups, 2);
    a[0] = out[0];
    b[0] = out[1];
}}
#endif
""" + "{drivers}"


# The entry points over {name}_prepare / {name}_channel (int8, int4, NF4): one weight, and several
# weights of one input in one parallel loop (a fusion group: q/k/v side by side, or gate.up with
# SiLU(gate) * up as its epilogue), so x is prepared once and one OpenMP region runs instead of
# two or three. Each output channel is computed by the same code in both, so a fused output
# equals the separate calls' bit for bit (the epilogue aside). The `_ext` entries take the fused
# RMSNorm prologue (`normw` non-null: the rows are normalised into `xbuf` first, once per call:
# x * (1 / sqrt(mean(x^2) + eps)) * normw, the sum of squares in double), then the threshold of an
# activation-sparse layer (`thr` non-null: lowbit::act_sparsify, input k kept when |x_k| (* cs[k])
# >= thr[k * thr_stride]: what `cpu_sparse` falls back to when its kernel does not pay) and, for
# one weight, the residual epilogue (`res` non-null: y = (x W^T + b) + res, torch's order of the
# two adds).
_DRIVERS = r"""
#ifndef {name}_PAIR
/* a kernel without a two-channel path: a pair of output channels is two channel calls */
static inline __attribute__((always_inline)) void {name}_pair(
    const void* c0, const uint16_t* s0, const uint8_t* z0, int64_t n0,
    const void* c1, const uint16_t* s1, const uint8_t* z1, int64_t n1,
    const float* x, const float* scratch, int64_t M, int64_t K, float* a, float* b)
{{
    {name}_channel(c0, s0, z0, x, scratch, n0, M, K, a);
    {name}_channel(c1, s1, z1, x, scratch, n1, M, K, b);
}}
#endif

static const float* {name}_prologue(const float* x, const float* normw, float eps, const float* thr,
                                    int64_t thr_stride, const float* cs, float* xbuf, int64_t M, int64_t K)
{{
    if (!normw && !thr)
        return x;
    for (int64_t m = 0; m < M; m++) {{
        const float* xr = x + m * K;
        float* o = xbuf + m * K;
        if (normw) {{
            lowbit_rms_norm_row(xr, normw, eps, o, K);
            xr = o;
        }}
        if (thr)  /* lowbit::act_sparsify: kept when |x| (* cs, WINA) >= the threshold (a NaN score is not) */
            for (int64_t k = 0; k < K; k++) {{
                const float v = xr[k], score = fabsf(v) * (cs ? cs[k] : 1.0f);
                o[k] = score >= thr[k * thr_stride] ? v : 0.0f;
            }}
    }}
    return xbuf;
}}

void {name}_ext(const float* x0, const void* codes, const uint16_t* scale, const uint8_t* zero,
                const float* bias, float* y, float* scratch, int64_t M, int64_t N, int64_t K, int threads,
                const float* normw, float eps, const float* res, float* xbuf, const float* thr, int64_t thr_stride,
                const float* cs)
{{
    const float* x = {name}_prologue(x0, normw, eps, thr, thr_stride, cs, xbuf, M, K);
    {name}_prepare(x, scratch, M, K);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < (N + 1) / 2; p++) {{  /* channels in pairs; an odd N's last pair is one channel twice */
        const int64_t n0 = 2 * p, n1 = n0 + 1 < N ? n0 + 1 : n0;
        float a[{max_rows}], b[{max_rows}];
        {name}_pair(codes, scale, zero, n0, codes, scale, zero, n1, x, scratch, M, K, a, b);
        for (int64_t m = 0; m < M; m++) {{
            const float v0 = a[m] + (bias ? bias[n0] : 0.0f), v1 = b[m] + (bias ? bias[n1] : 0.0f);
            y[m * N + n0] = res ? res[m * N + n0] + v0 : v0;
            y[m * N + n1] = res ? res[m * N + n1] + v1 : v1;
        }}
    }}
}}

void {name}(const float* x, const void* codes, const uint16_t* scale, const uint8_t* zero,
            const float* bias, float* y, float* scratch, int64_t M, int64_t N, int64_t K, int threads)
{{
    {name}_ext(x, codes, scale, zero, bias, y, scratch, M, N, K, threads, 0, 0.0f, 0, 0, 0, 0, 0);
}}

/* epilogue 0: y [M, sum Ns] = the nw outputs side by side (q/k/v); epilogue 1 (nw = 2, equal N):
   y [M, N] = silu(x W0^T + b0) * (x W1^T + b1) (a gated MLP's gate and up) */
void {name}_multi_ext(const float* x0, const void* const* codes, const uint16_t* const* scale,
                      const uint8_t* const* zero, const float* const* bias, float* y, float* scratch, int64_t M,
                      const int64_t* Ns, int64_t nw, int64_t K, int64_t epilogue, int threads,
                      const float* normw, float eps, float* xbuf, const float* thr, int64_t thr_stride,
                      const float* cs)
{{
    const float* x = {name}_prologue(x0, normw, eps, thr, thr_stride, cs, xbuf, M, K);
    {name}_prepare(x, scratch, M, K);
    if (epilogue == 1) {{
        const int64_t N = Ns[0];
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t n = 0; n < N; n++) {{
            float a[{max_rows}], b[{max_rows}];
            {name}_pair(codes[0], scale[0], zero[0], n, codes[1], scale[1], zero[1], n, x, scratch, M, K, a, b);
            for (int64_t m = 0; m < M; m++) {{
                const float g = a[m] + (bias[0] ? bias[0][n] : 0.0f), u = b[m] + (bias[1] ? bias[1][n] : 0.0f);
                y[m * N + n] = g / (1.0f + expf(-g)) * u;
            }}
        }}
        return;
    }}
    int64_t total = 0;
    for (int64_t i = 0; i < nw; i++) total += Ns[i];
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < (total + 1) / 2; p++) {{  /* output columns in pairs, as in {name}_ext */
        const int64_t t0 = 2 * p, t1 = t0 + 1 < total ? t0 + 1 : t0;
        int64_t i0 = 0, n0 = t0, i1 = 0, n1 = t1;
        while (n0 >= Ns[i0]) {{ n0 -= Ns[i0]; i0++; }}
        while (n1 >= Ns[i1]) {{ n1 -= Ns[i1]; i1++; }}
        float a[{max_rows}], b[{max_rows}];
        {name}_pair(codes[i0], scale[i0], zero[i0], n0, codes[i1], scale[i1], zero[i1], n1, x, scratch, M, K, a, b);
        for (int64_t m = 0; m < M; m++) {{
            y[m * total + t0] = a[m] + (bias[i0] ? bias[i0][n0] : 0.0f);
            y[m * total + t1] = b[m] + (bias[i1] ? bias[i1][n1] : 0.0f);
        }}
    }}
}}

void {name}_multi(const float* x, const void* const* codes, const uint16_t* const* scale,
                  const uint8_t* const* zero, const float* const* bias, float* y, float* scratch, int64_t M,
                  const int64_t* Ns, int64_t nw, int64_t K, int64_t epilogue, int threads)
{{
    {name}_multi_ext(x, codes, scale, zero, bias, y, scratch, M, Ns, nw, K, epilogue, threads, 0, 0.0f, 0, 0, 0, 0);
}}
"""

# What a 4-bit code means: an integer (int4: the code itself, its zero point subtracted per group)
# or an entry of a 16-value table (NF4: looked up in registers, two 8-entry permutes and a blend
# on the code's bit 3; no zero point).
_DECODE_INT = r"""
static inline float {name}_value(int c) {{ return (float)c; }}
#ifdef LOWBIT_AVX2
static inline __m256 {name}_decode(__m256i c) {{ return _mm256_cvtepi32_ps(c); }}
#endif
#ifdef LOWBIT_AVX512
static inline __m512 {name}_decode512(__m512i c) {{ return _mm512_cvtepi32_ps(c); }}
#endif
"""

_DECODE_TABLE = r"""
static const float {name}_table[16] = {{{values}}};
static inline float {name}_value(int c) {{ return {name}_table[c]; }}
#ifdef LOWBIT_AVX2
static inline __m256 {name}_decode(__m256i c) {{
    const __m256 low = _mm256_loadu_ps({name}_table), high = _mm256_loadu_ps({name}_table + 8);
    const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(c, 28));  /* sign bit = code bit 3 */
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, c), _mm256_permutevar8x32_ps(high, c), bit3);
}}
#endif
#ifdef LOWBIT_AVX512
/* all 16 values in one register: one permute per 16 codes */
static inline __m512 {name}_decode512(__m512i c) {{ return _mm512_permutexvar_ps(c, _mm512_loadu_ps({name}_table)); }}
#endif
"""

# The activation split of the int8 kernels' VNNI paths (dense int8 and 2:4 + int8): per row of x the
# three int8 parts (lowbit_split3), per block of {name}_BLOCK columns its scale, per row the sum the
# codes' offset of 128 adds. Formatted with the kernel's name into each template (``{prepare8}``).
_PREPARE8 = r"""
/* once per call: per row the three int8 parts of x (K bytes each, in column order), the block
   scales d [M, blocks] and the offset's sums C [M] */
static void {name}_prepare8(const float* x, float* scratch, int64_t M, int64_t K)
{{
    const int64_t blocks = (K + {name}_BLOCK - 1) / {name}_BLOCK;
    int8_t* xq = (int8_t*)scratch;
    float* db = scratch + (3 * M * K) / 4;
    float* corr = db + M * blocks;
    for (int64_t m = 0; m < M; m++) {{
        double c = 0.0;
        for (int64_t b = 0; b < blocks; b++) {{
            const int64_t k0 = b * {name}_BLOCK, k1 = k0 + {name}_BLOCK < K ? k0 + {name}_BLOCK : K;
            const float* xm = x + m * K;
            float amax = 0.0f, t = 0.0f;  /* t: NaN iff some x is inf or NaN (the max skips a NaN) */
            for (int64_t k = k0; k < k1; k++) {{
                const float a = fabsf(xm[k]);
                amax = a > amax ? a : amax;
                t += xm[k] * 0.0f;
            }}
            const int finite = isfinite(amax) && isfinite(t);
            const float inv = finite && amax > 0.0f ? 127.0f / amax : 0.0f;
            int8_t* p = xq + m * 3 * K;
            int32_t sh = 0, sm = 0, sl = 0;
            for (int64_t k = k0; k < k1; k++) {{
                lowbit_split3(finite ? xm[k] * inv : 0.0f, p + k, p + K + k, p + 2 * K + k);
                sh += p[k]; sm += p[K + k]; sl += p[2 * K + k];
            }}
            const float d = finite ? (inv > 0.0f ? 1.0f / inv : 0.0f) : NAN;
            db[m * blocks + b] = d;
            c += 128.0 * (double)d * ((double)sh + (double)sm / 254.0 + (double)sl / 64516.0);
        }}
        corr[m] = (float)c;
    }}
}}
"""

# int8 per channel: codes int8 [N, K], scale bf16 [N]. Rows in tiles of up to 4 per pass over a
# channel's codes, two FMA chains per row; a scalar tail for K not a multiple of 16.
_INT8 = r"""
#ifdef LOWBIT_AVX2
static inline __attribute__((always_inline)) void {name}_tile(
    const int8_t* w, const float* x, float* out, int64_t K, const int MT)
{{
    __m256 a0[4], a1[4];
    for (int r = 0; r < MT; r++) {{ a0[r] = _mm256_setzero_ps(); a1[r] = _mm256_setzero_ps(); }}
    int64_t k = 0;
    if (MT == 1) {{  /* decode: four chains over 32 bytes, the next lines of codes prefetched */
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (; k + 32 <= K; k += 32) {{
            lowbit_prefetch(w + k, 32);
            a0[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + k)))),
                                    _mm256_loadu_ps(x + k), a0[0]);
            a1[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + k + 8)))),
                                    _mm256_loadu_ps(x + k + 8), a1[0]);
            a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + k + 16)))),
                                 _mm256_loadu_ps(x + k + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + k + 24)))),
                                 _mm256_loadu_ps(x + k + 24), a3);
        }}
        a0[0] = _mm256_add_ps(a0[0], a2);
        a1[0] = _mm256_add_ps(a1[0], a3);
    }}
    for (; k + 16 <= K; k += 16) {{
        lowbit_prefetch(w + k, 16);
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + k))));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + k + 8))));
        for (int r = 0; r < MT; r++) {{
            a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * K + k), a0[r]);
            a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * K + k + 8), a1[r]);
        }}
    }}
    for (int r = 0; r < MT; r++) {{
        float t = hsum256(_mm256_add_ps(a0[r], a1[r]));
        for (int64_t kk = k; kk < K; kk++)
            t += (float)w[kk] * x[r * K + kk];
        out[r] = t;
    }}
}}
#endif

#ifdef LOWBIT_AVX512
/* 16 codes a step (vpmovsxbd to 16 int32 lanes); one row keeps four chains over 64 bytes */
static inline __attribute__((always_inline)) void {name}_tile512(
    const int8_t* w, const float* x, float* out, int64_t K, const int MT)
{{
    __m512 a0[4], a1[4];
    for (int r = 0; r < MT; r++) {{ a0[r] = _mm512_setzero_ps(); a1[r] = _mm512_setzero_ps(); }}
    int64_t k = 0;
    if (MT == 1) {{
        __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        for (; k + 64 <= K; k += 64) {{
            lowbit_prefetch(w + k, 64);
            a0[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k)))),
                                    _mm512_loadu_ps(x + k), a0[0]);
            a1[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k + 16)))),
                                    _mm512_loadu_ps(x + k + 16), a1[0]);
            a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k + 32)))),
                                 _mm512_loadu_ps(x + k + 32), a2);
            a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k + 48)))),
                                 _mm512_loadu_ps(x + k + 48), a3);
        }}
        a0[0] = _mm512_add_ps(a0[0], a2);
        a1[0] = _mm512_add_ps(a1[0], a3);
    }}
    for (; k + 32 <= K; k += 32) {{
        lowbit_prefetch(w + k, 32);
        const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k))));
        const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k + 16))));
        for (int r = 0; r < MT; r++) {{
            a0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * K + k), a0[r]);
            a1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * K + k + 16), a1[r]);
        }}
    }}
    for (int r = 0; r < MT; r++) {{
        float t = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
        for (int64_t kk = k; kk < K; kk++)
            t += (float)w[kk] * x[r * K + kk];
        out[r] = t;
    }}
}}
#endif

#if defined(LOWBIT_VNNI) && {split8}
#define {name}_S8 1
#define {name}_BLOCK 256
/* With VNNI, x in three int8 parts per block of 256 columns (lowbit_split3, d = absmax / 127) and
   the codes made unsigned (w + 128: an xor), so that vpdpbusd multiplies 32 codes by 32 parts and
   sums them in 8 int32 lanes per instruction: per 32 codes one load and xor, three dot products
   per row, against the float path's widen, convert and FMA per 16 codes. The sums are exact
   integers; each block's three become float once, and the offset's sum 128 * sum(x) (the same
   for every channel) is subtracted once per row: y = s (sum_b d_b (H + M/254 + L/254^2) - C). */
static inline __attribute__((always_inline)) void {name}_tile8(
    const int8_t* w, const int8_t* xq, const float* db, const float* corr, float* out, int64_t K,
    int64_t blocks, const int MT)
{{
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    const __m256 c1 = _mm256_set1_ps(1.0f / 254.0f), c2 = _mm256_set1_ps(1.0f / 64516.0f);
    __m256 acc[4];
    for (int r = 0; r < MT; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {{
        const int64_t k0 = b * {name}_BLOCK, k1 = k0 + {name}_BLOCK < K ? k0 + {name}_BLOCK : K;
        lowbit_prefetch(w + k0, k1 - k0);
        __m256i h[4], m[4], l[4];
        for (int r = 0; r < MT; r++) {{
            h[r] = _mm256_setzero_si256(); m[r] = _mm256_setzero_si256(); l[r] = _mm256_setzero_si256();
        }}
        for (int64_t k = k0; k < k1; k += 32) {{
            const __m256i wu = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(w + k)), flip);
            for (int r = 0; r < MT; r++) {{
                const int8_t* xr = xq + r * 3 * K + k;
                h[r] = _mm256_dpbusd_epi32(h[r], wu, _mm256_loadu_si256((const __m256i*)xr));
                m[r] = _mm256_dpbusd_epi32(m[r], wu, _mm256_loadu_si256((const __m256i*)(xr + K)));
                l[r] = _mm256_dpbusd_epi32(l[r], wu, _mm256_loadu_si256((const __m256i*)(xr + 2 * K)));
            }}
        }}
        for (int r = 0; r < MT; r++) {{
            const __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(l[r]), c2,
                                             _mm256_fmadd_ps(_mm256_cvtepi32_ps(m[r]), c1, _mm256_cvtepi32_ps(h[r])));
            acc[r] = _mm256_fmadd_ps(f, _mm256_set1_ps(db[r * blocks + b]), acc[r]);
        }}
    }}
    for (int r = 0; r < MT; r++)
        out[r] = hsum256(acc[r]) - corr[r];
}}

{prepare8}#endif

static void {name}_prepare(const float* x, float* scratch, int64_t M, int64_t K)
{{
#if defined({name}_S8)
    if (M <= {split_rows} && K % 32 == 0) {{
        {name}_prepare8(x, scratch, M, K);
        return;
    }}
#endif
    (void)x; (void)scratch; (void)M; (void)K;  /* the float path reads x as it is */
}}

static inline __attribute__((always_inline)) void {name}_channel(
    const void* codes_, const uint16_t* scale, const uint8_t* zero, const float* x, const float* scratch,
    int64_t n, int64_t M, int64_t K, float* out)
{{
    (void)zero; (void)scratch;
    const int8_t* codes = (const int8_t*)codes_;
    {{
        const int8_t* w = codes + n * K;
        const float s = bf16_to_f32(scale[n]);
        float d[{max_rows}];
#if defined({name}_S8)
        if (M <= {split_rows} && K % 32 == 0) {{  /* the layout {name}_prepare8 wrote */
            const int64_t blocks = (K + {name}_BLOCK - 1) / {name}_BLOCK;
            const float* db = scratch + (3 * M * K) / 4;
            for (int64_t m = 0; m < M; m += 4) {{
                const int64_t t = M - m < 4 ? M - m : 4;
                const int8_t* q = (const int8_t*)scratch + m * 3 * K;
                const float *b = db + m * blocks, *c = db + M * blocks + m;
                if (t == 4) {name}_tile8(w, q, b, c, d + m, K, blocks, 4);
                else if (t == 3) {name}_tile8(w, q, b, c, d + m, K, blocks, 3);
                else if (t == 2) {name}_tile8(w, q, b, c, d + m, K, blocks, 2);
                else {name}_tile8(w, q, b, c, d + m, K, blocks, 1);
            }}
            for (int64_t m = 0; m < M; m++)
                out[m] = s * d[m];
            return;
        }}
#endif
#if defined(LOWBIT_AVX512)
        for (int64_t m = 0; m < M; m += 4) {{
            const int64_t t = M - m < 4 ? M - m : 4;
            if (t == 4) {name}_tile512(w, x + m * K, d + m, K, 4);
            else if (t == 3) {name}_tile512(w, x + m * K, d + m, K, 3);
            else if (t == 2) {name}_tile512(w, x + m * K, d + m, K, 2);
            else {name}_tile512(w, x + m * K, d + m, K, 1);
        }}
#elif defined(LOWBIT_AVX2)
        for (int64_t m = 0; m < M; m += 4) {{
            const int64_t t = M - m < 4 ? M - m : 4;
            if (t == 4) {name}_tile(w, x + m * K, d + m, K, 4);
            else if (t == 3) {name}_tile(w, x + m * K, d + m, K, 3);
            else if (t == 2) {name}_tile(w, x + m * K, d + m, K, 2);
            else {name}_tile(w, x + m * K, d + m, K, 1);
        }}
#else
        for (int64_t m = 0; m < M; m++) d[m] = 0.0f;
        for (int64_t k0 = 0; k0 < K; k0 += 256) {{  /* a block of the row converted once for all rows */
            const int64_t k1 = k0 + 256 < K ? k0 + 256 : K;
            lowbit_prefetch(w + k0, k1 - k0);
            float wf[256];
            #pragma omp simd
            for (int64_t k = k0; k < k1; k++)
                wf[k - k0] = (float)w[k];
            for (int64_t m = 0; m < M; m++) {{
                const float* xm = x + m * K;
                float t = 0.0f;
                #pragma omp simd reduction(+:t)
                for (int64_t k = k0; k < k1; k++)
                    t += wf[k - k0] * xm[k];
                d[m] += t;
            }}
        }}
#endif
        for (int64_t m = 0; m < M; m++)
            out[m] = s * d[m];
    }}
}}
""" + "{drivers}"

# 2:4 sparse + int8 (``sparse_formats.py``: ``s24+int8``): per row, KC = K/2 int8 codes of the kept
# values, then their 2-bit indices inside each group of 4 (kept value j: bits [2j, 2j+2) of the
# index stream), scale bf16 [N]. Only the kept values and their indices are read (0.625 bytes per
# weight instead of int8's 1). A channel function like the dense kernels' (``{drivers}``: q/k/v
# and gate.up groups, the norm prologue, the residual epilogue). With AVX-512 VNNI + VBMI and K a
# multiple of 128: integer sums like the dense int8 kernel's (x in three int8 parts per block of
# 256 columns, ``_PREPARE8``), but over the kept values only: per 128 columns the 64 kept codes'
# columns come from the index bits (vpmultishiftqb picks each 2-bit field), the activations of
# those columns are gathered from x's parts (vpermi2b over the 128 columns) and meet the codes in
# vpdpbusd: half the dense kernel's dot products. (Expanding the codes to their columns instead,
# vpexpandb + the dense arithmetic, was measured: vpexpandb costs ~5 cycles per 64 columns on Zen
# 4, and that kernel lost to dense int8 when the memory was fast.) One row takes two channels at a
# time (each load of x feeds both). Float paths otherwise: AVX-512 decodes the index bits of 16 kept
# values to their columns with a broadcast, a variable shift and a mask, and one two-source permute
# (vpermt2ps) gathers x in registers; AVX2 looks an index byte (4 kept values) up as its 4 columns
# in a 256-entry table and permutes the activations into place (two permutes and a blend per 8).
_S24_INT8 = r"""
/* one index byte = the 2-bit positions of 4 kept values (two groups of 4 columns) -> their
   columns among the 8 the byte covers */
static int32_t s24_columns[256][4];
static int s24_ready = 0;

static void s24_init(void) {{
    for (int b = 0; b < 256; b++) {{
        s24_columns[b][0] = b & 3;
        s24_columns[b][1] = (b >> 2) & 3;
        s24_columns[b][2] = 4 + ((b >> 4) & 3);
        s24_columns[b][3] = 4 + ((b >> 6) & 3);
    }}
    s24_ready = 1;
}}

#if defined(LOWBIT_VNNI) && defined(__AVX512VBMI__) && {split8}
#define {name}_S8 1
#define {name}_BLOCK 256
/* the columns of a step's 64 kept values among its 128 (kept value j: 4 (j / 2) + its 2-bit
   position): the step's 16 index bytes as two words spread over the lanes (vpermq), each byte's
   2-bit field picked by a shift per byte (vpmultishiftqb), masked and added to 4 (j / 2) */
static inline __attribute__((always_inline)) __m512i {name}_columns(const uint8_t* idx)
{{
    const __m512i lanes = _mm512_set_epi64(1, 1, 1, 1, 0, 0, 0, 0);
    const __m512i shifts = _mm512_set_epi8(
        62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0,
        62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i base = _mm512_set_epi8(
        124, 124, 120, 120, 116, 116, 112, 112, 108, 108, 104, 104, 100, 100, 96, 96, 92, 92, 88, 88, 84, 84, 80, 80,
        76, 76, 72, 72, 68, 68, 64, 64, 60, 60, 56, 56, 52, 52, 48, 48, 44, 44, 40, 40, 36, 36, 32, 32, 28, 28, 24, 24,
        20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
    const __m512i words = _mm512_permutexvar_epi64(lanes, _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)idx)));
    /* (field & 3) | base in one ternary-logic op (base has its low two bits clear) */
    return _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(shifts, words), _mm512_set1_epi8(3), base, 0xEA);
}}

/* y = s sum_b d_b (H + M/254 + L/254^2): per step of 128 columns the 64 kept codes (signed) meet
   the 64 activations of their columns, gathered from x's unsigned parts (u = part + 128, two-source
   byte permute: vpermi2b) by vpdpbusd, three per step; the parts' offset adds 128 sum(w) to each
   sum, taken off per block from one more vpdpbusd of the codes with ones. Half the dot products
   of the dense kernel (it multiplies the zeros too) */
static inline __attribute__((always_inline)) void {name}_tile8(
    const int8_t* v, const uint8_t* idx, const uint8_t* xu, const float* db, float* out,
    int64_t K, int64_t blocks, const int MT)
{{
    const __m512 c1 = _mm512_set1_ps(1.0f / 254.0f), c2 = _mm512_set1_ps(1.0f / 64516.0f);
    const __m512 off = _mm512_set1_ps(-128.0f * (1.0f + 1.0f / 254.0f + 1.0f / 64516.0f));
    const __m512i ones = _mm512_set1_epi8(1);
    __m512 acc[4];
    for (int r = 0; r < MT; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {{
        const int64_t k0 = b * {name}_BLOCK, k1 = k0 + {name}_BLOCK < K ? k0 + {name}_BLOCK : K;
        lowbit_prefetch(v + k0 / 2, (k1 - k0) / 2);  /* codes and indices: together the whole row */
        lowbit_prefetch(idx + k0 / 8, (k1 - k0) / 8);
        __m512i h[4], m[4], l[4], sw = _mm512_setzero_si512();
        for (int r = 0; r < MT; r++) {{
            h[r] = _mm512_setzero_si512(); m[r] = _mm512_setzero_si512(); l[r] = _mm512_setzero_si512();
        }}
        for (int64_t k = k0; k < k1; k += 128) {{  /* K is a multiple of 128 on this path */
            const __m512i c = {name}_columns(idx + k / 8), w = _mm512_loadu_si512((const void*)(v + k / 2));
            sw = _mm512_dpbusd_epi32(sw, ones, w);
            for (int r = 0; r < MT; r++) {{
                const uint8_t* xr = xu + r * 3 * K + k;
                h[r] = _mm512_dpbusd_epi32(h[r], _mm512_permutex2var_epi8(_mm512_loadu_si512((const void*)xr), c,
                                                                          _mm512_loadu_si512((const void*)(xr + 64))), w);
                m[r] = _mm512_dpbusd_epi32(m[r], _mm512_permutex2var_epi8(_mm512_loadu_si512((const void*)(xr + K)), c,
                                                                          _mm512_loadu_si512((const void*)(xr + K + 64))), w);
                l[r] = _mm512_dpbusd_epi32(l[r], _mm512_permutex2var_epi8(_mm512_loadu_si512((const void*)(xr + 2 * K)), c,
                                                                          _mm512_loadu_si512((const void*)(xr + 2 * K + 64))), w);
            }}
        }}
        const __m512 swf = _mm512_mul_ps(_mm512_cvtepi32_ps(sw), off);
        for (int r = 0; r < MT; r++) {{
            const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(l[r]), c2,
                             _mm512_fmadd_ps(_mm512_cvtepi32_ps(m[r]), c1, _mm512_add_ps(_mm512_cvtepi32_ps(h[r]), swf)));
            acc[r] = _mm512_fmadd_ps(f, _mm512_set1_ps(db[r * blocks + b]), acc[r]);
        }}
    }}
    for (int r = 0; r < MT; r++)
        out[r] = _mm512_reduce_add_ps(acc[r]);
}}

/* one row (decode), two channels: each load of x's parts feeds both channels' gathers */
static inline __attribute__((always_inline)) void {name}_tile8p(
    const int8_t* v0, const uint8_t* idx0, const int8_t* v1, const uint8_t* idx1, const uint8_t* xu,
    const float* db, float* out0, float* out1, int64_t K, int64_t blocks)
{{
    const __m512 c1 = _mm512_set1_ps(1.0f / 254.0f), c2 = _mm512_set1_ps(1.0f / 64516.0f);
    const __m512 off = _mm512_set1_ps(-128.0f * (1.0f + 1.0f / 254.0f + 1.0f / 64516.0f));
    const __m512i ones = _mm512_set1_epi8(1);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {{
        const int64_t k0 = b * {name}_BLOCK, k1 = k0 + {name}_BLOCK < K ? k0 + {name}_BLOCK : K;
        lowbit_prefetch(v0 + k0 / 2, (k1 - k0) / 2);  /* codes and indices: together the whole row */
        lowbit_prefetch(idx0 + k0 / 8, (k1 - k0) / 8);
        lowbit_prefetch(v1 + k0 / 2, (k1 - k0) / 2);
        lowbit_prefetch(idx1 + k0 / 8, (k1 - k0) / 8);
        __m512i h0 = _mm512_setzero_si512(), m0 = h0, l0 = h0, s0 = h0, h1 = h0, m1 = h0, l1 = h0, s1 = h0;
        for (int64_t k = k0; k < k1; k += 128) {{
            const __m512i i0 = {name}_columns(idx0 + k / 8), i1 = {name}_columns(idx1 + k / 8);
            const __m512i w0 = _mm512_loadu_si512((const void*)(v0 + k / 2)), w1 = _mm512_loadu_si512((const void*)(v1 + k / 2));
            s0 = _mm512_dpbusd_epi32(s0, ones, w0);
            s1 = _mm512_dpbusd_epi32(s1, ones, w1);
            __m512i lo = _mm512_loadu_si512((const void*)(xu + k)), hi = _mm512_loadu_si512((const void*)(xu + k + 64));
            h0 = _mm512_dpbusd_epi32(h0, _mm512_permutex2var_epi8(lo, i0, hi), w0);
            h1 = _mm512_dpbusd_epi32(h1, _mm512_permutex2var_epi8(lo, i1, hi), w1);
            lo = _mm512_loadu_si512((const void*)(xu + K + k)); hi = _mm512_loadu_si512((const void*)(xu + K + k + 64));
            m0 = _mm512_dpbusd_epi32(m0, _mm512_permutex2var_epi8(lo, i0, hi), w0);
            m1 = _mm512_dpbusd_epi32(m1, _mm512_permutex2var_epi8(lo, i1, hi), w1);
            lo = _mm512_loadu_si512((const void*)(xu + 2 * K + k)); hi = _mm512_loadu_si512((const void*)(xu + 2 * K + k + 64));
            l0 = _mm512_dpbusd_epi32(l0, _mm512_permutex2var_epi8(lo, i0, hi), w0);
            l1 = _mm512_dpbusd_epi32(l1, _mm512_permutex2var_epi8(lo, i1, hi), w1);
        }}
        const __m512 d = _mm512_set1_ps(db[b]);
        a0 = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(l0), c2, _mm512_fmadd_ps(_mm512_cvtepi32_ps(m0), c1,
                             _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), off, _mm512_cvtepi32_ps(h0)))), d, a0);
        a1 = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(l1), c2, _mm512_fmadd_ps(_mm512_cvtepi32_ps(m1), c1,
                             _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), off, _mm512_cvtepi32_ps(h1)))), d, a1);
    }}
    *out0 = _mm512_reduce_add_ps(a0);
    *out1 = _mm512_reduce_add_ps(a1);
}}

{prepare8}#endif

static void {name}_prepare(const float* x, float* scratch, int64_t M, int64_t K)
{{
    if (!s24_ready)  /* before the drivers' parallel region */
        s24_init();
#if defined({name}_S8)
    if (M <= {split_rows} && K % 128 == 0) {{
        {name}_prepare8(x, scratch, M, K);
        uint8_t* xu = (uint8_t*)scratch;  /* the parts unsigned: u = part + 128 (the codes are the signed operand) */
        for (int64_t i = 0; i < 3 * M * K; i++)
            xu[i] ^= 0x80;
        return;
    }}
#endif
    (void)x; (void)scratch; (void)M; (void)K;  /* the float paths read x as it is */
}}

static inline __attribute__((always_inline)) void {name}_channel(
    const void* codes_, const uint16_t* scale, const uint8_t* zero, const float* x, const float* scratch,
    int64_t n, int64_t M, int64_t K, float* out)
{{
    (void)zero; (void)scratch;
    const int64_t KC = K / 2, row_bytes = KC + KC / 4;
    const int8_t* v = (const int8_t*)codes_ + n * row_bytes;
    const uint8_t* idx = (const uint8_t*)codes_ + n * row_bytes + KC;
    const float s = bf16_to_f32(scale[n]);
    float d[{max_rows}] = {{0}};
#if defined({name}_S8)
    if (M <= {split_rows} && K % 128 == 0) {{  /* the layout {name}_prepare wrote */
        const int64_t blocks = (K + {name}_BLOCK - 1) / {name}_BLOCK;
        const float* db = scratch + (3 * M * K) / 4;
        for (int64_t m = 0; m < M; m += 4) {{
            const int64_t t = M - m < 4 ? M - m : 4;
            const uint8_t* q = (const uint8_t*)scratch + m * 3 * K;
            const float* b = db + m * blocks;
            if (t == 4) {name}_tile8(v, idx, q, b, d + m, K, blocks, 4);
            else if (t == 3) {name}_tile8(v, idx, q, b, d + m, K, blocks, 3);
            else if (t == 2) {name}_tile8(v, idx, q, b, d + m, K, blocks, 2);
            else {name}_tile8(v, idx, q, b, d + m, K, blocks, 1);
        }}
        for (int64_t m = 0; m < M; m++)
            out[m] = s * d[m];
        return;
    }}
#endif
    int64_t j = 0;
#if defined(LOWBIT_AVX512)
    /* 64 kept values = 128 columns of x a step, in quarters of 16: the 32 index bits of 16 kept
       values, broadcast, shifted per lane and masked, give each value's column among the 32
       its quarter spans (4 * (j / 2) + position), and one two-source permute (vpermt2ps)
       brings those columns of x into place; four independent accumulators; a row of x at a time */
    {{
        const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
        const __m512i three = _mm512_set1_epi32(3);
        int64_t j_end = 0;
        for (int64_t m = 0; m < M; m++) {{
            const float* xm = x + m * K;
            __m512 acc[4] = {{_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()}};
            int64_t jj = 0;
            for (; jj + {s24_step} <= KC; jj += {s24_step}) {{
                for (int q = 0; q < {s24_step} / 16; q++) {{
                    /* (bits >> 2j) & 3 | base in one ternary-logic op (base has its low two bits clear) */
                    const __m512i c = _mm512_ternarylogic_epi32(_mm512_srlv_epi32(
                        _mm512_set1_epi32(*(const int32_t*)(idx + (jj >> 2) + 4 * q)), shifts), three, base, 0xEA);
                    const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(v + jj + 16 * q))));
                    const float* xc = xm + 2 * jj + 32 * q;
                    acc[q] = _mm512_fmadd_ps(w, _mm512_permutex2var_ps(_mm512_loadu_ps(xc), c, _mm512_loadu_ps(xc + 16)), acc[q]);
                }}
            }}
            d[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
            j_end = jj;
        }}
        j = j_end;
    }}
#elif defined(LOWBIT_AVX2)
    /* 16 kept values = 32 columns of x a step: each half of a 16-column span is permuted into
       place in registers (kept values 0-3 come from columns 0-7, 4-7 from 8-15), two
       independent accumulators; a row of x at a time (the weight row stays in L1) */
    {{
        int64_t j_end = 0;
        for (int64_t m = 0; m < M; m++) {{
            const float* xm = x + m * K;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            int64_t jj = 0;
            for (; jj + 16 <= KC; jj += 16) {{
                const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(v + jj))));
                const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(v + jj + 8))));
                const uint8_t* b = idx + (jj >> 2);
                const __m256i p0 = _mm256_set_m128i(_mm_loadu_si128((const __m128i*)s24_columns[b[1]]),
                                                     _mm_loadu_si128((const __m128i*)s24_columns[b[0]]));
                const __m256i p1 = _mm256_set_m128i(_mm_loadu_si128((const __m128i*)s24_columns[b[3]]),
                                                     _mm_loadu_si128((const __m128i*)s24_columns[b[2]]));
                const float* xc = xm + 2 * jj;
                a0 = _mm256_fmadd_ps(w0, _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xc), p0),
                                                         _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 8), p0), 0xF0), a0);
                a1 = _mm256_fmadd_ps(w1, _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 16), p1),
                                                         _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 24), p1), 0xF0), a1);
            }}
            d[m] = hsum256(_mm256_add_ps(a0, a1));
            j_end = jj;
        }}
        j = j_end;
    }}
#endif
    for (; j < KC; j++) {{  /* scalar: kept value j sits in group j/2, columns 4*(j/2) .. +3 */
        const int64_t c = 2 * (j & ~(int64_t)1) + ((idx[j >> 2] >> (2 * (j & 3))) & 3);
        for (int64_t m = 0; m < M; m++)
            d[m] += (float)v[j] * x[m * K + c];
    }}
    for (int64_t m = 0; m < M; m++)
        out[m] = s * d[m];
}}

#if defined({name}_S8)
#define {name}_PAIR 1
/* two output channels (of one weight, or of two weights of a group): one row takes the
   two-channel tile, anything else two channel calls */
static inline __attribute__((always_inline)) void {name}_pair(
    const void* c0, const uint16_t* s0, const uint8_t* z0, int64_t n0,
    const void* c1, const uint16_t* s1, const uint8_t* z1, int64_t n1,
    const float* x, const float* scratch, int64_t M, int64_t K, float* a, float* b)
{{
    if (M != 1 || K % 128 != 0 || 1 > {split_rows}) {{
        {name}_channel(c0, s0, z0, x, scratch, n0, M, K, a);
        {name}_channel(c1, s1, z1, x, scratch, n1, M, K, b);
        return;
    }}
    const int64_t KC = K / 2, row_bytes = KC + KC / 4, blocks = (K + {name}_BLOCK - 1) / {name}_BLOCK;
    const int8_t* v0 = (const int8_t*)c0 + n0 * row_bytes;
    const int8_t* v1 = (const int8_t*)c1 + n1 * row_bytes;
    const float* db = scratch + (3 * K) / 4;
    float d0, d1;
    {name}_tile8p(v0, (const uint8_t*)v0 + KC, v1, (const uint8_t*)v1 + KC, (const uint8_t*)scratch, db,
                  &d0, &d1, K, blocks);
    a[0] = bf16_to_f32(s0[n0]) * d0;
    b[0] = bf16_to_f32(s1[n1]) * d1;
}}
#endif
""" + "{drivers}"


# W8A8 (lowbit::qa_linear, int8 weights x int8 activations): y[m, n] = sum_k x[m, k] w[n, k] in
# int32, exact; the caller applies both scales (as after torch._int_mm). AVX2 has no signed x
# signed byte product, so each 32-byte step multiplies |w| (unsigned) by x carrying w's sign
# (_mm256_sign_epi8), pairs summed to int16 by maddubs and to int32 by madd. Exact when x is in
# [-127, 127] (our activation codes; sign(-128) would wrap): a pair is at most 2 * 128 * 127 =
# 32512, below int16 saturation. Rows in tiles of up to 4 per pass over a channel.
_W8A8 = r"""
#ifdef LOWBIT_AVX2
static inline __attribute__((always_inline)) void {name}_tile(
    const int8_t* w, const int8_t* x, int32_t* out, int64_t K, const int MT)
{{
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[4];
    for (int r = 0; r < MT; r++) acc[r] = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {{
        const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + k));
        const __m256i wa = _mm256_sign_epi8(wv, wv);  /* |w| as unsigned bytes */
        for (int r = 0; r < MT; r++) {{
            const __m256i xs = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(x + r * K + k)), wv);
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(wa, xs), ones));
        }}
    }}
    for (int r = 0; r < MT; r++) {{
        int32_t t = hsum256_epi32(acc[r]);
        for (int64_t kk = k; kk < K; kk++)
            t += (int32_t)w[kk] * (int32_t)x[r * K + kk];
        out[r] = t;
    }}
}}
#endif

#ifdef LOWBIT_AVX512
/* 64 bytes a step, the same sign trick; with VNNI one vpdpbusd sums the four u8 x s8 products of
   each int32 lane into the accumulator (no int16 intermediate, no saturation: vpdpbusd, not
   vpdpbusds); without it maddubs + madd as above, 64 lanes wide */
static inline __attribute__((always_inline)) void {name}_tile512(
    const int8_t* w, const int8_t* x, int32_t* out, int64_t K, const int MT)
{{
    __m512i acc[4];
    for (int r = 0; r < MT; r++) acc[r] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {{
        const __m512i wv = _mm512_loadu_si512((const void*)(w + k));
        const __m512i wa = _mm512_abs_epi8(wv);  /* |w| as unsigned bytes (-128 -> 128) */
        const __mmask64 neg = _mm512_movepi8_mask(wv);
        for (int r = 0; r < MT; r++) {{
            const __m512i xv = _mm512_loadu_si512((const void*)(x + r * K + k));
            const __m512i xs = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);  /* x * sign(w) */
#ifdef LOWBIT_VNNI
            acc[r] = _mm512_dpbusd_epi32(acc[r], wa, xs);
#else
            acc[r] = _mm512_add_epi32(acc[r], _mm512_madd_epi16(_mm512_maddubs_epi16(wa, xs), _mm512_set1_epi16(1)));
#endif
        }}
    }}
    for (int r = 0; r < MT; r++) {{
        int32_t t = _mm512_reduce_add_epi32(acc[r]);
        for (int64_t kk = k; kk < K; kk++)
            t += (int32_t)w[kk] * (int32_t)x[r * K + kk];
        out[r] = t;
    }}
}}
#endif

void {name}(const int8_t* x, const int8_t* codes, int32_t* y, int64_t M, int64_t N, int64_t K, int threads)
{{
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {{
        const int8_t* w = codes + n * K;
        int32_t d[{max_rows}];
#if defined(LOWBIT_AVX512)
        for (int64_t m = 0; m < M; m += 4) {{
            const int64_t t = M - m < 4 ? M - m : 4;
            if (t == 4) {name}_tile512(w, x + m * K, d + m, K, 4);
            else if (t == 3) {name}_tile512(w, x + m * K, d + m, K, 3);
            else if (t == 2) {name}_tile512(w, x + m * K, d + m, K, 2);
            else {name}_tile512(w, x + m * K, d + m, K, 1);
        }}
#elif defined(LOWBIT_AVX2)
        for (int64_t m = 0; m < M; m += 4) {{
            const int64_t t = M - m < 4 ? M - m : 4;
            if (t == 4) {name}_tile(w, x + m * K, d + m, K, 4);
            else if (t == 3) {name}_tile(w, x + m * K, d + m, K, 3);
            else if (t == 2) {name}_tile(w, x + m * K, d + m, K, 2);
            else {name}_tile(w, x + m * K, d + m, K, 1);
        }}
#else
        for (int64_t m = 0; m < M; m++) {{
            int32_t t = 0;
            #pragma omp simd reduction(+:t)
            for (int64_t k = 0; k < K; k++)
                t += (int32_t)w[k] * (int32_t)x[m * K + k];
            d[m] = t;
        }}
#endif
        for (int64_t m = 0; m < M; m++)
            y[m * N + n] = d[m];
    }}
}}
"""


# int4 group-wise weights x int8 activations (llama.cpp's scheme; opt-in, lossy): each row of x is
# quantized per weight group to int8 (dx = absmax / 127, round half away from zero), laid out per
# 16 code bytes as [16 even columns | 16 odd columns] so that a 16-byte load of codes split into
# [low nibbles | high nibbles] meets them lane by lane. Codes are unsigned (0..15), so
# _mm256_maddubs_epi16 multiplies them by the signed activations directly (a pair is at most
# 2 * 15 * 127: no saturation), _mm256_madd_epi16 sums to int32, one conversion to float per group
# and row: y = sum_g s_g dx_g (sum q xq - z sum xq). About 3x less arithmetic than the float path.
_INT4_A8 = r"""
#ifdef LOWBIT_AVX2
static inline __attribute__((always_inline)) void {name}_tile(
    const uint8_t* row, const uint16_t* scale, const uint8_t* zp, const int8_t* xq, const float* dx,
    const int32_t* sx, float* out, int64_t K, int64_t groups, const int MT)
{{
    const int64_t G = {group};
    const __m128i low4 = _mm_set1_epi8(15);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4];
    float zsum[4];
    for (int r = 0; r < MT; r++) {{ acc[r] = _mm256_setzero_ps(); zsum[r] = 0.0f; }}
    for (int64_t g = 0; g < groups; g++) {{
        const float s = bf16_to_f32(scale[g]);
        const float z = {zero_expr};
        const uint8_t* b = row + g * (G / 2);
        lowbit_prefetch(b, G / 2);
        __m256i vi[4];
        for (int r = 0; r < MT; r++) vi[r] = _mm256_setzero_si256();
        for (int64_t c = 0; c < G / 32; c++) {{
            const __m128i q = _mm_loadu_si128((const __m128i*)(b + c * 16));
            const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low4), _mm_and_si128(q, low4));
            for (int r = 0; r < MT; r++) {{
                const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + r * K + g * G + c * 32));
#ifdef LOWBIT_VNNI
                vi[r] = _mm256_dpbusd_epi32(vi[r], w, xv);  /* the four u8 x s8 products per lane, summed */
#else
                vi[r] = _mm256_add_epi32(vi[r], _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), ones));
#endif
            }}
        }}
        for (int r = 0; r < MT; r++) {{
            const float sd = s * dx[r * groups + g];
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(vi[r]), _mm256_set1_ps(sd), acc[r]);
            zsum[r] += sd * z * (float)sx[r * groups + g];
        }}
    }}
    for (int r = 0; r < MT; r++)
        out[r] = hsum256(acc[r]) - zsum[r];
}}
#endif

void {name}(const float* x, const uint8_t* codes, const uint16_t* scale, const uint8_t* zero,
            const float* bias, float* y, float* scratch, int64_t M, int64_t N, int64_t K, int threads)
{{
    const int64_t G = {group}, half = K / 2, groups = K / G;
    int8_t* xq = (int8_t*)scratch;                        /* [M, K] int8, [even 16 | odd 16] per 32 */
    float* dx = scratch + (M * K + 3) / 4;                /* [M, K/G] activation scales */
    int32_t* sx = (int32_t*)(dx + M * groups);            /* [M, K/G] sum of the int8 codes */
    for (int64_t m = 0; m < M; m++) {{
        for (int64_t g = 0; g < groups; g++) {{
            const float* xg = x + m * K + g * G;
            float amax = 0.0f;
            for (int64_t k = 0; k < G; k++) amax = fabsf(xg[k]) > amax ? fabsf(xg[k]) : amax;
            const float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            int32_t t = 0;
            for (int64_t c = 0; c < G / 32; c++) {{
                int8_t* out = xq + m * K + g * G + c * 32;
                for (int64_t j = 0; j < 16; j++) {{
                    const float e = xg[c * 32 + 2 * j] * inv, o = xg[c * 32 + 2 * j + 1] * inv;
                    out[j] = (int8_t)(e >= 0.0f ? e + 0.5f : e - 0.5f);
                    out[16 + j] = (int8_t)(o >= 0.0f ? o + 0.5f : o - 0.5f);
                    t += out[j] + out[16 + j];
                }}
            }}
            dx[m * groups + g] = d;
            sx[m * groups + g] = t;
        }}
    }}
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {{
        const uint8_t* row = codes + n * half;
        const uint16_t* sc = scale + n * groups;
        const uint8_t* zp = {zero_row};
        float out[{max_rows}];
#ifdef LOWBIT_AVX2
        for (int64_t m = 0; m < M; m += 4) {{
            const int64_t t = M - m < 4 ? M - m : 4;
            const int8_t* q = xq + m * K;
            const float* d = dx + m * groups;
            const int32_t* s = sx + m * groups;
            if (t == 4) {name}_tile(row, sc, zp, q, d, s, out + m, K, groups, 4);
            else if (t == 3) {name}_tile(row, sc, zp, q, d, s, out + m, K, groups, 3);
            else if (t == 2) {name}_tile(row, sc, zp, q, d, s, out + m, K, groups, 2);
            else {name}_tile(row, sc, zp, q, d, s, out + m, K, groups, 1);
        }}
#else
        for (int64_t m = 0; m < M; m++) out[m] = 0.0f;
        for (int64_t g = 0; g < groups; g++) {{
            const float s = bf16_to_f32(sc[g]);
            const float z = {zero_expr};
            const uint8_t* b = row + g * (G / 2);
            lowbit_prefetch(b, G / 2);
            for (int64_t m = 0; m < M; m++) {{
                const int8_t* xg = xq + m * K + g * G;
                int32_t dot = 0;
                for (int64_t c = 0; c < G / 32; c++)
                    for (int64_t j = 0; j < 16; j++)
                        dot += (int32_t)(b[c * 16 + j] & 15) * xg[c * 32 + j]
                               + (int32_t)(b[c * 16 + j] >> 4) * xg[c * 32 + 16 + j];
                out[m] += s * dx[m * groups + g] * ((float)dot - z * (float)sx[m * groups + g]);
            }}
        }}
#endif
        for (int64_t m = 0; m < M; m++)
            y[m * N + n] = out[m] + (bias ? bias[n] : 0.0f);
    }}
}}
"""

# NF4 through an int8 table (the ``{name}_Q8`` path): the 16 grid values v as bytes u = round(ALPHA v +
# BETA) in [0, 255]; ALPHA and BETA were found by a grid search (ALPHA in [100, 127.5] by 0.002, BETA
# by 0.005) minimising the rms of the table's rounding: 0.0013 of the absmax scale (52 dB below the
# grid's rms; 0.0021 and 47.7 dB for the plain round(127.5 (v + 1))). The kernel uses v ~ P u + Q,
# the least-squares line through the 16 pairs (``nf4_int8_table``).
NF4_ALPHA, NF4_BETA = 124.07, 124.16
# calls of at most this many rows take the NF4 table path: every decode-sized call (measured faster
# than the float permute path at 1, 4 and 16 rows on AVX2: benchmarks/cpu_gemv.py)
NF4_INT_ROWS = MAX_ROWS


@functools.lru_cache(maxsize=1)
def nf4_int8_table() -> tuple[tuple[int, ...], float, float]:
    """(the 16 table bytes u, P, Q) of the NF4 int8 table: ``NF4_GRID[c] ~ P * u[c] + Q``."""
    v = torch.tensor(NF4_GRID, dtype=torch.float64)
    u = torch.round(NF4_ALPHA * v + NF4_BETA).clamp(0, 255)
    a = torch.stack([u, torch.ones_like(u)], dim=1)
    p, q = torch.linalg.lstsq(a, v[:, None]).solution[:, 0].tolist()
    return tuple(int(c) for c in u.tolist()), float(torch.tensor(p, dtype=torch.float32)), \
        float(torch.tensor(q, dtype=torch.float32))


# 2:4 sparse + int4 group-wise (``s24+int4_g{G}_{sym,asym}``): per row, the KC = K/2 kept values'
# 4-bit codes (a little-endian nibble stream: kept value j in byte j/2, bits 4 (j & 1)), then their
# 2-bit positions as in ``_S24_INT8``; scales bf16 [N, KC/G] and zero points uint8 [N, KC/G] over
# groups of G *kept* values (G = 128 spans 256 input columns). Only those bytes are read: 0.375 bytes
# per weight + the group's scale and zero, against 0.5 + the same for the dense int4 copy. Float
# path: per 16 kept values, 8 code bytes widened to 16 lanes (nibbles split and interleaved), less
# the group's zero point, times the activations of their columns (the index bits decoded and x
# gathered in registers exactly as ``_S24_INT8``'s AVX-512 float path), one accumulator pair per
# group, scaled once per group. AVX-512 explicit; otherwise portable loops.
_S24_INT4 = r"""
static void {name}_prepare(const float* x, float* scratch, int64_t M, int64_t K)
{{
    (void)x; (void)scratch; (void)M; (void)K;  /* the float paths read x as it is */
}}

static inline __attribute__((always_inline)) void {name}_channel(
    const void* codes_, const uint16_t* scale, const uint8_t* zero, const float* x, const float* scratch,
    int64_t n, int64_t M, int64_t K, float* out)
{{
    (void)zero; (void)scratch;
    const int64_t KC = K / 2, G = {group}, groups = KC / G, row_bytes = KC / 2 + KC / 4;
    const uint8_t* v = (const uint8_t*)codes_ + n * row_bytes;
    const uint8_t* idx = v + KC / 2;
    const uint16_t* sr = scale + n * groups;
    const uint8_t* zp = {zero_row};
    (void)zp;
    lowbit_prefetch(v, row_bytes);
    for (int64_t m = 0; m < M; m++) {{
        const float* xm = x + m * K;
        float d = 0.0f;
#if defined(LOWBIT_AVX512)
        const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
        const __m512i three = _mm512_set1_epi32(3);
        const __m128i low = _mm_set1_epi8(15);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {{
            const float z = {zero_expr};
            const __m512 zv = _mm512_set1_ps(z);
            __m512 a[2] = {{_mm512_setzero_ps(), _mm512_setzero_ps()}};
            for (int64_t jj = g * G; jj < (g + 1) * G; jj += 32) {{
                for (int q = 0; q < 2; q++) {{
                    const int64_t j = jj + 16 * q;
                    /* (bits >> 2i) & 3 | base in one ternary-logic op (base has its low two bits clear) */
                    const __m512i c = _mm512_ternarylogic_epi32(_mm512_srlv_epi32(
                        _mm512_set1_epi32(*(const int32_t*)(idx + (j >> 2))), shifts), three, base, 0xEA);
                    const __m128i b = _mm_loadl_epi64((const __m128i*)(v + j / 2));  /* 16 codes */
                    const __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low));
                    const __m512 w = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes)), zv);
                    const float* xc = xm + 2 * j;
                    a[q] = _mm512_fmadd_ps(w, _mm512_permutex2var_ps(_mm512_loadu_ps(xc), c, _mm512_loadu_ps(xc + 16)), a[q]);
                }}
            }}
            acc = _mm512_fmadd_ps(_mm512_add_ps(a[0], a[1]), _mm512_set1_ps(bf16_to_f32(sr[g])), acc);
        }}
        d = _mm512_reduce_add_ps(acc);
#else
        for (int64_t g = 0; g < groups; g++) {{
            const float z = {zero_expr};
            float a = 0.0f;
            for (int64_t j = g * G; j < (g + 1) * G; j++) {{  /* kept value j: group j/2 of 4 columns */
                const int64_t col = 2 * (j & ~(int64_t)1) + ((idx[j >> 2] >> (2 * (j & 3))) & 3);
                a += ((float)((v[j >> 1] >> (4 * (j & 1))) & 15) - z) * xm[col];
            }}
            d += a * bf16_to_f32(sr[g]);
        }}
#endif
        out[m] = d;
    }}
}}
""" + "{drivers}"

S24_STEP = 32  # 2:4 kernel, AVX-512: kept values per step (16 per accumulator)
S24_PF_BYTES = 16384  # 2:4 kernel: prefetch distance (the others: LOWBIT_PF_BYTES in _PRELUDE)
# calls of at most this many rows take the split-int8 integer path (int4 groups of 64+, int8 with VNNI)
SPLIT8_ROWS = int(os.environ.get("LOWBIT_CPU_SPLIT8_ROWS", MAX_ROWS))


SPLIT8_ENV = "LOWBIT_CPU_SPLIT8"


def split8_enabled() -> bool:
    """Whether the int4/int8 kernels keep their split-int8 integer paths (``LOWBIT_CPU_SPLIT8=0``:
    the float path only, for before/after comparisons; read per call like ``LOWBIT_CPU_ISA``)."""
    return os.environ.get(SPLIT8_ENV, "1") != "0"

# the kernel key of the W8A8 matmul (the weight-only kernels are keyed by their weight format)
W8A8 = "w8a8"
# suffix of the key of an int4 kernel that quantizes the activations to int8 (``int4_g128_asym+a8``)
A8 = "+a8"


def supported(fmt: str) -> str | None:
    """Why no generated CPU kernel exists for ``fmt`` (None: one does)."""
    if fmt == W8A8:
        return None
    if fmt.endswith(A8):
        f = WeightFormat.parse(fmt[: -len(A8)])
        if f.kind == "int" and f.bits == 4 and f.group_size is not None and f.group_size % 32 == 0:
            return None
        return f"format {fmt}: int8-activation kernels exist for int4 weights with groups a multiple of 32"
    f = WeightFormat.parse(fmt)
    if f.kind == "int" and f.bits == 8:
        return None
    if f.kind in ("int", "nf4") and f.bits == 4 and f.group_size is not None and f.group_size % 16 == 0:
        return None  # a group is whole 8-byte loads of codes
    if f.kind == "sparse" and (f.n, f.m) == (2, 4) and f.inner.key == "int8":
        return None
    if (f.kind == "sparse" and (f.n, f.m) == (2, 4) and f.inner.kind == "int" and f.inner.bits == 4
            and f.inner.group_size is not None and f.inner.group_size % 32 == 0):
        return None
    return (f"format {fmt}: generated CPU kernels exist for int8, and int4 and NF4 group-wise weights (group a "
            "multiple of 16), and 2:4 + int8 / int4 (s24+int8, s24+int4_g<G> with G a multiple of 32)")


def kernel_name(fmt: str) -> str:
    return "lowbit_cpu_" + fmt.replace("-", "_").replace("+", "_")


def source(fmt: str, split8: bool | None = None) -> str:
    """The C source of the kernel for ``fmt`` (readable; dumped beside the Triton kernels).
    ``split8`` (default: ``split8_enabled()``) keeps the split-int8 integer paths of int4 (groups of
    64+) and int8 weights; without it those calls take the float path."""
    split8 = split8_enabled() if split8 is None else split8
    name = kernel_name(fmt)
    if fmt == W8A8:
        return (f"/* lowbit generated CPU kernel: int8 weights x int8 activations, int32 sums (M <= {MAX_ROWS}) */\n"
                + _PRELUDE + _W8A8.format(name=name, max_rows=MAX_ROWS))
    if fmt.endswith(A8):
        f = WeightFormat.parse(fmt[: -len(A8)])
        body = _INT4_A8.format(name=name, group=f.group_size, max_rows=MAX_ROWS,
                               zero_expr="(float)zp[g]" if f.has_zero_points else "8.0f",
                               zero_row="zero + n * groups" if f.has_zero_points else "0")
        return (f"/* lowbit generated CPU kernel: {fmt[: -len(A8)]} weights, rows quantized to int8 per group "
                f"(M <= {MAX_ROWS}) */\n" + _PRELUDE + body)
    f = WeightFormat.parse(fmt)
    if f.kind == "sparse" and f.bits == 4:
        inner = f.inner
        body = _S24_INT4.format(name=name, group=inner.group_size,
                                zero_expr="(float)zp[g]" if inner.has_zero_points else "8.0f",
                                zero_row="zero + n * groups" if inner.has_zero_points else "0",
                                drivers=_DRIVERS.format(name=name, max_rows=MAX_ROWS))
    elif f.kind == "sparse":
        body = _S24_INT8.format(name=name, max_rows=MAX_ROWS, s24_step=S24_STEP, split8=int(split8),
                                split_rows=SPLIT8_ROWS, prepare8=_PREPARE8.format(name=name),
                                drivers=_DRIVERS.format(name=name, max_rows=MAX_ROWS))
    elif f.bits == 8:
        body = _INT8.format(name=name, max_rows=MAX_ROWS, drivers=_DRIVERS.format(name=name, max_rows=MAX_ROWS),
                            split8=int(split8), split_rows=SPLIT8_ROWS, prepare8=_PREPARE8.format(name=name))
    else:
        if f.kind == "nf4":
            decode = _DECODE_TABLE.format(name=name, values=", ".join(f"{float(v)!r}f" for v in NF4_GRID))
            zero_expr = "0.0f"
        else:
            decode = _DECODE_INT.format(name=name)
            zero_expr = "(float)zp[g]" if f.has_zero_points else "8.0f"
        nf4q = int(split8 and f.kind == "nf4" and (f.group_size == 32 or f.group_size % 64 == 0))
        u8, p, q = nf4_int8_table()
        body = _INT4.format(name=name, group=f.group_size, max_rows=MAX_ROWS, decode_defs=decode, zero_expr=zero_expr,
                            nf4q=nf4q, q8_rows=NF4_INT_ROWS, u8=", ".join(map(str, u8)), P=repr(p), Q=repr(q),
                            wide=int(f.group_size % 32 == 0),  # the 16-lane path reads 16 code bytes a step
                            # per group two int32 -> float conversions: worth it from 64 up (measured)
                            split8=int(split8 and f.kind == "int" and f.group_size % 64 == 0
                                       and f.group_size <= 4096),
                            split_rows=SPLIT8_ROWS,
                            drivers=_DRIVERS.format(name=name, max_rows=MAX_ROWS),
                            zero_row="zero + n * groups" if f.has_zero_points else "0")
    # the 2:4 kernel reads 0.625 bytes per weight: prefetched further ahead (16 KB: 3-5 % faster than 8 KB
    # on Zen 4 for 2048-32000 x 2048-5632 with the gathering kernel, interleaved)
    pf = f"#define LOWBIT_PF_BYTES {S24_PF_BYTES}\n" if f.kind == "sparse" else ""
    return f"/* lowbit generated CPU kernel: {fmt} weights, float32 rows (M <= {MAX_ROWS}) */\n" + pf + _PRELUDE + body


def _cache_dir() -> pathlib.Path:
    from lowbit_compiler.backends.kernel_cache import cache_dir

    path = cache_dir() / "cpu"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")


_disabled_reason: list[str] = []


# calls per kernel name (what ran: tests and benchmarks read it)
calls: collections.Counter = collections.Counter()


def isa_choice() -> str:
    """The build dispatch uses: ``LOWBIT_CPU_ISA`` (read per call), default "native"."""
    isa = os.environ.get(ISA_ENV, "native")
    if isa not in ISA_FLAGS:
        raise ValueError(f"{ISA_ENV}={isa!r}; expected one of {sorted(ISA_FLAGS)}")
    return isa


def kernel_disabled() -> bool:
    """Whether ``LOWBIT_CPU_CODEGEN=0`` turns generated kernels off (read at every call; logged once)."""
    if os.environ.get(ENV, "1") == "0":
        _note(f"turned off by {ENV}=0; torch's packed CPU kernels run instead")
        return True
    return False


def kernel(fmt: str, portable: bool = False, isa: str | None = None):
    """The compiled kernel for ``fmt`` (a ctypes function), or None (reason logged once).
    ``isa`` (see ``ISA_FLAGS``; default "native", or "portable" with ``portable=True``) builds for
    another target than the host's full ISA; ``isa_of(fn)`` says which explicit path it runs."""
    if kernel_disabled():
        return None
    return _build(fmt, isa or ("portable" if portable else isa_choice()), split8_enabled())


@functools.lru_cache(maxsize=None)
def _build(fmt: str, isa: str, split8: bool = True):
    why = supported(fmt)
    if why is not None:
        return None
    pointers = 3 if fmt == W8A8 else 7
    return build(argtypes=[ctypes.c_void_p] * pointers + [ctypes.c_int64] * 3 + [ctypes.c_int],
                 fallback="torch's packed CPU kernels run instead", what=f"the {fmt} kernel",
                 **kernel_spec(fmt, isa, split8))


def kernel_spec(fmt: str, isa: str, split8: bool = True) -> dict:
    """The source arguments of ``fmt``'s kernel library (every entry point: plain, ``_multi``,
    ``_ext``): what :func:`build` compiles, and what :func:`prebuild` takes."""
    return {"name": kernel_name(fmt), "text": source(fmt, split8), "isa": isa}


def multi_kernel(fmt: str, isa: str | None = None):
    """The several-weights entry point of ``fmt``'s kernel (``{name}_multi``: q/k/v side by side, or
    gate.up with SiLU * mul), or None (no kernel for the format; reason logged once)."""
    if kernel_disabled():
        return None
    return _build_multi(fmt, isa or isa_choice(), split8_enabled())


@functools.lru_cache(maxsize=None)
def _build_multi(fmt: str, isa: str, split8: bool = True):
    if supported(fmt) is not None or fmt in (W8A8,) or fmt.endswith(A8):
        return None
    return build(argtypes=[ctypes.c_void_p] * 7 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                                   ctypes.c_int64, ctypes.c_int],
                 fallback="the group's linears run one by one", what=f"the {fmt} kernel",
                 entry=kernel_name(fmt) + "_multi", **kernel_spec(fmt, isa, split8))


def ext_kernel(fmt: str, isa: str, split8: bool, multi: bool):
    """The ``_ext`` entry of ``fmt``'s kernel (``{name}_ext``: one weight with the RMSNorm prologue
    and the residual epilogue; ``{name}_multi_ext``: a fusion group with the prologue), or None
    (no kernel with drivers for the format: W8A8, int8 activations; reason logged once)."""
    if kernel_disabled():
        return None
    return _build_ext(fmt, isa, split8, multi)


@functools.lru_cache(maxsize=None)
def _build_ext(fmt: str, isa: str, split8: bool, multi: bool):
    if supported(fmt) is not None or fmt in (W8A8,) or fmt.endswith(A8):
        return None
    prologue = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]  # threshold, its stride, column scales
    if multi:
        argtypes = ([ctypes.c_void_p] * 7 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                             ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float,
                                             ctypes.c_void_p] + prologue)
    else:
        argtypes = ([ctypes.c_void_p] * 7 + [ctypes.c_int64] * 3 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_float,
                                                                    ctypes.c_void_p, ctypes.c_void_p] + prologue)
    return build(argtypes=argtypes, fallback="the norm and the residual add run in torch", what=f"the {fmt} kernel",
                 entry=kernel_name(fmt) + ("_multi_ext" if multi else "_ext"), **kernel_spec(fmt, isa, split8))


# ctypes function -> the explicit path its build runs ("avx512_vnni", "avx512", "avx2", "portable")
_ISA_OF: dict[int, str] = {}


def isa_of(fn) -> str | None:
    """Which explicit path a kernel built from this module's templates runs (None: not one of them)."""
    return _ISA_OF.get(id(fn))


def host_isa() -> str:
    """The path a native build takes on this host (from its CPU flags; what ``isa_of`` reports)."""
    flags = set(_host_flags().split())
    if {"avx512f", "avx512bw", "avx512vl", "avx2", "fma"} <= flags:
        return "avx512_vnni" if "avx512_vnni" in flags else "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "portable"


def build(name: str, text: str, argtypes: list, fallback: str = "torch's packed CPU kernels run instead",
          what: str | None = None, portable: bool = False, isa: str | None = None,
          entry: str | None = None, flags: tuple[str, ...] | None = None,
          extra_flags: tuple[str, ...] = ()) -> "ctypes._CFuncPtr | None":
    """Compile ``text`` (C defining the function ``name``) at first use, cached on disk by a hash
    of source, compiler, flags and host flags; the ctypes function, or None (why logged once,
    naming ``fallback``: what runs instead). The mechanism every generated CPU kernel uses (this
    module's, ``cpu_sparse.py``'s, ``cpu_lut.py``'s and ``kv_cpu.py``'s). ``isa`` (``ISA_FLAGS``;
    ``portable=True`` means "portable") builds for another target than the host's full ISA;
    ``entry`` names another function of the same library (one build, several entry points);
    ``flags`` replaces the compiler flags altogether; ``extra_flags`` are appended
    (``portable=True, extra_flags=("-mavx2", "-mfma")`` builds an AVX2 host's code on any machine
    that runs it). When :func:`prebuild` is compiling the same library, this waits for that compile
    instead of starting another."""
    compiler = _compiler()
    if compiler is None:
        _note(f"no C compiler on PATH (gcc/cc/clang, or $CC); {fallback}")
        return None
    flags = _compiler_flags(isa, portable, flags, extra_flags)
    lib = _library_path(name, text, compiler, flags)
    error = _compile_library(lib, text, compiler, flags)
    if error is not None:
        _note(f"compiling {what or name} with {compiler} failed ({error}); {fallback}")
        return None
    library = ctypes.CDLL(str(lib))
    fn = getattr(library, entry or name)
    fn.restype = None
    fn.argtypes = argtypes
    if hasattr(library, "lowbit_isa"):
        library.lowbit_isa.restype = ctypes.c_char_p
        _ISA_OF[id(fn)] = library.lowbit_isa().decode()
    return fn


def _compiler_flags(isa: str | None = None, portable: bool = False, flags: tuple[str, ...] | None = None,
                    extra_flags: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The compiler flags of a :func:`build` call with these arguments."""
    return (flags or ISA_FLAGS[isa or ("portable" if portable else "native")]) + tuple(extra_flags)


def _library_path(name: str, text: str, compiler: str, flags: tuple[str, ...]) -> pathlib.Path:
    key = hashlib.sha256("\n".join([text, compiler, " ".join(flags), platform.machine(), _host_flags()])
                         .encode()).hexdigest()[:20]
    return _cache_dir() / f"{name}_{key}.so"


# one lock per library path: a compile in progress (a prebuild thread's or a caller's) is waited for, not repeated
_LIBRARY_LOCKS: dict[str, threading.Lock] = {}
_LIBRARY_LOCKS_GUARD = threading.Lock()
_RUNNING: set[subprocess.Popen] = set()  # compilers running (killed at exit: a prebuild's daemon thread is not waited for)
compile_log: collections.deque = collections.deque(maxlen=256)  # (library file, thread) per compile (tests read it)


def _compile_library(lib: pathlib.Path, text: str, compiler: str, flags: tuple[str, ...]) -> str | None:
    """Compile ``text`` into ``lib`` unless the disk cache has it: None, or the compiler's error."""
    if lib.exists():
        return None
    with _LIBRARY_LOCKS_GUARD:
        lock = _LIBRARY_LOCKS.setdefault(str(lib), threading.Lock())
    with lock:
        if lib.exists():  # another thread compiled it while this one waited
            return None
        with tempfile.TemporaryDirectory() as tmp:
            src = pathlib.Path(tmp) / "kernel.c"
            src.write_text(text)
            out = pathlib.Path(tmp) / "kernel.so"
            proc = subprocess.Popen([compiler, *flags, str(src), "-o", str(out)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            with _LIBRARY_LOCKS_GUARD:
                _RUNNING.add(proc)
            try:
                _, stderr = proc.communicate()
            finally:
                with _LIBRARY_LOCKS_GUARD:
                    _RUNNING.discard(proc)
            if proc.returncode != 0:
                return stderr.strip()[:300] or f"exit status {proc.returncode}"
            os.replace(out, lib)  # atomic: concurrent processes never load a half-written library
            compile_log.append((lib.name, threading.current_thread().name))
    return None


_PREBUILD_SLOTS = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))  # compiles at once: one per core
_PREBUILDING: set[str] = set()  # library paths a prebuild thread has queued or is compiling
prebuilds: collections.Counter = collections.Counter()  # "started" / "compiled" / "failed" (tests read it)


@atexit.register
def _stop_compilers() -> None:
    """An exiting process does not wait for its background compiles: their compilers stop too."""
    for proc in list(_RUNNING):
        proc.kill()


def _after_fork_in_child() -> None:
    """A forked child gets the parent's locks as they were (one held by a prebuild thread that does
    not exist in the child would block its build() forever) and none of its threads: fresh locks,
    nothing in flight."""
    global _LIBRARY_LOCKS_GUARD, _PREBUILD_SLOTS
    _LIBRARY_LOCKS.clear()
    _LIBRARY_LOCKS_GUARD = threading.Lock()
    _PREBUILD_SLOTS = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))
    _PREBUILDING.clear()
    _RUNNING.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def prebuild(specs: list[dict]) -> list[str]:
    """Start compiling, in background threads (at most one compiler per core at a time), the
    libraries of ``specs`` that the disk cache lacks; returns the names started. A spec holds the
    source arguments of the :func:`build` call that will load the library: ``name``, ``text`` and
    any of ``isa``, ``portable``, ``flags``, ``extra_flags`` (each kernel module's ``*_spec``
    function makes them, and its own ``build`` call uses the same one).

    Why: a cold compile used to run gcc once per kernel, one after another, each when first needed
    (quantizer, decode kernel, dequantizer / GEMM, ...: ~6 s of an 8-layer model's ~11 s cold
    compile), while a core sat idle. The backend calls this as a graph arrives, so the compiles run
    side by side and beside the quantization; the :func:`build` that needs a library waits for its
    compile instead of starting another. Only the disk cache changes: nothing is loaded or cached in
    this process, so a compile that fails here changes nothing (the :func:`build` call compiles
    again and reports why); the threads are daemons (an exiting process does not wait for them,
    and stops their compilers), and a forked child starts with none in flight."""
    if os.environ.get(ENV, "1") == "0":
        return []
    compiler = _compiler()
    if compiler is None:
        return []
    started = []
    for spec in specs:
        spec = dict(spec)
        name, text = spec.pop("name"), spec.pop("text")
        flags = _compiler_flags(**spec)
        try:
            lib = _library_path(name, text, compiler, flags)
        except OSError:  # (the cache directory cannot be made: the build() that needs it reports that)
            return started
        with _LIBRARY_LOCKS_GUARD:
            if lib.exists() or str(lib) in _PREBUILDING:
                continue
            _PREBUILDING.add(str(lib))
            prebuilds["started"] += 1
        threading.Thread(target=_prebuild_one, args=(lib, text, compiler, flags), name=f"lowbit-build-{name}",
                         daemon=True).start()
        started.append(name)
    return started


def spec_path(spec: dict) -> pathlib.Path | None:
    """The disk-cache path of a spec's library (None without a compiler)."""
    compiler = _compiler()
    if compiler is None:
        return None
    spec = dict(spec)
    name, text = spec.pop("name"), spec.pop("text")
    return _library_path(name, text, compiler, _compiler_flags(**spec))


def _prebuild_one(lib: pathlib.Path, text: str, compiler: str, flags: tuple[str, ...]) -> None:
    try:
        with _PREBUILD_SLOTS:
            error = _compile_library(lib, text, compiler, flags)
    except Exception as exc:  # e.g. the cache directory removed meanwhile: the build() that needs it reports
        error = repr(exc)
    finally:
        with _LIBRARY_LOCKS_GUARD:
            _PREBUILDING.discard(str(lib))
            prebuilds["failed" if error else "compiled"] += 1
    if error:
        log.debug("lowbit: background compile of %s failed (%s); the call that needs it compiles again", lib.name,
                  error)


def _note(reason: str) -> None:
    if reason not in _disabled_reason:
        _disabled_reason.append(reason)
        log.warning("lowbit: generated CPU kernels unavailable: %s", reason)


@functools.lru_cache(maxsize=1)
def _host_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return " ".join(sorted(set(line.split(":", 1)[1].split())))
    except OSError:
        pass
    return platform.processor()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as contiguous float32 (itself when it already is; None stays None): what the kernels read."""
    return t if t is None or (t.dtype == torch.float32 and t.is_contiguous()) else t.to(torch.float32).contiguous()


class Bound:
    """One quantized weight bound to its generated kernel: the pointers, sizes and scratch size
    worked out once, so that a decode call costs a ctypes call and two small allocations
    (``packed_linear`` keeps one per weight and kernel; building the arguments per call was ~9 us
    of Python per linear, ~0.5 ms per token of a 57-linear model). Holds the tensors whose pointers
    it keeps."""

    __slots__ = ("fn", "name", "fmt", "tensors", "codes", "scales", "zeros", "n", "k", "scratch", "isa", "split8",
                 "ext_fn")

    def __init__(self, fn, key: str, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 fmt: str, in_features: int, isa: str = "native"):
        f = WeightFormat.parse(fmt)
        self.isa, self.split8 = isa, split8_enabled()
        codes, scales = qweight.contiguous(), scale.contiguous().view(torch.int16)
        zeros = None if zero is None else zero.contiguous()
        self.fn, self.name, self.fmt, self.tensors = fn, kernel_name(key), key, (codes, scales, zeros)
        self.codes, self.scales, self.zeros = codes.data_ptr(), scales.data_ptr(), _ptr(zeros)
        self.n, self.k = scale.shape[0], in_features
        self.ext_fn = None  # the _ext entry, looked up at the first ext call (False: the kernel has none)
        groups = in_features // (f.group_size or in_features)
        # scratch floats per row of x: the int4 kernels split x into even/odd columns + group sums
        # (int4 split-int8 path: 3K bytes + 2 K/G floats); int8 with VNNI: x in three int8 parts
        # (3K bytes) + a scale per 256 columns + one sum
        self.scratch = (in_features + 2 * groups if f.kind in ("int", "nf4") and f.bits == 4
                        else (3 * in_features) // 4 + in_features // 256 + 2 if f.bits == 8  # int8, 2:4 + int8
                        else 0)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x[M, K]`` (M <= MAX_ROWS) -> float32 ``[M, N]``."""
        rows, x32, bias = x.shape[0], _f32(x), _f32(bias)
        y = torch.empty(rows, self.n, dtype=torch.float32)
        scratch = torch.empty(max(rows * self.scratch, 1), dtype=torch.float32)
        calls[self.name] += 1
        self.fn(x32.data_ptr(), self.codes, self.scales, self.zeros, None if bias is None else bias.data_ptr(),
                y.data_ptr(), scratch.data_ptr(), rows, self.n, self.k, torch.get_num_threads())
        return y

    def ext(self, x: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float,
            residual: torch.Tensor | None, threshold: torch.Tensor | None = None,
            col_scale: torch.Tensor | None = None) -> torch.Tensor | None:
        """The call with the fused RMSNorm prologue (``norm_weight`` [K], ``eps``), the threshold of
        an activation-sparse layer (``threshold`` [1] or [K], ``col_scale`` [K] or None:
        ``lowbit::act_sparsify`` after the norm) and/or the residual epilogue (``residual`` [M, N]):
        ``residual + (act_sparsify(rms_norm(x)) W^T + bias)`` in float32; None when the kernel has no
        such entry (the caller runs the prologue and the add in torch).

        A decode step makes dozens of these calls between kernels that stream the caches empty, so
        the Python here runs cold: the entry is looked up once, and the scratch and the normalised
        row share one allocation."""
        fn = self.ext_fn
        if fn is None:
            fn = self.ext_fn = ext_kernel(self.fmt, self.isa, self.split8, multi=False) or False
        if fn is False:
            return None
        # converted copies (if any) stay referenced by these names until the call returns
        x, bias, nw, res = _f32(x), _f32(bias), _f32(norm_weight), _f32(residual)
        thr, cs = _f32(threshold), _f32(col_scale)
        rows = x.shape[0]
        y = torch.empty(rows, self.n, dtype=torch.float32)
        # scratch (rows * self.scratch floats) then, 64-byte aligned, the prologue's rows: one allocation
        head = -(-rows * self.scratch // 16) * 16
        scratch = torch.empty(head + (rows * self.k if nw is not None or thr is not None else 0) + 1,
                              dtype=torch.float32)
        base = scratch.data_ptr()
        calls[self.name + "_ext"] += 1
        fn(x.data_ptr(), self.codes, self.scales, self.zeros, None if bias is None else bias.data_ptr(),
           y.data_ptr(), base, rows, self.n, self.k, torch.get_num_threads(),
           None if nw is None else nw.data_ptr(), norm_eps(eps), None if res is None else res.data_ptr(),
           base + 4 * head, *threshold_args(thr, cs))
        return y


def norm_eps(eps: float | None) -> float:
    """The norm prologue's epsilon: ``rms_norm``'s default (float32's machine epsilon) when None."""
    return torch.finfo(torch.float32).eps if eps is None else float(eps)


def threshold_args(thr: torch.Tensor | None, cs: torch.Tensor | None) -> tuple:
    """The threshold arguments of the C kernels (the ``_ext`` entries here, ``cpu_sparse``'s
    kernel): pointer, stride (0: one threshold for every input), column scales (or NULL)."""
    if thr is None:
        return None, 0, None
    return thr.data_ptr(), 0 if thr.numel() == 1 else 1, None if cs is None else cs.data_ptr()


SILU_MUL = 1  # the multi kernel's epilogue code for silu(first) * second


class BoundGroup:
    """Several weights of one input (same format and K) bound to their kernel's ``_multi`` entry:
    ``(x, biases) -> [M, sum N]`` outputs side by side, or with ``epilogue=SILU_MUL`` (two
    weights, equal N) ``silu(x W0^T + b0) * (x W1^T + b1)``."""

    __slots__ = ("fn", "name", "members", "codes", "scales", "zeros", "ns", "nw", "k", "scratch", "epilogue", "n_out",
                 "ext_fn", "no_bias")

    def __init__(self, fn, members: list[Bound], epilogue: int = 0):
        self.fn, self.members, self.epilogue = fn, members, epilogue
        self.name = members[0].name + ("_silu_mul" if epilogue == SILU_MUL else f"_x{len(members)}")
        self.nw, self.k, self.scratch = len(members), members[0].k, members[0].scratch
        arr = ctypes.c_void_p * self.nw
        self.codes = arr(*[b.codes for b in members])
        self.scales = arr(*[b.scales for b in members])
        self.zeros = arr(*[b.zeros for b in members])
        self.no_bias = arr()  # all NULL: the bias pointers of a group without biases (the usual case)
        self.ns = (ctypes.c_int64 * self.nw)(*[b.n for b in members])
        self.n_out = members[0].n if epilogue == SILU_MUL else sum(b.n for b in members)
        self.ext_fn = None  # the _multi_ext entry, looked up at the first ext call (False: none)

    def _bias_ptrs(self, biases: list[torch.Tensor | None]):
        """The pointers of float32 biases (the caller converted them and holds them)."""
        if all(b is None for b in biases):
            return self.no_bias
        return (ctypes.c_void_p * self.nw)(*[None if b is None else b.data_ptr() for b in biases])

    def __call__(self, x: torch.Tensor, biases: list[torch.Tensor | None]) -> torch.Tensor:
        rows, x32 = x.shape[0], _f32(x)
        biases = [_f32(b) for b in biases]  # kept alive through the call
        bias_ptrs = self._bias_ptrs(biases)
        y = torch.empty(rows, self.n_out, dtype=torch.float32)
        scratch = torch.empty(max(rows * self.scratch, 1), dtype=torch.float32)
        calls[self.name] += 1
        self.fn(x32.data_ptr(), self.codes, self.scales, self.zeros, bias_ptrs, y.data_ptr(), scratch.data_ptr(),
                rows, self.ns, self.nw, self.k, self.epilogue, torch.get_num_threads())
        return y

    def ext(self, x: torch.Tensor, biases: list[torch.Tensor | None], norm_weight: torch.Tensor | None,
            eps: float, threshold: torch.Tensor | None = None,
            col_scale: torch.Tensor | None = None) -> torch.Tensor | None:
        """The group's call with the fused prologue: the group applied to ``rms_norm(x)`` and/or
        ``act_sparsify(..., threshold, col_scale)`` (once, in the kernel; as :meth:`Bound.ext`);
        None when the kernel has no such entry. Lean for the same reason as :meth:`Bound.ext`."""
        fn = self.ext_fn
        if fn is None:
            m0 = self.members[0]
            fn = self.ext_fn = ext_kernel(m0.fmt, m0.isa, m0.split8, multi=True) or False
        if fn is False:
            return None
        x, biases = _f32(x), [_f32(b) for b in biases]  # converted copies kept alive through the call
        rows = x.shape[0]
        nw, thr, cs = _f32(norm_weight), _f32(threshold), _f32(col_scale)
        y = torch.empty(rows, self.n_out, dtype=torch.float32)
        head = -(-rows * self.scratch // 16) * 16  # scratch, then (64-byte aligned) the prologue's rows: one allocation
        scratch = torch.empty(head + rows * self.k + 1, dtype=torch.float32)
        base = scratch.data_ptr()
        calls[self.name + "_ext"] += 1
        fn(x.data_ptr(), self.codes, self.scales, self.zeros, self._bias_ptrs(biases), y.data_ptr(), base,
           rows, self.ns, self.nw, self.k, self.epilogue, torch.get_num_threads(),
           None if nw is None else nw.data_ptr(), norm_eps(eps), base + 4 * head, *threshold_args(thr, cs))
        return y


def bind_group(members: list[Bound], epilogue: int = 0, isa: str | None = None) -> BoundGroup | None:
    """Bound weights of one input as one fused call, or None (different formats or K, the format
    has no multi kernel, SiLU * mul over weights of different N)."""
    fmts = {b.name for b in members}
    if len(members) < 2 or len(fmts) != 1 or len({b.k for b in members}) != 1:
        return None
    if epilogue == SILU_MUL and (len(members) != 2 or members[0].n != members[1].n):
        return None
    fmt = members[0].fmt
    fn = multi_kernel(fmt, isa)
    return None if fn is None else BoundGroup(fn, members, epilogue)


def bind(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: str, in_features: int,
         portable: bool = False, int8_activations: bool = False, isa: str | None = None) -> Bound | None:
    """The weight bound to its generated kernel, or None when no kernel applies (none for the
    format, no compiler, K padded to the group, scales not bf16, not on the CPU)."""
    key = fmt + A8 if int8_activations else fmt
    fn = kernel(key, portable, isa)
    if fn is None or qweight.device.type != "cpu" or scale.dtype != torch.bfloat16:
        return None
    f = WeightFormat.parse(fmt)
    if f.padded_k(in_features) != in_features:
        return None
    if f.kind in ("int", "sparse") and f.has_zero_points and zero is None:  # the kernel would read a NULL pointer
        raise ValueError(f"lowbit: asymmetric format {fmt} bound without its zero points (a caller dropped them)")
    if f.kind == "sparse":
        if (why := s24_index_error(qweight, in_features, fmt)) is not None:
            _note(f"{fmt} weight [{scale.shape[0]}, {in_features}]: {why}; the dense kernels run over a decompressed "
                  "copy")
            return None
    return Bound(fn, key, qweight, scale, zero, fmt, in_features, isa or ("portable" if portable else isa_choice()))


def s24_index_error(qweight: torch.Tensor, in_features: int, fmt: str = "s24+int8") -> str | None:
    """Why a 2:4 weight's index stream breaks the storage's rule that a group's two kept values sit
    at distinct positions, or None. The kernel multiplies each kept code by the activation of its own
    column (any order), so it would add both codes of such a group where the format's dequantization
    (a scatter) keeps one. Checked once per bound weight."""
    f = WeightFormat.parse(fmt)
    kc = f.kept(in_features)
    code_bytes = kc * f.bits // 8

    def check() -> str:
        nib = qweight[:, code_bytes:]
        for part in (nib & 15, nib >> 4):
            if bool(((part & 3) == (part >> 2)).any()):
                return "a group's two kept values share one position"
        return ""

    return _S24_INDEX.get_or_create(qweight, (in_features, fmt), check) or None


_S24_INDEX = IdentityCache()  # 2:4 weight -> s24_index_error's finding ("" when none)


def linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           bias: torch.Tensor | None, fmt: str, in_features: int, portable: bool = False,
           int8_activations: bool = False, isa: str | None = None) -> torch.Tensor | None:
    """``x[M, K] @ dequantize(W).T + bias`` in float32 by the generated kernel, or None when it
    does not apply (no kernel, too many rows, padded K): the caller runs torch's kernels.
    ``int8_activations=True`` (int4 only) runs the kernel that quantizes x per group to int8 first
    (lossy: see docs/codegen.md)."""
    if int8_activations and not bool(torch.isfinite(x).all()):
        int8_activations = False  # an inf or NaN has no int8 code: the float kernel propagates it
    if x.shape[0] > MAX_ROWS:
        return None
    bound = bind(qweight, scale, zero, fmt, in_features, portable, int8_activations, isa)
    return None if bound is None else bound(x, bias)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, portable: bool = False,
                isa: str | None = None) -> torch.Tensor | None:
    """``x[M, K] @ weight[N, K].T`` for int8 codes in int32 (exact; what ``torch._int_mm`` gives)
    by the generated W8A8 kernel, or None when it does not apply (no kernel, too many rows, not the
    CPU, an activation code of -128, which the kernel's sign trick cannot take)."""
    fn = kernel(W8A8, portable, isa)
    rows = x.shape[0]
    if fn is None or rows > MAX_ROWS or x.device.type != "cpu" or x.dtype != torch.int8 or weight.dtype != torch.int8:
        return None
    xc, wc = x.contiguous(), weight.contiguous()
    if rows and int(xc.min()) == -128:
        return None
    n, k = wc.shape
    y = torch.empty(rows, n, dtype=torch.int32)
    calls[kernel_name(W8A8)] += 1
    fn(xc.data_ptr(), wc.data_ptr(), y.data_ptr(), rows, n, k, torch.get_num_threads())
    return y
