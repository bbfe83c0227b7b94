"""CPU decode attention over the packed KV cache: a generated C kernel (``cpu_codegen.build``: gcc
at first use, cached on disk under ``$LOWBIT_CACHE_DIR/cpu``, ctypes), one per (bits, key layout,
channel group, key token group).

What it computes, for one query token per sequence (decode, ``Q == 1``): for each (batch, KV head),
first pass: for each token of the packed store, unpack the key codes in registers and dot them with
the ``g`` query heads that share the KV head (GQA/MQA), the per-group scales and zeros applied to
the partial dot products; second pass: the softmax weights times the unpacked value codes, scales
folded into the weights. The packed store is read once per step and nothing dequantized is stored
(the scores, T floats per query head, are). It returns the unnormalised accumulator with its max
and sum, so the float tokens (sinks
and the recent window, a few dozen) are folded in by torch afterwards (:func:`decode_attention`).

Runs for the ``int`` and ``kivi`` schemes (``fp8``, ``kvquant``, ``gear`` and prefill take the blocked torch reference in
``lowbit_compiler.kv``); ``LOWBIT_CPU_CODEGEN=0``, no compiler or a failed compile: the reference,
logged once.
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

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

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

/* codes of one token row: D values of BITS bits, 8 values in BITS bytes (little endian) */
static inline void unpack_row(const uint8_t* p, float* out) {{
#if {BITS} == 8
    for (int64_t j = 0; j < {D}; j++) out[j] = (float)p[j];
#elif {BITS} == 4 || {BITS} == 2
    /* whole values per byte: value i of byte j at bits [i * BITS, (i + 1) * BITS) (vectorises) */
    for (int64_t j = 0; j < {D} * {BITS} / 8; j++)
        for (int i = 0; i < 8 / {BITS}; i++)
            out[j * (8 / {BITS}) + i] = (float)((p[j] >> (i * {BITS})) & {MASK}u);
#else
    for (int64_t w = 0; w < {D} / 8; w++) {{
        uint64_t word = 0;
        memcpy(&word, p + w * {BITS}, {BITS});
        for (int i = 0; i < 8; i++)
            out[w * 8 + i] = (float)((word >> (i * {BITS})) & {MASK}u);
    }}
#endif
}}

/* q [B, HKV, G, D] float32 (already scaled); key/value codes [B, HKV, Tcap, D*BITS/8];
   key scales: per token [B, HKV, Tcap, D/CG] or per channel [B, HKV, Tcap/KG, D] (fp16, + zero);
   value scales per token [B, HKV, Tcap, D/CG]; mask [B, T] uint8 (1 attends) or NULL.
   out: acc [B, HKV, G, D] (unnormalised), m [B, HKV, G] (max score), s [B, HKV, G] (sum of exp).
   Two passes over the tokens of one (batch, KV head): scores, then values weighted by
   exp(score - max); the scales factor out of the dot products: for a per-token group,
   q . (c s + z) = s (q . c) + z (sum q), and p (c s + z) accumulates as (p s) c + p z. */
void {name}(const float* q, const uint8_t* kc, const uint16_t* ks, const uint16_t* kz,
            const uint8_t* vc, const uint16_t* vs, const uint16_t* vz, const uint8_t* mask,
            float* acc, float* m_out, float* s_out, float* scratch, int64_t B, int64_t HKV, int64_t G,
            int64_t T, int64_t Tcap, int threads)
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
            unpack_row(kc + (bh * Tcap + t) * row, c);
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
                scores[g * T + t] = dot;
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
                scores[g * T + t] = dot;
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
            unpack_row(vc + (bh * Tcap + t) * row, c);
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

GMAX = 64  # query heads per KV head the kernel's stack buffers hold
_LOGGED: set[str] = set()
log = logging.getLogger("lowbit_compiler")


def source(bits: int, head_dim: int, channel_group: int, key_group: int, per_channel_keys: bool) -> tuple[str, str]:
    name = f"lowbit_kv_decode_b{bits}_d{head_dim}_cg{channel_group}_kg{key_group}_{'pc' if per_channel_keys else 'pt'}"
    return name, _SOURCE.format(name=name, BITS=bits, MASK=(1 << bits) - 1, D=head_dim, CG=channel_group,
                                KG=key_group, KEY_PER_CHANNEL=int(per_channel_keys), GMAX=GMAX)


@functools.lru_cache(maxsize=None)
def kernel(bits: int, head_dim: int, channel_group: int, key_group: int, per_channel_keys: bool):
    if os.environ.get(cpu_codegen.ENV, "1") == "0":
        return None
    name, text = source(bits, head_dim, channel_group, key_group, per_channel_keys)
    return cpu_codegen.build(name, text, [ctypes.c_void_p] * 12 + [ctypes.c_int64] * 5 + [ctypes.c_int],
                             "the packed KV cache is read by the blocked torch attention (lowbit_compiler.kv)")


def unsupported(query: torch.Tensor, layer: Any) -> str | None:
    """Why the generated kernel does not run for this call (None: it does)."""
    fmt = layer.fmt
    if query.device.type != "cpu":
        return "not a CPU tensor"
    if query.shape[2] != 1:
        return "prefill (more than one query token)"
    if fmt.scheme == "fp8":
        return "fp8 codes"
    if fmt.scheme in ("kvquant", "gear"):
        return f"{fmt.scheme}: the kernel reads uniform codes only (not codebooks, outliers or low-rank factors)"
    if layer._k.length == 0:
        return "nothing packed yet"
    if query.shape[1] // layer._float_k.shape[1] > GMAX:
        return f"more than {GMAX} query heads per KV head"
    return None


def decode_attention(query: torch.Tensor, layer: Any, mask: torch.Tensor | None, scaling: float,
                     softcap: float | None = None) -> torch.Tensor | None:
    """Attention of one query token over the layer's cache (B, 1, Hq, D), or None when the
    generated kernel does not apply (:func:`unsupported`; the caller runs the torch reference)."""
    why = unsupported(query, layer)
    if softcap or why is not None:
        if why is not None and why.startswith(layer.fmt.scheme) and why not in _LOGGED:
            _LOGGED.add(why)
            log.warning("lowbit fallback: CPU decode attention over the %s cache: %s; it takes the blocked torch "
                        "attention (lowbit_compiler.kv.packed_attention_reference)", layer.fmt.key, why)
        return None
    fmt, store_k, store_v = layer.fmt, layer._k, layer._v
    b, hq, _, d = query.shape
    hkv = layer._float_k.shape[1]
    g = hq // hkv
    per_channel = store_k.axis == "per_channel"
    fn = kernel(fmt.bits, d, fmt.channel_group(d), fmt.group if per_channel else 1, per_channel)
    if fn is None:
        return None
    n, total = store_k.length, layer.get_seq_length()
    sinks = layer._sink_k.shape[2]
    q = (query.float() * scaling).reshape(b, hkv, g, d).contiguous()
    packed_mask = None
    if mask is not None:
        mask = mask[:, 0, -1, :total]
        if mask.dtype != torch.bool:
            mask = mask > -1e30  # additive masks: -inf (or the dtype's min) masks out
        packed_mask = mask[:, sinks:sinks + n].to(torch.uint8).contiguous()
    tensors = [store_k.codes, store_k.scale, store_k.zero, store_v.codes, store_v.scale, store_v.zero]
    if any(not t.is_contiguous() for t in tensors):
        return None
    acc = torch.empty(b, hkv, g, d)
    m = torch.empty(b, hkv, g)
    s = torch.empty(b, hkv, g)
    scratch = torch.empty(b * hkv * g * n)  # the scores of the packed tokens
    fn(q.data_ptr(), *(t.data_ptr() for t in tensors), None if packed_mask is None else packed_mask.data_ptr(),
       acc.data_ptr(), m.data_ptr(), s.data_ptr(), scratch.data_ptr(), b, hkv, g, n, store_k.codes.shape[2],
       torch.get_num_threads())
    return fold_float_tokens(q, layer, mask, acc, m.unsqueeze(-1), s.unsqueeze(-1), query.dtype)


def fold_float_tokens(q: torch.Tensor, layer: Any, mask: torch.Tensor | None, acc: torch.Tensor, m: torch.Tensor,
                      s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Fold the layer's float tokens (sinks, window) into the packed tokens' unnormalised softmax
    (acc [B, HKV, G, D], max and sum [B, HKV, G, 1]) and normalise: (B, 1, Hq, D) in ``dtype``.
    ``q``: the scaled queries [B, HKV, G, D]; ``mask``: [B, T] bool over all tokens, or None."""
    b, hkv, g, d = q.shape
    sinks, n = layer._sink_k.shape[2], layer._k.length
    for start, kf, vf in ((0, layer._sink_k, layer._sink_v), (sinks + n, layer._float_k, layer._float_v)):
        if kf.shape[2] == 0:
            continue
        scores = torch.einsum("bhgd,bhtd->bhgt", q, kf.float())
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
