"""Generated CPU kernels: low-bit matmuls for decode-sized batches, as C compiled at first use.

torch's packed int4 CPU kernel is compute-bound at batch 1 (it reaches about 40 % of the memory
bandwidth floor), and its int8 one converts the activation to bf16. For M <= ``MAX_ROWS`` rows a
weight-streaming kernel does better: each weight byte is read once, unpacked in registers and
multiplied against every row of ``x`` (float32 accumulation), threads over output channels.

One kernel per weight format (``int8``; ``int4_g{G}_{sym,asym}``), written from a template
(:func:`source`), compiled by the system C compiler (the one Inductor's CPU backend needs) with
``-O3 -march=native -fopenmp``: the compiler vectorises the inner loops for the machine's ISA
(AVX-512, AVX2 or SSE; the host's flags are part of the cache key), cached on disk under
``$LOWBIT_CACHE_DIR/cpu`` by a hash of source, compiler and flags, loaded with ``ctypes``.
Without a compiler (or when compiling fails) :func:`kernel` returns None, logs why once, and
torch's packed kernels run.

Layouts are our storage formats (``formats.py``): the generated kernels read the quantized
tensors as ``compress`` and the passes wrote them, so they need no repacked copy.

Which kernel runs (``cpu_kernels.packed_linear``): the generated one for ``M <= MAX_ROWS`` rows,
torch's packed kernels above (prefill), a static rule measured by ``benchmarks/cpu_gemv.py``.
``LOWBIT_CPU_CODEGEN=0`` turns generated kernels off (read at every call; logged once).
"""
from __future__ import annotations

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

import torch

from lowbit_compiler.formats import NF4_GRID, WeightFormat

log = logging.getLogger("lowbit_compiler")

MAX_ROWS = 16  # decode and small batches; larger M goes to torch's packed kernels
ENV = "LOWBIT_CPU_CODEGEN"
# "1": int4 weight-only calls quantize their activations to int8 per group first (faster, lossy)
INT8_ACTIVATIONS_ENV = "LOWBIT_CPU_INT8_ACTIVATIONS"


def int8_activations_enabled() -> bool:
    """Whether dispatch runs int4 weights with int8-quantized activations (opt-in; read per call)."""
    return os.environ.get(INT8_ACTIVATIONS_ENV, "0") == "1"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
# the compiler's default target (no AVX2 on x86-64): builds the portable loops; the tests use it to
# check the fallback a host without AVX2 + FMA runs
PORTABLE_FLAGS = tuple(f for f in FLAGS if f != "-march=native")

_PRELUDE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LOWBIT_AVX2 1  /* explicit AVX2 + FMA below; otherwise the portable loops the compiler vectorises */
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#ifdef LOWBIT_AVX2
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int32_t hsum256_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}
#endif
"""

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

void {name}(const float* x, const uint8_t* codes, const uint16_t* scale, const uint8_t* zero,
            const float* bias, float* y, float* scratch, int64_t M, int64_t N, int64_t K, int threads)
{{
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
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {{
        const uint8_t* row = codes + n * half;
        const uint16_t* sc = scale + n * groups;
        const uint8_t* zp = {zero_row};
        float out[{max_rows}];
#ifdef LOWBIT_AVX2
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
        for (int64_t m = 0; m < M; m++)
            y[m * N + n] = out[m] + (bias ? bias[n] : 0.0f);
    }}
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
            _mm_prefetch((const char*)(w + k + 512), _MM_HINT_T0);
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

void {name}(const float* x, const int8_t* codes, const uint16_t* scale, const uint8_t* zero,
            const float* bias, float* y, float* scratch, int64_t M, int64_t N, int64_t K, int threads)
{{
    (void)zero; (void)scratch;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {{
        const int8_t* w = codes + n * K;
        const float s = bf16_to_f32(scale[n]);
        float d[{max_rows}];
#ifdef LOWBIT_AVX2
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
            y[m * N + n] = s * d[m] + (bias ? bias[n] : 0.0f);
    }}
}}
"""

# 2:4 sparse + int8 (``sparse_formats.py``: ``s24+int8``): per row, KC = K/2 int8 codes of the kept
# values, then their 2-bit indices inside each group of 4 (kept value j: bits [2j, 2j+2) of the
# index stream), scale bf16 [N]. Only the kept values and their indices are read (0.625 bytes per
# weight instead of int8's 1); AVX2: an index byte (4 kept values) looks up its 4 columns in a
# 256-entry table and the activations are permuted into place in registers (no gathers).
_S24_INT8 = r"""
#ifdef __AVX2__
#include <immintrin.h>
#endif

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

void {name}(const float* x, const uint8_t* qweight, const uint16_t* scale, const uint8_t* zero,
            const float* bias, float* y, float* scratch, int64_t M, int64_t N, int64_t K, int threads)
{{
    (void)zero; (void)scratch;
    if (!s24_ready)
        s24_init();
    const int64_t KC = K / 2, row_bytes = KC + KC / 4;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {{
        const int8_t* v = (const int8_t*)(qweight + n * row_bytes);
        const uint8_t* idx = qweight + n * row_bytes + KC;
        const float s = bf16_to_f32(scale[n]);
        float d[{max_rows}] = {{0}};
        int64_t j = 0;
#ifdef __AVX2__
        /* 16 kept values = 32 columns of x a step: each half of a 16-column span is permuted into
           place in registers (kept values 0-3 come from columns 0-7, 4-7 from 8-15), two
           independent accumulators; a row of x at a time (the weight row stays in L1) */
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
            float t[8];
            _mm256_storeu_ps(t, _mm256_add_ps(a0, a1));
            d[m] = t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
            j_end = jj;
        }}
        j = j_end;
#endif
        for (; j < KC; j++) {{  /* scalar: kept value j sits in group j/2, columns 4*(j/2) .. +3 */
            const int64_t c = 2 * (j & ~(int64_t)1) + ((idx[j >> 2] >> (2 * (j & 3))) & 3);
            for (int64_t m = 0; m < M; m++)
                d[m] += (float)v[j] * x[m * K + c];
        }}
        for (int64_t m = 0; m < M; m++)
            y[m * N + n] = s * d[m] + (bias ? bias[n] : 0.0f);
    }}
}}
"""


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

void {name}(const int8_t* x, const int8_t* codes, int32_t* y, int64_t M, int64_t N, int64_t K, int threads)
{{
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {{
        const int8_t* w = codes + n * K;
        int32_t d[{max_rows}];
#ifdef LOWBIT_AVX2
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
        __m256i vi[4];
        for (int r = 0; r < MT; r++) vi[r] = _mm256_setzero_si256();
        for (int64_t c = 0; c < G / 32; c++) {{
            const __m128i q = _mm_loadu_si128((const __m128i*)(b + c * 16));
            const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low4), _mm_and_si128(q, low4));
            for (int r = 0; r < MT; r++) {{
                const __m256i p = _mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i*)(xq + r * K + g * G + c * 32)));
                vi[r] = _mm256_add_epi32(vi[r], _mm256_madd_epi16(p, ones));
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
    return (f"format {fmt}: generated CPU kernels exist for int8, and int4 and NF4 group-wise weights (group a "
            "multiple of 16), and 2:4 + int8 (s24+int8)")


def kernel_name(fmt: str) -> str:
    return "lowbit_cpu_" + fmt.replace("-", "_").replace("+", "_")


def source(fmt: str) -> str:
    """The C source of the kernel for ``fmt`` (readable; dumped beside the Triton kernels)."""
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
    if f.kind == "sparse":
        body = _S24_INT8.format(name=name, max_rows=MAX_ROWS)
    elif f.bits == 8:
        body = _INT8.format(name=name, max_rows=MAX_ROWS)
    else:
        if f.kind == "nf4":
            decode = _DECODE_TABLE.format(name=name, values=", ".join(f"{float(v)!r}f" for v in NF4_GRID))
            zero_expr = "0.0f"
        else:
            decode = _DECODE_INT.format(name=name)
            zero_expr = "(float)zp[g]" if f.has_zero_points else "8.0f"
        body = _INT4.format(name=name, group=f.group_size, max_rows=MAX_ROWS, decode_defs=decode, zero_expr=zero_expr,
                            zero_row="zero + n * groups" if f.has_zero_points else "0")
    return f"/* lowbit generated CPU kernel: {fmt} weights, float32 rows (M <= {MAX_ROWS}) */\n" + _PRELUDE + body


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


def kernel(fmt: str, portable: bool = False):
    """The compiled kernel for ``fmt`` (a ctypes function), or None (reason logged once).
    ``portable=True`` builds for the compiler's default target instead of the host's ISA."""
    if os.environ.get(ENV, "1") == "0":
        _note(f"turned off by {ENV}=0; torch's packed CPU kernels run instead")
        return None
    return _build(fmt, portable)


@functools.lru_cache(maxsize=None)
def _build(fmt: str, portable: bool):
    why = supported(fmt)
    if why is not None:
        return None
    pointers = 3 if fmt == W8A8 else 7
    return build(kernel_name(fmt), source(fmt), [ctypes.c_void_p] * pointers + [ctypes.c_int64] * 3 + [ctypes.c_int],
                 "torch's packed CPU kernels run instead", what=f"the {fmt} kernel", portable=portable)


def build(name: str, text: str, argtypes: list, fallback: str = "torch's packed CPU kernels run instead",
          what: str | None = None, portable: bool = False,
          extra_flags: tuple[str, ...] = ()) -> "ctypes._CFuncPtr | None":
    """Compile ``text`` (C defining the function ``name``) at first use, cached on disk by a hash
    of source, compiler, flags and host flags; the ctypes function, or None (why logged once,
    naming ``fallback``: what runs instead). The mechanism every generated CPU kernel uses (this
    module's, ``cpu_sparse.py``'s and ``kv_cpu.py``'s). ``portable`` builds for the compiler's
    default target instead of the host's ISA; ``extra_flags`` are appended (``portable=True,
    extra_flags=("-mavx2", "-mfma")`` builds an AVX2 host's code on any machine that runs it: the
    tests use it to check the AVX2 branch on an AVX-512 host)."""
    compiler = _compiler()
    if compiler is None:
        _note(f"no C compiler on PATH (gcc/cc/clang, or $CC); {fallback}")
        return None
    flags = (PORTABLE_FLAGS if portable else FLAGS) + tuple(extra_flags)
    key = hashlib.sha256("\n".join([text, compiler, " ".join(flags), platform.machine(), _host_flags()])
                         .encode()).hexdigest()[:20]
    lib = _cache_dir() / f"{name}_{key}.so"
    if not lib.exists():
        with tempfile.TemporaryDirectory() as tmp:
            src = pathlib.Path(tmp) / "kernel.c"
            src.write_text(text)
            out = pathlib.Path(tmp) / "kernel.so"
            result = subprocess.run([compiler, *flags, str(src), "-o", str(out)], capture_output=True, text=True)
            if result.returncode != 0:
                _note(f"compiling {what or name} with {compiler} failed ({result.stderr.strip()[:300]}); {fallback}")
                return None
            os.replace(out, lib)  # atomic: concurrent processes never load a half-written library
    fn = getattr(ctypes.CDLL(str(lib)), name)
    fn.restype = None
    fn.argtypes = argtypes
    return fn


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


def linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           bias: torch.Tensor | None, fmt: str, in_features: int, portable: bool = False,
           int8_activations: bool = False) -> torch.Tensor | None:
    """``x[M, K] @ dequantize(W).T + bias`` in float32 by the generated kernel, or None when it
    does not apply (no kernel, too many rows, padded K): the caller runs torch's kernels.
    ``int8_activations=True`` (int4 only) runs the kernel that quantizes x per group to int8 first
    (lossy: see docs/codegen.md)."""
    if int8_activations and not bool(torch.isfinite(x).all()):
        int8_activations = False  # an inf or NaN has no int8 code: the float kernel propagates it
    key = fmt + A8 if int8_activations else fmt
    fn = kernel(key, portable)
    rows = x.shape[0]
    if fn is None or rows > MAX_ROWS or qweight.device.type != "cpu":
        return None
    k = in_features
    f = WeightFormat.parse(fmt)
    if f.padded_k(k) != k:
        return None
    if scale.dtype != torch.bfloat16:
        return None
    n = scale.shape[0]
    # every tensor whose pointer the kernel gets is held by a local until the call returns
    x32 = x.to(torch.float32).contiguous()
    codes, scales = qweight.contiguous(), scale.contiguous().view(torch.int16)
    zeros = None if zero is None else zero.contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    y = torch.empty(rows, n, dtype=torch.float32)
    groups = k // (f.group_size or k)
    scratch = torch.empty(rows * (k + groups) if f.kind in ("int", "nf4") and f.bits == 4 else 1, dtype=torch.float32)
    calls[kernel_name(key)] += 1
    fn(x32.data_ptr(), codes.data_ptr(), scales.data_ptr(), _ptr(zeros), _ptr(b), y.data_ptr(), scratch.data_ptr(),
       rows, n, k, torch.get_num_threads())
    return y


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, portable: bool = False) -> torch.Tensor | None:
    """``x[M, K] @ weight[N, K].T`` for int8 codes in int32 (exact; what ``torch._int_mm`` gives)
    by the generated W8A8 kernel, or None when it does not apply (no kernel, too many rows, not the
    CPU, an activation code of -128, which the kernel's sign trick cannot take)."""
    fn = kernel(W8A8, portable)
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
