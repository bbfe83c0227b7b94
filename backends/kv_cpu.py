"""CPU decode attention over the packed KV cache: a generated C kernel (``cpu_codegen.build``: gcc
at first use, cached on disk under ``$LOWBIT_CACHE_DIR/cpu``, ctypes), one per (bits, key layout,
channel group, key token group).

What it computes, for one query token per sequence (decode, ``Q == 1``): for each (batch, KV head),
first pass: for each token of the packed store, unpack the key codes in registers and dot them with
the ``g`` query heads that share the KV head (GQA/MQA), the per-group scales and zeros applied to
the partial dot products, then Gemma-2's logit soft-capping when set (``softcap * tanhf(s /
softcap)``, a runtime argument, 0 off; before the mask, as transformers applies it); second pass:
the softmax weights times the unpacked value codes, scales folded into the weights. The packed
store is read once per step and nothing dequantized is stored (the scores, T floats per query
head, are). It returns the unnormalised accumulator with its max and sum, so the float tokens
(sinks and the recent window, a few dozen) are folded in by torch afterwards, with the same
soft-capping (:func:`decode_attention`).

Runs for the ``int`` and ``kivi`` schemes; ``kvquant`` and ``gear`` take a second kernel
(:func:`field_kernel`: codebook levels, per-channel key tables, sparse outliers, low-rank terms,
keys before RoPE rotated with the model's cos/sin table) and ``fp8`` (a 256-level codebook of the
e4m3 values). Prefill takes the blocked torch reference in ``lowbit_compiler.kv``; ``LOWBIT_CPU_CODEGEN=0``, no compiler or a failed compile: the
reference, logged once.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
from typing import Any

import torch

from lowbit_compiler.backends import cpu_codegen

# Shared by both kernels' sources (formatted with them): the fp16 conversion and the unpacking of one
# token row of codes (to float for the int kernel, to int32 for the codebook/field kernel).
_PRELUDE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__F16C__)
#include <immintrin.h>
static inline float f16_to_f32(uint16_t h) {{ return _cvtsh_ss(h); }}
#else
static inline float f16_to_f32(uint16_t h) {{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, u;
    if (exp == 0) {{
        if (mant == 0) u = sign;
        else {{ /* subnormal: renormalise */
            exp = 113;
            while (!(mant & 0x400)) {{ mant <<= 1; exp--; }}
            u = sign | (exp << 23) | ((mant & 0x3ff) << 13);
        }}
    }} else if (exp == 31) u = sign | 0x7f800000 | (mant << 13);
    else u = sign | ((exp + 112) << 23) | (mant << 13);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}}
#endif

/* Gemma-2's attention logit soft-capping of one scaled score (softcap 0: off), before the mask */
static inline float soft_cap(float score, float softcap) {{
    return softcap != 0.0f ? softcap * tanhf(score / softcap) : score;
}}
"""

_UNPACK = r"""
/* codes of one token row (as CODE_T): D values of BITS bits, 8 values in BITS bytes (little endian) */
static inline void unpack_codes(const uint8_t* p, {CODE_T}* out) {{
#if {BITS} == 8
    for (int64_t j = 0; j < {D}; j++) out[j] = ({CODE_T})p[j];
#elif {BITS} == 4 || {BITS} == 2
    /* whole values per byte: value i of byte j at bits [i * BITS, (i + 1) * BITS) (vectorises) */
    for (int64_t j = 0; j < {D} * {BITS} / 8; j++)
        for (int i = 0; i < 8 / {BITS}; i++)
            out[j * (8 / {BITS}) + i] = ({CODE_T})((p[j] >> (i * {BITS})) & {MASK}u);
#else
    /* odd widths: 8 values in BITS bytes, 8 words at a time so the shifts vectorise */
    for (int64_t w0 = 0; w0 < {D} / 8; w0 += 8) {{
        uint64_t word[8];
        for (int k = 0; k < 8; k++) {{
            word[k] = 0;
            if (w0 + k < {D} / 8)
                for (int i = 0; i < {BITS}; i++) word[k] |= (uint64_t)p[(w0 + k) * {BITS} + i] << (8 * i);
        }}
        for (int k = 0; k < 8 && w0 + k < {D} / 8; k++)
            for (int i = 0; i < 8; i++) out[(w0 + k) * 8 + i] = ({CODE_T})((word[k] >> (i * {BITS})) & {MASK}u);
    }}
#endif
}}
"""

_SOURCE = _PRELUDE + _UNPACK + r"""
/* q [B, HKV, G, D] float32 (already scaled); key/value codes [B, HKV, Tcap, D*BITS/8];
   key scales: per token [B, HKV, Tcap, D/CG] or per channel [B, HKV, Tcap/KG, D] (fp16, + zero);
   value scales per token [B, HKV, Tcap, D/CG]; mask [B, T] uint8 (1 attends) or NULL;
   softcap: the logit soft-capping of the scaled scores (0: none).
   out: acc [B, HKV, G, D] (unnormalised), m [B, HKV, G] (max score), s [B, HKV, G] (sum of exp).
   Two passes over the tokens of one (batch, KV head): scores, then values weighted by
   exp(score - max); the scales factor out of the dot products: for a per-token group,
   q . (c s + z) = s (q . c) + z (sum q), and p (c s + z) accumulates as (p s) c + p z. */
void {name}(const float* q, const uint8_t* kc, const uint16_t* ks, const uint16_t* kz,
            const uint8_t* vc, const uint16_t* vs, const uint16_t* vz, const uint8_t* mask,
            float* acc, float* m_out, float* s_out, float* scratch, int64_t B, int64_t HKV, int64_t G,
            int64_t T, int64_t Tcap, float softcap, int threads)
{{
    const int64_t D = {D}, row = {D} * {BITS} / 8, CG = {CG}, KG = {KG};
    const int64_t ngroups = D / CG;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t bh = 0; bh < B * HKV; bh++) {{
        const int64_t b = bh / HKV;
        float c[{D}], sk[{D}], zk[{D}], qsum[{GMAX} * ({D} / {CG})], m[{GMAX}], s[{GMAX}];
        float* scores = scratch + bh * G * T;   /* [G, T] */
        int64_t loaded = -1;                    /* the key token group whose scales sk, zk hold */
        float* a = acc + bh * G * D;
        const float* qq = q + bh * G * D;
        for (int64_t g = 0; g < G; g++) {{
            m[g] = -INFINITY;
            s[g] = 0.0f;
            for (int64_t cg = 0; cg < ngroups; cg++) {{
                float t = 0.0f;
                for (int64_t d = cg * CG; d < (cg + 1) * CG; d++) t += qq[g * D + d];
                qsum[g * ngroups + cg] = t;
            }}
        }}
        /* ---- pass 1: scores ---- */
        for (int64_t t = 0; t < T; t++) {{
            if (mask && !mask[b * T + t]) {{
                for (int64_t g = 0; g < G; g++) scores[g * T + t] = -INFINITY;
                continue;
            }}
            unpack_codes(kc + (bh * Tcap + t) * row, c);
#if {KEY_PER_CHANNEL}
            if (t / KG != loaded) {{  /* one fp16 -> float conversion per token group */
                loaded = t / KG;
                const uint16_t* ps = ks + (bh * (Tcap / KG) + t / KG) * D;
                const uint16_t* pz = kz + (bh * (Tcap / KG) + t / KG) * D;
                for (int64_t d = 0; d < D; d++) {{ sk[d] = f16_to_f32(ps[d]); zk[d] = f16_to_f32(pz[d]); }}
            }}
            for (int64_t d = 0; d < D; d++) c[d] = c[d] * sk[d] + zk[d];
            for (int64_t g = 0; g < G; g++) {{
                float dot = 0.0f;
                for (int64_t d = 0; d < D; d++) dot += qq[g * D + d] * c[d];
                scores[g * T + t] = soft_cap(dot, softcap);
            }}
#else
            const uint16_t* ps = ks + (bh * Tcap + t) * ngroups;
            const uint16_t* pz = kz + (bh * Tcap + t) * ngroups;
            for (int64_t g = 0; g < G; g++) {{
                float dot = 0.0f;
                for (int64_t cg = 0; cg < ngroups; cg++) {{
                    float part = 0.0f;
                    for (int64_t d = cg * CG; d < (cg + 1) * CG; d++) part += qq[g * D + d] * c[d];
                    dot += f16_to_f32(ps[cg]) * part + f16_to_f32(pz[cg]) * qsum[g * ngroups + cg];
                }}
                scores[g * T + t] = soft_cap(dot, softcap);
            }}
#endif
        }}
        for (int64_t g = 0; g < G; g++)
            for (int64_t t = 0; t < T; t++) m[g] = scores[g * T + t] > m[g] ? scores[g * T + t] : m[g];
        for (int64_t g = 0; g < G; g++)
            for (int64_t t = 0; t < T; t++) {{
                const float p = m[g] == -INFINITY ? 0.0f : expf(scores[g * T + t] - m[g]);
                scores[g * T + t] = p;
                s[g] += p;
            }}
        /* ---- pass 2: values ---- */
        memset(a, 0, sizeof(float) * G * D);
        for (int64_t t = 0; t < T; t++) {{
            if (mask && !mask[b * T + t]) continue;
            unpack_codes(vc + (bh * Tcap + t) * row, c);
            const uint16_t* ps = vs + (bh * Tcap + t) * ngroups;
            const uint16_t* pz = vz + (bh * Tcap + t) * ngroups;
            for (int64_t cg = 0; cg < ngroups; cg++) {{
                const float sc = f16_to_f32(ps[cg]), ze = f16_to_f32(pz[cg]);
                for (int64_t g = 0; g < G; g++) {{
                    const float p = scores[g * T + t], ps_ = p * sc, pz_ = p * ze;
                    float* ag = a + g * D;
                    for (int64_t d = cg * CG; d < (cg + 1) * CG; d++) ag[d] += ps_ * c[d] + pz_;
                }}
            }}
        }}
        for (int64_t g = 0; g < G; g++) {{ m_out[bh * G + g] = m[g]; s_out[bh * G + g] = s[g]; }}
    }}
}}
"""

_FIELD_SOURCE = _PRELUDE + _UNPACK + r"""
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

/* codes of one token row -> their levels: the code, or its codebook entry (cb != NULL) */
static inline void levels(const uint8_t* p, const float* cb, float* out) {{
    int32_t code[{D}];
    unpack_codes(p, code);
    if (!cb) {{
        for (int64_t j = 0; j < {D}; j++) out[j] = (float)code[j];
        return;
    }}
    /* the codebook (padded to 16 floats) as an in-register table: one permute per 16 (8) codes */
#if defined(__AVX512F__) && {BITS} <= 4 && {D} % 16 == 0
    const __m512 table = _mm512_loadu_ps(cb);
    for (int64_t j = 0; j < {D}; j += 16)
        _mm512_storeu_ps(out + j, _mm512_permutexvar_ps(_mm512_loadu_si512((const void*)(code + j)), table));
#elif defined(__AVX2__) && {BITS} <= 3 && {D} % 8 == 0
    const __m256 table = _mm256_loadu_ps(cb);
    for (int64_t j = 0; j < {D}; j += 8)
        _mm256_storeu_ps(out + j, _mm256_permutevar8x32_ps(table, _mm256_loadu_si256((const __m256i*)(code + j))));
#else
    for (int64_t j = 0; j < {D}; j++) out[j] = cb[code[j]];
#endif
}}

/* one dequantized row: levels * S + Z (fp16 S, Z per channel group of cg), + the rank-R term
   (A: the row's fp16 factors, lbf: its chunk's B already in float), then the outliers put back */
static inline void deq_row(const uint8_t* codes, const float* cb, const uint16_t* srow, const uint16_t* zrow, int cg,
                           const uint16_t* la, const float* lbf, const uint8_t* oi, const uint16_t* ov, float* x) {{
    levels(codes, cb, x);
    for (int64_t g = 0; g < {D} / cg; g++) {{
        const float sc = f16_to_f32(srow[g]), ze = zrow ? f16_to_f32(zrow[g]) : 0.0f;  /* fp8: no zero */
        for (int64_t d = g * cg; d < (g + 1) * cg; d++) x[d] = x[d] * sc + ze;
    }}
#if {RANK} > 0
    for (int r = 0; r < {RANK}; r++) {{
        const float a = f16_to_f32(la[r]);
        for (int64_t d = 0; d < {D}; d++) x[d] += a * lbf[r * {D} + d];
    }}
#endif
#if {NOUT} > 0
    for (int j = 0; j < {NOUT}; j++) x[oi[j]] = f16_to_f32(ov[j]);
#endif
}}

/* KVQuant keys: levels * S + Z with the head's per-channel tables in float, then the outliers */
static inline void deq_row_table(const uint8_t* codes, const float* cb, const float* S, const float* Z,
                                 const uint8_t* oi, const uint16_t* ov, float* x) {{
    levels(codes, cb, x);
    for (int64_t d = 0; d < {D}; d++) x[d] = x[d] * S[d] + Z[d];
#if {NOUT} > 0
    for (int j = 0; j < {NOUT}; j++) x[oi[j]] = f16_to_f32(ov[j]);
#endif
}}

/* the chunk's low-rank B [R, D] in float, converted once per chunk */
static inline void load_chunk(const uint16_t* lb, float* lbf) {{
    for (int64_t i = 0; i < {RANK} * {D}; i++) lbf[i] = f16_to_f32(lb[i]);
}}

/* KVQuant / GEAR decode attention: q [B, HKV, G, D] float32 (scaled). Keys: codes [BH, kcap, D*BITS/8],
   scales/zeros [BH, kcap, D/KCG] (GEAR) or the head's channel table [HKV, D] in float32 (KVQuant, KCG = 1,
   KEY_TABLE), codebook (or NULL), outliers [BH, kcap, NOUT] (uint8 index, fp16 value), low-rank
   A [BH, kcap, R], B [BH, klbcap, R*D], positions [B, poscap] int32 and the model's cos / sin
   [positions, D/2] float32 (PRE_ROPE: rotate_half RoPE applied to each dequantized key row). Values: the same fields with per-token groups of VCG.
   Soft-capping and out as the uniform kernel: unnormalised acc, max, sum. */
void {name}(const float* q, const uint8_t* kc, const uint16_t* ks, const uint16_t* kz, const float* kcb,
            const uint8_t* koi, const uint16_t* kov, const uint16_t* kla, const uint16_t* klb,
            const int32_t* kpos, const float* rope_cos, const float* rope_sin,
            const uint8_t* vc, const uint16_t* vs, const uint16_t* vz, const float* vcb,
            const uint8_t* voi, const uint16_t* vov, const uint16_t* vla, const uint16_t* vlb,
            const uint8_t* mask, float* acc, float* m_out, float* s_out, float* scratch,
            int64_t B, int64_t HKV, int64_t G, int64_t T, int64_t kcap, int64_t vcap, int64_t klbcap, int64_t vlbcap,
            int64_t poscap, float softcap, int threads)
{{
    const int64_t D = {D}, row = {D} * {BITS} / 8;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t bh = 0; bh < B * HKV; bh++) {{
        const int64_t b = bh / HKV, h = bh % HKV;
        float x[{D}], m[{GMAX}], s[{GMAX}], lbf[{RANK} * {D} + 1];
        int64_t chunk = -1;
        float* scores = scratch + bh * G * T;
        float* a = acc + bh * G * D;
        const float* qq = q + bh * G * D;
        for (int64_t g = 0; g < G; g++) {{ m[g] = -INFINITY; s[g] = 0.0f; }}
        /* ---- pass 1: scores ---- */
        for (int64_t t = 0; t < T; t++) {{
            if (mask && !mask[b * T + t]) {{
                for (int64_t g = 0; g < G; g++) scores[g * T + t] = -INFINITY;
                continue;
            }}
            const int64_t r = bh * kcap + t;
#if {KEY_TABLE}
            deq_row_table(kc + r * row, kcb, (const float*)ks + h * D, (const float*)kz + h * D, koi + r * {NOUT},
                          kov + r * {NOUT}, x);
#else
#if {RANK} > 0
            if (t / {CHUNK} != chunk) {{ chunk = t / {CHUNK}; load_chunk(klb + (bh * klbcap + chunk) * {RANK} * D, lbf); }}
#endif
            deq_row(kc + r * row, kcb, ks + r * (D / {KCG}), kz ? kz + r * (D / {KCG}) : 0, {KCG}, kla + r * {RANK}, lbf,
                    koi + r * {NOUT}, kov + r * {NOUT}, x);
#endif
#if {PRE_ROPE}
            {{  /* RoPE at the token's position, from the model's own cos/sin table */
                const float* c = rope_cos + (int64_t)kpos[b * poscap + t] * (D / 2);
                const float* si = rope_sin + (int64_t)kpos[b * poscap + t] * (D / 2);
                for (int64_t j = 0; j < D / 2; j++) {{
                    const float x0 = x[j], x1 = x[j + D / 2];
                    x[j] = x0 * c[j] - x1 * si[j];
                    x[j + D / 2] = x1 * c[j] + x0 * si[j];
                }}
            }}
#endif
            for (int64_t g = 0; g < G; g++) {{
                float dot = 0.0f;
                for (int64_t d = 0; d < D; d++) dot += qq[g * D + d] * x[d];
                scores[g * T + t] = soft_cap(dot, softcap);
            }}
        }}
        for (int64_t g = 0; g < G; g++)
            for (int64_t t = 0; t < T; t++) m[g] = scores[g * T + t] > m[g] ? scores[g * T + t] : m[g];
        for (int64_t g = 0; g < G; g++)
            for (int64_t t = 0; t < T; t++) {{
                const float p = m[g] == -INFINITY ? 0.0f : expf(scores[g * T + t] - m[g]);
                scores[g * T + t] = p;
                s[g] += p;
            }}
        /* ---- pass 2: values ---- */
        memset(a, 0, sizeof(float) * G * D);
        chunk = -1;
        for (int64_t t = 0; t < T; t++) {{
            if (mask && !mask[b * T + t]) continue;
            const int64_t r = bh * vcap + t;
#if {RANK} > 0
            if (t / {CHUNK} != chunk) {{ chunk = t / {CHUNK}; load_chunk(vlb + (bh * vlbcap + chunk) * {RANK} * D, lbf); }}
#endif
            deq_row(vc + r * row, vcb, vs + r * (D / {VCG}), vz ? vz + r * (D / {VCG}) : 0, {VCG}, vla + r * {RANK}, lbf,
                    voi + r * {NOUT}, vov + r * {NOUT}, x);
            for (int64_t g = 0; g < G; g++) {{
                const float p = scores[g * T + t];
                float* ag = a + g * D;
                for (int64_t d = 0; d < D; d++) ag[d] += p * x[d];
            }}
        }}
        for (int64_t g = 0; g < G; g++) {{ m_out[bh * G + g] = m[g]; s_out[bh * G + g] = s[g]; }}
    }}
}}
"""

GMAX = 64  # query heads per KV head the kernel's stack buffers hold
_LOGGED: set[str] = set()
log = logging.getLogger("lowbit_compiler")


def source(bits: int, head_dim: int, channel_group: int, key_group: int, per_channel_keys: bool) -> tuple[str, str]:
    name = f"lowbit_kv_decode_b{bits}_d{head_dim}_cg{channel_group}_kg{key_group}_{'pc' if per_channel_keys else 'pt'}"
    return name, _SOURCE.format(name=name, CODE_T="float", BITS=bits, MASK=(1 << bits) - 1, D=head_dim,
                                CG=channel_group, KG=key_group, KEY_PER_CHANNEL=int(per_channel_keys), GMAX=GMAX)


@functools.lru_cache(maxsize=None)
def kernel(bits: int, head_dim: int, channel_group: int, key_group: int, per_channel_keys: bool):
    if os.environ.get(cpu_codegen.ENV, "1") == "0":
        return None
    name, text = source(bits, head_dim, channel_group, key_group, per_channel_keys)
    return cpu_codegen.build(name, text,
                             [ctypes.c_void_p] * 12 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int],
                             "the packed KV cache is read by the blocked torch attention (lowbit_compiler.kv)")


def field_source(bits: int, head_dim: int, key_cg: int, value_cg: int, key_table: bool, nout: int, rank: int,
                 chunk: int, pre_rope: bool) -> tuple[str, str]:
    name = (f"lowbit_kv_decode_fields_b{bits}_d{head_dim}_k{'tab' if key_table else key_cg}_v{value_cg}_o{nout}_r{rank}"
            f"c{chunk}{'_rope' if pre_rope else ''}")
    return name, _FIELD_SOURCE.format(name=name, CODE_T="int32_t", BITS=bits, MASK=(1 << bits) - 1, D=head_dim,
                                      KCG=key_cg, VCG=value_cg, KEY_TABLE=int(key_table), NOUT=nout, RANK=rank, CHUNK=chunk,
                                      PRE_ROPE=int(pre_rope), GMAX=GMAX)


def field_kernel(bits: int, head_dim: int, key_cg: int, value_cg: int, key_table: bool, nout: int, rank: int,
                 chunk: int, pre_rope: bool, isa: str | None = None):
    """The KVQuant / GEAR kernel (codebooks, per-channel key tables, outliers, low-rank terms, RoPE),
    built for ``isa`` (default ``LOWBIT_CPU_ISA``, else the host's: AVX-512 / AVX2 codebook permutes,
    or portable C)."""
    return _field_kernel(bits, head_dim, key_cg, value_cg, key_table, nout, rank, chunk, pre_rope,
                         isa or cpu_codegen.isa_choice())


@functools.lru_cache(maxsize=None)
def _field_kernel(bits, head_dim, key_cg, value_cg, key_table, nout, rank, chunk, pre_rope, isa):
    if os.environ.get(cpu_codegen.ENV, "1") == "0":
        return None
    name, text = field_source(bits, head_dim, key_cg, value_cg, key_table, nout, rank, chunk, pre_rope)
    return cpu_codegen.build(name, text,
                             [ctypes.c_void_p] * 25 + [ctypes.c_int64] * 9 + [ctypes.c_float, ctypes.c_int],
                             "the packed KV cache is read by the blocked torch attention (lowbit_compiler.kv)",
                             isa=isa)


def rope_table(rope: Any, positions: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [positions, D/2] float32 of the model's own rotary embedding at 0..positions-1,
    kept on the rope function and extended by doubling (one table per model, shared by its layers;
    rebuilt when the embedding's ``inv_freq`` changes, as dynamic RoPE variants change it). The
    values are the ones ``kv.packed_attention_reference`` rotates with."""
    rotary = getattr(rope, "rotary", None)
    version = None if rotary is None else (getattr(rotary, "inv_freq", None)._version,
                                           float(getattr(rotary, "attention_scaling", 1.0) or 1.0))
    table = getattr(rope, "_lowbit_table", None)
    if table is None or table[0] != version or table[1].shape[0] < positions:
        size = max(positions, 2 * table[1].shape[0] if table is not None and table[0] == version else 256)
        cos, sin = rope(torch.arange(size, device=device)[None])
        half = cos.shape[-1] // 2
        table = (version, cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous())
        rope._lowbit_table = table
    return table[1], table[2]


@functools.lru_cache(maxsize=None)
def _fp8_levels() -> torch.Tensor:
    """The float value of each of the 256 e4m3 codes (NaN codes are never written: values are clamped)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().nan_to_num(0.0)


def _field_decode(q: torch.Tensor, layer: Any, packed_mask: torch.Tensor | None, b: int, hkv: int, g: int, d: int,
                  softcap: float):
    """The KVQuant / GEAR kernel's (acc, max, sum) over the packed tokens, or None (no compiler)."""
    from lowbit_compiler import kv

    fmt, sk, sv = layer.fmt, layer._k, layer._v
    if fmt.scheme == "fp8":  # e4m3 codes: a 256-level codebook of their values, one scale per group, no zero
        kf, vf = {"codes": sk.codes, "scale": sk.scale}, {"codes": sv.codes, "scale": sv.scale}
    else:
        kf, vf = sk.fields, sv.fields
    kvq = isinstance(sk, kv._KVQuantStore)
    nout = fmt.n_outliers(d)
    rank = fmt.rank if fmt.scheme == "gear" else 0
    pre_rope = fmt.key_rope == "pre"
    vscale = vf["half"] if kvq else vf["scale"]
    key_cg = 1 if kvq else d // kf["scale"].shape[-1]
    fn = field_kernel(fmt.bits, d, key_cg, d // vscale.shape[-1], kvq, nout, rank, fmt.chunk, pre_rope)
    if fn is None:
        return None
    n = sk.length
    dummy = torch.zeros(1)
    if kvq:
        p = sk.params
        kscale, kzero = p.key_scale.float().contiguous(), p.key_center.float().contiguous()  # float tables
        # padded to 16 levels: the kernel loads the codebook as one in-register table
        kcb, vcb = (torch.nn.functional.pad(c.float(), (0, max(0, 16 - c.numel()))) for c in (sk.codebook, sv.codebook))
        vzero = vf["mid"]
    else:
        kscale, kzero, vzero = kf["scale"], kf.get("zero"), vf.get("zero")
        kcb = vcb = _fp8_levels() if fmt.scheme == "fp8" else None
    rope_cos = rope_sin = pos = None
    if pre_rope:
        pos = kf["pos"]
        rope_cos, rope_sin = rope_table(layer.rope, int(pos[:, 0, :n].max()) + 1, q.device)
    tensors = [kf["codes"], kscale, kzero, kcb, kf.get("oidx"), kf.get("oval"), kf.get("lr_a"), kf.get("lr_b"), pos,
               rope_cos, rope_sin, vf["codes"], vscale, vzero, vcb, vf.get("oidx"), vf.get("oval"), vf.get("lr_a"),
               vf.get("lr_b")]
    caps = {t.shape[2] for t in (kf["codes"], kf.get("oidx"), kf.get("lr_a"), kscale if not kvq else None) if t is not None}
    caps_v = {t.shape[2] for t in (vf["codes"], vf.get("oidx"), vf.get("lr_a"), vscale) if t is not None}
    if len(caps) != 1 or len(caps_v) != 1 or any(t is not None and not t.is_contiguous() for t in tensors):
        return None
    if nout and (kf["oidx"].dtype != torch.uint8 or vf["oidx"].dtype != torch.uint8):
        return None
    acc = torch.empty(b, hkv, g, d)
    m = torch.empty(b, hkv, g)
    s = torch.empty(b, hkv, g)
    scratch = torch.empty(b * hkv * g * n)
    ptr = [None if t is None else t.data_ptr() for t in tensors]
    fn(q.data_ptr(), *ptr, None if packed_mask is None else packed_mask.data_ptr(), acc.data_ptr(), m.data_ptr(),
       s.data_ptr(), scratch.data_ptr(), b, hkv, g, n, kf["codes"].shape[2], vf["codes"].shape[2],
       kf["lr_b"].shape[2] if rank else 1, vf["lr_b"].shape[2] if rank else 1, pos.shape[-1] if pre_rope else 1,
       softcap, torch.get_num_threads())
    return acc, m, s


def unsupported(query: torch.Tensor, layer: Any) -> str | None:
    """Why the generated kernel does not run for this call (None: it does)."""
    fmt = layer.fmt
    if query.device.type != "cpu":
        return "not a CPU tensor"
    if query.shape[2] != 1:
        return "prefill (more than one query token)"
    if fmt.scheme in ("kvquant", "gear") and query.shape[-1] > 256:
        return f"{fmt.scheme}: head size {query.shape[-1]} > 256 (outlier indices are not uint8)"
    if layer._k.length == 0:
        return "nothing packed yet"
    if query.shape[1] // layer._float_k.shape[1] > GMAX:
        return f"more than {GMAX} query heads per KV head"
    return None


def decode_attention(query: torch.Tensor, layer: Any, mask: torch.Tensor | None, scaling: float,
                     softcap: float | None = None) -> torch.Tensor | None:
    """Attention of one query token over the layer's cache (B, 1, Hq, D), or None when the
    generated kernel does not apply (:func:`unsupported`; the caller runs the torch reference).
    ``softcap``: Gemma-2's logit soft-capping, ``softcap * tanh(s / softcap)`` on the scaled scores
    before the mask, in the kernel and on the float tokens folded in (None or 0: off)."""
    why = unsupported(query, layer)
    if why is not None:
        if why.startswith(layer.fmt.scheme) and why not in _LOGGED:
            _LOGGED.add(why)
            log.warning("lowbit fallback: CPU decode attention over the %s cache: %s; it takes the blocked torch "
                        "attention (lowbit_compiler.kv.packed_attention_reference)", layer.fmt.key, why)
        return None
    fmt, store_k, store_v = layer.fmt, layer._k, layer._v
    b, hq, _, d = query.shape
    hkv = layer._float_k.shape[1]
    g = hq // hkv
    n, total = store_k.length, layer.get_seq_length()
    sinks = layer._sink_k.shape[2]
    q = (query.float() * scaling).reshape(b, hkv, g, d).contiguous()
    softcap = float(softcap or 0.0)
    packed_mask = None
    if mask is not None:
        mask = mask[:, 0, -1, :total]
        if mask.dtype != torch.bool:
            mask = mask > -1e30  # additive masks: -inf (or the dtype's min) masks out
        packed_mask = mask[:, sinks:sinks + n].to(torch.uint8).contiguous()
    if fmt.scheme in ("kvquant", "gear", "fp8"):
        out = _field_decode(q, layer, packed_mask, b, hkv, g, d, softcap)
        if out is None:
            return None
        acc, m, s = out
        return fold_float_tokens(q, layer, mask, acc, m.unsqueeze(-1), s.unsqueeze(-1), query.dtype, softcap)
    per_channel = store_k.axis == "per_channel"
    fn = kernel(fmt.bits, d, fmt.channel_group(d), fmt.group if per_channel else 1, per_channel)
    if fn is None:
        return None
    tensors = [store_k.codes, store_k.scale, store_k.zero, store_v.codes, store_v.scale, store_v.zero]
    if any(not t.is_contiguous() for t in tensors):
        return None
    acc = torch.empty(b, hkv, g, d)
    m = torch.empty(b, hkv, g)
    s = torch.empty(b, hkv, g)
    scratch = torch.empty(b * hkv * g * n)  # the scores of the packed tokens
    fn(q.data_ptr(), *(t.data_ptr() for t in tensors), None if packed_mask is None else packed_mask.data_ptr(),
       acc.data_ptr(), m.data_ptr(), s.data_ptr(), scratch.data_ptr(), b, hkv, g, n, store_k.codes.shape[2],
       softcap, torch.get_num_threads())
    return fold_float_tokens(q, layer, mask, acc, m.unsqueeze(-1), s.unsqueeze(-1), query.dtype, softcap)


def fold_float_tokens(q: torch.Tensor, layer: Any, mask: torch.Tensor | None, acc: torch.Tensor, m: torch.Tensor,
                      s: torch.Tensor, dtype: torch.dtype, softcap: float | None = None) -> torch.Tensor:
    """Fold the layer's float tokens (sinks, window) into the packed tokens' unnormalised softmax
    (acc [B, HKV, G, D], max and sum [B, HKV, G, 1]) and normalise: (B, 1, Hq, D) in ``dtype``.
    ``q``: the scaled queries [B, HKV, G, D]; ``mask``: [B, T] bool over all tokens, or None;
    ``softcap``: the logit soft-capping the packed tokens' scores had (None: none)."""
    b, hkv, g, d = q.shape
    sinks, n = layer._sink_k.shape[2], layer._k.length
    for start, kf, vf in ((0, layer._sink_k, layer._sink_v), (sinks + n, layer._float_k, layer._float_v)):
        if kf.shape[2] == 0:
            continue
        scores = torch.einsum("bhgd,bhtd->bhgt", q, kf.float())
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, start:start + kf.shape[2]], -math.inf)
        m_new = torch.maximum(m, scores.amax(-1, keepdim=True))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(scores - safe)
        corr = torch.exp(m - safe)
        s = s * corr + p.sum(-1, keepdim=True)
        acc = acc * corr + torch.einsum("bhgt,bhtd->bhgd", p, vf.float())
        m = m_new
    out = acc / s.clamp_min(1e-30)
    return out.reshape(b, hkv * g, 1, d).transpose(1, 2).to(dtype)
