"""Which CPU kernel runs a quantized linear, decided by measurement on this host: one mechanism for
the dense weight-only calls (:func:`choose`, used by ``cpu_kernels.packed_linear``, so by compiled
graphs and ``compress``ed models alike) and the sparse kernels (``cpu_sparse.plan`` /
``plan_24`` use :func:`fastest`, :func:`evict` and :func:`cached_plan`).

Why measure: which kernel is fastest depends on the host (ISA, cores, caches, torch's build), the
shape, the format and the number of rows. On an AVX2 host torch's packed int4/int8 kernels were
slow from 2 rows up and bf16 matmuls 7x slower than fp32 ones; on an AVX-512 + AVX512_BF16 host
(AMD Zen 4) torch's packed kernels win from 4-16 rows and a bf16 matmul is 2.5x faster than
torch's packed kernels at prefill sizes. A static rule is wrong on one of them.

**Candidates** for ``lowbit::wo_linear`` over int8 / int4 / NF4 weights (``cpu_kernels``):

* ``generated``: the generated C kernel of ``cpu_codegen`` (float32 activations and accumulation;
  at most ``cpu_codegen.MAX_ROWS`` rows; int8, and int4 and NF4 with groups a multiple of 16, K not
  padded; NF4 through its int8 table: 45-51 dB against float64);
* ``torch``: torch's packed kernel (``aten._weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu``)
  with activations in the compute dtype (bf16 by default); int8 and int4 only;
* ``dequant_bf16`` / ``dequant_fp32`` (more than ``MAX_ROWS`` rows): the weight dequantized by a
  generated C kernel (:data:`DEQUANT_SOURCE`: AVX-512 with ``vcvtneps2bf16`` where the host has
  AVX512_BF16, AVX2, portable) in blocks of rows into a small temporary (:data:`BLOCK_BYTES`, so a
  32000 x 2048 head never has a full-size float copy), each block multiplied by torch's dense
  matmul (oneDNN) in that dtype. ``dequant_bf16`` is a candidate only when the compute dtype is
  bf16 (the activations are rounded to bf16 anyway; the weights' rounding to bf16 adds about as
  much error again: see docs/codegen.md), ``dequant_fp32`` always (NF4: also for a decode-sized
  call the generated kernel does not take);
* ``gemm_bf16`` (more than ``MAX_ROWS`` rows, bf16 compute, builds with AVX512_BF16): the
  generated blocked GEMM (:func:`gemm_group`): x rounded to bf16 and packed once, the weight
  dequantized to bf16 tile by tile (no full-size copy), float32 accumulation, the output written
  in x's dtype; it also takes the CPU fusion groups' RMSNorm (while packing), residual add and
  SiLU * mul (in the store) from ``cpu_kernels.packed_linear`` / ``fused_linear``;
* ``reference``: the op's float reference, only where no other candidate exists (NF4 without a
  compiler): :func:`reference_reason` says why (logged, counted, in the layer record).

**How it is decided** (``LOWBIT_CPU_DISPATCH``, read per call):

* ``measure`` (default): per (format, N, K, row class, compute dtype, threads, ISA build,
  int8-activation mode) the candidates are timed on the weight itself at its first call of that
  row class: interleaved, each weight evicted from the caches before each call (a decode step
  finds a layer's weights in memory, not in cache), minimum of :data:`REPEATS` calls (prefill
  classes: :data:`PREFILL_REPEATS`, candidates more than :data:`PREFILL_DROP` times slower than the
  best after one round dropped). The static rule's choice (``generated`` up to ``MAX_ROWS`` rows,
  ``torch`` above) is kept unless another candidate is :data:`MARGIN` faster; ``gemm_bf16`` is kept
  over ``dequant_bf16`` unless that is :data:`MARGIN` faster (the GEMM also takes the fusion groups'
  prologue and epilogues, which one call's timing does not see). Row classes (:data:`ROW_CLASSES`) are
  timed at their upper end (the open class at 512 rows). The plan is cached in memory and on disk
  (``$LOWBIT_CACHE_DIR/cpu/dispatch.json``, keyed by a version, the shape, the host's CPU flags,
  torch's version and the sources of the generated kernels), so a process pays each timing once
  and later processes not at all; logged once per shape and class (INFO) with the times.
* ``generated``: the static rule (generated kernel where it applies, torch's packed kernel
  otherwise; what the test suite pins, since timings on a shared machine vary);
* ``torch``: torch's packed kernel for every call; ``dequant``: dequantize-then-matmul in the
  compute dtype for every call; ``gemm``: the generated GEMM for every call it takes (the static
  rule for the others).

Each compiled or compressed layer's record (``cpu_kernel``) holds :func:`layer_record`: the rule,
and for every row class decided so far which kernel runs and why (filled in as calls come).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import threading
import time
from typing import Any, Callable

import torch

from lowbit_compiler import memory
from lowbit_compiler.backends import cpu_codegen
from lowbit_compiler.formats import NF4_GRID, WeightFormat

log = logging.getLogger("lowbit_compiler")

ENV = "LOWBIT_CPU_DISPATCH"
MODES = ("measure", "generated", "torch", "dequant", "gemm")
VERSION = 2  # in every dense plan's disk key: a change in how plans are made invalidates the old ones
# (2: the GEMM keeps a near tie with dequantize + bf16 matmul, and a prefill candidate is dropped after
# one round only when 2x slower than the best)
MARGIN = 1.05  # a candidate must be this much faster than the static rule's choice to replace it
REPEATS = 11
PREFILL_REPEATS = 3
PREFILL_DROP = 2.0  # a prefill candidate this much slower than the best after one round is not timed again
# (torch's packed and dequantize + fp32: 2.2-2.7x at 512 rows; at 1.3x one slow first call of the GEMM,
# 46.7 against 29.7 ms, kept it out and its plan on disk)
PREFILL_ROWS = 512  # the open row class is timed at this many rows
BLOCK_BYTES = 32 << 20  # dequantize-then-matmul: bytes of the dequantized block of weight rows (smaller blocks
# make oneDNN's matmul markedly slower: 2048-row blocks of a 5632 x 2048 bf16 weight cost 1.3x one block)
# (first row, last row or None, rows timed): a call of M rows takes the plan of the class holding M
ROW_CLASSES = ((1, 1, 1), (2, 2, 2), (3, 4, 4), (5, 8, 8), (9, 16, 16), (17, 64, 64), (65, 256, 256),
               (257, None, PREFILL_ROWS))
CANDIDATES = ("generated", "torch", "gemm_bf16", "dequant_bf16", "dequant_fp32", "dense_copy", "reference")
DESCRIPTION = {"generated": "the generated C kernel (float32)", "torch": "torch's packed kernel",
               "dense_copy": "the dense format's kernels over a decompressed copy of the N:M weight",
               "gemm_bf16": "the generated blocked GEMM (bf16 products, float32 accumulation, the weight "
                            "dequantized tile by tile)",
               "dequant_bf16": "dequantize (generated C) + bf16 matmul, blockwise",
               "dequant_fp32": "dequantize (generated C) + fp32 matmul, blockwise",
               "reference": "the float reference (the whole weight dequantised, fp32 matmul)"}


# ------------------------------------------------------------------------------------------------
# Shared machinery: timing, cache eviction, plans cached in memory and on disk
# ------------------------------------------------------------------------------------------------

def timer() -> float:
    return time.perf_counter()


_FLUSH_SOURCE = r"""
#include <stdint.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
/* evict [p, p + n) from every cache level (x86: clflush; elsewhere nothing: returns 0) */
int lowbit_flush(const char* p, int64_t n)
{
#if defined(__x86_64__) || defined(__i386__)
    for (int64_t i = 0; i < n; i += 64)
        _mm_clflush(p + i);
    _mm_mfence();
    return 1;
#else
    (void)p; (void)n;
    return 0;
#endif
}
"""


def flush_spec() -> dict:
    """The source arguments of the cache-flush helper the measured dispatch times with."""
    return {"name": "lowbit_flush", "text": _FLUSH_SOURCE}


@functools.lru_cache(maxsize=1)
def _flush_fn():
    fn = cpu_codegen.build(argtypes=[ctypes.c_void_p, ctypes.c_int64],
                           fallback="the dispatch times the kernels with their weights in cache",
                           what="the cache-flush helper", **flush_spec())
    if fn is not None:
        fn.restype = ctypes.c_int
    return fn


def evict(tensors) -> None:
    """Evict the tensors' bytes from the caches: a decode step finds a layer's weights in memory,
    not in cache (a model's weights are many times the last-level cache), so that is how the
    dispatch times the kernels."""
    fn = _flush_fn()
    if fn is None:
        return
    for t in tensors:
        if t is not None:
            fn(t.data_ptr(), t.numel() * t.element_size())


def fastest(calls: dict, repeats: int = REPEATS, cold: dict | None = None,
            clock: Callable[[], float] = timer, drop_above: float | None = None) -> dict[str, float]:
    """Minimum seconds per call of each contender, calls interleaved (one of each in turn); the
    tensors ``cold[name]`` are evicted from the caches before each call of ``name``. With
    ``drop_above``, contenders slower than that many times the best after the first round are
    not timed again (their one time is kept)."""
    best = {name: float("inf") for name in calls}
    live = dict(calls)
    for i in range(repeats):
        for name, call in live.items():
            evict((cold or {}).get(name, ()))
            t0 = clock()
            call()
            best[name] = min(best[name], clock() - t0)
        if i == 0 and drop_above is not None:
            top = min(best.values())
            live = {n: c for n, c in live.items() if best[n] <= drop_above * top}
    return best


def digest(*sources: str) -> str:
    """A short hash of kernel sources, the compiler flags and the host's CPU flags (a plan is only
    valid for the kernels and the machine it was measured with)."""
    return hashlib.sha256("\n".join([*sources, " ".join(cpu_codegen.FLAGS), cpu_codegen._host_flags()])
                          .encode()).hexdigest()[:16]


def cached_plan(memo: dict, memo_key: tuple, path: Callable[[], Any], disk_key: Callable[[], str],
                make: Callable[[], dict]) -> dict:
    """A dispatch decision: from ``memo``, else from the JSON file ``path()`` (``disk_key()``, which
    names the kernels' sources and the host), else ``make()`` (a measurement), stored in both (the
    file merged with what other processes wrote meanwhile; atomic replace). A measurement marked
    ``busy`` (timed while the load average exceeded the CPU count) is kept in memory only, so a
    later process on a quieter machine times again. ``path`` is called only on a memory miss:
    resolving the cache folder costs a mkdir and a stat (about 70 us, which the sparse kernels'
    per-call plan lookup paid on every decode call)."""
    found = memo.get(memo_key)
    if found is not None:
        return found
    path = path()
    key = disk_key()
    stored = _read(path)
    if key not in stored:
        stored[key] = make()
        if stored[key].get("busy"):  # timed on a busy machine: for this process only, timed again next time
            memo[memo_key] = stored[key]
            return stored[key]
        current = _read(path)
        current[key] = stored[key]
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(current, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError as error:  # a read-only cache: the plan holds for this process only
            log.warning("lowbit: could not write the CPU dispatch plans to %s (%s); they are measured again in "
                        "the next process", path, error)
    memo[memo_key] = stored[key]
    return stored[key]


def _read(path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def env_mode(env: str, modes: tuple[str, ...], default: str = "measure") -> str:
    """The value of a dispatch override variable, checked."""
    mode = os.environ.get(env, default)
    if mode not in modes:
        raise ValueError(f"{env}={mode!r}: expected one of {', '.join(modes)} ('{default}' when unset)")
    return mode


# ------------------------------------------------------------------------------------------------
# The dequantization kernel (candidates dequant_bf16 / dequant_fp32)
# ------------------------------------------------------------------------------------------------

DEQUANT_SOURCE = r"""
/* lowbit generated CPU kernel: int8 / int4 / int3 / int2 / NF4 weights (our storage layout) -> bf16 or
   float32 rows, and the blocked GEMM over them */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define DQ_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DQ_AVX2 1
#endif

const char* lowbit_isa(void)
{
#if defined(DQ_AVX512) && defined(__AVX512BF16__)
    return "avx512_bf16";
#elif defined(DQ_AVX512)
    return "avx512";
#elif defined(DQ_AVX2)
    return "avx2";
#else
    return "portable";
#endif
}

static inline float dq_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
/* float32 -> bf16, round to nearest even (finite values) */
static inline uint16_t dq_round(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7FFFu + ((u >> 16) & 1u); return (uint16_t)(u >> 16); }
static inline void dq_put(void* out, int64_t i, float v, int bf16)
{
    if (bf16) ((uint16_t*)out)[i] = dq_round(v);
    else ((float*)out)[i] = v;
}

#if defined(DQ_AVX512)
static inline void dq_store16(void* out, int64_t i, __m512 v, int bf16)
{
    if (bf16) {
#if defined(__AVX512BF16__)
        _mm256_storeu_si256((__m256i*)((uint16_t*)out + i), (__m256i)_mm512_cvtneps_pbh(v));
#else
        __m512i u = _mm512_castps_si512(v);
        u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                                 _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
        _mm256_storeu_si256((__m256i*)((uint16_t*)out + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
#endif
    } else {
        _mm512_storeu_ps((float*)out + i, v);
    }
}
#elif defined(DQ_AVX2)
static inline void dq_store8(void* out, int64_t i, __m256 v, int bf16)
{
    if (bf16) {
        __m256i u = _mm256_castps_si256(v);
        u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                                                 _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
        u = _mm256_srli_epi32(u, 16);
        _mm_storeu_si128((__m128i*)((uint16_t*)out + i),
                         _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
    } else {
        _mm256_storeu_ps((float*)out + i, v);
    }
}
#endif

/* Row n of a quantized [N, K] weight, dequantized into o [K] (bf16 when bf16 != 0, else
   float32). bits 8: codes int8 [N, row_bytes], scale bf16 [N]. bits 4: codes
   [N, row_bytes] two per byte (column 2j in the low nibble of byte j, 2j + 1 in the high one),
   scale bf16 [N, groups], zero uint8 [N, groups] or NULL (8); groups of `group` columns, the last
   one may reach past K (padded columns are not written). bits 3 / 2: the same with the codes a
   little-endian bit stream per row (column k at bit bits * k; formats.pack_codes) and NULL zero
   meaning 4 / 2. w = (q - z) * s, float32, then rounded; with a 16-entry table (NF4) w = table[q]
   * s instead. */
static void dq_row(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, const float* table,
                   void* o, int64_t n, int64_t K, int64_t row_bytes, int64_t group, int64_t groups, int64_t bits,
                   int bf16)
{
    const uint8_t* c = codes + n * row_bytes;
    if (bits == 8) {
        const float s = dq_bf16(scale[n]);
        const int8_t* q = (const int8_t*)c;
        int64_t k = 0;
#if defined(DQ_AVX512)
        const __m512 sv = _mm512_set1_ps(s);
        for (; k + 16 <= K; k += 16)
            dq_store16(o, k, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128((const __m128i*)(q + k)))), sv), bf16);
#elif defined(DQ_AVX2)
        const __m256 sv = _mm256_set1_ps(s);
        for (; k + 8 <= K; k += 8)
            dq_store8(o, k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                _mm_loadl_epi64((const __m128i*)(q + k)))), sv), bf16);
#endif
        for (; k < K; k++)
            dq_put(o, k, (float)q[k] * s, bf16);
        return;
    }
    if (bits == 2 || bits == 3) {  /* int3 / int2: code k at bit bits * k of the row's little-endian stream */
#if defined(DQ_AVX512) && defined(__AVX512VBMI__)
        /* 32 codes (bits * 4 bytes) per step: each 16-bit lane gets the two bytes its code starts in
           (vpermb), shifted down to it (vpsrlvw); the group's 2^bits values, rounded to bf16 as below,
           looked up by code (vpermw) */
        uint8_t at8[64];
        uint16_t sh16[32];
        for (int i = 0; i < 32; i++) {
            at8[2 * i] = (uint8_t)((bits * i) >> 3);
            at8[2 * i + 1] = (uint8_t)(((bits * i) >> 3) + 1);
            sh16[i] = (uint16_t)((bits * i) & 7);
        }
        const __m512i at = _mm512_loadu_si512(at8), sh = _mm512_loadu_si512(sh16);
        const __m512i mask = _mm512_set1_epi16((short)((1 << bits) - 1));
        const __m512 codes16 = _mm512_cvtepi32_ps(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
#endif
        for (int64_t g = 0; g < groups; g++) {
            const float s = dq_bf16(scale[n * groups + g]);
            const float off = -(zero ? (float)zero[n * groups + g] : (float)(1 << (bits - 1))) * s;
            const int64_t k0 = g * group, k1 = k0 + group < K ? k0 + group : K;
            int64_t k = k0;  /* a multiple of 8: groups are */
#if defined(DQ_AVX512) && defined(__AVX512VBMI__)
            if (bf16) {
                uint16_t t16[16];
                dq_store16(t16, 0, _mm512_fmadd_ps(codes16, _mm512_set1_ps(s), _mm512_set1_ps(off)), 1);
                const __m512i tv = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)t16));
                for (; k + 32 <= k1; k += 32) {
                    const __m512i raw = _mm512_castsi128_si512(
                        _mm_maskz_loadu_epi8((__mmask16)((1u << (4 * bits)) - 1), c + bits * k / 8));
                    const __m512i q = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi8(at, raw), sh), mask);
                    _mm512_storeu_si512((uint16_t*)o + k, _mm512_permutexvar_epi16(q, tv));
                }
            }
#endif
            for (; k < k1; k++) {
                const int64_t bit = bits * k, byte = bit >> 3, shift = bit & 7;
                unsigned v = c[byte];
                if (shift + bits > 8)  /* the code runs into the next byte (in the row: the code is) */
                    v |= (unsigned)c[byte + 1] << 8;
                dq_put(o, k, (float)((v >> shift) & ((1u << bits) - 1)) * s + off, bf16);
            }
        }
        return;
    }
    if (table) {  /* NF4: the code looks up its grid value */
        for (int64_t g = 0; g < groups; g++) {
            const float s = dq_bf16(scale[n * groups + g]);
            const int64_t k0 = g * group, k1 = k0 + group < K ? k0 + group : K;
            int64_t k = k0;
#if defined(DQ_AVX512)
            const __m512 sv = _mm512_set1_ps(s), tv = _mm512_loadu_ps(table);
            const __m128i low4 = _mm_set1_epi8(15);
            for (; k + 32 <= k1; k += 32) {
                const __m128i b = _mm_loadu_si128((const __m128i*)(c + k / 2));
                const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
                dq_store16(o, k, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(
                    _mm_unpacklo_epi8(lo, hi)), tv), sv), bf16);
                dq_store16(o, k + 16, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(
                    _mm_unpackhi_epi8(lo, hi)), tv), sv), bf16);
            }
#elif defined(DQ_AVX2)
            const __m256 sv = _mm256_set1_ps(s), tlo = _mm256_loadu_ps(table), thi = _mm256_loadu_ps(table + 8);
            const __m128i low4 = _mm_set1_epi8(15);
            for (; k + 16 <= k1; k += 16) {
                const __m128i b = _mm_loadl_epi64((const __m128i*)(c + k / 2));
                const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
                const __m128i w = _mm_unpacklo_epi8(lo, hi);  /* columns k .. k + 15 in order */
                for (int h = 0; h < 2; h++) {
                    const __m256i q = _mm256_cvtepu8_epi32(h ? _mm_srli_si128(w, 8) : w);
                    /* two 8-entry permutes, blended on the code's bit 3 (moved to the sign bit) */
                    const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, q),
                                                      _mm256_permutevar8x32_ps(thi, q),
                                                      _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
                    dq_store8(o, k + 8 * h, _mm256_mul_ps(v, sv), bf16);
                }
            }
#endif
            for (; k < k1; k++) {
                const uint8_t b = c[k / 2];
                dq_put(o, k, table[(k & 1) ? (b >> 4) : (b & 15)] * s, bf16);
            }
        }
        return;
    }
    for (int64_t g = 0; g < groups; g++) {
        const float s = dq_bf16(scale[n * groups + g]);
        const float off = -(zero ? (float)zero[n * groups + g] : 8.0f) * s;
        const int64_t k0 = g * group, k1 = k0 + group < K ? k0 + group : K;
        int64_t k = k0;  /* even: groups are a multiple of 2 columns */
#if defined(DQ_AVX512)
        const __m512 sv = _mm512_set1_ps(s), ov = _mm512_set1_ps(off);
        const __m128i low4 = _mm_set1_epi8(15);
        for (; k + 32 <= k1; k += 32) {
            const __m128i b = _mm_loadu_si128((const __m128i*)(c + k / 2));
            const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
            dq_store16(o, k, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi))),
                                             sv, ov), bf16);
            dq_store16(o, k + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi))),
                                                  sv, ov), bf16);
        }
#elif defined(DQ_AVX2)
        const __m256 sv = _mm256_set1_ps(s), ov = _mm256_set1_ps(off);
        const __m128i low4 = _mm_set1_epi8(15);
        for (; k + 16 <= k1; k += 16) {
            const __m128i b = _mm_loadl_epi64((const __m128i*)(c + k / 2));
            const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
            const __m128i w = _mm_unpacklo_epi8(lo, hi);  /* columns k .. k + 15 in order */
            dq_store8(o, k, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(w)), sv, ov), bf16);
            dq_store8(o, k + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(w, 8))),
                                                sv, ov), bf16);
        }
#endif
        for (; k < k1; k++) {
            const uint8_t b = c[k / 2];
            dq_put(o, k, (float)((k & 1) ? (b >> 4) : (b & 15)) * s + off, bf16);
        }
    }
}

/* Rows [n0, n0 + rows) of the weight into out [rows, K], threads over rows. */
void lowbit_dequant(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, const float* table,
                    void* out, int64_t n0, int64_t rows, int64_t K, int64_t row_bytes, int64_t group,
                    int64_t groups, int64_t bits, int bf16, int threads)
{
    const int64_t esize = bf16 ? 2 : 4;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        dq_row(codes, scale, zero, table, (char*)out + r * K * esize, n0 + r, K, row_bytes, group, groups, bits, bf16);
}

/* ---- The blocked GEMM (candidate gemm_bf16): y[M, N] = x[M, K] @ dequantize(W)^T + bias ------------
   x rounded to bf16 and packed once per call (lowbit_gemm_pack); each thread takes blocks of GEMM_N
   weight rows, dequantizes them to bf16 into a small buffer (one row at a time, dq_row: no
   full-size copy) and multiplies them with every block of GEMM_M packed rows of x: 2 x GEMM_N
   float32 accumulators (16 rows of x each), one vdpbf16ps per accumulator per pair of columns, the
   weight's pair broadcast, x's pairs loaded. The weight is the broadcast operand so that it is
   read in its own row order (no transpose); x, the small operand, is the one packed. AVX512_BF16
   only: elsewhere the entry returns 0 and the candidate is not offered. */
#define GEMM_M 32  /* rows of x per tile: two vectors of 16 */
#define GEMM_N 12  /* weight rows per tile: 24 accumulators, 2 x vectors, a broadcast: 27 of 32 registers */


int lowbit_gemm_available(void)
{
#if defined(DQ_AVX512) && defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

/* x [M, K] (bf16 when x_bf16 != 0, else float32; row stride ldx elements) -> xp: per block of
   GEMM_M rows, per pair of columns p, the block's rows' (x[2p], x[2p + 1]) as one bf16 pair each
   ([ceil(M / 32)][ceil(K / 2)][32] 32-bit pairs); rows past M and the column past an odd K zero.
   With norm (float32 [K]) each row is rms_norm(x, norm, eps) first (in float32: x * (1 /
   sqrt(mean(x^2) + eps)) * norm), rounded to bf16 once. */
static inline float gemm_in(const void* x, int x_bf16, int64_t i)
{
    return x_bf16 ? dq_bf16(((const uint16_t*)x)[i]) : ((const float*)x)[i];
}

void lowbit_gemm_pack(const void* x, int x_bf16, int64_t M, int64_t K, int64_t ldx, uint32_t* xp,
                      const float* norm, float eps, int threads)
{
    const int64_t K2 = (K + 1) / 2, blocks = (M + GEMM_M - 1) / GEMM_M;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < blocks * GEMM_M; r++) {
        uint32_t* o = xp + (r / GEMM_M) * K2 * GEMM_M + r % GEMM_M;
        const void* row = x_bf16 ? (const void*)((const uint16_t*)x + r * ldx) : (const void*)((const float*)x + r * ldx);
        int64_t p = 0;
        if (r >= M) {
            for (; p < K2; p++) o[p * GEMM_M] = 0;
            continue;
        }
        float inv = 1.0f;
        if (norm) {
            float ss = 0.0f;
            int64_t k = 0;
#if defined(DQ_AVX512)
            __m512 acc = _mm512_setzero_ps();
            for (; k + 16 <= K; k += 16) {
                const __m512 v = x_bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                              _mm256_loadu_si256((const __m256i*)((const uint16_t*)row + k))), 16))
                                        : _mm512_loadu_ps((const float*)row + k);
                acc = _mm512_fmadd_ps(v, v, acc);
            }
            ss = _mm512_reduce_add_ps(acc);
#endif
            for (; k < K; k++) {
                const float v = gemm_in(row, x_bf16, k);
                ss += v * v;
            }
            inv = 1.0f / sqrtf(ss / (float)K + eps);
        }
#if defined(DQ_AVX512) && defined(__AVX512BF16__)
        const __m512i at = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(GEMM_M));
        const __m512 iv = _mm512_set1_ps(inv);
        for (; p + 16 <= K / 2; p += 16) {
            __m512 lo, hi;
            if (x_bf16) {
                const __m512i h = _mm512_loadu_si512((const uint16_t*)row + 2 * p);
                lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
                hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
            } else {
                lo = _mm512_loadu_ps((const float*)row + 2 * p);
                hi = _mm512_loadu_ps((const float*)row + 2 * p + 16);
            }
            if (norm) {
                lo = _mm512_mul_ps(_mm512_mul_ps(lo, iv), _mm512_loadu_ps(norm + 2 * p));
                hi = _mm512_mul_ps(_mm512_mul_ps(hi, iv), _mm512_loadu_ps(norm + 2 * p + 16));
            }
            _mm512_i32scatter_epi32(o + p * GEMM_M, at, (__m512i)_mm512_cvtne2ps_pbh(hi, lo), 4);
        }
#endif
        for (; p < K2; p++) {
            float lo = gemm_in(row, x_bf16, 2 * p), hi = 2 * p + 1 < K ? gemm_in(row, x_bf16, 2 * p + 1) : 0.0f;
            if (norm) {
                lo = lo * inv * norm[2 * p];
                hi = 2 * p + 1 < K ? hi * inv * norm[2 * p + 1] : 0.0f;
            }
            o[p * GEMM_M] = (uint32_t)dq_round(lo) | ((uint32_t)dq_round(hi) << 16);
        }
    }
}

#if defined(DQ_AVX512) && defined(__AVX512BF16__)
/* acc[i][0..31] = sum over pairs p of x rows' pairs . w row i's pair p (one tile: GEMM_N weight rows, GEMM_M rows of x) */
static inline void gemm_tile(const uint32_t* xp, const uint32_t* w, int64_t K2, int64_t wstride, float* acc)
{
    __m512 a[GEMM_N][2];
    for (int i = 0; i < GEMM_N; i++)
        a[i][0] = a[i][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < K2; p++) {
        const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xp + p * GEMM_M);
        const __m512bh x1 = (__m512bh)_mm512_loadu_si512(xp + p * GEMM_M + 16);
        #pragma GCC unroll 12
        for (int i = 0; i < GEMM_N; i++) {
            const __m512bh wv = (__m512bh)_mm512_set1_epi32((int)w[i * wstride + p]);
            a[i][0] = _mm512_dpbf16_ps(a[i][0], x0, wv);
            a[i][1] = _mm512_dpbf16_ps(a[i][1], x1, wv);
        }
    }
    for (int i = 0; i < GEMM_N; i++) {
        _mm512_store_ps(acc + i * GEMM_M, a[i][0]);
        _mm512_store_ps(acc + i * GEMM_M + 16, a[i][1]);
    }
}

/* gemm_tile for a last block of at most 16 rows: its first 16 only (half the products; a 100-row
   call computes 112 rows, not 128) */
static inline void gemm_tile16(const uint32_t* xp, const uint32_t* w, int64_t K2, int64_t wstride, float* acc)
{
    __m512 a[GEMM_N];
    for (int i = 0; i < GEMM_N; i++)
        a[i] = _mm512_setzero_ps();
    for (int64_t p = 0; p < K2; p++) {
        const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xp + p * GEMM_M);
        #pragma GCC unroll 12
        for (int i = 0; i < GEMM_N; i++)
            a[i] = _mm512_dpbf16_ps(a[i], x0, (__m512bh)_mm512_set1_epi32((int)w[i * wstride + p]));
    }
    for (int i = 0; i < GEMM_N; i++)
        _mm512_store_ps(acc + i * GEMM_M, a[i]);
}

/* r[i][j] <- r[j][i]: a 16 x 16 float32 transpose (the tile's columns of rows -> its rows) */
static inline void gemm_transpose16(__m512 r[16])
{
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 2])));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 2])));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[4 * i + 1]), _mm512_castps_pd(t[4 * i + 3])));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[4 * i + 1]), _mm512_castps_pd(t[4 * i + 3])));
    }
    for (int j = 0; j < 4; j++) {
        t[j] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0x88);
        t[j + 4] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0xdd);
        t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
        t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
    }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
    }
}

/* e^x, float32 (Cephes' expf polynomial on x - n ln 2, scaled by 2^n; ~1 ulp), x clamped to
   [-87.3, 88.7] */
static inline __m512 gemm_exp(__m512 x)
{
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

/* y [M, N] (bf16 when out_bf16 != 0, else float32; row stride N) = xp (lowbit_gemm_pack) times the
   weight (dq_row's arguments; bits, group and layout shared by the second weight) + bias (float32
   [N] or NULL), + residual ([M, N], y's dtype) when given. epilogue 1: two weights of N rows
   (codes2 / scale2 / zero2, bias2), y = silu(x W^T + bias) * (x W2^T + bias2), a gated MLP's gate
   and up: each tile takes GEMM_N / 2 rows of each. Threads over blocks of weight rows. Returns 0,
   or 1 when a thread could not allocate its weight buffer (nothing written then). */
int lowbit_gemm(const uint32_t* xp, int64_t M, int64_t K, const uint8_t* codes, const uint16_t* scale,
                const uint8_t* zero, const float* table, int64_t row_bytes, int64_t group, int64_t groups,
                int64_t bits, int64_t N, const float* bias, void* y, int out_bf16, int threads,
                const void* residual, int epilogue, const uint8_t* codes2, const uint16_t* scale2,
                const uint8_t* zero2, const float* bias2)
{
#if defined(DQ_AVX512) && defined(__AVX512BF16__)
    const int64_t K2 = (K + 1) / 2, mblocks = (M + GEMM_M - 1) / GEMM_M;
    const int64_t per = epilogue == 1 ? GEMM_N / 2 : GEMM_N, nblocks = (N + per - 1) / per;
    /* weight rows 16 pairs apart past a multiple of 16: rows 4 kB apart would share the L1 sets
       (measured: a 2048-column weight ran at 0.64x oneDNN's speed, 0.96x with the padding) */
    const int64_t wstride = (K2 + 15) / 16 * 16 + 16;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        uint32_t* wb = (uint32_t*)aligned_alloc(64, (size_t)(GEMM_N * wstride * 4));
        if (!wb) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp barrier
        if (failed) {
            free(wb);
        } else {
            float acc[GEMM_N * GEMM_M] __attribute__((aligned(64)));
            const __m512i second_at = _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                       _mm512_set1_epi32((int)per));
            memset(wb, 0, (size_t)(GEMM_N * wstride * 4));
            #pragma omp for schedule(static)
            for (int64_t nb = 0; nb < nblocks; nb++) {
                const int64_t n0 = nb * per, nn = N - n0 < per ? N - n0 : per;
                for (int64_t i = 0; i < GEMM_N; i++) {  /* K odd: the pad column stays zero from the memset */
                    const int64_t j = i % per, second = i >= per;
                    if (j < nn)
                        dq_row(second ? codes2 : codes, second ? scale2 : scale, second ? zero2 : zero, table,
                               wb + i * wstride, n0 + j, K, row_bytes, group, groups, bits, 1);
                    else
                        memset(wb + i * wstride, 0, (size_t)(K2 * 4));
                }
                const __mmask16 keep = (__mmask16)((1u << nn) - 1);
                const __m512 b = bias ? _mm512_maskz_loadu_ps(keep, bias + n0) : _mm512_setzero_ps();
                const __m512 b2 = bias2 ? _mm512_maskz_loadu_ps(keep, bias2 + n0) : _mm512_setzero_ps();
                for (int64_t mb = 0; mb < mblocks; mb++) {
                    const int64_t m0 = mb * GEMM_M, mm = M - m0 < GEMM_M ? M - m0 : GEMM_M;
                    if (mm <= 16)
                        gemm_tile16(xp + mb * K2 * GEMM_M, wb, K2, wstride, acc);
                    else
                        gemm_tile(xp + mb * K2 * GEMM_M, wb, K2, wstride, acc);
                    for (int64_t h = 0; h < GEMM_M / 16 && 16 * h < mm; h++) {
                        __m512 rows[16];  /* the tile's rows 16h.. as vectors of its GEMM_N columns */
                        for (int i = 0; i < 16; i++)
                            rows[i] = i < GEMM_N ? _mm512_load_ps(acc + i * GEMM_M + 16 * h) : _mm512_setzero_ps();
                        gemm_transpose16(rows);
                        for (int64_t r = 16 * h; r < mm && r < 16 * h + 16; r++) {
                            __m512 v = _mm512_add_ps(rows[r - 16 * h], b);
                            if (epilogue == 1) {  /* columns per.. are the second weight's */
                                const __m512 u = _mm512_add_ps(_mm512_permutexvar_ps(second_at, rows[r - 16 * h]), b2);
                                v = _mm512_mul_ps(_mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f),
                                                                                 gemm_exp(_mm512_sub_ps(_mm512_setzero_ps(), v)))), u);
                            }
                            const int64_t at = (m0 + r) * N + n0;
                            if (out_bf16) {
                                if (residual)
                                    v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                        _mm256_maskz_loadu_epi16(keep, (const uint16_t*)residual + at)), 16)));
                                _mm256_mask_storeu_epi16((uint16_t*)y + at, keep, (__m256i)_mm512_cvtneps_pbh(v));
                            } else {
                                if (residual)
                                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(keep, (const float*)residual + at));
                                _mm512_mask_storeu_ps((float*)y + at, keep, v);
                            }
                        }
                    }
                }
            }
            free(wb);
        }
    }
    return failed;
#else
    return 1;
#endif
}
"""


@functools.lru_cache(maxsize=None)
def _dequant_build(isa: str):
    return cpu_codegen.build(argtypes=[ctypes.c_void_p] * 5 + [ctypes.c_int64] * 7 + [ctypes.c_int, ctypes.c_int],
                             fallback="the dequantize-then-matmul candidate is left out of the CPU dispatch",
                             what="the dequantization kernel", **dequant_spec(isa))


def dequant_spec(isa: str) -> dict:
    """The source arguments of the dequantizer / GEMM library (``cpu_codegen.prebuild``)."""
    return {"name": "lowbit_dequant", "text": DEQUANT_SOURCE, "isa": isa}


def dequant_kernel(isa: str | None = None):
    """The compiled dequantization kernel (ctypes), or None (no compiler, or turned off by
    ``LOWBIT_CPU_CODEGEN=0``; logged once)."""
    if cpu_codegen.kernel_disabled():
        return None
    return _dequant_build(isa or cpu_codegen.isa_choice())


@functools.lru_cache(maxsize=None)
def _gemm_build(isa: str):
    """(pack, gemm) entry points of the dequantization library, or None where it has no blocked GEMM
    (no AVX512_BF16 in this build) or no compiler."""
    probe = cpu_codegen.build(argtypes=[], fallback="the generated GEMM candidate is left out",
                              what="the dequantization kernel", entry="lowbit_gemm_available", **dequant_spec(isa))
    if probe is None:
        return None
    probe.restype = ctypes.c_int
    if not probe():
        return None
    pack = cpu_codegen.build(argtypes=[ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 3
                             + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_int],
                             what="the dequantization kernel", entry="lowbit_gemm_pack", **dequant_spec(isa))
    gemm = cpu_codegen.build(argtypes=[ctypes.c_void_p] + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 4
                             + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 2
                             + [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 4,
                             what="the dequantization kernel", entry="lowbit_gemm", **dequant_spec(isa))
    if pack is None or gemm is None:
        return None
    gemm.restype = ctypes.c_int
    return (pack, gemm)


def gemm_kernel(isa: str | None = None):
    """The generated blocked GEMM's (pack, gemm) entry points, or None (no compiler, turned off by
    ``LOWBIT_CPU_CODEGEN=0``, or a build without AVX512_BF16)."""
    if cpu_codegen.kernel_disabled():
        return None
    return _gemm_build(isa or cpu_codegen.isa_choice())


def gemm_linear(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                bias: torch.Tensor | None, fmt: str, in_features: int, out_dtype: torch.dtype,
                isa: str | None = None) -> torch.Tensor | None:
    """``x2[M, K] @ dequantize(W).T + bias`` by the generated blocked GEMM (x rounded to bf16, the
    weight dequantized to bf16 tile by tile, float32 accumulation), a contiguous ``[M, N]`` tensor
    of ``out_dtype`` (float32 and bf16 written directly, others cast), or None when the kernel is
    not available (or does not cover the format). The weight never has a full-size dequantized
    copy. :func:`gemm_group` is the same with the CPU fusion groups' prologue and epilogues."""
    out = gemm_group(x2, [(qweight, scale, zero, bias)], fmt, in_features, out_dtype, isa=isa)
    return None if out is None else out[0]


def gemm_group(x2: torch.Tensor, weights: list[tuple], fmt: str, in_features: int, out_dtype: torch.dtype,
               norm_weight: torch.Tensor | None = None, eps: float | None = None,
               residual: torch.Tensor | None = None, silu_mul: bool = False,
               isa: str | None = None) -> list[torch.Tensor] | None:
    """The generated blocked GEMM for weights of one input ``x2[M, K]`` (``weights``: ``(qweight,
    scale, zero, bias)`` each, all of format ``fmt``): x packed once (through ``rms_norm(x, (K,),
    norm_weight, eps)`` when ``norm_weight`` is given, computed in float32 while packing), then one
    product per weight, ``[M, N]`` each in ``out_dtype``; ``residual`` (one weight) is added in the
    store; ``silu_mul`` (two weights of equal N) gives the one output ``silu(x W0^T + b0) * (x W1^T
    + b1)``, computed from the float32 accumulators. None when the kernel is not available."""
    fns = gemm_kernel(isa)
    if fns is None or not dequant_covers(fmt) or (silu_mul and (len(weights) != 2 or
                                                                weights[0][1].shape[0] != weights[1][1].shape[0])):
        return None
    m = x2.shape[0]
    if residual is not None and (silu_mul or len(weights) != 1 or residual.shape[-1] != weights[0][1].shape[0]
                                 or residual.numel() != m * weights[0][1].shape[0]):
        return None  # the store adds a residual of the output's own shape to a single weight's output only
    pack, gemm = fns
    if x2.dtype not in (torch.float32, torch.bfloat16):
        x2 = x2.float()
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if norm_weight is not None and eps is None:  # what F.rms_norm takes for eps=None
        eps = torch.finfo(x2.dtype).eps
    pairs, blocks = (in_features + 1) // 2, (m + 31) // 32
    xp = _scratch(blocks * 32, pairs * 2, torch.bfloat16, "packed")
    threads = torch.get_num_threads()
    norm = None if norm_weight is None else norm_weight.to(torch.float32).contiguous()
    ptr = cpu_codegen._ptr
    pack(x2.data_ptr(), int(x2.dtype == torch.bfloat16), m, in_features, x2.stride(0), xp.data_ptr(),
         ptr(norm), float(eps or 0.0), threads)
    direct = out_dtype in (torch.float32, torch.bfloat16)
    ydtype = out_dtype if direct else torch.float32
    res = None if residual is None else residual.reshape(m, -1).to(ydtype).contiguous()  # one weight (checked)
    parts = [(_operands(qweight, scale, zero, fmt, in_features),
              None if bias is None else bias.to(torch.float32).contiguous()) for qweight, scale, zero, bias in weights]

    def run(first, second=None):
        (codes, scales, zeros, table, group, groups, bits), b = first
        (codes2, scales2, zeros2, *_), b2 = second or ((None,) * 7, None)
        n = scales.shape[0]
        y = torch.empty(m, n, dtype=ydtype)
        memory.advise_huge_pages(y)  # a 512-token prompt's float32 logits: 65 MB written once
        ok = gemm(xp.data_ptr(), m, in_features, codes.data_ptr(), scales.data_ptr(), ptr(zeros), ptr(table),
                  codes.shape[1], group, groups, bits, n, ptr(b), y.data_ptr(), int(ydtype == torch.bfloat16),
                  threads, ptr(res), int(second is not None), ptr(codes2), ptr(scales2), ptr(zeros2), ptr(b2))
        if ok != 0:
            raise MemoryError(f"lowbit: the generated GEMM could not allocate its per-thread weight buffer "
                              f"({n} x {in_features} weight)")
        return y if direct else y.to(out_dtype)

    if silu_mul:
        return [run(parts[0], parts[1])]
    return [run(part) for part in parts]


def dequant_rows(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: str,
                 in_features: int, n0: int, rows: int, dtype: torch.dtype, out: torch.Tensor | None = None,
                 isa: str | None = None) -> torch.Tensor | None:
    """Rows ``[n0, n0 + rows)`` of the weight dequantized to ``dtype`` (bf16 or float32), ``[rows,
    in_features]`` (into ``out`` when given), or None when the kernel is not available."""
    fn = dequant_kernel(isa)
    if fn is None or not dequant_covers(fmt) or dtype not in (torch.bfloat16, torch.float32):
        return None
    if out is None:
        out = torch.empty(rows, in_features, dtype=dtype)
    codes, scales, zeros, table, group, groups, bits = _operands(qweight, scale, zero, fmt, in_features)
    ptr = cpu_codegen._ptr
    fn(codes.data_ptr(), scales.data_ptr(), ptr(zeros), ptr(table), out.data_ptr(), n0, rows, in_features,
       codes.shape[1], group, groups, bits, int(dtype == torch.bfloat16), torch.get_num_threads())
    return out


_NF4_TABLE = torch.tensor(NF4_GRID, dtype=torch.float32)


def _operands(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: str,
              in_features: int) -> tuple:
    """A quantized weight as ``dq_row`` reads it (the dequantizer's and the GEMM's arguments):
    contiguous codes, the bf16 scales as int16, the zero points or None, NF4's table or None, the
    group size (K for per-channel int8), the groups per row and the bits per code."""
    f = WeightFormat.parse(fmt)
    return (qweight if qweight.is_contiguous() else qweight.contiguous(), scale.contiguous().view(torch.int16),
            None if zero is None else zero.contiguous(), _NF4_TABLE if f.kind == "nf4" else None,
            f.group_size or in_features, scale.shape[1] if scale.dim() == 2 else 1, f.bits)


def dequant_covers(fmt: str) -> bool:
    """Whether the dequantization kernel reads this format (int8, int4 / int3 / int2 group-wise, NF4)."""
    f = WeightFormat.parse(fmt)
    return ((f.kind == "int" and (f.bits == 8 or (f.bits in (2, 3, 4) and f.group_size is not None)))
            or (f.kind == "nf4" and f.group_size is not None))


def block_rows(in_features: int, dtype: torch.dtype, out_features: int) -> int:
    """Weight rows per dequantized block: :data:`BLOCK_BYTES` of ``dtype``, a multiple of 16."""
    per_row = in_features * (2 if dtype == torch.bfloat16 else 4)
    return max(16, min(out_features, BLOCK_BYTES // max(per_row, 1)) // 16 * 16)


_SCRATCH = threading.local()  # reused temporaries per thread: the dequantized blocks, the cast rows, the bf16 products


def _scratch(rows: int, in_features: int, dtype: torch.dtype, which: str = "weight") -> torch.Tensor:
    """A ``[rows, in_features]`` temporary in ``dtype`` from this thread's reused buffer ``which``
    (grown to the largest size seen, up to :data:`BLOCK_BYTES` plus a row; larger ones are fresh
    tensors, so a long prompt does not leave a thread holding its size for good): a fresh tensor
    per call costs its page faults every call (glibc hands large blocks back to the kernel on
    free, and the next call's block comes back zeroed, a fault per 4 kB page): measured on the
    4-layer prefill model at 512 tokens, dequantize-then-matmul's fresh temporaries were half the
    run's ~150k faults."""
    nbytes = rows * in_features * torch.tensor([], dtype=dtype).element_size()
    if nbytes > BLOCK_BYTES + in_features * 4:
        return torch.empty(rows, in_features, dtype=dtype)
    buf = getattr(_SCRATCH, which, None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        setattr(_SCRATCH, which, buf)
    return buf[:nbytes].view(dtype).view(rows, in_features)


def dequant_linear(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   bias: torch.Tensor | None, fmt: str, in_features: int, dtype: torch.dtype,
                   out_dtype: torch.dtype | None = None, isa: str | None = None) -> torch.Tensor | None:
    """``x2[M, K] @ dequantize(W).T + bias`` in ``dtype``, as a contiguous ``[M, N]`` tensor of
    ``out_dtype`` (default ``dtype``), or None when the dequantization kernel is not available.
    The weight is dequantized block by block of rows (:func:`block_rows`) into one reused
    temporary; one block (the usual case) is one ``addmm``; with several, each block's product is
    written (and cast) into its columns of the output. The cast of x and, when the output is cast,
    the products in ``dtype`` go to reused temporaries too (up to :data:`BLOCK_BYTES` each), so
    that the usual call's one large fresh allocation is the tensor it returns."""
    n, m = scale.shape[0], x2.shape[0]
    if x2.dtype == dtype:
        xd = x2
    else:
        xd = _scratch(m, in_features, dtype, "rows")
        xd.copy_(x2)
    step = block_rows(in_features, dtype, n)
    tmp = _scratch(min(step, n), in_features, dtype)
    b = None if bias is None else bias.to(dtype)
    cast = out_dtype not in (None, dtype)

    def product(w: torch.Tensor, bias_part: torch.Tensor | None, into: torch.Tensor | None) -> torch.Tensor:
        if bias_part is None:
            return torch.mm(xd, w.t()) if into is None else torch.mm(xd, w.t(), out=into)
        return torch.addmm(bias_part, xd, w.t()) if into is None else torch.addmm(bias_part, xd, w.t(), out=into)

    if step >= n:
        w = dequant_rows(qweight, scale, zero, fmt, in_features, 0, n, dtype, tmp, isa)
        if w is None:
            return None
        if not cast:
            return product(w, b, None)
        return product(w, b, _scratch(m, n, dtype, "product")).to(out_dtype)
    y = torch.empty(m, n, dtype=out_dtype or dtype)
    part = _scratch(m, step, dtype, "product") if cast else None
    for n0 in range(0, n, step):  # each block's product written (and cast) into its columns of y
        rows = min(step, n - n0)
        w = dequant_rows(qweight, scale, zero, fmt, in_features, n0, rows, dtype, tmp[:rows], isa)
        if w is None:
            return None
        into = None if part is None else (part if rows == step else _scratch(m, rows, dtype, "product_tail"))
        y[:, n0:n0 + rows] = product(w, None if b is None else b[n0:n0 + rows], into)
    return y


# ------------------------------------------------------------------------------------------------
# The dense dispatch
# ------------------------------------------------------------------------------------------------

_PLANS: dict[tuple, dict] = {}
_LOGGED: set[tuple] = set()
# (fmt, N, K, compute dtype) -> {row class: what runs and why}: the live part of the layer records
_RECORDS: dict[tuple, dict] = {}
# (fmt, candidate) -> calls (tests and benchmarks read it)
import collections  # noqa: E402

counter: collections.Counter = collections.Counter()


def dispatch_file():
    return cpu_codegen._cache_dir() / "dispatch.json"


def row_class(rows: int) -> tuple[int, int | None, int]:
    for lo, hi, timed in ROW_CLASSES:
        if hi is None or rows <= hi:
            return lo, hi, timed
    raise AssertionError(rows)


def class_label(cls: tuple) -> str:
    lo, hi, _ = cls
    return f"{lo}+ rows" if hi is None else (f"{lo} row" + ("s" if lo > 1 else "") if lo == hi else f"{lo}-{hi} rows")


# the variables a choice depends on, read at every call: through os.environ's own byte-keyed dict
# where it has one (POSIX CPython: ~50 ns a lookup against ~0.5 us for os.environ.get)
# the last one is cpu_sparse.DISPATCH_ENV (cpu_sparse imports this module)
_ENV_NAMES = (ENV, cpu_codegen.ISA_ENV, cpu_codegen.INT8_ACTIVATIONS_ENV, cpu_codegen.ENV, cpu_codegen.SPLIT8_ENV,
              "LOWBIT_SPARSE_DISPATCH")
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENV_KEYS = tuple(os.fsencode(name) for name in _ENV_NAMES)


def env_key() -> tuple:
    """The values of the variables a kernel choice depends on (a memo key: ``choose`` and the
    bound-kernel fast paths of ``cpu_kernels`` are redone when one of them changes)."""
    if isinstance(_ENV_DATA, dict):
        get = _ENV_DATA.get
        return tuple(get(name) for name in _ENV_KEYS)
    return tuple(os.environ.get(name) for name in _ENV_NAMES)


def has_torch_kernel(fmt: str) -> bool:
    """Whether torch has a packed CPU kernel for the format (int8 per channel, int4 group-wise);
    NF4 has none: its calls run the generated kernels or the float reference."""
    f = WeightFormat.parse(fmt)
    return f.kind == "int" and f.bits in (4, 8)


def static_choice(packed, rows: int) -> str:
    """The static rule: the generated kernel for decode sizes where it exists, torch's above; for a
    format torch has no kernel for (NF4, int3 / int2), dequantize + fp32 matmul (the float
    reference's numerics, blockwise), else the float reference."""
    if rows <= cpu_codegen.MAX_ROWS and packed.generated(cpu_codegen.int8_activations_enabled()) is not None:
        return "generated"
    if WeightFormat.parse(packed.fmt).kind == "sparse":
        return "dense_copy"
    if has_torch_kernel(packed.fmt):
        return "torch"
    return "dequant_fp32" if dequant_kernel() is not None and dequant_covers(packed.fmt) else "reference"


def candidates(packed, rows: int, compute_dtype: torch.dtype) -> list[str]:
    """The kernels that can run a call of ``rows`` rows on this weight here (the float reference
    only when no other can)."""
    out = []
    if rows <= cpu_codegen.MAX_ROWS and packed.generated(cpu_codegen.int8_activations_enabled()) is not None:
        out.append("generated")
    if WeightFormat.parse(packed.fmt).kind == "sparse":  # N:M: the lowering's measured plan (cpu_sparse.plan_24)
        return out or ["dense_copy"]                    # chose the N:M kernel; what it cannot take, the dense copy
    if has_torch_kernel(packed.fmt):
        out.append("torch")
    # above MAX_ROWS, and for a decode-sized call nothing else takes (NF4 with K padded to the group)
    if (rows > cpu_codegen.MAX_ROWS or not out) and dequant_kernel() is not None and dequant_covers(packed.fmt):
        if compute_dtype == torch.bfloat16:
            if rows > cpu_codegen.MAX_ROWS and gemm_kernel() is not None:
                out.append("gemm_bf16")
            out.append("dequant_bf16")
        out.append("dequant_fp32")
    return out or ["reference"]


def reference_reason(packed, rows: int) -> str:
    """Why a call of ``rows`` rows on ``packed`` runs the float reference (a format without a torch
    kernel, whose generated kernels are unavailable or do not cover the call)."""
    why = ", ".join(r.split(";")[0] for r in cpu_codegen._disabled_reason) or "not built"
    if rows <= cpu_codegen.MAX_ROWS:
        gap = (cpu_codegen.supported(packed.fmt) or
               (f"K={packed.in_features} is padded to the group" if packed.padded_in_features != packed.in_features
                else f"the generated kernel is unavailable ({why})"))
    else:
        gap = (f"a call of more than {cpu_codegen.MAX_ROWS} rows (the generated kernel's limit) needs the "
               f"dequantization kernel, which is unavailable ({why})")
    return (f"lowbit::wo_linear: format {packed.fmt} has no torch kernel, and {gap}; the float reference runs "
            "instead (the whole weight is dequantised to float32 on every call)")


def choose(packed, rows: int, compute_dtype: torch.dtype, env: tuple | None = None) -> str:
    """The kernel a call of ``rows`` rows on ``packed`` runs (one of :data:`CANDIDATES`): memoised
    on the weight per (rows, dtype, environment: ``env``, read now if not given), so a decode step
    pays a dictionary lookup."""
    key = (rows, compute_dtype, env_key() if env is None else env)
    got = packed._dispatch.get(key)
    if got is None:
        got = packed._dispatch[key] = _decide(packed, rows, compute_dtype)
    return got


def _decide(packed, rows: int, compute_dtype: torch.dtype) -> str:
    mode = env_mode(ENV, MODES)
    cls = row_class(rows)
    if mode == "generated":
        choice, why = static_choice(packed, rows), f"{ENV}=generated (the static rule)"
    elif mode == "torch":
        choice, why = ("torch", f"{ENV}=torch") if has_torch_kernel(packed.fmt) else (
            static_choice(packed, rows), f"{ENV}=torch, but torch has no {packed.fmt} kernel (the static rule)")
    elif mode == "dequant":
        dq = "dequant_bf16" if compute_dtype == torch.bfloat16 else "dequant_fp32"
        choice, why = (dq, f"{ENV}=dequant") if dequant_kernel() is not None and dequant_covers(packed.fmt) else (
            static_choice(packed, rows), f"{ENV}=dequant, but the dequantization kernel is not available")
    elif mode == "gemm":
        choice, why = ("gemm_bf16", f"{ENV}=gemm") if "gemm_bf16" in candidates(packed, rows, compute_dtype) else (
            static_choice(packed, rows), f"{ENV}=gemm, but the generated GEMM does not take this call (more than "
            f"{cpu_codegen.MAX_ROWS} rows, bf16 compute, AVX512_BF16; the static rule)")
    elif candidates(packed, rows, compute_dtype) == ["reference"]:  # nothing to time (and no plan to store:
        choice, why = "reference", reference_reason(packed, rows)      # a compiler may be there next time)
    else:
        entry = plan(packed, cls, compute_dtype)
        choice, why = entry["choice"], describe(entry)
    if choice == "reference" and mode != "measure":
        why = f"{why}: {reference_reason(packed, rows)}"
    _note(packed, cls, compute_dtype, choice, why)
    return choice


def plan(packed, cls: tuple, compute_dtype: torch.dtype) -> dict:
    """The measured plan of one (format, N, K, row class, compute dtype, threads, ISA, activation
    mode): from memory, from disk, or timed now on this weight."""
    threads, isa = torch.get_num_threads(), cpu_codegen.isa_choice()
    a8 = cpu_codegen.int8_activations_enabled()
    dname = str(compute_dtype).split(".")[-1]
    n, k, fmt = packed.out_features, packed.in_features, packed.fmt
    memo_key = (fmt, n, k, cls, dname, threads, isa, a8)

    def disk_key() -> str:
        sources = [DEQUANT_SOURCE]
        if cpu_codegen.supported(fmt) is None:
            sources.append(cpu_codegen.source(fmt + cpu_codegen.A8 if a8 and cpu_codegen.supported(
                fmt + cpu_codegen.A8) is None else fmt))
        return (f"dense-v{VERSION}|{fmt}|N={n}|K={k}|rows={cls[0]}-{cls[1]}|{dname}|threads={threads}|isa={isa}|"
                f"a8={int(a8)}|torch={torch.__version__}|{digest(*sources)}")

    return cached_plan(_PLANS, memo_key, dispatch_file, disk_key, lambda: measure(packed, cls, compute_dtype))


def measure(packed, cls: tuple, compute_dtype: torch.dtype, clock: Callable[[], float] = timer) -> dict:
    """Time every candidate for the row class (at its timed row count) on this weight; the entry
    names the choice and every candidate's best time (ms)."""
    from lowbit_compiler.backends import cpu_kernels

    rows = cls[2]
    names = candidates(packed, rows, compute_dtype)
    default = static_choice(packed, rows)
    if len(names) == 1:
        return {"choice": names[0], "rows": rows, "ms": {}, "default": default,
                "reason": "the only kernel for this call"}
    had_layout = packed.weight is not None
    x = torch.randn(rows, packed.in_features, generator=torch.Generator().manual_seed(0))
    calls = {c: functools.partial(cpu_kernels.run_candidate, c, x, packed, None, compute_dtype) for c in names}
    with torch.no_grad():
        for c in names:  # warm-up: builds, torch's lazy layout, first-touch allocations
            calls[c]()
        q = [t for t in packed.quantized if t is not None]
        cold = {c: (list(packed.torch_layout()) if c == "torch" else q) for c in names}
        prefill = rows > cpu_codegen.MAX_ROWS
        best = fastest(calls, PREFILL_REPEATS if prefill else REPEATS, cold, clock,
                       drop_above=PREFILL_DROP if prefill else None)
    choice = min(best, key=best.get)
    if best[default] <= MARGIN * best[choice]:
        choice = default
    elif choice == "dequant_bf16" and best.get("gemm_bf16", float("inf")) <= MARGIN * best[choice]:
        choice = "gemm_bf16"  # a near tie: the GEMM also takes the fusion groups' norm, SiLU * mul and
        # residual (cpu_kernels.fused_linear), which a single call's timing does not see
    if not had_layout and choice != "torch" and not any(v == "torch" for v in packed._dispatch.values()):
        packed.drop_torch_layout()  # timed only: the second copy of the weight is not kept
    entry = {"choice": choice, "rows": rows, "default": default,
             "ms": {c: round(t * 1e3, 4) for c, t in best.items()}}
    load, cpus = _load()
    if load is not None and load > cpus:  # other processes shared the cores: the times may mislead
        entry["busy"] = f"load {load:.1f} on {cpus} CPUs"
    return entry


def _load() -> tuple[float | None, int]:
    try:
        return os.getloadavg()[0], os.cpu_count() or 1
    except OSError:
        return None, os.cpu_count() or 1


def describe(entry: dict) -> str:
    """A plan in words (logs, layer records)."""
    if not entry.get("ms"):
        return entry.get("reason", "")
    times = ", ".join(f"{c} {t:.3f} ms" for c, t in sorted(entry["ms"].items(), key=lambda kv: kv[1]))
    kept = " (the static rule's choice: no other kernel was 5% faster)" if entry["choice"] == entry["default"] else ""
    busy = (f"; timed while the machine was busy ({entry['busy']}): kept for this process only, timed again "
            f"by the next (or set {ENV})" if "busy" in entry else "")
    return f"measured at {entry['rows']} rows: {times}{kept}{busy}"


def layer_record(fmt: str, out_features: int, in_features: int, compute_dtype: torch.dtype) -> dict:
    """The ``cpu_kernel`` entry of a layer record: how the kernel is chosen, and per row class
    decided so far which one runs and why (the same dict object, filled in as calls come)."""
    dname = str(compute_dtype).split(".")[-1]
    record = _RECORDS.get((fmt, out_features, in_features, dname))
    if record is None:
        mode = os.environ.get(ENV, "measure")
        rule = ("timed per row class at the first call of that class on this host, cached on disk "
                f"({ENV}=measure)" if mode == "measure" else f"{ENV}={mode}")
        record = _RECORDS[(fmt, out_features, in_features, dname)] = {"rule": rule}
    return record


def _note(packed, cls: tuple, compute_dtype: torch.dtype, choice: str, why: str) -> None:
    label = class_label(cls)
    text = f"{DESCRIPTION[choice]}: {why}"
    layer_record(packed.fmt, packed.out_features, packed.in_features, compute_dtype)[label] = text
    key = (packed.fmt, packed.out_features, packed.in_features, cls, str(compute_dtype), text)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("lowbit: CPU dispatch %s %dx%d, %s, %s compute: %s (logged once per shape and row class)",
                 packed.fmt, packed.out_features, packed.in_features, label, str(compute_dtype).split(".")[-1], text)
