"""A prototype, not in the library: an integer (VNNI) activation-sparse int4 GEMV, timed against
the dense int4 kernel and the library's float activation-sparse kernel with the weights streaming
from memory.

Why: on the AVX-512 + VNNI host (AMD Zen 4) the library's activation-sparse int4 kernel
(``backends/cpu_sparse.py``) loses to the dense int4 kernel inside a model, so ``teal-50+w4a16``
runs dense there. Measured: a pure read of the kept K-major rows takes half the dense stream's
time, so the layout is not the limit; the float path spends ~7 vector ops per 32 codes (widen,
mask/shift, two int->float converts, two FMAs; zmm ops are double-pumped on Zen 4) where the dense
kernel's VNNI path spends ~2, and from memory the arithmetic between loads leaves too few misses in
flight. This prototype keeps the library's K-major layout and multiplies with ``vpdpbusd``: per
quad of kept rows (each group's kept list padded to a multiple of 4 with x = 0), the four rows'
64-byte tile lines are unpacked to nibbles and interleaved (``vpunpck*bw`` / ``*wd``) so each 32-bit
lane holds one column's four codes; the kept activations of a scale group are quantized into three
int8 parts (x ~ s (h + m / 256 + l / 65536), ~113 dB against the float kernel) broadcast as 32-bit
quads; one ``vpdpbusd`` per part per 16 columns. The kept rows go in chunks of 16 that sweep the
thread's tiles (each row read front to back within a chunk, the same tile two ahead prefetched),
the two nibble halves in separate passes (12 accumulators each: with 24 in one pass the registers
spilled and it lost its gain), folded per chunk into float outputs with the group's scales. Its
accumulator lanes come out in a fixed permutation of the tile's columns, so it reads scale and zero
point copies permuted the same way.

What integrating it needs (not done): the library kernel's compaction (``sp_compact``, AVX-512,
threshold, norm prologue) followed by the per-group quad padding and quantization (here scalar
C, which is most of its cost at K = 5632); permuted scale / zero copies on ``CpuKMajor`` and the
slot order in the final loop (bias, residual, SiLU * mul); a non-finite activation routed to the
float path (integer parts cannot carry NaN / inf); VNNI builds only (the AVX2 and portable builds
keep the float path); the dispatch's timing then decides per site, as now.

    python benchmarks/sparse_vnni_prototype.py [--pool 12] [--repeats 8] [--json benchmarks/results/sparse_vnni_prototype.json]

Needs gcc and an AVX-512 VNNI host. Measured on the Zen 4 host (2 threads, 50 % of the inputs
zeroed, int4 g128 asym, a pool of 12 weights called round robin so that each call streams its
weight from memory; dense / library float sparse / prototype, us per call, 2026-12-07):
gate.up stacked 11264 x 2048: 460 / 523 / 307 (prototype 1.50x dense); down 2048 x 5632: 269 /
288 / 311 (0.86x); q.k.v 3072 x 2048: 129 / 116 / 107 (1.20x); o 2048 x 2048: 100 / 96 / 103
(0.97x). Per layer 958 / 1023 / 828 us.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {"gate.up (stacked)": (11264, 2048), "down": (2048, 5632), "q.k.v (stacked)": (3072, 2048), "o": (2048, 2048)}
FMT = "int4_g128_asym"
# slot i of a tile's accumulators holds column PERM[i] (16 lanes per accumulator, 4 per 128-bit lane)
PERM = [32 * lane + 16 * (acc // 4) + 4 * (acc % 4) + e for acc in range(8) for lane in range(4) for e in range(4)]

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>
#include <omp.h>
#ifndef CH
#define CH 32
#endif
#ifndef PFD
#define PFD 2
#endif
/* x [K] float; codes [K][Np/2] chunk layout; sc bf16 [G][Np] PERMUTED per tile; zp u8 [G][Np] permuted (NULL: 8)
   perm[128]: position in tile (natural column) of permuted slot i. y [N]. */
int64_t vn_sparse(const float* x, const uint8_t* codes, const uint16_t* sc, const uint8_t* zp, const int32_t* perm,
                  float* y, int64_t N, int64_t Np, int64_t K, int64_t GS, int threads, int parts)
{
    const int64_t groups = K / GS, row = Np / 2, tiles = Np / 128;
    int32_t* idx = (int32_t*)malloc((K + 4 * groups) * 4);
    int8_t* xq = (int8_t*)malloc((K + 4 * groups) * 3);
    float* xs = (float*)malloc(groups * 4 * 4);  /* per group: s, sum */
    int64_t* gs = (int64_t*)malloc((groups + 1) * 8);
    int64_t p = 0;
    for (int64_t g = 0; g < groups; g++) {
        gs[g] = p;
        float amax = 0.f, sum = 0.f; int64_t first = -1;
        for (int64_t k = g * GS; k < (g + 1) * GS; k++) if (x[k] != 0.f) { if (first < 0) first = k; idx[p++] = (int32_t)k; float a = fabsf(x[k]); if (a > amax) amax = a; sum += x[k]; }
        int64_t c0 = gs[g];
        while ((p - c0) & 3) idx[p++] = (int32_t)(first < 0 ? g * GS : first);  /* pad to quads: x = 0 */
        xs[2 * g] = amax > 0 ? amax / 127.f : 1.f;
        xs[2 * g + 1] = sum;
    }
    gs[groups] = p;
    /* second pass: quantize (padded entries flagged by recount) */
    for (int64_t g = 0; g < groups; g++) {
        int64_t cnt = 0;
        for (int64_t k = g * GS; k < (g + 1) * GS; k++) cnt += x[k] != 0.f;
        const float s = xs[2 * g];
        for (int64_t i = gs[g]; i < gs[g + 1]; i++) {
            float v = (i - gs[g]) < cnt ? x[idx[i]] : 0.f;
            float h = nearbyintf(v / s); if (h > 127) h = 127; if (h < -127) h = -127;
            float r1 = v - h * s;
            float m = nearbyintf(r1 * 256.f / s); if (m > 127) m = 127; if (m < -128) m = -128;
            float r2 = r1 - m * s / 256.f;
            float l = nearbyintf(r2 * 65536.f / s); if (l > 127) l = 127; if (l < -128) l = -128;
            xq[i] = (int8_t)h; xq[(K + 4 * groups) + i] = (int8_t)m; xq[2 * (K + 4 * groups) + i] = (int8_t)l;
        }
    }
    const int64_t stride = K + 4 * groups;
    float* outb = (float*)aligned_alloc(64, Np * 4);
    #pragma omp parallel num_threads(threads)
    {
    const int th = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t t0 = tiles * th / nth, t1 = tiles * (th + 1) / nth;
    memset(outb + t0 * 128, 0, (t1 - t0) * 128 * 4);
    const __m512i m4 = _mm512_set1_epi8(15);
    for (int64_t g = 0; g < groups; g++) {
        const float s = xs[2 * g], sum = xs[2 * g + 1];
        const __m512 sv = _mm512_set1_ps(s), sv2 = _mm512_set1_ps(s / 256.f), sv3 = _mm512_set1_ps(s / 65536.f), sumv = _mm512_set1_ps(sum);
        for (int64_t a0 = gs[g]; a0 < gs[g + 1]; a0 += CH) {
            const int64_t a1 = a0 + CH < gs[g + 1] ? a0 + CH : gs[g + 1];
            for (int64_t t = t0; t < t1; t++) {
              const uint8_t* b = codes + t * 64;
              const uint16_t* sg = sc + g * Np + t * 128;
              const uint8_t* zg = zp ? zp + g * Np + t * 128 : 0;
              float* ot = outb + t * 128;
              const int first = a0 == gs[g];
              for (int half = 0; half < 2; half++) {
                __m512i ah[4], am[4], al[4];
                for (int i = 0; i < 4; i++) { ah[i] = _mm512_setzero_si512(); am[i] = _mm512_setzero_si512(); al[i] = _mm512_setzero_si512(); }
                for (int64_t q = a0; q < a1; q += 4) {
                    __m512i r0 = _mm512_loadu_si512(b + (int64_t)idx[q] * row);
                    __m512i r1 = _mm512_loadu_si512(b + (int64_t)idx[q + 1] * row);
                    __m512i r2 = _mm512_loadu_si512(b + (int64_t)idx[q + 2] * row);
                    __m512i r3 = _mm512_loadu_si512(b + (int64_t)idx[q + 3] * row);
                    if (half == 0) {
                        const int64_t pt = t + PFD < t1 ? t + PFD : t;
                        _mm_prefetch((const char*)(codes + pt * 64 + (int64_t)idx[q] * row), _MM_HINT_T0);
                        _mm_prefetch((const char*)(codes + pt * 64 + (int64_t)idx[q + 1] * row), _MM_HINT_T0);
                        _mm_prefetch((const char*)(codes + pt * 64 + (int64_t)idx[q + 2] * row), _MM_HINT_T0);
                        _mm_prefetch((const char*)(codes + pt * 64 + (int64_t)idx[q + 3] * row), _MM_HINT_T0);
                    } else {
                        r0 = _mm512_srli_epi16(r0, 4); r1 = _mm512_srli_epi16(r1, 4); r2 = _mm512_srli_epi16(r2, 4); r3 = _mm512_srli_epi16(r3, 4);
                    }
                    const __m512i xh = _mm512_set1_epi32(*(const int32_t*)(xq + q));
                    const __m512i xm = _mm512_set1_epi32(*(const int32_t*)(xq + stride + q));
                    const __m512i xl = _mm512_set1_epi32(*(const int32_t*)(xq + 2 * stride + q));
                    const __m512i l0 = _mm512_and_si512(r0, m4), l1 = _mm512_and_si512(r1, m4), l2 = _mm512_and_si512(r2, m4), l3 = _mm512_and_si512(r3, m4);
                    const __m512i a = _mm512_unpacklo_epi8(l0, l1), bb = _mm512_unpackhi_epi8(l0, l1);
                    const __m512i c = _mm512_unpacklo_epi8(l2, l3), d = _mm512_unpackhi_epi8(l2, l3);
                    const __m512i qq[4] = {_mm512_unpacklo_epi16(a, c), _mm512_unpackhi_epi16(a, c), _mm512_unpacklo_epi16(bb, d), _mm512_unpackhi_epi16(bb, d)};
                    for (int i = 0; i < 4; i++) {
                        ah[i] = _mm512_dpbusd_epi32(ah[i], qq[i], xh);
                        am[i] = _mm512_dpbusd_epi32(am[i], qq[i], xm);
                        al[i] = _mm512_dpbusd_epi32(al[i], qq[i], xl);
                    }
                }
                for (int j = 0; j < 4; j++) {
                    const int i = 4 * half + j;
                    __m512 accf = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ah[j]), sv, _mm512_fmadd_ps(_mm512_cvtepi32_ps(am[j]), sv2, _mm512_mul_ps(_mm512_cvtepi32_ps(al[j]), sv3)));
                    if (first) {
                        const __m512 z = zg ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(zg + 16 * i)))) : _mm512_set1_ps(8.f);
                        accf = _mm512_fnmadd_ps(z, sumv, accf);
                    }
                    const __m512 scl = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(sg + 16 * i))), 16));
                    _mm512_store_ps(ot + 16 * i, _mm512_fmadd_ps(scl, accf, _mm512_load_ps(ot + 16 * i)));
                }
              }
            }
        }
    }
    for (int64_t t = t0; t < t1; t++)
        for (int i = 0; i < 128; i++) { int64_t n = t * 128 + perm[i]; if (n < N) y[n] = outb[t * 128 + i]; }
    }
    free(outb);
    free(idx); free(xq); free(xs); free(gs);
    return p;
}
"""


def build() -> ctypes.CDLL:
    work = tempfile.mkdtemp(prefix="lowbit_vnni_proto_")
    src, lib = os.path.join(work, "proto.c"), os.path.join(work, "proto.so")
    with open(src, "w") as f:
        f.write(SOURCE)
    subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-DCH=16", "-DPFD=2", src, "-o", lib],
                   check=True)
    so = ctypes.CDLL(lib)
    so.vn_sparse.restype = ctypes.c_int64
    so.vn_sparse.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4 + [ctypes.c_int, ctypes.c_int]
    return so


def main() -> None:
    from lowbit_compiler import formats
    from lowbit_compiler.backends import cpu_codegen, cpu_sparse
    from lowbit_compiler.formats import WeightFormat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--json", default="benchmarks/results/sparse_vnni_prototype.json")
    args = parser.parse_args()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if "avx512_vnni" not in flags:
        sys.exit("this prototype needs an AVX-512 VNNI host")
    so = build()
    perm = torch.tensor(PERM, dtype=torch.int32)
    threads = torch.get_num_threads()
    rows = []
    for name, (n, k) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        pool = []
        for _ in range(args.pool):
            q = formats.quantize(torch.randn(n, k, generator=g) * 0.05, WeightFormat.parse(FMT))
            km = cpu_sparse.make_kmajor_cpu(q.qweight, q.scale, q.zero, FMT, k)
            cols = (torch.arange(km.padded_out // 128)[:, None] * 128 + perm[None, :].long()).reshape(-1)
            pool.append((cpu_codegen.bind(q.qweight, q.scale, q.zero, FMT, k), km,
                         km.scale[:, cols].contiguous(), km.zero[:, cols].contiguous()))
        x = torch.randn(1, k, generator=g)
        x[x.abs() < 0.674] = 0  # about half the inputs zeroed
        x32 = x.reshape(-1).contiguous()
        y = torch.empty(n)

        def proto(km, scale, zero):
            so.vn_sparse(x32.data_ptr(), km.codes.data_ptr(), scale.data_ptr(), zero.data_ptr(), perm.data_ptr(),
                         y.data_ptr(), n, km.padded_out, k, 128, threads, 3)
            return y

        ref = cpu_sparse.run(x32, pool[0][1], None, FMT, k)
        db = formats.sqnr_db(ref.double(), proto(*pool[0][1:]).double())
        times = {"dense": [], "float sparse": [], "prototype": []}
        for rep in range(args.repeats):
            for i in range(len(pool)):
                calls = (("dense", lambda w: w[0](x, None)), ("float sparse", lambda w: cpu_sparse.run(x32, w[1], None, FMT, k)),
                         ("prototype", lambda w: proto(*w[1:])))
                for j, (label, call) in enumerate(calls):  # each contender on a different weight of the pool
                    w = pool[(i + j * len(pool) // 3) % len(pool)]
                    t0 = time.perf_counter()
                    call(w)
                    if rep:
                        times[label].append(time.perf_counter() - t0)
        us = {label: statistics.median(v) * 1e6 for label, v in times.items()}
        rows.append({"shape": name, "N": n, "K": k, "kept": int((x32 != 0).sum()), "sqnr_db_vs_float_kernel": round(db, 1),
                     **{f"{label} us": round(v, 1) for label, v in us.items()}})
    print(f"threads {threads}, weights streaming from memory (pool of {args.pool}), {FMT}, ~50 % of inputs zeroed")
    print("| shape | dense us | float sparse us | prototype us | prototype vs dense | vs float sparse | SQNR vs float kernel |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        d, s, p = r["dense us"], r["float sparse us"], r["prototype us"]
        print(f"| {r['shape']} {r['N']}x{r['K']} | {d:.0f} | {s:.0f} | {p:.0f} | {d / p:.2f}x | {s / p:.2f}x | "
              f"{r['sqnr_db_vs_float_kernel']} dB |")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"rows": rows, "threads": threads, "pool": args.pool}, f, indent=1)


if __name__ == "__main__":
    main()
