"""Round-to-nearest quantization of a weight in one streaming pass: a generated C kernel.

``formats.quantize`` + ``formats.weight_sqnr_db`` in torch read a float weight about five times
(absmax, divide, round, pack; then dequantize every slice again for the SQNR) and build int64
temporaries to pack sub-byte codes. On the 0.49B decode model that was most of the backend's
compile time. This kernel reads each float weight once, group by group, and writes, per row:

* the codes in the stored layout (int8 ``[N, K]``; int4/int3/int2 packed little-endian per row,
  the ``formats.pack_codes`` bit stream; padded columns are zeros, as ``pad_to_group`` pads),
* the bf16 scales (and asymmetric uint8 zero points),
* the row's signal and noise power in float64 (``sum w^2``, ``sum (dequant - w)^2``), the
  ingredients of the weight SQNR the layer record reports,

threading over rows (OpenMP). Formats: ``int8`` (per channel), ``int{2,3,4}_g{G}_{sym,asym}`` and
``nf4_g{G}`` (absmax scale; each code the nearest NF4 table value, compared in double as
``formats.round_to_grid`` does, ties to the even index: 0.3 s for a 5632 x 2048 weight against 6.4 s
in torch); float32 or bfloat16 weights (others are converted to float32 slice by slice first).

Bit-identical to the torch path: the same float32 operations in the same order (``absmax / 7.5``
as a true division, ``clamp(min=1e-12)``, bf16 round-to-nearest-even, ``round(w / s)`` half to
even with ``rintf`` under the default rounding mode, ``+ zero``, clamp), compiled with
``-ffp-contract=off`` so no multiply-add is fused into one rounding. Tested for exact equality of
codes, scales and zero points on random and adversarial weights (ties, all-zero groups, ragged K,
every format and build).

Weights with inf or NaN are refused (``FormatError`` naming the layer): their codes would be
garbage. The check costs nothing: a non-finite weight makes its row's signal sum non-finite.

Built by ``cpu_codegen.build()`` (same on-disk cache, host-ISA key); the compiler vectorises the
loops for the host (AVX-512, AVX2) and the portable build runs the same C, except two loops it left
scalar (the per-group min/max and the float64 signal / noise sums: 2.2x the kernel's speed once
written with AVX-512 intrinsics, 0.8 -> 1.75 G weights/s on a 5632 x 2048 int4 weight, Zen 4), which
compute the same comparisons and adds in the same order (tested bit for bit against the portable
build). Without a compiler, or
with ``LOWBIT_CPU_CODEGEN=0`` / ``LOWBIT_QUANTIZE_KERNEL=0``, :func:`quantize_with_sqnr` returns
None and the torch path runs (logged once).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import math
import os

import torch

from lowbit_compiler.backends import cpu_codegen
from lowbit_compiler.formats import NF4_GRID, FormatError, QuantizedWeight, WeightFormat, row_chunks

log = logging.getLogger("lowbit_compiler")

ENV = "LOWBIT_QUANTIZE_KERNEL"  # "0": quantize in torch (formats.quantize + weight_sqnr_db)
FALLBACK = "weights are quantized by the torch path (formats.quantize)"
NAME = "lowbit_quantize_rtn"
calls = 0  # weights the kernel quantized (tests and benchmarks read it)

_SOURCE = r"""
#include <stdlib.h>

static inline uint16_t f32_to_bf16_rne(float f) {  /* c10::BFloat16's round to nearest even */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* one row's group [k0, k0 + G) into buf (float32), zeros past K */
static inline void load_group(const void* w, int dtype, int64_t off, int64_t valid, int64_t G, float* buf) {
    if (dtype == 0) {
        const float* src = (const float*)w + off;
        for (int64_t j = 0; j < valid; j++) buf[j] = src[j];
    } else {
        const uint16_t* src = (const uint16_t*)w + off;
        for (int64_t j = 0; j < valid; j++) {
            uint32_t u = (uint32_t)src[j] << 16;
            float f;
            memcpy(&f, &u, sizeof f);
            buf[j] = f;
        }
    }
    for (int64_t j = valid; j < G; j++) buf[j] = 0.0f;
}

/* w: [N, K] float32 (dtype 0) or bf16 (dtype 1), row stride ld elements.
   bits 8: per-channel symmetric int8 (G == K), codes int8 [N, K], scales bf16 [N].
   bits 2/3/4: groups of G (K padded to Kp = groups * G), codes packed [N, Kp * bits / 8],
   scales bf16 [N, groups], zeros uint8 [N, groups] when asymmetric (sym == 0).
   sums: float64 [N, 2]: sum w^2 and sum (dequantized - w)^2 over the row's K columns. */
/* NF4 (nf4 != 0; bits 4, absmax scale): the code of v = w / s is the index of the nearest value of
   the NF4 table, distances in double as formats.round_to_grid takes them, ties to the even index */
static const double nf4_grid64[16] = {NF4_GRID};

static inline int32_t nf4_code(float v32) {
    const double v = (double)v32;
    int32_t best = 0;
    double bd = fabs(v - nf4_grid64[0]);
    for (int32_t i = 1; i < 16; i++) {
        const double d = fabs(v - nf4_grid64[i]);
        if (d < bd) { bd = d; best = i; }
    }
    if (best & 1)  /* the first nearest is odd: an even index at the same distance wins */
        for (int32_t i = 0; i < 16; i += 2)
            if (fabs(v - nf4_grid64[i]) == bd) { best = i; break; }
    return best;
}

void lowbit_quantize_rtn(const void* w, int64_t ld, int dtype, int64_t N, int64_t K, int bits, int64_t G, int sym,
                         uint8_t* codes, uint16_t* scales, uint8_t* zeros, double* sums, int threads, int nf4)
{
    if (nf4) sym = 1;  /* NF4 scales by absmax whatever the format's symmetric flag says */
    float nf4_grid32[16];  /* the table as formats.dequantize_parts reads it: float32 */
    for (int i = 0; i < 16; i++) nf4_grid32[i] = (float)nf4_grid64[i];
    const int64_t groups = (K + G - 1) / G;
    const int64_t row_bytes = groups * G * bits / 8;
    const int32_t top = bits == 8 ? 127 : (1 << bits) - 1;
    const int32_t bottom = bits == 8 ? -128 : 0;
    const float half = bits == 8 ? 0.0f : (float)(1 << (bits - 1));
    const float divisor = nf4 ? 1.0f : bits == 8 ? 127.0f : sym ? half - 0.5f : (float)top;
    #pragma omp parallel num_threads(threads)
    {
        float* buf = (float*)malloc((size_t)G * sizeof(float));
        int32_t* q = (int32_t*)malloc((size_t)G * sizeof(int32_t));
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            double sig[8] = {0}, noi[8] = {0};
            double sig_tail = 0.0, noi_tail = 0.0;
            for (int64_t gi = 0; gi < groups; gi++) {
                const int64_t k0 = gi * G;
                const int64_t valid = K - k0 < G ? K - k0 : G;
                load_group(w, dtype, n * ld + k0, valid, G, buf);
                float lo16[16], hi16[16];
                for (int l = 0; l < 16; l++) { lo16[l] = 0.0f; hi16[l] = 0.0f; }
                int64_t j = 0;
#if defined(LOWBIT_AVX512)
                /* the 16-lane loops below, explicitly: max_ps(a, m) is a > m ? a : m and min_ps(v, m)
                   v < m ? v : m, the scalar comparisons exactly (NaN included) */
                if (bits == 8 || sym) {
                    __m512 h = _mm512_setzero_ps();
                    for (; j + 16 <= G; j += 16)
                        h = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(buf + j)), h);
                    _mm512_storeu_ps(hi16, h);
                } else {
                    __m512 l = _mm512_setzero_ps(), h = _mm512_setzero_ps();
                    for (; j + 16 <= G; j += 16) {
                        const __m512 v = _mm512_loadu_ps(buf + j);
                        l = _mm512_min_ps(v, l);
                        h = _mm512_max_ps(v, h);
                    }
                    _mm512_storeu_ps(lo16, l);
                    _mm512_storeu_ps(hi16, h);
                }
#endif
                if (bits == 8 || sym) {  /* absmax */
                    for (; j + 16 <= G; j += 16)
                        for (int l = 0; l < 16; l++) {
                            float a = fabsf(buf[j + l]);
                            hi16[l] = a > hi16[l] ? a : hi16[l];
                        }
                    for (; j < G; j++) { float a = fabsf(buf[j]); hi16[0] = a > hi16[0] ? a : hi16[0]; }
                } else {  /* min(min, 0), max(max, 0) */
                    for (; j + 16 <= G; j += 16)
                        for (int l = 0; l < 16; l++) {
                            float v = buf[j + l];
                            lo16[l] = v < lo16[l] ? v : lo16[l];
                            hi16[l] = v > hi16[l] ? v : hi16[l];
                        }
                    for (; j < G; j++) {
                        float v = buf[j];
                        lo16[0] = v < lo16[0] ? v : lo16[0];
                        hi16[0] = v > hi16[0] ? v : hi16[0];
                    }
                }
                float lo = 0.0f, hi = 0.0f;
                for (int l = 0; l < 16; l++) { lo = lo16[l] < lo ? lo16[l] : lo; hi = hi16[l] > hi ? hi16[l] : hi; }
                float s = (bits == 8 || sym) ? hi / divisor : (hi - lo) / divisor;
                if (!(s >= 1e-12f)) s = s != s ? s : 1e-12f;  /* clamp(min=1e-12), NaN kept */
                const uint16_t sb = f32_to_bf16_rne(s);
                uint32_t su = (uint32_t)sb << 16;
                float sf;
                memcpy(&sf, &su, sizeof sf);
                float z = half;
                if (bits != 8 && !sym) {
                    z = rintf(-lo / sf);
                    z = z < 0.0f ? 0.0f : z > (float)top ? (float)top : z;
                    zeros[n * groups + gi] = (uint8_t)(int32_t)z;
                }
                scales[bits == 8 ? n : n * groups + gi] = sb;
                if (nf4) {
                    for (j = 0; j < G; j++) q[j] = nf4_code(buf[j] / sf);
                } else {
                    for (j = 0; j < G; j++) {
                        float v = rintf(buf[j] / sf) + z;
                        v = v < (float)bottom ? (float)bottom : v > (float)top ? (float)top : v;
                        q[j] = (int32_t)v;
                    }
                }
                /* signal and noise of the K real columns: 8 float64 lanes, then the tail */
                j = 0;
#if defined(LOWBIT_AVX512)
                if (!nf4) {  /* the loop below, 16 columns a step (two of its steps, in its order: the same sums) */
                    __m512d sv = _mm512_loadu_pd(sig), nv = _mm512_loadu_pd(noi);
                    const __m512 zv = _mm512_set1_ps(z), s16 = _mm512_set1_ps(sf);
                    for (; j + 16 <= valid; j += 16) {
                        const __m512 b = _mm512_loadu_ps(buf + j);
                        const __m512 d = _mm512_sub_ps(_mm512_mul_ps(_mm512_sub_ps(
                            _mm512_cvtepi32_ps(_mm512_loadu_si512(q + j)), zv), s16), b);
                        const __m512d b0 = _mm512_cvtps_pd(_mm512_castps512_ps256(b));
                        const __m512d b1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(b), 1)));
                        const __m512d d0 = _mm512_cvtps_pd(_mm512_castps512_ps256(d));
                        const __m512d d1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1)));
                        sv = _mm512_add_pd(sv, _mm512_mul_pd(b0, b0));
                        nv = _mm512_add_pd(nv, _mm512_mul_pd(d0, d0));
                        sv = _mm512_add_pd(sv, _mm512_mul_pd(b1, b1));
                        nv = _mm512_add_pd(nv, _mm512_mul_pd(d1, d1));
                    }
                    _mm512_storeu_pd(sig, sv);
                    _mm512_storeu_pd(noi, nv);
                }
#endif
                for (; j + 8 <= valid; j += 8)
                    for (int l = 0; l < 8; l++) {
                        float d = (nf4 ? nf4_grid32[q[j + l]] : (float)q[j + l] - z) * sf - buf[j + l];
                        sig[l] += (double)buf[j + l] * (double)buf[j + l];
                        noi[l] += (double)d * (double)d;
                    }
                for (; j < valid; j++) {
                    float d = (nf4 ? nf4_grid32[q[j]] : (float)q[j] - z) * sf - buf[j];
                    sig_tail += (double)buf[j] * (double)buf[j];
                    noi_tail += (double)d * (double)d;
                }
                uint8_t* out = codes + n * row_bytes + k0 * bits / 8;
                if (bits == 8) {
                    for (j = 0; j < G; j++) ((int8_t*)out)[j] = (int8_t)q[j];
                } else if (bits == 4) {
                    for (j = 0; j < G / 2; j++) out[j] = (uint8_t)(q[2 * j] | (q[2 * j + 1] << 4));
                } else if (bits == 2) {
                    for (j = 0; j < G / 4; j++)
                        out[j] = (uint8_t)(q[4 * j] | (q[4 * j + 1] << 2) | (q[4 * j + 2] << 4) | (q[4 * j + 3] << 6));
                } else {  /* 3: eight codes in three bytes, little-endian */
                    for (j = 0; j < G / 8; j++) {
                        const int32_t* c = q + 8 * j;
                        uint32_t word = (uint32_t)c[0] | ((uint32_t)c[1] << 3) | ((uint32_t)c[2] << 6)
                                      | ((uint32_t)c[3] << 9) | ((uint32_t)c[4] << 12) | ((uint32_t)c[5] << 15)
                                      | ((uint32_t)c[6] << 18) | ((uint32_t)c[7] << 21);
                        out[3 * j] = (uint8_t)word;
                        out[3 * j + 1] = (uint8_t)(word >> 8);
                        out[3 * j + 2] = (uint8_t)(word >> 16);
                    }
                }
            }
            double s_all = sig_tail, n_all = noi_tail;
            for (int l = 0; l < 8; l++) { s_all += sig[l]; n_all += noi[l]; }
            sums[2 * n] = s_all;
            sums[2 * n + 1] = n_all;
        }
        free(buf);
        free(q);
    }
}

/* the reference dequantiser of the int formats (formats.dequantize_parts), the same float32 ops:
   int8: q * s; int2/3/4: (q - z) * s, z the zero point or 2^(bits-1). out: float32 [N, Kp]. */
void lowbit_dequantize_int(const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros, float* out,
                           int64_t N, int64_t Kp, int bits, int64_t G, int threads)
{
    const int64_t groups = Kp / G;
    const int64_t row_bytes = Kp * bits / 8;
    const float half = bits == 8 ? 0.0f : (float)(1 << (bits - 1));
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* row = codes + n * row_bytes;
        float* o = out + n * Kp;
        for (int64_t gi = 0; gi < groups; gi++) {
            const float s = bf16_to_f32(scales[bits == 8 ? n : n * groups + gi]);
            const float z = zeros != NULL ? (float)zeros[n * groups + gi] : half;
            const uint8_t* src = row + gi * G * bits / 8;
            float* dst = o + gi * G;
            if (bits == 8) {
                for (int64_t j = 0; j < G; j++) dst[j] = (float)((const int8_t*)src)[j] * s;
            } else if (bits == 4) {
                for (int64_t j = 0; j < G / 2; j++) {
                    dst[2 * j] = ((float)(src[j] & 15) - z) * s;
                    dst[2 * j + 1] = ((float)(src[j] >> 4) - z) * s;
                }
            } else if (bits == 2) {
                for (int64_t j = 0; j < G / 4; j++)
                    for (int l = 0; l < 4; l++) dst[4 * j + l] = ((float)((src[j] >> (2 * l)) & 3) - z) * s;
            } else {
                for (int64_t j = 0; j < G / 8; j++) {
                    const uint32_t word = (uint32_t)src[3 * j] | ((uint32_t)src[3 * j + 1] << 8)
                                        | ((uint32_t)src[3 * j + 2] << 16);
                    for (int l = 0; l < 8; l++) dst[8 * j + l] = ((float)((word >> (3 * l)) & 7) - z) * s;
                }
            }
        }
    }
}

/* packed codes (bits 2/3/4, formats.pack_codes' bit stream) -> one code per element: uint8 (wide == 0)
   or int32 (wide == 1, what torch's int4pack converter takes) [N, Kp] */
void lowbit_unpack_codes(const uint8_t* codes, void* out, int64_t N, int64_t Kp, int bits, int wide, int threads)
{
    const int64_t row_bytes = Kp * bits / 8;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* src = codes + n * row_bytes;
        uint8_t c[64];
        for (int64_t k0 = 0; k0 < Kp; k0 += 64) {  /* 64 codes: 8 * bits bytes */
            const int64_t m = Kp - k0 < 64 ? Kp - k0 : 64;
            const uint8_t* b = src + k0 * bits / 8;
            if (bits == 4) {
                for (int64_t j = 0; j < m / 2; j++) { c[2 * j] = b[j] & 15; c[2 * j + 1] = b[j] >> 4; }
            } else if (bits == 2) {
                for (int64_t j = 0; j < m / 4; j++)
                    for (int l = 0; l < 4; l++) c[4 * j + l] = (b[j] >> (2 * l)) & 3;
            } else {
                for (int64_t j = 0; j < m / 8; j++) {
                    const uint32_t word = (uint32_t)b[3 * j] | ((uint32_t)b[3 * j + 1] << 8) | ((uint32_t)b[3 * j + 2] << 16);
                    for (int l = 0; l < 8; l++) c[8 * j + l] = (word >> (3 * l)) & 7;
                }
            }
            if (wide) {
                int32_t* o = (int32_t*)out + n * Kp + k0;
                for (int64_t j = 0; j < m; j++) o[j] = c[j];
            } else {
                memcpy((uint8_t*)out + n * Kp + k0, c, (size_t)m);
            }
        }
    }
}

/* packed int4 codes [N, K/2] (low nibble = even k) -> torch's CPU int4pack layout of the same weight
   padded with code-8 rows to NP (a multiple of 16) rows: [NP, K/2] bytes, blocks of BN rows (64 for
   torch's AVX-512 build, 32 otherwise), each block k-major. mode 64: byte (k, d) of a full block holds
   rows d | d+32 << 4 at k*32+d and rows d+16 | d+48 << 4 at k*32+16+d; mode 32: rows d | d+16 << 4 at
   k*16+d; a partial block (and mode 0) holds row pairs n | n+1 << 4 at k*nb/2+n/2. What
   aten::_convert_weight_to_int4pack_for_cpu writes from int32 codes, without the 4-byte-per-weight
   temporary (lowbit_compiler checks the mode against torch's converter before using it). */
static inline uint8_t lowbit_code4(const uint8_t* codes, int64_t N, int64_t half, int64_t n, int64_t k)
{
    return n < N ? (uint8_t)((codes[n * half + (k >> 1)] >> ((k & 1) * 4)) & 15) : (uint8_t)8;
}

void lowbit_int4pack_torch(const uint8_t* codes, uint8_t* out, int64_t N, int64_t K, int64_t NP, int mode,
                           int threads)
{
    const int64_t half = K / 2, BN = mode == 64 ? 64 : 32, NB = (NP + BN - 1) / BN;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < NB; b++) {
        const int64_t n0 = b * BN, nb = NP - n0 < BN ? NP - n0 : BN;
        uint8_t* dst = out + n0 * half;
        for (int64_t k = 0; k < K; k++) {
            if (nb == BN && mode == 64) {
                for (int64_t d = 0; d < 16; d++) {
                    dst[k * 32 + d] = (uint8_t)(lowbit_code4(codes, N, half, n0 + d, k)
                                                | lowbit_code4(codes, N, half, n0 + d + 32, k) << 4);
                    dst[k * 32 + 16 + d] = (uint8_t)(lowbit_code4(codes, N, half, n0 + d + 16, k)
                                                     | lowbit_code4(codes, N, half, n0 + d + 48, k) << 4);
                }
            } else if (nb == BN && mode == 32) {
                for (int64_t d = 0; d < 16; d++)
                    dst[k * 16 + d] = (uint8_t)(lowbit_code4(codes, N, half, n0 + d, k)
                                                | lowbit_code4(codes, N, half, n0 + d + 16, k) << 4);
            } else {
                for (int64_t n = 0; n < nb; n += 2)
                    dst[k * nb / 2 + n / 2] = (uint8_t)(lowbit_code4(codes, N, half, n0 + n, k)
                                                        | lowbit_code4(codes, N, half, n0 + n + 1, k) << 4);
            }
        }
    }
}
"""

# builds: the host's full ISA (what runs), AVX2 without AVX-512 and the compiler's default target
# (what a machine without them runs; the tests check every build against the torch path)
ISA_FLAGS = ("native", "avx2", "portable")


def supported(fmt: WeightFormat) -> str | None:
    """None when the quantization kernel handles ``fmt``, else why not."""
    if fmt.kind not in ("int", "nf4"):
        return f"{fmt.key} is not an int or NF4 format (the kernel does int8, int2/3/4 and NF4 group-wise)"
    return None


def source() -> str:
    grid = ", ".join(repr(float(v)) for v in NF4_GRID)  # exact: repr round-trips a double
    return ("/* lowbit generated CPU kernel: round-to-nearest quantization + packing + SQNR sums, one pass */\n"
            + cpu_codegen._PRELUDE + _SOURCE.replace("{NF4_GRID}", "{" + grid + "}"))


def disabled() -> bool:
    if os.environ.get(ENV, "1") == "0":
        cpu_codegen._note(f"the quantization kernel is turned off by {ENV}=0; {FALLBACK}")
        return True
    return cpu_codegen.kernel_disabled()


def kernel(isa: str = "native"):
    """The compiled kernel (ctypes function) or None (why logged once)."""
    if disabled():
        return None
    return _build(isa)


@functools.lru_cache(maxsize=None)
def _build(isa: str):
    if isa not in ISA_FLAGS:
        raise ValueError(f"isa={isa!r}; expected one of {ISA_FLAGS}")
    return cpu_codegen.build(
        argtypes=[ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                  ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                  ctypes.c_int, ctypes.c_int],
        fallback=FALLBACK, what="the quantization kernel", **build_spec(isa))


def build_spec(isa: str = "native") -> dict:
    """The source arguments of this module's library (the quantizer and its dequantize / unpack /
    int4pack entries): what ``cpu_codegen.build`` compiles and ``cpu_codegen.prebuild`` takes."""
    return {"name": NAME, "text": source(), "isa": isa, "extra_flags": ("-ffp-contract=off", "-fno-trapping-math")}


@functools.lru_cache(maxsize=None)
def _build_dequantize(isa: str):
    return cpu_codegen.build(
        argtypes=[ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_int],
        fallback="the torch reference dequantiser runs", what="the dequantization kernel",
        entry="lowbit_dequantize_int", **build_spec(isa))


def dequantize(fmt: WeightFormat, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               isa: str = "native") -> torch.Tensor | None:
    """``formats.dequantize_parts`` (float32 ``[N, Kp]``, the same bits) for int formats on the CPU
    in one pass over the codes, without the int64 temporaries of ``unpack_codes``; None when the
    kernel cannot run (the caller uses ``dequantize_parts``)."""
    if (fmt.kind != "int" or qweight.device.type != "cpu" or disabled()
            or (fmt.bits == 8 and qweight.dtype != torch.int8)):
        return None
    fn = _build_dequantize(isa)
    if fn is None:
        return None
    n = scale.shape[0]
    kp = qweight.shape[1] * 8 // fmt.bits
    codes, scales = qweight.contiguous(), scale.contiguous().view(torch.int16)
    zeros = None if zero is None else zero.contiguous()
    out = torch.empty(n, kp, dtype=torch.float32)
    fn(codes.data_ptr(), scales.data_ptr(), None if zeros is None else zeros.data_ptr(), out.data_ptr(), n, kp,
       fmt.bits, fmt.group_size or kp, _threads(n * kp))
    return out


@functools.lru_cache(maxsize=None)
def _build_unpack(isa: str):
    return cpu_codegen.build(
        argtypes=[ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                  ctypes.c_int],
        fallback="the torch unpacking runs", what="the unpacking kernel", entry="lowbit_unpack_codes",
        **build_spec(isa))


@functools.lru_cache(maxsize=None)
def _build_int4pack():
    fn = cpu_codegen.build(
        argtypes=[ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_int, ctypes.c_int],
        fallback="torch's converter builds the int4pack layout (from int32 codes, slower)",
        what="the int4pack repacker", entry="lowbit_int4pack_torch", **build_spec())
    return fn


INT4PACK_MODES = (64, 32, 0)


def _int4pack_call(fn, codes: torch.Tensor, n: int, k: int, padded_n: int, mode: int) -> torch.Tensor:
    out = torch.empty(padded_n, k // 2, dtype=torch.uint8)
    fn(codes.data_ptr(), out.data_ptr(), n, k, padded_n, mode, _threads(padded_n * k))
    return out


def int4pack_mode() -> int | None:
    """Which of torch's int4pack CPU layouts this torch build writes (:data:`INT4PACK_MODES`: its
    AVX-512 build's 64-row blocks, the AVX2 / default builds' 32-row blocks), found by comparing the
    repacker's output with ``aten::_convert_weight_to_int4pack_for_cpu`` on a probe weight whose rows
    cover a full block and every partial one; None (logged once) when no mode matches or the repacker
    cannot be built: torch's converter runs. ``LOWBIT_QUANTIZE_KERNEL=0`` / ``LOWBIT_CPU_CODEGEN=0``
    are read per call (the probe's answer is cached)."""
    return None if disabled() else _probe_int4pack_mode()


@functools.lru_cache(maxsize=1)
def _probe_int4pack_mode() -> int | None:
    fn = _build_int4pack()
    if fn is None:
        return None
    gen = torch.Generator().manual_seed(0)
    n, k = 171, 96  # padded to 176 rows: full blocks of 64 (32) rows, a partial one of 48 (16), code-8 rows
    padded = (n + 15) // 16 * 16
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.nn.functional.pad(q.to(torch.int32), (0, 0, 0, padded - n), value=8), 1)
    codes = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    for mode in INT4PACK_MODES:
        if torch.equal(_int4pack_call(fn, codes, n, k, padded, mode), ref):
            return mode
    cpu_codegen._note("the int4pack repacker matches none of torch's known int4pack CPU layouts "
                      f"(torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}); "
                      "torch's converter builds the layout (from int32 codes, slower)")
    return None


def int4pack(codes: torch.Tensor, k: int, padded_n: int) -> torch.Tensor | None:
    """torch's int4pack CPU layout ([padded_n, k/2] uint8, the bytes
    ``aten::_convert_weight_to_int4pack_for_cpu`` writes for these codes padded with code-8 rows)
    from packed int4 codes [N, k/2] in one pass; None when the repacker cannot run (the caller
    uses torch's converter)."""
    mode = int4pack_mode()
    if mode is None or codes.device.type != "cpu" or codes.dtype != torch.uint8 or k % 2:
        return None
    return _int4pack_call(_build_int4pack(), codes.contiguous(), codes.shape[0], k, padded_n, mode)


# below this many elements a kernel runs on one thread: a copy-like loop over a slice takes about a
# millisecond, less than a team of threads costs to start and join when the machine is busy (a
# descheduled thread holds the barrier for a time slice: measured 0.3-1 s instead of 3-35 ms for the
# 22 slices of one 5632 x 2048 weight on the loaded 2-core machine)
PARALLEL_ELEMENTS = 1 << 22


def _threads(elements: int) -> int:
    return torch.get_num_threads() if elements >= PARALLEL_ELEMENTS else 1


def unpack_codes(packed: torch.Tensor, bits: int, dtype: torch.dtype = torch.uint8,
                 isa: str = "native") -> torch.Tensor:
    """``formats.unpack_codes(packed, bits).to(dtype)`` (``dtype`` uint8 or int32) in one pass over
    the packed bytes (no int64 temporaries); the torch path when the kernel cannot run."""
    from lowbit_compiler.formats import _unpack

    fn = None if (bits not in (2, 3, 4) or packed.device.type != "cpu" or disabled()) else _build_unpack(isa)
    if fn is None or (packed.shape[1] * 8) % (bits * 8):
        return _unpack(packed, bits).to(dtype)
    packed = packed.contiguous()
    n, kp = packed.shape[0], packed.shape[1] * 8 // bits
    out = torch.empty(n, kp, dtype=dtype)
    fn(packed.data_ptr(), out.data_ptr(), n, kp, bits, int(dtype == torch.int32), _threads(n * kp))
    return out


def available(fmt: WeightFormat) -> bool:
    """Whether :func:`quantize_with_sums` runs for ``fmt`` (int format, compiler present, not off)."""
    return supported(fmt) is None and kernel() is not None


def quantize_with_sums(w: torch.Tensor, fmt: WeightFormat, isa: str = "native"
                       ) -> tuple[QuantizedWeight, torch.Tensor] | None:
    """``formats.quantize(w, fmt)`` (the same bits) and the per-row float64 ``[N, 2]`` signal and
    noise sums, in one pass; None when the kernel cannot run (format, no compiler: logged)."""
    if supported(fmt) is not None or w.dim() != 2 or w.device.type != "cpu":
        return None
    fn = kernel(isa)
    if fn is None:
        return None
    n, k = w.shape
    g = fmt.group_size or k
    kp = fmt.padded_k(k)
    groups = kp // g
    codes = torch.empty(n, kp * fmt.bits // 8, dtype=torch.int8 if fmt.bits == 8 else torch.uint8)
    scale = torch.empty((n,) if fmt.bits == 8 else (n, groups), dtype=torch.bfloat16)
    zero = torch.empty(n, groups, dtype=torch.uint8) if fmt.has_zero_points else None
    sums = torch.empty(n, 2, dtype=torch.float64)
    w = w.detach()
    threads = _threads(n * k)
    global calls
    calls += 1

    def call(src: torch.Tensor, a: int, b: int) -> None:
        fn(src.data_ptr(), src.stride(0), 0 if src.dtype == torch.float32 else 1, b - a, k, fmt.bits, g,
           int(fmt.symmetric), codes[a:b].data_ptr(), scale[a:b].data_ptr(),
           None if zero is None else zero[a:b].data_ptr(), sums[a:b].data_ptr(), threads, int(fmt.kind == "nf4"))

    if w.dtype in (torch.float32, torch.bfloat16) and w.stride(1) == 1 and w.stride(0) >= k:
        call(w, 0, n)
    else:  # another dtype or a transposed view: float32 slices of rows (bounded temporaries)
        for a, b in row_chunks(n, k):
            call(w[a:b].float().contiguous(), a, b)
    return QuantizedWeight(fmt, codes, scale, zero, k), sums


def quantize_with_sqnr(w: torch.Tensor, fmt: WeightFormat, layer: str = "?", isa: str = "native"
                       ) -> tuple[QuantizedWeight, float] | None:
    """``(formats.quantize(w, fmt), formats.weight_sqnr_db(w, ...))`` in one pass (None: the kernel
    cannot run; the caller uses the torch path). Raises ``FormatError`` naming ``layer`` when the
    weight holds inf or NaN."""
    got = quantize_with_sums(w, fmt, isa)
    if got is None:
        return None
    qw, sums = got
    signal = float(sums[:, 0].sum())
    if not math.isfinite(signal):
        raise non_finite_error(layer, w)
    noise = float(sums[:, 1].sum())
    return qw, (math.inf if noise == 0 else 10 * math.log10(signal / noise))


def non_finite_error(layer: str, w: torch.Tensor) -> FormatError:
    bad = (~torch.isfinite(w)).nonzero()
    where = f" (first at index {tuple(bad[0].tolist())}, {bad.shape[0]} in all)" if bad.numel() else ""
    return FormatError(f"layer {layer}: the weight holds inf or NaN{where}; its codes would be garbage. "
                       "Fix the weights (an overflow in training or conversion?) or exclude the layer from the "
                       "recipe (exclude = [...])")
