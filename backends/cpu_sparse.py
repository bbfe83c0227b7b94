"""Generated CPU kernel for activation-sparse decode: a GEMV that reads only the weight rows of the
inputs a threshold kept (TEAL / CATS / WINA, ``lowbit::sparse_input_linear``).

Why a K-major copy: in our storage (``formats.py``) a weight is [N, K], so the K codes one input
multiplies are spread over N rows; skipping an input saves nothing there. The kernel reads a
transposed copy made once per weight (:func:`kmajor_cpu`, cached by identity like
``cpu_kernels.prepack``): codes [K, Np] int8 or [K, Np/2] uint8 (int4), scales bf16 [groups, Np]
(int8: [1, Np]) and zero points uint8 [groups, Np] (asymmetric int4), ``Np`` = N rounded up to
``TW`` = 128 columns (padding columns have zero scales; their outputs are dropped). Input ``k`` is
one contiguous row; a zero input is a row never fetched, so at 50 % sparsity half the code bytes
are read. This is TEAL's column-major GEMV, with low-bit codes and their scales fused in.

int4 rows are cut in chunks of 32 columns (16 bytes): byte ``j`` holds column ``j`` in its low
nibble and column ``16 + j`` in its high nibble, so one 16-byte load widens to 16 lanes of each
(AVX-512) or two 8-byte loads to 8 lanes (AVX2).

The computation (:data:`_SOURCE`):

1. compact the nonzero inputs into (index, value) lists, per scale group (AVX-512: a compare and
   two compresses per 16 inputs; AVX2: a compare and a permutation looked up by its mask per 8), with
   each group's sum of inputs (zero points);
2. threads over tasks = ranges of the kept inputs (int8) or of the scale groups (int4), one per
   thread, so each thread reads whole K-major rows (partial sums added after; :func:`ksplit_for`
   says why), x ranges of output tiles of ``TW`` columns (the threads split the columns instead
   when int4 has fewer groups than threads); per task and group, the tile's
   accumulators stay in registers (8 zmm with AVX-512; two halves of 8 ymm with AVX2) while the
   kept rows stream through them (one broadcast ``x_k``, ``TW`` widened codes, FMAs; the row
   ``PF`` ahead prefetched); then ``out += s * (acc - z * sum_g x)`` (int8: one group, the
   per-channel scale applied once at the end). Groups whose inputs were all zeroed are skipped.
   int4 tasks at least ``STREAM_TILES`` tiles wide (gate/up, N in the thousands) on AVX-512, with
   one thread, read each kept row once, front to back, into float accumulators of the task's
   columns in L1, the row ``STREAM_PF`` kept rows on prefetched whole: the tile sweep reads such
   rows as dozens of 64-byte pieces far apart, which the prefetchers follow badly (measured 0.76 ->
   0.89x dense on 4864x896 at 50 %, one thread). With two threads the sweep is faster (its
   accumulators stay in registers; the row-by-row loop loads and stores them in L1 for every 32
   codes and is compute-bound: 11264 x 2048 at 50 %, 2 threads, cold: 0.62 ms against 1.00).

With AVX-512 VNNI (``sp_vnni_task``, int4 and int8): integer dot products instead of the float FMAs.
After the compaction, each group's kept inputs are quantized into three int8 parts (x ~ s (h + m /
254 + l / 254^2), s = the group's largest |x| / 127; vectorised, ``sp_quads``: within s / 2^17 of x,
104-138 dB against float64 measured) and listed in quads (the count padded to a multiple of 4 with a
kept row times 0). Per chunk of 16 kept rows and tile, the four rows of a quad are split into
nibbles and interleaved (vpunpck) so each 32-bit lane holds one column's four codes: one
``vpdpbusd`` per part per 16 columns; the two nibble halves in separate passes (12 accumulators: 24
in one pass spilled); the lanes, a 4 x 4 transpose of 128-bit blocks of the tile's columns, are put
back in order in registers before the scales. Why: on the Zen 4 host the float path was bound by its
arithmetic (about 7 vector ops per 32 codes against the dense kernel's 2), and from memory it read
the kept rows at 0.85-0.88x the dense kernel's time for half the bytes; with the integer path, per
call from memory at 50 %, the stacked gate.up runs at 1.28-1.50x the dense kernel, q.k.v at 1.2x, o
at 1.05-1.2x and down at 0.8-0.9x (its K-major rows are 1 kB: short runs, where the dense kernel
streams 2.8 kB rows). int8 runs the same interleave over the tile's two 64-column lines; its signed
codes go in as code + 128 (vpdpbusd multiplies unsigned by signed bytes) with the accumulators
started at -128 x the chunk's sum of each part, so they are the exact integer dot products: about
2.4x fewer vector ops per code byte than its float path (int8 on the VNNI path has not been timed:
the hosts this was written on since lacked AVX-512). A kept x that is not finite (integer parts
cannot carry it) runs the float path for that call. tests/backends/test_cpu_sparse_emulated.py
builds these paths against SIMDe's portable AVX-512 on any x86 host and checks them against float64.

The ISA is chosen at compile time (``-march=native``, the host flags in the cache key): AVX-512F,
else AVX2 + FMA, else fixed-width loops the compiler vectorises for whatever it has. The tests
build all three on an AVX-512 host (:func:`kernel` ``isa=``).

Dispatch by measurement (:func:`max_kept`): skipping rows pays only below some fraction of kept
inputs, which depends on the shape, the format, the ISA and the dense kernel it competes with. At
the first call for a (format, N, K, threads) the kernel and the dense generated kernel are timed
on that weight (interleaved, minimum of a few calls; sparse at all and at a quarter of the inputs
kept, a straight line in between) and the crossover is cached on disk
(``$LOWBIT_CACHE_DIR/cpu/sparse_dispatch.json``, keyed by both kernels' sources and the host
flags). A call keeping more inputs than that gets -1 from the kernel right after the compaction
and runs the dense kernel on the thresholded input (counted in :data:`dispatch_counter`, logged
once per shape); the compress/compile summary's layer record says which kernel the layer's target
sparsity gets and why, written by the layer's site when it decides (``SparseInputGroup.limit``, then its
in-model trial: :class:`SiteTrial`). ``LOWBIT_SPARSE_DISPATCH=sparse`` (always the
sparse kernel) / ``dense`` (never) override the measurement.

One row only (decode); more rows return None and the caller runs the dense kernels on the
thresholded input. Compiled like ``cpu_codegen`` (``cpu_codegen.build``: gcc at first use, disk
cache, logged fallback); ``LOWBIT_CPU_CODEGEN=0`` turns it off.
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import functools
import math
import logging
import os
import weakref

import torch

from lowbit_compiler.backends import cpu_codegen, cpu_dispatch, cpu_kernels
from lowbit_compiler.formats import WeightFormat, _unpack
from lowbit_compiler.identity_cache import IdentityCache

log = logging.getLogger("lowbit_compiler")

TW = 128    # output columns per task of the CPU kernel (its accumulators fit the registers)
PFD = 2  # prefetch distance along a row, in tiles
STREAM_TILES = 8  # int4 tasks this many tiles wide (or wider) read each kept row once, front to back
CHUNK = {8: 8, 4: 32}  # kept rows per sweep over a task's column tiles, by code bits (module docstring)
# (float paths; int8 8 rows rather than 16: per call from memory at 50 % kept, Zen 3 AVX2, two threads,
# alternating runs: o 1.35-1.39x against 1.13-1.45x dense, down 1.38-1.48x / 1.23-1.34x, q.k.v
# 1.57-1.76x / 1.40-1.53x, gate.up 1.80-1.87x / 1.48-1.58x; int4 at 16 lost on all but gate.up)
TILE = 512  # column tile of the int4 nibble layout of :func:`kmajor` (the Triton GEMV's copy)
DISPATCH_ENV = "LOWBIT_SPARSE_DISPATCH"  # "measure" (default), "sparse" (always), "dense" (never)
ISAS = {"native": None, "avx2": ("-mno-avx512f",), "portable": ()}  # extra flags; () = the compiler's default target
_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#define SP_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SP_AVX2 1
#endif

#define TW {tw}          /* output columns whose accumulators stay in registers */
#define GROUP {group}    /* input channels per scale group (int8: 0 = one group, K) */
#define CHUNK {chunk}    /* kept rows per sweep over the task's column tiles */
#define BITS {bits}
#define HAS_ZERO {has_zero}
#define TB (TW * BITS / 8)  /* bytes of one row of a tile */
#if defined(SP_AVX512) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && TW == 128
#define SP_VNNI 1         /* integer dot products (vpdpbusd) over quads of kept rows, sp_vnni_task */
#endif
#define VCH 16            /* VNNI path: kept rows (a multiple of 4) per sweep over a task's tiles */
#define SP_RN (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)  /* a literal: clang's roundscale is a macro */
#define PFD {pfd}         /* prefetch distance in tiles along a row */
#define STREAM_TILES {stream_tiles}  /* int4 tasks at least this many tiles wide read row by row */
#define STREAM_PF 4       /* kept rows ahead that the row-by-row path prefetches */

{rms_norm_row}
#ifdef SP_AVX2
/* sp_pack8[mask]: byte j = the position of the j-th set bit of the 8-bit mask (AVX2 left-pack) */
static const uint64_t sp_pack8[256] = {{{pack8}}};
{hsum256}#endif
static inline float sp_bf16(uint16_t h) {{ uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }}

/* Compact the kept inputs: idx[p], xv[p] for p < nnz, in order; gstart[g] = first p of group g
   (gstart[groups] = nnz); xs[g] = sum of the group's kept inputs (int4 zero points). Returns nnz.
   thr == NULL: x is already thresholded, every nonzero input is kept. Else the threshold is applied
   here (lowbit::act_sparsify): input k is kept when |x_k| (* cs[k], WINA) >= thr[k * thr_stride]
   and x_k != 0 (a NaN score is not kept, as torch.where's comparison); xs_out (when not NULL)
   receives the thresholded row, what the dense kernel reads when the call has too many kept. */
static int64_t sp_compact(const float* x, int64_t K, int64_t G, int32_t* idx, float* xv, int64_t* gstart, float* xs,
                          const float* thr, int64_t thr_stride, const float* cs, float* xs_out)
{{
    const int64_t groups = K / G;
    int64_t nnz = 0;
    for (int64_t g = 0; g < groups; g++) {{
        gstart[g] = nnz;
        float t = 0.0f;
        int64_t k = g * G;
#ifdef SP_AVX512
        const __m512i step = _mm512_set1_epi32(16);
        __m512i iota = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                        _mm512_set1_epi32((int32_t)k));
        __m512 tv = _mm512_setzero_ps();
        for (; k + 16 <= (g + 1) * G; k += 16) {{
            const __m512 v = _mm512_loadu_ps(x + k);
            __mmask16 m = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
            if (thr) {{
                __m512 score = _mm512_abs_ps(v);
                if (cs)
                    score = _mm512_mul_ps(score, _mm512_loadu_ps(cs + k));
                const __m512 tk = thr_stride ? _mm512_loadu_ps(thr + k) : _mm512_set1_ps(thr[0]);
                m &= _mm512_cmp_ps_mask(score, tk, _CMP_GE_OQ);
                if (xs_out)
                    _mm512_storeu_ps(xs_out + k, _mm512_maskz_mov_ps(m, v));
            }}
            _mm512_storeu_ps(xv + nnz, _mm512_maskz_compress_ps(m, v));
            _mm512_storeu_si512((void*)(idx + nnz), _mm512_maskz_compress_epi32(m, iota));
            nnz += __builtin_popcount((unsigned)m);
            tv = _mm512_mask_add_ps(tv, m, tv, v);
            iota = _mm512_add_epi32(iota, step);
        }}
        t = _mm512_reduce_add_ps(tv);
#elif defined(SP_AVX2)
        /* the same, 8 inputs per step: the kept lanes moved to the front by a permutation looked up
           by the compare's bit mask (sp_pack8) */
        const __m256i step = _mm256_set1_epi32(8);
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        __m256i iota = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int32_t)k));
        __m256 tv = _mm256_setzero_ps();
        for (; k + 8 <= (g + 1) * G; k += 8) {{
            const __m256 v = _mm256_loadu_ps(x + k);
            __m256 m = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NEQ_UQ);
            if (thr) {{
                __m256 score = _mm256_and_ps(v, absmask);
                if (cs)
                    score = _mm256_mul_ps(score, _mm256_loadu_ps(cs + k));
                const __m256 tk = thr_stride ? _mm256_loadu_ps(thr + k) : _mm256_set1_ps(thr[0]);
                m = _mm256_and_ps(m, _mm256_cmp_ps(score, tk, _CMP_GE_OQ));
                if (xs_out)
                    _mm256_storeu_ps(xs_out + k, _mm256_and_ps(m, v));
            }}
            const int bits = _mm256_movemask_ps(m);
            const __m256i perm = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)sp_pack8[bits]));
            _mm256_storeu_ps(xv + nnz, _mm256_permutevar8x32_ps(v, perm));
            _mm256_storeu_si256((__m256i*)(idx + nnz), _mm256_permutevar8x32_epi32(iota, perm));
            nnz += __builtin_popcount((unsigned)bits);
            tv = _mm256_add_ps(tv, _mm256_and_ps(m, v));
            iota = _mm256_add_epi32(iota, step);
        }}
        t = hsum256(tv);
#endif
        for (; k < (g + 1) * G; k++) {{
            int keep = x[k] != 0.0f;  /* NaN != 0: kept */
            if (thr) {{
                const float score = fabsf(x[k]) * (cs ? cs[k] : 1.0f);
                keep = x[k] != 0.0f && score >= thr[k * thr_stride];
                if (xs_out)
                    xs_out[k] = keep ? x[k] : 0.0f;
            }}
            if (keep) {{
                idx[nnz] = (int32_t)k;
                xv[nnz++] = x[k];
                t += x[k];
            }}
        }}
        xs[g] = t;
    }}
    gstart[groups] = nnz;
    return nnz;
}}

/* Kept rows [a, b) times the TW columns of one tile whose bytes start at c0 in every row:
   o[0 .. TW) += acc (int8), or += s * (acc - z * xg) with the group's scales sc and zero points zp
   (int4). The same tile of the next row is prefetched one tile ahead (the next tile pass). */
static inline void sp_tile(const int32_t* idx, const float* xv, int64_t a, int64_t b, const {code_t}* codes,
                           int64_t row, int64_t c0, float* o, const uint16_t* sc, const uint8_t* zp, float xg,
                           int64_t pf_shift, int64_t pf_c, int64_t pmax)
{{
    /* prefetch: for row p, tile bytes pf_c of kept row p + pf_shift (the same row PFD tiles on, or,
       near the end of the task's tiles, the row of the next chunk: one stream across chunks) */
#define SP_PF(p, l) _mm_prefetch((const char*)(codes + (int64_t)idx[(p) + pf_shift < pmax ? (p) + pf_shift : pmax - 1] * row \
                                               + pf_c + (l)), _MM_HINT_T0)
    (void)sc; (void)zp; (void)xg;
#if defined(SP_AVX512)
    __m512 acc[TW / 16];
    for (int i = 0; i < TW / 16; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t p = a; p < b; p++) {{
        const {code_t}* r = codes + (int64_t)idx[p] * row + c0;
        for (int l = 0; l < TB; l += 64)
            SP_PF(p, l);
        const __m512 xb = _mm512_set1_ps(xv[p]);
#if BITS == 8
        for (int i = 0; i < TW / 16; i++)
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r + 16 * i)))),
                                     xb, acc[i]);
#else
        const __m512i low4 = _mm512_set1_epi32(15);
        for (int c = 0; c < TW / 32; c++) {{
            const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(r + 16 * c)));
            acc[2 * c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(w, low4)), xb, acc[2 * c]);
            acc[2 * c + 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 4)), xb, acc[2 * c + 1]);
        }}
#endif
    }}
#if BITS == 8
    for (int i = 0; i < TW / 16; i++)
        _mm512_storeu_ps(o + 16 * i, _mm512_add_ps(_mm512_loadu_ps(o + 16 * i), acc[i]));
#else
    const __m512 xgv = _mm512_set1_ps(xg);
    for (int i = 0; i < TW / 16; i++) {{
        const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(sc + 16 * i))), 16));
#if HAS_ZERO
        const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(zp + 16 * i))));
#else
        const __m512 z = _mm512_set1_ps(8.0f);
#endif
        _mm512_storeu_ps(o + 16 * i, _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, xgv, acc[i]), _mm512_loadu_ps(o + 16 * i)));
    }}
#endif
#elif defined(SP_AVX2)
    for (int h = 0; h < TW; h += 64) {{  /* halves of 64 columns: 8 accumulators of the 16 registers */
        __m256 acc[8];
        for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t p = a; p < b; p++) {{
            const {code_t}* r = codes + (int64_t)idx[p] * row + c0 + h * BITS / 8;
            SP_PF(p, h * BITS / 8);
            const __m256 xb = _mm256_set1_ps(xv[p]);
#if BITS == 8
            for (int i = 0; i < 8; i++)
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(r + 8 * i)))),
                                         xb, acc[i]);
#else
            const __m256i low4 = _mm256_set1_epi32(15);
            for (int c = 0; c < 2; c++)       /* a chunk: 16 bytes = 32 columns (low: 0-15, high: 16-31) */
                for (int e = 0; e < 2; e++) {{ /* bytes 8e .. 8e+7: columns 8e.. (low), 16+8e.. (high) */
                    const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(r + 16 * c + 8 * e)));
                    acc[4 * c + e] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(w, low4)), xb, acc[4 * c + e]);
                    acc[4 * c + 2 + e] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 4)), xb, acc[4 * c + 2 + e]);
                }}
#endif
        }}
        float* oh = o + h;
#if BITS == 8
        for (int i = 0; i < 8; i++)
            _mm256_storeu_ps(oh + 8 * i, _mm256_add_ps(_mm256_loadu_ps(oh + 8 * i), acc[i]));
#else
        const __m256 xgv = _mm256_set1_ps(xg);
        for (int i = 0; i < 8; i++) {{
            const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(sc + h + 8 * i))), 16));
#if HAS_ZERO
            const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(zp + h + 8 * i))));
#else
            const __m256 z = _mm256_set1_ps(8.0f);
#endif
            _mm256_storeu_ps(oh + 8 * i, _mm256_fmadd_ps(s, _mm256_fnmadd_ps(z, xgv, acc[i]), _mm256_loadu_ps(oh + 8 * i)));
        }}
#endif
    }}
#else   /* portable: fixed-width loops the compiler vectorises for the target it has */
    float acc[TW];
    memset(acc, 0, sizeof acc);
    for (int64_t p = a; p < b; p++) {{
        const {code_t}* r = codes + (int64_t)idx[p] * row + c0;
        const float xb = xv[p];
#if BITS == 8
        for (int j = 0; j < TW; j++)
            acc[j] += xb * (float)r[j];
#else
        for (int c = 0; c < TW / 32; c++)
            for (int j = 0; j < 16; j++) {{
                acc[32 * c + j] += xb * (float)(r[16 * c + j] & 15);
                acc[32 * c + 16 + j] += xb * (float)(r[16 * c + j] >> 4);
            }}
#endif
    }}
#if BITS == 8
    for (int j = 0; j < TW; j++)
        o[j] += acc[j];
#else
    for (int j = 0; j < TW; j++)
        o[j] += sp_bf16(sc[j]) * (acc[j] - (HAS_ZERO ? (float)zp[j] : 8.0f) * xg);
#endif
#endif
}}

#ifdef SP_VNNI
/* The kept inputs of each scale group as quads for vpdpbusd: q4idx / the three int8 parts q4x
   ([3][stride]) / q4start [groups + 1], each group's count padded to a multiple of 4 with its first
   kept row and x = 0; q4s[g] = the group's step s (x ~ s (h + m / 254 + l / 254^2): h = round(x /
   s), |x / s - h| <= 1/2, so m = round(254 (x / s - h)) and likewise l fit in [-127, 127] without
   clamping, and x is within s / (2 254^2) < s / 2^17 = 2^-24 of the group's largest |x|; steps
   of 1/256 could round the remainder to 128, which int8 cannot hold: up to s / 1024 off). Sixteen
   inputs per vector step (a masked tail). Returns 0 when a kept x is not finite (integer parts
   cannot carry it: the float path runs). */
static int sp_quads(const int32_t* idx, const float* xv, const int64_t* gstart, int64_t groups, int64_t stride,
                    int32_t* q4idx, int8_t* q4x, int64_t* q4start, float* q4s)
{{
    const __m512 big = _mm512_set1_ps(3.4028234663852886e38f), lo = _mm512_set1_ps(-127.0f),
                 hi = _mm512_set1_ps(127.0f);
    int64_t p = 0;
    for (int64_t g = 0; g < groups; g++) {{
        const int64_t c0 = gstart[g], c1 = gstart[g + 1];
        __m512 am = _mm512_setzero_ps();
        for (int64_t i = c0; i < c1; i += 16) {{
            const __mmask16 m = c1 - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (c1 - i)) - 1);
            const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(m, xv + i));
            if ((__mmask16)(_mm512_cmp_ps_mask(a, big, _CMP_LE_OQ) & m) != m)  /* inf or NaN */
                return 0;
            am = _mm512_max_ps(am, a);
        }}
        const float amax = _mm512_reduce_max_ps(am);
        const float st = amax > 0.0f ? amax / 127.0f : 1.0f, inv = 1.0f / st;
        const __m512 vinv = _mm512_set1_ps(inv), vinv2 = _mm512_set1_ps(inv * 254.0f),
                     vinv3 = _mm512_set1_ps(inv * 64516.0f), vst = _mm512_set1_ps(st),
                     vst2 = _mm512_set1_ps(st / 254.0f);
        q4start[g] = p;
        q4s[g] = st;
        for (int64_t i = c0; i < c1; i += 16) {{
            const int64_t n = c1 - i >= 16 ? 16 : c1 - i;
            const __mmask16 m = (__mmask16)((1u << n) - 1);
            const __m512 v = _mm512_maskz_loadu_ps(m, xv + i);
            const __m512 h = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_mul_ps(v, vinv), SP_RN), lo), hi);
            const __m512 r1 = _mm512_fnmadd_ps(h, vst, v);
            const __m512 md = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_mul_ps(r1, vinv2), SP_RN), lo), hi);
            const __m512 r2 = _mm512_fnmadd_ps(md, vst2, r1);
            const __m512 l = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_mul_ps(r2, vinv3), SP_RN), lo), hi);
            _mm512_mask_cvtsepi32_storeu_epi8(q4x + p, m, _mm512_cvtps_epi32(h));
            _mm512_mask_cvtsepi32_storeu_epi8(q4x + stride + p, m, _mm512_cvtps_epi32(md));
            _mm512_mask_cvtsepi32_storeu_epi8(q4x + 2 * stride + p, m, _mm512_cvtps_epi32(l));
            _mm512_mask_storeu_epi32(q4idx + p, m, _mm512_maskz_loadu_epi32(m, idx + i));
            p += n;
        }}
        while ((p - q4start[g]) & 3) {{  /* pad: a kept row again, times 0 */
            q4idx[p] = idx[c0];
            q4x[p] = q4x[stride + p] = q4x[2 * stride + p] = 0;
            p++;
        }}
    }}
    q4start[groups] = p;
    return 1;
}}

/* Tiles [t0, t1) x the groups [g0, g1) (the quads [qlo, qhi) of them) by quads of kept rows: per
   chunk of VCH rows, tile and pass, the four rows' 64-byte lines are interleaved (vpunpck) so each
   32-bit lane holds one column's four codes, times the quad's x parts (vpdpbusd: u8 codes x s8
   parts), 12 accumulators per pass. int4: the two passes are the line's nibble halves (24
   accumulators in one pass spilled); int8: the tile's two 64-column lines, the signed codes + 128
   (vpdpbusd takes them unsigned; the accumulators start at -128 x the chunk's sum of each part, so
   they hold the exact integer dot products). The accumulators hold the pass's columns as a 4 x 4
   transpose of 128-bit lanes: undone in registers, then o += s (h + m / 254 + l / 254^2) (int8:
   the per-channel scale applies once at the end) or o += s_col * (that - z_col * sum_g x) (int4:
   the zero-point term with the group's first chunk). */
static void sp_vnni_task(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, float* o, int64_t Np,
                         int64_t row, int64_t t0, int64_t t1, int64_t g0, int64_t g1, int64_t qlo, int64_t qhi,
                         const int32_t* q4idx, const int8_t* q4x, int64_t stride, const int64_t* q4start,
                         const float* q4s, const float* xs)
{{
#if BITS == 4
    const __m512i m4 = _mm512_set1_epi8(15);
#else
    const __m512i flip = _mm512_set1_epi8((char)0x80);
#endif
    for (int64_t g = g0; g < g1; g++) {{
        const __m512 sv = _mm512_set1_ps(q4s[g]), sv2 = _mm512_set1_ps(q4s[g] / 254.0f),
                     sv3 = _mm512_set1_ps(q4s[g] / 64516.0f), sumv = _mm512_set1_ps(xs[g]);
        (void)sumv;
        const int64_t qa = q4start[g] > qlo ? q4start[g] : qlo, qb = q4start[g + 1] < qhi ? q4start[g + 1] : qhi;
        for (int64_t a0 = qa; a0 < qb; a0 += VCH) {{
            const int64_t a1 = a0 + VCH < qb ? a0 + VCH : qb;
#if BITS == 8
            int32_t ch = 0, cm = 0, cl = 0;  /* the chunk's sums of the parts: the codes' +128 taken out */
            for (int64_t q = a0; q < a1; q++) {{
                ch += q4x[q];
                cm += q4x[stride + q];
                cl += q4x[2 * stride + q];
            }}
            const __m512i ih = _mm512_set1_epi32(-128 * ch), im = _mm512_set1_epi32(-128 * cm),
                          il = _mm512_set1_epi32(-128 * cl);
#else
            const __m512i ih = _mm512_setzero_si512(), im = ih, il = ih;
#endif
            for (int64_t tile = t0; tile < t1; tile++) {{
                for (int pass = 0; pass < 2; pass++) {{
                    const int64_t line = BITS == 8 ? 64 * pass : 0;  /* int8: the tile's second 64 columns */
                    const uint8_t* b = codes + tile * TB + line;
                    const int64_t pf = (tile + PFD < t1 ? tile + PFD : tile) * TB + line;
                    __m512i ah[4], am[4], al[4];
                    for (int i = 0; i < 4; i++) {{
                        ah[i] = ih;
                        am[i] = im;
                        al[i] = il;
                    }}
                    for (int64_t q = a0; q < a1; q += 4) {{
                        const int64_t o0 = (int64_t)q4idx[q] * row, o1 = (int64_t)q4idx[q + 1] * row,
                                      o2 = (int64_t)q4idx[q + 2] * row, o3 = (int64_t)q4idx[q + 3] * row;
                        __m512i r0 = _mm512_loadu_si512(b + o0), r1 = _mm512_loadu_si512(b + o1);
                        __m512i r2 = _mm512_loadu_si512(b + o2), r3 = _mm512_loadu_si512(b + o3);
                        if (BITS == 8 || pass == 0) {{  /* int4's second pass reads the same line */
                            _mm_prefetch((const char*)(codes + pf + o0), _MM_HINT_T0);
                            _mm_prefetch((const char*)(codes + pf + o1), _MM_HINT_T0);
                            _mm_prefetch((const char*)(codes + pf + o2), _MM_HINT_T0);
                            _mm_prefetch((const char*)(codes + pf + o3), _MM_HINT_T0);
                        }}
#if BITS == 8
                        r0 = _mm512_xor_si512(r0, flip); r1 = _mm512_xor_si512(r1, flip);
                        r2 = _mm512_xor_si512(r2, flip); r3 = _mm512_xor_si512(r3, flip);
#else
                        if (pass == 1) {{
                            r0 = _mm512_srli_epi16(r0, 4); r1 = _mm512_srli_epi16(r1, 4);
                            r2 = _mm512_srli_epi16(r2, 4); r3 = _mm512_srli_epi16(r3, 4);
                        }}
                        r0 = _mm512_and_si512(r0, m4); r1 = _mm512_and_si512(r1, m4);
                        r2 = _mm512_and_si512(r2, m4); r3 = _mm512_and_si512(r3, m4);
#endif
                        const __m512i a = _mm512_unpacklo_epi8(r0, r1), bb = _mm512_unpackhi_epi8(r0, r1);
                        const __m512i c = _mm512_unpacklo_epi8(r2, r3), d = _mm512_unpackhi_epi8(r2, r3);
                        const __m512i qq[4] = {{_mm512_unpacklo_epi16(a, c), _mm512_unpackhi_epi16(a, c),
                                                _mm512_unpacklo_epi16(bb, d), _mm512_unpackhi_epi16(bb, d)}};
                        const __m512i xh = _mm512_set1_epi32(*(const int32_t*)(q4x + q));
                        const __m512i xm = _mm512_set1_epi32(*(const int32_t*)(q4x + stride + q));
                        const __m512i xl = _mm512_set1_epi32(*(const int32_t*)(q4x + 2 * stride + q));
                        for (int i = 0; i < 4; i++) {{
                            ah[i] = _mm512_dpbusd_epi32(ah[i], qq[i], xh);
                            am[i] = _mm512_dpbusd_epi32(am[i], qq[i], xm);
                            al[i] = _mm512_dpbusd_epi32(al[i], qq[i], xl);
                        }}
                    }}
                    __m512 f[4];
                    for (int i = 0; i < 4; i++)
                        f[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ah[i]), sv, _mm512_fmadd_ps(
                            _mm512_cvtepi32_ps(am[i]), sv2, _mm512_mul_ps(_mm512_cvtepi32_ps(al[i]), sv3)));
                    /* accumulator i, 128-bit lane L, element e: int4: column 32 L + 16 pass + 4 i + e of
                       the tile (byte j of a 16-byte chunk holds columns j and 16 + j); int8: 64 pass + 16 L
                       + 4 i + e */
                    const __m512 u0 = _mm512_shuffle_f32x4(f[0], f[1], 0x44), u1 = _mm512_shuffle_f32x4(f[0], f[1], 0xEE);
                    const __m512 u2 = _mm512_shuffle_f32x4(f[2], f[3], 0x44), u3 = _mm512_shuffle_f32x4(f[2], f[3], 0xEE);
                    const __m512 v[4] = {{_mm512_shuffle_f32x4(u0, u2, 0x88), _mm512_shuffle_f32x4(u0, u2, 0xDD),
                                         _mm512_shuffle_f32x4(u1, u3, 0x88), _mm512_shuffle_f32x4(u1, u3, 0xDD)}};
                    for (int L = 0; L < 4; L++) {{  /* 16 consecutive columns of the tile */
#if BITS == 8
                        const int64_t col = tile * TW + 64 * pass + 16 * L;
                        _mm512_storeu_ps(o + col, _mm512_add_ps(v[L], _mm512_loadu_ps(o + col)));
#else
                        const int64_t col = tile * TW + 32 * L + 16 * pass;
                        __m512 acc = v[L];
                        if (a0 == q4start[g]) {{
#if HAS_ZERO
                            const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                _mm_loadu_si128((const __m128i*)(zero + g * Np + col))));
#else
                            const __m512 z = _mm512_set1_ps(8.0f);
#endif
                            acc = _mm512_fnmadd_ps(z, sumv, acc);
                        }}
                        const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(
                            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(scale + g * Np + col))), 16));
                        _mm512_storeu_ps(o + col, _mm512_fmadd_ps(sc, acc, _mm512_loadu_ps(o + col)));
#endif
                    }}
                }}
            }}
        }}
    }}
    (void)zero; (void)scale; (void)Np;
}}
#endif

/* y[N] = x[K] W^T + bias over the K-major copy (codes [K, Np] int8, or [K, Np/2] uint8 in chunks of
   32 columns; scale bf16 [groups, Np]; zero uint8 [groups, Np] or NULL). Returns the number of
   kept inputs, or -1 without computing anything more when over max_nnz were kept (the dense
   kernel is faster there: the caller runs it). Tasks: ``parts`` contiguous column ranges (whole
   tiles) x ``ksplit`` ranges of the kept inputs (int8) or of the scale groups (int4), about one
   task per thread (``ksplit_for``: usually one range per thread and one column range). Per task,
   the kept rows go in chunks (at most CHUNK rows, within a scale group) and each chunk sweeps the
   task's tiles with the accumulators in registers, so every row is read in full, tile after tile,
   while the task's outputs stay in L1. scratch: int32 idx [K + 16], float xv [K + 16], int64
   gstart [groups + 1], float xs [groups], float out [ksplit * Np].
   Epilogue (as the dense groups' kernels): n_first > 0 stacks a gated MLP's gate (columns
   [0, n_first)) and up ([n_first, 2 n_first)): y[n_first] = silu(gate) * up; res (NULL or [N])
   is added to y (a residual). Prologue: nw non-NULL normalises x first, into xbuf [K]
   (RMSNorm as the dense kernels' _ext entries: x * (1 / sqrt(mean(x^2) + eps)) * nw, the sum of
   squares in double); the threshold then applies to the normalised row. */
int64_t {name}(const float* x, const {code_t}* codes, const uint16_t* scale, const uint8_t* zero,
               const float* bias, float* y, void* scratch, int64_t N, int64_t Np, int64_t K,
               int64_t max_nnz, int64_t ksplit, int threads, const float* thr, int64_t thr_stride,
               const float* cs, float* xs_out, int64_t n_first, const float* res, const float* nw, float eps,
               float* xbuf)
{{
    const int64_t G = GROUP ? GROUP : K, groups = K / G, row = Np * BITS / 8;
    if (nw) {{
        lowbit_rms_norm_row(x, nw, eps, xbuf, K);
        x = xbuf;
    }}
    int32_t* idx = (int32_t*)scratch;
    float* xv = (float*)(idx + K + 16);
    int64_t* gstart = (int64_t*)(xv + K + 16);
    float* xs = (float*)(gstart + groups + 1);
    /* the VNNI path's quads (sp_quads): q4start int64 [groups + 1] (8-byte aligned), q4s float
       [groups], q4idx int32 [stride], q4x int8 [3 stride] (compaction_words counts them) */
    const int64_t stride = K + 4 * groups;
    int64_t* q4start = (int64_t*)(((uintptr_t)(xs + groups) + 7) & ~(uintptr_t)7);
    float* q4s = (float*)(q4start + groups + 1);
    int32_t* q4idx = (int32_t*)(q4s + groups);
    int8_t* q4x = (int8_t*)(q4idx + stride);
    float* out = (float*)(((uintptr_t)(q4x + 3 * stride) + 7) & ~(uintptr_t)7);
    float* acc_all = out + ksplit * Np;  /* the wide tasks' accumulators (int4) */
    (void)acc_all; (void)q4s; (void)q4idx;
    const int64_t nnz = sp_compact(x, K, G, idx, xv, gstart, xs, thr, thr_stride, cs, xs_out);
    if (nnz > max_nnz)
        return -1;
#ifdef SP_VNNI
    const int vnni = sp_quads(idx, xv, gstart, groups, stride, q4idx, q4x, q4start, q4s);
#endif
    /* tasks: parts column ranges x ksplit ranges of the kept inputs, about one per thread */
    const int64_t tiles = Np / TW, want = (threads + ksplit - 1) / ksplit, parts = tiles < want ? tiles : want;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < parts * ksplit; t++) {{
        const int64_t part = t % parts, s = t / parts;
        const int64_t t0 = tiles * part / parts, t1 = tiles * (part + 1) / parts;
        float* o = out + s * Np;
        memset(o + t0 * TW, 0, (size_t)(t1 - t0) * TW * sizeof(float));
        const int64_t g0 = GROUP ? groups * s / ksplit : 0, g1 = GROUP ? groups * (s + 1) / ksplit : 1;
#ifdef SP_VNNI
        if (vnni) {{
            int64_t qlo = 0, qhi = INT64_MAX;  /* int8 (one group) split over ksplit: whole quads */
            if (!GROUP && ksplit > 1) {{
                const int64_t nq = q4start[1] / 4;
                qlo = 4 * (nq * s / ksplit);
                qhi = 4 * (nq * (s + 1) / ksplit);
            }}
            sp_vnni_task((const uint8_t*)codes, scale, zero, o, Np, row, t0, t1, g0, g1, qlo, qhi, q4idx, q4x, stride,
                         q4start, q4s, xs);
            continue;
        }}
#endif
#if BITS == 4 && defined(SP_AVX512)
        if (threads == 1 && t1 - t0 >= STREAM_TILES) {{  /* one thread only: with two the sweep below was faster */
            /* a wide task (gate/up: rows of thousands of columns): each kept row is read once, front
               to back, into L1-resident accumulators of the task's columns, the rows STREAM_PF on
               prefetched whole; the scales apply once per group. AVX-512 only: measured 15 % faster
               than the tile sweep below on gate/up shapes (AVX-512 Xeon, 1 thread); the same loop
               left to the compiler's vectoriser was 40 % slower than the sweep, so AVX2 and the
               portable build keep the sweep. */
            float* am = acc_all + s * Np + t0 * TW;
            const int64_t w = (t1 - t0) * TW, wb = (t1 - t0) * TB;
            for (int64_t g = g0; g < g1; g++) {{
                const int64_t p0 = gstart[g], p1 = gstart[g + 1];
                if (p0 == p1)
                    continue;  /* every input of the group zeroed: its rows are never read */
                memset(am, 0, (size_t)w * sizeof(float));
                for (int64_t p = p0; p < p1; p++) {{
                    const uint8_t* r = (const uint8_t*)codes + (int64_t)idx[p] * row + t0 * TB;
                    if (p + STREAM_PF < nnz) {{
                        const char* q = (const char*)codes + (int64_t)idx[p + STREAM_PF] * row + t0 * TB;
                        for (int64_t l = 0; l < wb; l += 64)
                            __builtin_prefetch(q + l, 0, 3);
                    }}
                    const float xb = xv[p];
                    const __m512 xbv = _mm512_set1_ps(xb);
                    const __m512i low4 = _mm512_set1_epi32(15);
                    for (int64_t c = 0; c < wb / 16; c++) {{
                        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(r + 16 * c)));
                        float* a2 = am + 32 * c;
                        _mm512_storeu_ps(a2, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, low4)), xbv,
                                                             _mm512_loadu_ps(a2)));
                        _mm512_storeu_ps(a2 + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), xbv,
                                                                  _mm512_loadu_ps(a2 + 16)));
                    }}
                }}
                const uint16_t* sc = scale + g * Np + t0 * TW;
                const float xg = xs[g];
                float* og = o + t0 * TW;
#if HAS_ZERO
                const uint8_t* zg = zero + g * Np + t0 * TW;
                #pragma omp simd
                for (int64_t j = 0; j < w; j++)
                    og[j] += sp_bf16(sc[j]) * (am[j] - (float)zg[j] * xg);
#else
                #pragma omp simd
                for (int64_t j = 0; j < w; j++)
                    og[j] += sp_bf16(sc[j]) * (am[j] - 8.0f * xg);
#endif
            }}
            continue;
        }}
#endif
        for (int64_t g = g0; g < g1; g++) {{
            const int64_t p0 = GROUP ? gstart[g] : nnz * s / ksplit, p1 = GROUP ? gstart[g + 1] : nnz * (s + 1) / ksplit;
            /* a group whose inputs were all zeroed has no chunk: its rows are never read */
            for (int64_t a = p0; a < p1; a += CHUNK) {{
                const int64_t b = a + CHUNK < p1 ? a + CHUNK : p1;
                for (int64_t tile = t0; tile < t1; tile++) {{
                    const int64_t ahead = tile + PFD < t1 ? 0 : b - a;  /* past the last tile: the next chunk */
                    const int64_t pf_tile = ahead ? t0 + (tile + PFD - t1) % (t1 - t0) : tile + PFD;
                    sp_tile(idx, xv, a, b, codes, row, tile * TB, o + tile * TW,
                            GROUP ? scale + g * Np + tile * TW : 0, HAS_ZERO ? zero + g * Np + tile * TW : 0,
                            a == p0 ? xs[g] : 0.0f,  /* the zero points' term once per group */
                            ahead, pf_tile * TB, nnz);
                }}
            }}
        }}
    }}
    for (int64_t n = 0; n < N; n++) {{
        float v = out[n];
        for (int64_t s = 1; s < ksplit; s++)
            v += out[s * Np + n];
#if BITS == 8
        v *= sp_bf16(scale[n]);
#endif
        v += bias ? bias[n] : 0.0f;
        if (n_first)
            out[n] = v;  /* the epilogue below reads gate and up */
        else
            y[n] = v + (res ? res[n] : 0.0f);
    }}
    for (int64_t n = 0; n < n_first; n++) {{
        const float g = out[n];
        y[n] = g / (1.0f + expf(-g)) * out[n_first + n] + (res ? res[n] : 0.0f);
    }}
    return nnz;
}}
"""


def supported(fmt: str) -> str | None:
    """Why the activation-sparse kernel does not take ``fmt`` (None: it does)."""
    f = WeightFormat.parse(fmt)
    if f.kind == "int" and (f.bits == 8 or (f.bits == 4 and f.group_size is not None)):
        return None
    return f"format {fmt}: the activation-sparse CPU kernel exists for int8 and int4 group-wise weights"


def kernel_name(fmt: str) -> str:
    return "lowbit_cpu_sparse_" + fmt.replace("-", "_")


def _pack8_table() -> str:
    """The AVX2 compaction's permutations: for each 8-bit mask, the kept lanes' positions in order
    (byte j of the 64-bit entry = the j-th set bit; unused bytes 0)."""
    entries = []
    for mask in range(256):
        lanes = [j for j in range(8) if mask >> j & 1]
        entries.append("0x%016xULL" % sum(lane << (8 * j) for j, lane in enumerate(lanes)))
    return ", ".join(entries)


_PACK8 = _pack8_table()


def source(fmt: str) -> str:
    """The C source of the activation-sparse GEMV for ``fmt`` (readable; see the module docstring)."""
    f = WeightFormat.parse(fmt)
    fields = dict(code_t="int8_t", group=0, bits=8, has_zero=0) if f.bits == 8 else dict(
        code_t="uint8_t", group=f.group_size, bits=4, has_zero=int(f.has_zero_points))
    return (f"/* lowbit generated CPU kernel: activation-sparse decode GEMV, {fmt} weights, K-major */\n"
            + _SOURCE.format(name=kernel_name(fmt), tw=TW, chunk=CHUNK[f.bits], pfd=PFD, stream_tiles=STREAM_TILES,
                             pack8=_PACK8, hsum256=cpu_codegen.HSUM256,
                             rms_norm_row=cpu_codegen.RMS_NORM_ROW, **fields))


def kernel(fmt: str, isa: str = "native"):
    """The compiled kernel (a ctypes function), or None (why: logged once by ``cpu_codegen``).
    ``isa``: ``native`` (the host's: AVX-512 here), ``avx2`` (AVX-512 turned off) or ``portable``
    (the compiler's default target): the tests check every path on one host."""
    if os.environ.get(cpu_codegen.ENV, "1") == "0" or supported(fmt) is not None:
        return None
    return _build(fmt, isa)


ARGTYPES = ([ctypes.c_void_p] * 7 + [ctypes.c_int64] * 5 + [ctypes.c_int]
            + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
               ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p])  # the kernel's C signature (see _SOURCE)


@functools.lru_cache(maxsize=None)
def _build(fmt: str, isa: str):
    extra = ISAS[isa]
    flags = cpu_codegen.FLAGS if extra is None else (
        cpu_codegen.PORTABLE_FLAGS if extra == () else cpu_codegen.FLAGS + extra)
    fn = cpu_codegen.build(kernel_name(fmt), source(fmt), ARGTYPES, "the dense kernels run on the thresholded input",
                           what=f"the activation-sparse {fmt} kernel", flags=flags)
    if fn is not None:
        fn.restype = ctypes.c_int64
    return fn


@dataclasses.dataclass
class KMajorWeight:
    """A weight's K-major copy for the activation-sparse kernel (module docstring)."""

    codes: torch.Tensor   # int8 [K, N] or uint8 [K, N/2] (tile-split nibbles)
    scale: torch.Tensor   # float32 [groups, N]
    zero: torch.Tensor | None  # float32 [groups, N] (int4), None (int8)
    out_features: int
    in_features: int


KMAJOR_CACHE = IdentityCache()


def tile_split_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[K, N] codes in [0, 15] -> [K, N/2] bytes: per tile of TILE columns (width w), low nibble =
    column j, high nibble = column w/2 + j."""
    parts = []
    for n0 in range(0, q.shape[1], TILE):
        t = q[:, n0:n0 + TILE]
        h = t.shape[1] // 2
        parts.append((t[:, :h] | (t[:, h:] << 4)).to(torch.uint8))
    return torch.cat(parts, dim=1).contiguous()


def kmajor(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: str,
           in_features: int) -> KMajorWeight:
    """The K-major copy of one quantized weight (cached by the identity of ``qweight``)."""
    def make() -> KMajorWeight:
        f = WeightFormat.parse(fmt)
        n = scale.shape[0]
        if f.bits == 8:
            return KMajorWeight(qweight.t().contiguous(), scale.float().reshape(1, n).contiguous(), None, n,
                                in_features)
        q = _unpack(qweight, 4)[:, :in_features].to(torch.int32)
        z = torch.full_like(scale, 8, dtype=torch.float32) if zero is None else zero.float()
        return KMajorWeight(tile_split_nibbles(q.t()), scale.float().t().contiguous(), z.t().contiguous(), n,
                            in_features)

    return KMAJOR_CACHE.get_or_create(qweight, ("kmajor", fmt), make)


@dataclasses.dataclass
class CpuKMajor:
    """A weight's K-major copy for the CPU kernel (module docstring): N padded to ``Np``."""

    codes: torch.Tensor        # int8 [K, Np] or uint8 [K, Np/2] (chunks of 32 columns)
    scale: torch.Tensor        # bf16 viewed as int16 [groups, Np] (int8: [1, Np])
    zero: torch.Tensor | None  # uint8 [groups, Np] (asymmetric int4), else None
    out_features: int
    padded_out: int
    in_features: int

    def __post_init__(self) -> None:
        self.scratch = compaction_words(self.in_features, self.scale.shape[0])  # float32 words (run())
        self.groups = None if self.codes.dtype == torch.int8 else self.scale.shape[0]  # int4's along K (ksplit_for)
        self.zero_ptr = None if self.zero is None else self.zero.data_ptr()


def compaction_words(k: int, groups: int) -> int:
    """float32 words of the kernel's compaction scratch: int32 idx [K + 16], float xv [K + 16], int64
    gstart [groups + 1], float xs [groups], then the VNNI path's quads (int64 q4start [groups + 1],
    float q4s [groups], int32 q4idx [K + 4 groups], int8 parts [3 (K + 4 groups)], two 8-byte
    alignments); the outputs' accumulators follow."""
    stride = k + 4 * groups
    return 2 * (k + 16) + 2 * (groups + 1) + groups + 2 + 2 * (groups + 1) + groups + stride + -(-3 * stride // 4) + 2


def ksplit_for(padded_out: int, threads: int, groups: int | None = None) -> int:
    """Ranges of the kept inputs the threads split (partial outputs added at the end): one per
    thread, so each thread reads whole K-major rows (int8: a share of the kept inputs; int4: of the
    scale groups, when there are at least as many groups as threads), else 1 per output tile (the
    threads split the columns) or enough for every thread when there are fewer tiles than threads.
    Why whole rows: with the columns split, each of two threads read half of every kept row, runs
    of 1 kB on the 2048-wide o / down projections that the prefetchers follow badly; the rows
    split measured, per call from memory at 50 % kept (the decode model's shapes, Zen 3, AVX2,
    two threads, three runs), int8 q.k.v 1.25-1.27x -> 1.48-1.52x the dense kernel, o 1.24-1.52x
    -> 1.30-1.80x, gate.up 1.58-1.75x -> 1.71-1.94x, down 0.79-0.93x -> 1.03-1.22x; int4 g128:
    1.05 -> 1.26x, 1.06 -> 1.19x, 1.19 -> 1.35x, 1.21 -> 1.34x. ``groups``: int4's scale groups
    along K; None for int8 (the kept inputs split anywhere)."""
    if threads > 1 and (groups is None or groups >= threads):
        return threads
    tiles = padded_out // TW
    return 1 if tiles >= threads else -(-threads // tiles)


def chunk_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[K, Np] codes in [0, 15] (Np a multiple of 32) -> [K, Np/2] bytes: per chunk of 32 columns,
    byte j = column j (low nibble) | column 16 + j (high nibble)."""
    k, n = q.shape
    c = q.reshape(k, n // 32, 2, 16).to(torch.uint8)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(k, n // 2).contiguous()


def kmajor_cpu(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: str,
               in_features: int) -> CpuKMajor:
    """The CPU kernel's K-major copy of one quantized weight (cached by the identity of ``qweight``)."""
    return KMAJOR_CACHE.get_or_create(qweight, ("kmajor_cpu", fmt),
                                      lambda: make_kmajor_cpu(qweight, scale, zero, fmt, in_features))


def make_kmajor_cpu(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: str,
                    in_features: int) -> CpuKMajor:
    """:func:`kmajor_cpu` without the cache (a group's weights stacked along N: :class:`SparseInputGroup`)."""
    f = WeightFormat.parse(fmt)
    n = scale.shape[0]
    np_ = -(-n // TW) * TW
    pad = np_ - n
    s = torch.nn.functional.pad(scale.to(torch.bfloat16).reshape(n, -1).t(), (0, pad))  # zero scale: padding
    if f.bits == 8:
        codes = torch.nn.functional.pad(qweight.t(), (0, pad)).contiguous()
        return CpuKMajor(codes, s.contiguous().view(torch.int16), None, n, np_, in_features)
    q = _unpack(qweight, 4)[:, :in_features].t()
    codes = chunk_nibbles(torch.nn.functional.pad(q, (0, pad)))
    z = None if zero is None else torch.nn.functional.pad(zero.t().to(torch.uint8), (0, pad)).contiguous()
    return CpuKMajor(codes, s.contiguous().view(torch.int16), z, n, np_, in_features)


@functools.lru_cache(maxsize=None)
def _static_reason(fmt: str, in_features: int) -> str | None:
    """What does not depend on the call (cached: the decode loop pays one dict look-up)."""
    if (why := supported(fmt)) is not None:
        return why
    f = WeightFormat.parse(fmt)
    if f.padded_k(in_features) != in_features:
        return f"K={in_features} is padded to the group size"
    if _build(fmt, "native") is None:
        return "the kernel did not compile (logged)"
    return None


def unsupported_reason(x: torch.Tensor, scale: torch.Tensor, fmt: str, in_features: int) -> str | None:
    """Why a call cannot take the kernel (None: it can). Not an error: the dense path runs."""
    if os.environ.get(cpu_codegen.ENV, "1") == "0":
        return f"turned off by {cpu_codegen.ENV}=0"
    if x.numel() != in_features:
        rows = x.numel() // max(x.shape[-1], 1)
        return f"{rows} rows: the activation-sparse kernel is a decode GEMV (one row); the dense kernels run"
    if x.device.type != "cpu":
        return f"x on {x.device.type}: this is the CPU kernel"
    return _static_reason(fmt, in_features)


def run(x32: torch.Tensor, w: CpuKMajor, bias: torch.Tensor | None, fmt: str, max_nnz: int,
        isa: str = "native", lead: tuple = (), threshold: torch.Tensor | None = None,
        col_scale: torch.Tensor | None = None, xs_out: torch.Tensor | None = None, silu_first: int = 0,
        residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
        eps: float = 0.0) -> torch.Tensor | None:
    """One call of the kernel on a contiguous float32 row ``x32`` (K values): ``y`` [*lead, N]
    float32, or None when more than ``max_nnz`` inputs are kept (nothing computed past the
    compaction). Without ``threshold`` the row is already thresholded (its nonzeros are kept);
    with it (float32 [1] or [K], contiguous; ``col_scale`` float32 [K] or None) the kernel applies
    ``lowbit::act_sparsify`` itself and, given ``xs_out`` (float32 [K]), writes the thresholded row
    there (also when it returns None: the dense kernel's input). ``silu_first`` = n > 0: the weight
    is a gate (columns [0, n)) and up (the next n) stacked, and ``y`` [*lead, n] is
    ``silu(gate) * up``; ``residual`` (float32, contiguous, as many values as ``y``) is added.
    ``norm_weight`` (float32 [K], contiguous): ``x32`` is RMS-normalised in the kernel first (with
    ``eps``), and the threshold applies to the normalised row (``xs_out`` receives it thresholded)."""
    k, n, np_ = w.in_features, w.out_features, w.padded_out
    threads = torch.get_num_threads()
    ksplit = ksplit_for(np_, threads, w.groups)
    y = torch.empty(lead + (silu_first or n,), dtype=torch.float32)
    xbuf = None if norm_weight is None else torch.empty(k, dtype=torch.float32)
    assert norm_weight is None or (norm_weight.dtype == torch.float32 and norm_weight.is_contiguous()
                                   and norm_weight.numel() == k)
    assert (silu_first == 0 or 2 * silu_first == n) and (residual is None or (residual.dtype == torch.float32
                                                               and residual.is_contiguous()
                                                               and residual.numel() == y.numel()))
    # int32 idx [K + 16], float xv [K + 16], int64 gstart [groups + 1], float xs [groups], partials
    scratch = torch.empty(w.scratch + 2 * ksplit * np_, dtype=torch.float32)  # out + the wide tasks' accumulators
    # every tensor whose pointer the kernel gets is held by a local until the call returns
    got = _build(fmt, isa)(x32.data_ptr(), w.codes.data_ptr(), w.scale.data_ptr(), w.zero_ptr,
                           None if bias is None else bias.data_ptr(), y.data_ptr(), scratch.data_ptr(), n, np_, k,
                           max_nnz, ksplit, threads, *cpu_codegen.threshold_args(threshold, col_scale),
                           None if xs_out is None else xs_out.data_ptr(), silu_first,
                           None if residual is None else residual.data_ptr(),
                           None if norm_weight is None else norm_weight.data_ptr(), float(eps),
                           None if xbuf is None else xbuf.data_ptr())
    return None if got < 0 else y


# ------------------------------------------------------------------------------------------------
# Dispatch by measurement
# ------------------------------------------------------------------------------------------------

MARGIN = 1.05  # the sparse kernel must be predicted this much faster than the dense one
REPEATS = 7
TRIAL_ROWS = 6  # decode rows timed per policy inside the model (SiteTrial): each the sum of its ~30 site calls


class SiteTrial:
    """The in-model check of a measured plan that takes the sparse kernel: the plan is timed on one
    weight outside the model, where a site's sparse call can look faster than it is between the
    model's other work (int4 on Zen 4: level at 50 % kept in the plan, 0.8x dense in the model).
    So the first decode rows of the model alternate two policies for all its activation-sparse
    sites of one format (and compute dtype, environment, threads): every site sparse for a row,
    then every site dense (the threshold in its prologue), and so on; a row is over when a site is
    called again. A row's sample is the sum of its site calls, each timed whole (a row the sparse
    call refuses, keeping more inputs than it takes, counts with the dense call it then needs).
    Whole rows, because a call's cost depends on the path of the calls before it: the int4 q·k·v
    sparse call measured ~228 us where sites alternated within a row (dense ~221), 322 us where
    every site was sparse (dense 270; Zen 4, 8 layers, one process): per-call or per-shape
    samples picked sparse where whole sparse rows were 21 % slower. A row in which a site ran a
    path for the first time is not a sample (the dense kernels bind and choose at their first
    call). After :data:`TRIAL_ROWS` rows of each policy, the medians decide for every site of the
    trial for the rest of the process, the sparse policy only when :data:`MARGIN` times faster (as
    the plan requires: it keeps a second, K-major copy of the weights, and a near tie flips with
    the machine's noise); logged, and written into the sites' layer records, also of sites that
    join later. A dense verdict drops the sites' row calls and K-major copies. Not with
    ``LOWBIT_SPARSE_DISPATCH=sparse|dense``."""

    def __init__(self, fmt: str):
        self.fmt = fmt  # the format of its sites (the log line)
        self.times: dict[str, list[float]] = {"sparse": [], "dense": []}
        self.verdict: str | None = None
        self.text = ""  # the verdict in words (layer records)
        self.groups: weakref.WeakSet = weakref.WeakSet()  # the sites that joined
        self.warm: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # site -> the paths it ran once
        self.path = "sparse"  # the current row's policy
        self.row: weakref.WeakSet = weakref.WeakSet()  # the sites called in the current row
        self.row_seconds = 0.0
        self.row_clean = True  # no site ran the row's path for the first time

    def join(self, group: "SparseInputGroup") -> None:
        if group not in self.groups:
            self.groups.add(group)
            if self.verdict is not None:
                group.note_trial(self)

    def next_path(self, group: "SparseInputGroup") -> str:
        """The path of ``group``'s call: the current row's policy; a site called again ends the
        row (its sum becomes a sample; the verdict once both policies have enough)."""
        if group in self.row:
            if self.row_clean and self.row_seconds > 0:
                self.times[self.path].append(self.row_seconds)
            self.row, self.row_seconds, self.row_clean = weakref.WeakSet(), 0.0, True
            if min(len(v) for v in self.times.values()) >= TRIAL_ROWS:
                self._decide()
                return self.verdict
            other = "dense" if self.path == "sparse" else "sparse"
            self.path = other if len(self.times[other]) <= len(self.times[self.path]) else self.path
        self.row.add(group)
        return self.path

    def add(self, group: "SparseInputGroup", path: str, seconds: float) -> None:
        if self.verdict is not None or path != self.path:
            return
        ran = self.warm.setdefault(group, set())
        if path not in ran:
            ran.add(path)
            self.row_clean = False
        self.row_seconds += seconds

    def _decide(self) -> None:
        sparse, dense = (sorted(v)[len(v) // 2] for v in (self.times["sparse"], self.times["dense"]))
        self.verdict = "sparse" if sparse * MARGIN <= dense else "dense"
        self.text = (f"in-model trial ({TRIAL_ROWS} decode rows of each policy over every activation-sparse "
                     f"site of this format): sparse rows {sparse * 1e3:.3f} ms, dense rows {dense * 1e3:.3f} ms "
                     f"(medians of the rows' summed site calls; sparse must be {MARGIN:.2f}x faster) -> the "
                     f"{self.verdict} kernel")
        log.info("lowbit: activation-sparse %s sites: %s", self.fmt, self.text)
        for g in list(self.groups):
            g.note_trial(self)


_TRIALS: dict[tuple, SiteTrial] = {}
# (fmt, "sparse"|"dense:measured"|...) -> calls: what ran (tests and benchmarks read it)
dispatch_counter: collections.Counter = collections.Counter()
_PLANS: dict[str, dict] = {}
_LOGGED: set[tuple] = set()


def _dispatch_file():
    return cpu_codegen._cache_dir() / "sparse_dispatch.json"


def _digest(*sources: str) -> str:
    return cpu_dispatch.digest(*sources)


# the timing, eviction and plan cache are the shared CPU dispatch's (backends/cpu_dispatch.py); the
# names stay here because the tests replace them (a fake clock, a plan file of their own)
_timer = cpu_dispatch.timer
_evict = cpu_dispatch.evict


def _fastest(calls: dict, repeats: int = REPEATS, cold: dict | None = None) -> dict[str, float]:
    """Minimum seconds per call of each contender (``cpu_dispatch.fastest``: interleaved, the
    tensors ``cold[name]`` evicted from the caches before each call of ``name``)."""
    return cpu_dispatch.fastest(calls, repeats, cold, clock=_timer)


def cached_plan(memo_key: tuple, disk_key, make) -> dict:
    """A dispatch decision: from memory, else from the disk cache (``disk_key()``, which names the
    kernels' sources and the host), else ``make()`` (a measurement), stored in both
    (``cpu_dispatch.cached_plan`` over ``sparse_dispatch.json``)."""
    return cpu_dispatch.cached_plan(_PLANS, memo_key, _dispatch_file, disk_key, make)


def measure(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: str,
            in_features: int, w: CpuKMajor | None = None) -> dict:
    """Time the sparse kernel (all inputs kept, a quarter kept) and the dense generated kernel on
    this weight, calls interleaved, each weight evicted from the caches before its call (as in a
    decode step: :func:`_evict`), minimum of :data:`REPEATS`; the crossover ``max_nnz`` is where
    the straight line through the two sparse times meets the dense time / :data:`MARGIN`."""
    w = w or kmajor_cpu(qweight, scale, zero, fmt, in_features)
    k = in_features
    full, quarter = _probe_rows(k)
    x2 = full.reshape(1, k)
    calls = {"dense": lambda: cpu_codegen.linear(x2, qweight, scale, zero, None, fmt, k),
             "sparse_all": lambda: run(full, w, None, fmt, k),
             "sparse_quarter": lambda: run(quarter, w, None, fmt, k)}
    if calls["dense"]() is None:
        return {"max_nnz": k, "reason": "no dense generated kernel for this call: the sparse kernel always runs"}
    dense_tensors, sparse_tensors = (qweight, scale, zero), (w.codes, w.scale, w.zero)
    best = _fastest(calls, cold={"dense": dense_tensors, "sparse_all": sparse_tensors,
                                 "sparse_quarter": sparse_tensors})
    return _crossover(best, k, int((quarter != 0).sum()))


def _probe_rows(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows a crossover is timed on: every input kept (positive, nonzero) and about a quarter kept."""
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(k, generator=gen).abs() + 0.1
    return full, torch.where(torch.rand(k, generator=gen) < 0.25, full, torch.zeros(()))


def _crossover(best: dict[str, float], k: int, nq: int) -> dict:
    """The plan from the times of ``dense``, ``sparse_all`` and ``sparse_quarter`` (``nq`` kept):
    ``max_nnz`` is where the straight line through the two sparse times meets dense / :data:`MARGIN`."""
    dense, t_all, t_q = best["dense"], best["sparse_all"], best["sparse_quarter"]
    slope = max((t_all - t_q) / max(k - nq, 1), 1e-15)
    at0 = t_q - slope * nq
    crossover = (dense / MARGIN - at0) / slope
    max_nnz = max(-1, min(k, math.floor(crossover)))  # at most max_nnz kept: the sparse kernel
    return {"max_nnz": max_nnz, "max_kept_fraction": round(max(max_nnz, 0) / k, 3),
            "dense_ms": round(dense * 1e3, 4), "sparse_all_ms": round(t_all * 1e3, 4),
            "sparse_quarter_ms": round(t_q * 1e3, 4), "quarter_kept": nq}


def plan(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: str, in_features: int) -> dict:
    """The dispatch plan of one (format, N, K, threads): measured at first use, cached in memory
    and on disk. ``max_nnz``: the most kept inputs the sparse kernel takes (-1: never)."""
    return plan_for(fmt, scale.shape[0], in_features, lambda: measure(qweight, scale, zero, fmt, in_features))


def plan_for(fmt: str, n: int, in_features: int, make) -> dict:
    """:func:`plan` by shape: ``make()`` measures when neither memory nor the disk has the plan."""
    threads = torch.get_num_threads()
    return cached_plan(("act", fmt, n, in_features, threads),
                       lambda: f"act|{fmt}|N={n}|K={in_features}|threads={threads}|"
                               f"{_digest(source(fmt), cpu_codegen.source(fmt))}", make)


def plan_24(qweight: torch.Tensor, scale: torch.Tensor, fmt: str, in_features: int, rows: int,
            zero: torch.Tensor | None = None) -> dict:
    """Whether the N:M kernel over compressed weights (``cpu_codegen``: ``s24+int8``, ``s24+int4_g*``) runs rather
    than the dense kernel over the same weight decompressed (:func:`dense_copy`), for ``rows`` rows:
    measured at first use per (format, N, K, threads, rows), cached like :func:`plan`. The dense
    path keeps a second copy of the weight (1 byte per weight more for int8, on top of the 0.625 of
    the 2:4 storage), so it must be :data:`MARGIN` times faster; a near tie keeps the N:M kernel
    (single-call timings of one shape moved 1.04-1.33x between repeats in one process on Zen 4:
    a margin the other way flipped the choice with the noise). ``sparse``: the N:M kernel runs."""
    n, threads = scale.shape[0], torch.get_num_threads()

    def make() -> dict:
        dense = WeightFormat.parse(fmt).to_dense(qweight, scale, zero)  # not cached: only the dense path keeps one
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(0))
        dfmt = dense.format.key
        calls = {"dense": lambda: cpu_codegen.linear(x, dense.qweight, dense.scale, dense.zero, None, dfmt,
                                                     in_features),
                 "sparse": lambda: cpu_codegen.linear(x, qweight, scale, zero, None, fmt, in_features)}
        if calls["sparse"]() is None:  # (not bound: scales not bf16, say) nothing to time
            return {"sparse": False, "reason": "the N:M kernel does not take this weight", "speedup": 0.0}
        if calls["dense"]() is None:
            return {"sparse": True, "reason": "no dense generated kernel to compare with"}
        best = _fastest(calls, cold={"dense": tuple(t for t in (dense.qweight, dense.scale, dense.zero) if t is not None),
                                     "sparse": tuple(t for t in (qweight, scale, zero) if t is not None)})
        return {"sparse": best["sparse"] <= MARGIN * best["dense"], "dense_ms": round(best["dense"] * 1e3, 4),
                "sparse_ms": round(best["sparse"] * 1e3, 4), "speedup": round(best["dense"] / best["sparse"], 3)}

    return cached_plan(("nm", fmt, n, in_features, threads, rows),
                       lambda: f"nm-v2|{fmt}|N={n}|K={in_features}|threads={threads}|rows={rows}|"
                               f"{_digest(cpu_codegen.source(fmt), cpu_codegen.source(WeightFormat.parse(fmt).dense_format.key))}",
                       make)


DENSE_CACHE = IdentityCache()


def dense_copy(qweight: torch.Tensor, scale: torch.Tensor, fmt: str, in_features: int,
               zero: torch.Tensor | None = None):
    """The N:M weight decompressed to its dense format's codes (``SparseFormat.to_dense``: exactly
    the same matrix, zero points included for asymmetric int4), cached by the identity of
    ``qweight``: what the dense kernels read when the measured dispatch finds the N:M kernel slower
    or it cannot take the call (1 byte per weight more, for int8)."""
    f = WeightFormat.parse(fmt)
    return DENSE_CACHE.get_or_create(qweight, ("dense", fmt), lambda: f.to_dense(qweight, scale, zero))


def use_nm_kernel(qweight: torch.Tensor, scale: torch.Tensor, fmt: str, in_features: int, rows: int,
                  zero: torch.Tensor | None = None) -> bool:
    """Whether a call of ``rows`` rows over N:M ``fmt`` runs the N:M kernel (else the dense kernel
    over :func:`dense_copy`, counted and logged once per shape): :data:`DISPATCH_ENV`, else
    :func:`plan_24`."""
    if cpu_codegen.supported(fmt) is None and cpu_codegen.s24_index_error(qweight, in_features, fmt) is not None:
        return False  # the binding refuses it (logged), before a plan is cached for its shape: the dense copy runs
    mode = _mode()
    if mode == "sparse":
        return True
    n = scale.shape[0]
    if mode == "dense":
        why = f"{DISPATCH_ENV}=dense"
    else:
        entry = plan_24(qweight, scale, fmt, in_features, rows, zero)
        if entry["sparse"]:
            dispatch_counter[(fmt, "sparse")] += 1
            return True
        why = (f"the N:M kernel measured {entry['speedup']:.2f}x the dense kernel at {rows} rows (slower by more "
               f"than the {MARGIN:.2f}x margin): the dense kernel runs over a decompressed copy (1 byte per weight "
               f"more; {DISPATCH_ENV}=sparse keeps the compressed kernel)")
    _note_dense(fmt, n, in_features, rows, why)
    return False


def _mode() -> str:
    return cpu_dispatch.env_mode(DISPATCH_ENV, ("measure", "sparse", "dense"))


def max_kept(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: str,
             in_features: int) -> int:
    """The most kept inputs a call may have to run the sparse kernel (:data:`DISPATCH_ENV`)."""
    mode = _mode()
    if mode == "sparse":
        return in_features
    if mode == "dense":
        return -1
    return plan(qweight, scale, zero, fmt, in_features)["max_nnz"]


def describe(entry: dict, in_features: int, sparsity: float | None = None) -> str:
    """A plan in words (layer records, logs)."""
    if "dense_ms" not in entry:
        return entry.get("reason", "")
    frac = max(entry["max_nnz"], 0) / in_features
    text = (f"measured: dense {entry['dense_ms']:.4f} ms, sparse {entry['sparse_all_ms']:.4f} ms with every input "
            f"kept and {entry['sparse_quarter_ms']:.4f} ms with a quarter kept; the sparse kernel runs when at most "
            f"{frac:.0%} of the inputs are kept")
    if sparsity is not None:
        kept = 1 - sparsity
        speed = entry["dense_ms"] / (entry["sparse_quarter_ms"] + (entry["sparse_all_ms"] - entry["sparse_quarter_ms"])
                                     * (kept * in_features - entry["quarter_kept"])
                                     / max(in_features - entry["quarter_kept"], 1))
        text += f"; at {sparsity:.0%} sparsity about {speed:.2f}x dense"
    return text


def _note_dense(fmt: str, n: int, k: int, _unused: int, why: str) -> None:
    dispatch_counter[(fmt, "dense")] += 1
    key = (fmt, n, k, why)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("lowbit: sparse %s %dx%d runs the dense kernel: %s (logged once per shape; counted in "
                 "cpu_sparse.dispatch_counter)", fmt, n, k, why)


def linear(xs: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           bias: torch.Tensor | None, fmt: str, in_features: int) -> torch.Tensor | None:
    """``xs @ dequantize(W).T + bias`` for one thresholded row, reading only the weight rows of its
    nonzero inputs; None when the kernel does not apply (:func:`unsupported_reason`) or when the
    row keeps more inputs than the measured crossover (:func:`max_kept`): the caller runs the
    dense kernels."""
    if unsupported_reason(xs, scale, fmt, in_features) is not None:
        return None
    limit = max_kept(qweight, scale, zero, fmt, in_features)
    n = scale.shape[0]
    if limit < 0:
        _note_dense(fmt, n, in_features, limit, "the sparse kernel is slower at every sparsity on this host "
                    f"({os.environ.get(DISPATCH_ENV, 'measured')})")
        return None
    w = KMAJOR_CACHE.get(qweight, ("kmajor_cpu", fmt)) or kmajor_cpu(qweight, scale, zero, fmt, in_features)
    x32 = xs if xs.dtype == torch.float32 and xs.is_contiguous() else xs.to(torch.float32).contiguous()
    b = None if bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()) else (
        bias.to(torch.float32).contiguous())
    y = run(x32, w, bias if b is None else b, fmt, limit, lead=tuple(xs.shape[:-1]))
    if y is None:
        _note_dense(fmt, n, in_features, limit, f"more than {limit} of {in_features} inputs kept (measured crossover)")
        return None
    dispatch_counter[(fmt, "sparse")] += 1
    return y if xs.dtype == torch.float32 else y.to(xs.dtype)


def sparse_or_dense(xs: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    bias: torch.Tensor | None, fmt: str, in_features: int) -> torch.Tensor | None:
    """What ``lowbit::sparse_input_linear`` runs for a thresholded row on the CPU: :func:`linear`,
    else the dense generated kernel (benchmarks time this)."""
    y = linear(xs, qweight, scale, zero, bias, fmt, in_features)
    return y if y is not None else cpu_codegen.linear(xs.reshape(-1, in_features), qweight, scale, zero, bias, fmt,
                                                      in_features)


class SparseInputGroup(torch.nn.Module):
    """Quantized linears that read one thresholded input, lowered for the CPU as one call
    (``lowering._sparse_input_linear_cpu`` / ``_fuse_cpu_sparse_groups``): the
    ``lowbit::sparse_input_linear`` nodes of one site (q/k/v; gate and up, with ``silu(gate) * up``
    as ``epilogue``; o_proj and down_proj alone) share ``x``, the threshold and WINA's column
    scale, so a decode row is thresholded and compacted once, in the kernel, and the members'
    K-major copies stacked along N (one copy, :func:`make_kmajor_cpu` of the stacked weights) are
    read by one kernel call. The crossover to the dense kernels is measured on the stacked shape
    (:meth:`measure`: the group's own calls); a row keeping more inputs, and calls of more rows, run the dense generated
    kernels (one fused call for a group, ``cpu_kernels.fused_linear``) on the thresholded input.

    A module so that lowered graphs hold it with ``get_attr``; the K-major copy is built at the
    first decode call (freed again when the measured plan never takes the sparse kernel).
    ``records``: the members' layer records with their target sparsity ((record, target) pairs):
    the plan, once decided, is written into their ``sparse_kernel`` (:meth:`limit`)."""

    def __init__(self, threshold: torch.Tensor, col_scale: torch.Tensor | None,
                 members: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], fmt: str, in_features: int,
                 compute_dtype: torch.dtype, epilogue: int = 0, records: tuple = ()):
        super().__init__()
        self.records = tuple(records)
        self.fmt, self.in_features, self.epilogue, self.compute_dtype = fmt, in_features, epilogue, compute_dtype
        self.threshold_source, self.col_scale_source = threshold, col_scale  # the graph's constants (grouping key)
        self.threshold = threshold.detach().to(torch.float32).contiguous()
        self.col_scale = None if col_scale is None else col_scale.detach().to(torch.float32).contiguous()
        self.quantized = list(members)
        self.sizes = [s.shape[0] for _, s, _ in members]
        self.out_features = sum(self.sizes)
        self.dense = torch.nn.ModuleList([cpu_kernels.prepack(q, s, z, fmt, in_features, compute_dtype)
                                          for q, s, z in members])
        self.fused = cpu_kernels.FusedWeights(list(self.dense), epilogue) if len(members) > 1 else None
        self._kmajor: CpuKMajor | None = None  # stacked members (several), built at the first decode call
        self._kmajor_versions: tuple = ()
        self._limit: dict[tuple, int] = {}  # (environment, threads) -> most kept inputs for the sparse kernel
        self._bias: tuple | None = None  # (the biases' identities, their float32 concatenation)
        self._rows: dict[tuple, RowCall | None] = {}  # (environment, threads) -> the decode row's call (row_call)
        self._dense_why = ""  # why a row runs the dense kernels, as of the last row_call() that decided

    def kmajor(self) -> CpuKMajor:
        """The members' K-major copy (one member: the shared per-weight cache; several: stacked,
        rebuilt when a member's tensors -- codes, scales or zero points -- were edited in place)."""
        versions = self._versions()
        if self._kmajor is None or self._kmajor_versions != versions:
            if len(self.quantized) == 1:
                q, sc, z = self.quantized[0]
                if self._kmajor_versions:  # edited since: the shared cache checks the codes' version only
                    KMAJOR_CACHE.put(q, ("kmajor_cpu", self.fmt), make_kmajor_cpu(q, sc, z, self.fmt, self.in_features))
                self._kmajor = kmajor_cpu(q, sc, z, self.fmt, self.in_features)
            else:
                self._kmajor = make_kmajor_cpu(*self._stacked(), self.fmt, self.in_features)
            self._kmajor_versions = versions
        return self._kmajor

    def _stacked(self):
        q, s, z = zip(*self.quantized)
        return torch.cat(q), torch.cat(s), None if z[0] is None else torch.cat(z)

    def limit(self) -> int:
        """The most kept inputs a decode row may have to take the sparse kernel (-1: never),
        per environment (``LOWBIT_SPARSE_DISPATCH``) and thread count: measured on this group's own
        calls (:meth:`measure`)."""
        key = (cpu_dispatch.env_key(), torch.get_num_threads())
        got = self._limit.get(key)
        if got is None:
            mode, entry = _mode(), None
            if os.environ.get(cpu_codegen.ENV, "1") == "0":
                got, why = -1, f"{cpu_codegen.ENV}=0"
            elif mode in ("sparse", "dense"):
                got, why = (self.in_features if mode == "sparse" else -1), f"{DISPATCH_ENV}={mode}"
            else:
                threads, sizes = torch.get_num_threads(), "+".join(map(str, self.sizes))
                # the environment is in the memo key (key[0]); the disk key names what the fallback's
                # dense kernels depend on: the compute dtype and the kernels' sources and host
                entry = cached_plan(
                    ("group", self.fmt, sizes, self.in_features, self.epilogue, str(self.compute_dtype), key),
                    lambda: (f"group|{self.fmt}|N={sizes}|K={self.in_features}|epilogue={self.epilogue}|"
                             f"dtype={self.compute_dtype}|threads={threads}|"
                             f"{_digest(source(self.fmt), cpu_codegen.source(self.fmt))}"),
                    self.measure)
                got = entry["max_nnz"]
            if got < 0:
                self._kmajor = None  # never read: the dense kernels run every call
            self._limit[key] = got
            for record, target in self.records:  # what the layer records say: this decision
                if entry is None:
                    text = f"{'activation-sparse' if got >= 0 else 'dense'} kernel: {why}"
                else:
                    kernel = "activation-sparse" if got >= round((1 - target) * self.in_features) else "dense"
                    text = f"{kernel} kernel at the target {target:.0%} sparsity ({describe(entry, self.in_features, target)})"
                record["sparse_kernel"] = (f"{text}; decided for the site's {len(self.sizes)} weight(s) in one call "
                                           f"(N={'+'.join(map(str, self.sizes))}), {key[1]} thread(s)")
        return got

    def trial(self) -> SiteTrial | None:
        """This site's in-model trial (:class:`SiteTrial`), shared by the sites of its format (the
        model's, and any other model's in the process); None when the dispatch is not measured."""
        if _mode() != "measure":
            return None
        key = (self.fmt, str(self.compute_dtype), cpu_dispatch.env_key(), torch.get_num_threads())
        trial = _TRIALS.get(key)
        if trial is None:
            trial = _TRIALS[key] = SiteTrial(self.fmt)
        trial.join(self)
        return trial

    def note_trial(self, trial: SiteTrial) -> None:
        """The in-model trial decided (:class:`SiteTrial`): its verdict into the layer records; a
        dense one drops this site's row calls and K-major copy (never read again)."""
        for record, _ in self.records:
            record["sparse_kernel"] = f"{record.get('sparse_kernel', '')}; {trial.text}"
        if trial.verdict == "dense":
            self._rows, self._kmajor = {}, None
            if len(self.quantized) == 1:
                KMAJOR_CACHE.drop(self.quantized[0][0], ("kmajor_cpu", self.fmt))

    def row_call(self) -> "RowCall | None":
        """The decode row's call (:class:`RowCall`) for this environment and thread count: the
        sparse kernel up to :meth:`limit` kept inputs; None when the kernel cannot run here or
        never pays (``limit() < 0``: the dense kernels threshold in their prologue)."""
        key = (cpu_dispatch.env_key(), torch.get_num_threads())
        call = self._rows.get(key, False)
        if call is not None and call is not False and call.versions != self._versions():
            call = False  # a member was edited in place: its K-major copy is rebuilt
        if call is False:
            why = _static_reason(self.fmt, self.in_features) if os.environ.get(cpu_codegen.ENV, "1") != "0" else "off"
            trial = None if why is not None or self.limit() < 0 else self.trial()
            call = None if why is not None or self.limit() < 0 or (trial is not None and trial.verdict == "dense") \
                else RowCall(self, self.limit(), key[1])
            if call is not None:
                call.trial = trial
            self._rows = {key: call}  # calls for other environments (and the copies they hold) dropped
            self._dense_why = self.dense_reason(trial)
            if why is not None:
                for record, _ in self.records:
                    record["sparse_kernel"] = f"dense kernels: {self._dense_why}"
        return call

    def dense_reason(self, trial: SiteTrial | None = None, dtype: torch.dtype = torch.float32) -> str:
        """Why a decode row of this group runs the dense kernels (the log line and the counter)."""
        if os.environ.get(cpu_codegen.ENV, "1") == "0":
            why = f"turned off by {cpu_codegen.ENV}=0"
        elif (why := _static_reason(self.fmt, self.in_features)) is None:
            why = ("the in-model trial found the dense call faster" if trial is not None and trial.verdict == "dense"
                   else f"the sparse kernel is slower at every sparsity on this host "
                   f"({os.environ.get(DISPATCH_ENV, 'measured')})" if self.limit() < 0
                   else f"a {str(dtype).split('.')[-1]} row the kernel does not take here")
        return why + "; the dense kernels threshold in their prologue"

    def _versions(self) -> tuple:
        return tuple(t._version for m in self.quantized for t in m if t is not None)

    def measure(self) -> dict:
        """Time this group's decode-row call as the model makes it (:class:`RowCall`: the Python,
        the allocations and the kernel) against its fallback (the dense kernels' call with the
        threshold in its prologue: what a group whose kernel never pays runs, the dense recipe's
        cost plus the threshold), the
        sparse call with every input kept and with a quarter kept, calls interleaved, each weight
        evicted from the caches before its call, minimum of :data:`REPEATS`; ``max_nnz`` is where
        the straight line through the two sparse times meets the dense time / :data:`MARGIN`.
        Measuring the bare kernels instead missed ~40-140 us per call of Python and torch ops
        around them (stop 31, Zen 4)."""
        k, threads = self.in_features, torch.get_num_threads()
        full, quarter = (row.reshape(1, k) for row in _probe_rows(k))
        zero_threshold = torch.zeros(1)  # every nonzero input kept: the inputs decide how many
        # a K-major copy of its own, kept (kmajor()) only when the plan takes the sparse kernel
        w = make_kmajor_cpu(*(self.quantized[0] if len(self.quantized) == 1 else self._stacked()), self.fmt, k)
        sparse = RowCall(self, k, threads, threshold=zero_threshold, col_scale=None, w=w)
        biases = (None,) * len(self.sizes)

        def dense(x):
            return _dense(x, self, biases, None, threshold=zero_threshold)

        calls = {"dense": lambda: dense(full), "sparse_all": lambda: sparse(full, None, None, 0.0, None),
                 "sparse_quarter": lambda: sparse(quarter, None, None, 0.0, None)}
        for call in calls.values():
            call()  # first calls: the dense kernels' own dispatch measures and binds here
        dense_tensors = tuple(t for m in self.quantized for t in m)
        best = _fastest(calls, cold={"dense": dense_tensors, "sparse_all": (w.codes, w.scale, w.zero),
                                     "sparse_quarter": (w.codes, w.scale, w.zero)})
        entry = _crossover(best, k, int((quarter != 0).sum()))
        if entry["max_nnz"] >= 0:  # the copy the kernel will read
            if len(self.quantized) == 1:
                KMAJOR_CACHE.put(self.quantized[0][0], ("kmajor_cpu", self.fmt), w)
            else:
                self._kmajor, self._kmajor_versions = w, self._versions()
        return {**entry, "measured": "group calls"}

    def bias(self, biases: tuple) -> torch.Tensor | None:
        """The members' biases as one float32 row (zeros for members without one), or None."""
        if all(b is None for b in biases):
            return None
        ids = tuple((id(b), None if b is None else b._version) for b in biases)  # edited in place: rebuilt
        if self._bias is None or self._bias[0] != ids:
            self._bias = (ids, torch.cat([torch.zeros(n) if b is None else b.detach().float().reshape(n)
                                          for b, n in zip(biases, self.sizes)]).contiguous())
        return self._bias[1]

    def extra_repr(self) -> str:
        what = ("silu(gate) * up" if self.epilogue == cpu_codegen.SILU_MUL
                else "outputs side by side" if len(self.sizes) > 1 else "one weight")
        return f"{self.fmt}, {len(self.sizes)} weight(s) of one thresholded input ({what}), K={self.in_features}"


class RowCall:
    """One float32 decode row of a :class:`SparseInputGroup` through the kernel, its arguments
    worked out once (``SparseInputGroup.row_call``, per environment and thread count) so that a
    call costs three allocations and one ctypes call: a decode step makes dozens of these between
    kernels that stream the caches empty, and the general path's Python and torch ops around the
    kernel cost 30-65 us a call there (stop 32, Zen 4) against ~5 us for the ctypes call. Made
    only where the plan takes the sparse kernel (``limit`` >= 0)."""

    __slots__ = ("fn", "w", "codes", "scale", "zero", "n", "np_", "k", "limit", "ksplit", "threads", "thr",
                 "thr_stride", "cs", "held", "scratch", "silu_first", "out_n", "versions", "trial")

    def __init__(self, group: SparseInputGroup, limit: int, threads: int, threshold: torch.Tensor | None = None,
                 col_scale: torch.Tensor | None = None, w: CpuKMajor | None = None):
        k, fmt = group.in_features, group.fmt
        self.fn, self.k, self.limit, self.threads = _build(fmt, "native"), k, limit, threads
        self.versions = group._versions()
        if threshold is None:  # the group's (a measurement passes its own)
            threshold, col_scale = group.threshold, group.col_scale
        self.held = (threshold, col_scale)  # the pointers' tensors
        self.thr, self.thr_stride, self.cs = cpu_codegen.threshold_args(threshold, col_scale)
        assert limit >= 0
        w = self.w = w or group.kmajor()
        self.codes, self.scale, self.zero = w.codes.data_ptr(), w.scale.data_ptr(), w.zero_ptr
        self.n, self.np_ = w.out_features, w.padded_out
        self.ksplit = ksplit_for(self.np_, threads, w.groups)
        words = w.scratch + 2 * self.ksplit * self.np_
        self.scratch = -(-words // 16) * 16  # then (64-byte aligned) the normalised row, when there is a norm
        self.silu_first = group.sizes[0] if group.epilogue == cpu_codegen.SILU_MUL else 0
        self.out_n = self.silu_first or self.n
        self.trial: SiteTrial | None = None  # the in-model check of the plan (SparseInputGroup.row_call)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float,
                 residual: torch.Tensor | None, lead: tuple = (1,)) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``x``: float32, contiguous, K values (``norm_weight``, ``bias``, ``residual``: float32,
        contiguous, or None). Returns ``(y, xs)``: ``y`` [*lead, out] (None when the row kept more
        than ``limit`` inputs) and ``xs`` [K], the normalised, thresholded row."""
        k = self.k
        xs = torch.empty(k, dtype=torch.float32)
        y = torch.empty(lead + (self.out_n,), dtype=torch.float32)
        scratch = torch.empty(self.scratch + (k if norm_weight is not None else 0), dtype=torch.float32)
        base = scratch.data_ptr()
        got = self.fn(x.data_ptr(), self.codes, self.scale, self.zero, None if bias is None else bias.data_ptr(),
                      y.data_ptr(), base, self.n, self.np_, k, self.limit, self.ksplit, self.threads, self.thr,
                      self.thr_stride, self.cs, xs.data_ptr(), self.silu_first,
                      None if residual is None else residual.data_ptr(),
                      None if norm_weight is None else norm_weight.data_ptr(), eps,
                      None if norm_weight is None else base + 4 * self.scratch)
        return (y if got >= 0 else None), xs


def sparse_input_group_linear(x: torch.Tensor, group: SparseInputGroup, biases: tuple,
                              norm_weight: torch.Tensor | None = None, eps: float | None = None,
                              residual: torch.Tensor | None = None):
    """``lowbit::sparse_input_linear`` of every member of ``group`` on ``x`` (after
    ``rms_norm(x, norm_weight, eps)`` when given; plus ``residual`` for a single member): one row
    takes the activation-sparse kernel (norm, threshold, compaction, the stacked K-major GEMV and
    the epilogue in one C call: :class:`RowCall`) when it keeps at most ``group.limit()`` inputs;
    a row that keeps more gets the thresholded row from that call and the dense kernels run on it.
    Where the sparse kernel never pays (``limit() < 0``), for more rows and for bf16 / fp16 rows,
    the dense kernels run with the norm and the threshold in their prologue (one generated call
    for decode rows: the dense recipe's cost). Returns the tensor (one member; ``silu(gate) *
    up``) or a tuple of the members' outputs."""
    k = group.in_features
    one_row = x.numel() == k and x.device.type == "cpu"
    if one_row and x.dtype == torch.float32 and (norm_weight is None or norm_weight.numel() == k):
        call = group.row_call()  # (None once the in-model trial found the dense call faster)
        trial = None if call is None or call.trial is None or call.trial.verdict is not None else call.trial
        if call is not None and trial is not None and trial.next_path(group) == "dense":
            _note_dense(group.fmt, group.out_features, k, call.limit, "in-model trial (alternating with the sparse call)")
            start = cpu_dispatch.timer()
            y = _dense(x, group, biases, residual, norm_weight, eps, group.threshold, group.col_scale)
            trial.add(group, "dense", cpu_dispatch.timer() - start)
            return y
        if call is not None:
            start = cpu_dispatch.timer() if trial is not None else 0.0
            nw = None if norm_weight is None else norm_weight if (
                norm_weight.dtype == torch.float32 and norm_weight.is_contiguous()) else (
                norm_weight.to(torch.float32).contiguous())
            lead = tuple(x.shape[:-1])
            res = residual if (residual is not None and call.silu_first == 0 and len(group.sizes) == 1
                               and residual.dtype == torch.float32 and residual.is_contiguous()
                               and residual.shape == lead + (group.out_features,)) else None
            eps = 0.0 if nw is None else cpu_codegen.norm_eps(eps)
            y, xs = call(x if x.is_contiguous() else x.contiguous(), group.bias(biases), nw, eps, res, lead)
            if y is not None:
                dispatch_counter[(group.fmt, "sparse")] += len(group.sizes)
                if not call.silu_first:
                    y = ((y if residual is None or res is not None else residual + y) if len(group.sizes) == 1
                         else tuple(y.split(group.sizes, dim=-1)))
                if trial is not None:
                    trial.add(group, "sparse", cpu_dispatch.timer() - start)
                return y
            _note_dense(group.fmt, group.out_features, k, call.limit,
                        f"more than {call.limit} of {k} inputs kept (measured crossover)")
            y = _dense(xs.view(x.shape), group, biases, residual)
            if trial is not None:  # what the sparse path cost this row: the kernel's attempt and the dense call
                trial.add(group, "sparse", cpu_dispatch.timer() - start)
            return y
    if one_row and x.dtype != torch.float32 and group.limit() >= 0 and group.row_call() is not None:
        # bf16 / fp16: the op compares in x's dtype (rounded threshold and score), so torch thresholds
        limit = group.limit()
        xs = cpu_kernels._prologue(x, norm_weight, eps, group.threshold, group.col_scale)
        y = run(xs.reshape(k).to(torch.float32), group.kmajor(), group.bias(biases), group.fmt, limit,
                lead=tuple(x.shape[:-1]))
        if y is not None:
            dispatch_counter[(group.fmt, "sparse")] += len(group.sizes)
            y = y.to(x.dtype)
            if len(group.sizes) == 1:
                return y if residual is None else residual + y
            if group.epilogue == cpu_codegen.SILU_MUL:
                n = group.sizes[0]
                return torch.nn.functional.silu(y[..., :n]) * y[..., n:]
            return tuple(y.split(group.sizes, dim=-1))
        _note_dense(group.fmt, group.out_features, k, limit, f"more than {limit} of {k} inputs kept (measured "
                    "crossover)")
        return _dense(xs, group, biases, residual)
    if one_row:  # (a float32 row asked row_call() above, which worked the reason out once)
        _note_dense(group.fmt, group.out_features, k, -1, group._dense_why if x.dtype == torch.float32 and (
            norm_weight is None or norm_weight.numel() == k) else group.dense_reason(None, x.dtype))
    return _dense(x, group, biases, residual, norm_weight, eps, group.threshold, group.col_scale)


def _dense(x: torch.Tensor, group: SparseInputGroup, biases: tuple, residual: torch.Tensor | None,
           norm_weight: torch.Tensor | None = None, eps: float | None = None,
           threshold: torch.Tensor | None = None, col_scale: torch.Tensor | None = None):
    """The group's members by the dense kernels (one fused call for several), with the norm and
    the threshold in their prologue when given."""
    if group.fused is None:
        return cpu_kernels.packed_linear(x, group.dense[0], biases[0], group.compute_dtype, norm_weight, eps,
                                         residual, threshold, col_scale)
    return cpu_kernels.fused_linear(x, group.fused, biases, group.compute_dtype, norm_weight, eps, threshold,
                                    col_scale)
