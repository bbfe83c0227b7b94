"""The generated Triton decode attention over the packed KV cache (``lowbit_compiler.kv``): one
query token per sequence reads the packed keys and values directly, dequantizes them in registers
and never writes a dequantized copy.

Formats (every one the cache stores):

* ``int`` / ``kivi``: uniform codes of 2..8 bits, fp16 scale and zero per token and channel group,
  or (KIVI's keys) per channel and token group;
* ``kvquant``: codebook indices (the per-layer levels are loaded once per program), keys per
  channel with the calibrated centre and half-range of each (KV head, channel), values per token
  group with their fp16 centre and half-range, the sparse outliers (fp16 value + index) put back
  in registers, and keys stored **before RoPE**: the kernel rotates them at their stored positions
  (``cos(pos * inv_freq) * attention_scaling``, full-width rotate_half) before the dot product;
* ``gear``: uniform per-token codes + the rank-``R`` residual ``A[t] . B[chunk(t)]`` + outliers;
* ``fp8``: e4m3 codes times one fp16 scale per token and channel group. Two variants: the GPU's
  native fp8 -> fp32 conversion (compiled for a CUDA device), and the float built from the code's
  sign, exponent and mantissa bits (under the interpreter, whose fp8 casts are not the hardware's);
  they give the same floats (every e4m3 value is exact in fp32).

Gemma-2's attention logit soft-capping (``softcap * tanh(s / softcap)`` on the scaled scores, before
the mask) is a constexpr branch (``SOFTCAP``), tanh from one exp.

All of them are one formula per element: ``x = level(code) * S + Z`` (level: the code itself, or
its codebook entry; ``S``, ``Z``: the scale and zero of a per-token group, of a KIVI token group,
or of a channel), then outliers and the low-rank term. Codes of any width are read from their
packed bytes by bit position (``c * BITS``; 8 values in ``BITS`` bytes, little endian, as
``kv.pack`` writes them): two byte loads, a shift and a mask.

Flash-decoding: the grid is (batch x KV head, token splits). Each program takes all ``G`` query
heads of its KV head (GQA / MQA: the codes are read once for the group, the dots are ``tl.dot`` of
a ``BLOCK_G x D`` query tile, ``G`` padded to 16), walks its split in ``BLOCK_T`` token blocks with
an online softmax, and writes an unnormalised partial (acc, max, sum); :func:`combine` (a second
kernel, one program per batch x KV head) merges the splits. The float tokens (sinks, the window)
are folded in by torch afterwards, as on the CPU path (``kv_cpu.fold_float_tokens``).

Every load is upcast to fp32 right after it (bf16 arithmetic is wrong under the interpreter).
Checked under ``TRITON_INTERPRET=1`` against ``kv.packed_attention_reference`` and compiled for
sm_90 with registers and spills reported (``tests/backends/test_kv_triton.py``). Used by
``kv.packed_attention`` for CUDA tensors (and for CPU tensors under the interpreter when
``LOWBIT_KV_KERNEL=triton``); what it does not take (more than 64 query heads per KV head, a head
size that is not a power of two from 32 to 256, a rotary embedding it cannot reproduce) runs the
blocked torch attention, logged once.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
import triton
import triton.language as tl

from lowbit_compiler.backends import _triton_adapter

log = logging.getLogger("lowbit_compiler")
BLOCK_T = 16  # tokens per step: at head size 128, 112-143 registers at 8 warps on sm_90, no spills
NUM_WARPS = 8
GMAX = 64
ENV = "LOWBIT_KV_KERNEL"  # "auto" (CUDA: Triton, CPU: C), "triton", "c", "torch"
_LOGGED: set[str] = set()

# SCALE modes: how S and Z of an element are found
PER_TOKEN_GROUP = 0   # [BH, cap, D / CG]: token t, channel group d // CG
PER_TOKEN_BLOCK = 1   # [BH, cap / TG, D]: token group t // TG, channel d (KIVI keys)
PER_HEAD_CHANNEL = 2  # [HKV, D]: constant over tokens (KVQuant keys)
# FP8 modes: how e4m3 codes become floats
FP8_NONE: tl.constexpr = tl.constexpr(0)    # not fp8
FP8_BITS: tl.constexpr = tl.constexpr(1)    # by building the float's bits (the interpreter, and CPU tensors)
FP8_NATIVE: tl.constexpr = tl.constexpr(2)  # the GPU's fp8 -> fp32 conversion (compiled kernels)


@triton.jit
def _dequant(codes_ptr, s_ptr, z_ptr, cb_ptr, oi_ptr, ov_ptr, la_ptr, lb_ptr,
             bh, h, offs_t, offs_d, tmask, cap, s_cap, lb_cap,
             D: tl.constexpr, BITS: tl.constexpr, SCALE: tl.constexpr, CG: tl.constexpr, TG: tl.constexpr,
             CODEBOOK: tl.constexpr, NOUT: tl.constexpr, RANK: tl.constexpr, CHUNK: tl.constexpr,
             FP8: tl.constexpr):
    """Dequantized elements [BLOCK_T, len(offs_d)] of tokens ``offs_t`` (float32)."""
    ROW: tl.constexpr = D * BITS // 8
    tok = (bh * cap + offs_t).to(tl.int64)
    if FP8 == FP8_NATIVE:  # e4m3 bytes: the hardware's fp8 -> fp32 conversion
        raw = tl.load(codes_ptr + tok[:, None] * ROW + offs_d[None, :], mask=tmask[:, None], other=0)
        level = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        if BITS == 8:  # one byte per code
            code = tl.load(codes_ptr + tok[:, None] * ROW + offs_d[None, :], mask=tmask[:, None], other=0).to(tl.int32)
        else:
            bit = offs_d * BITS
            byte = bit // 8
            shift = bit - byte * 8
            m2 = tmask[:, None] & (byte[None, :] + 1 < ROW)
            lo = tl.load(codes_ptr + tok[:, None] * ROW + byte[None, :], mask=tmask[:, None], other=0).to(tl.int32)
            hi = tl.load(codes_ptr + tok[:, None] * ROW + byte[None, :] + 1, mask=m2, other=0).to(tl.int32)
            code = ((lo | (hi << 8)) >> shift[None, :]) & ((1 << BITS) - 1)
        if FP8 == FP8_BITS:
            level = _e4m3_bits(code)
        elif CODEBOOK:
            level = tl.load(cb_ptr + code)
        else:
            level = code.to(tl.float32)
    if SCALE == 0:
        sidx = tok[:, None] * (D // CG) + (offs_d // CG)[None, :]
        smask = tmask[:, None]
    elif SCALE == 1:
        sidx = (bh * s_cap + offs_t // TG).to(tl.int64)[:, None] * D + offs_d[None, :]
        smask = tmask[:, None]
    else:
        sidx = (h * D + offs_d)[None, :]
        smask = offs_d[None, :] >= 0
    s = tl.load(s_ptr + sidx, mask=smask, other=0.0).to(tl.float32)
    if FP8 != FP8_NONE:  # fp8: one scale per group, no zero point
        x = level * s
    else:
        z = tl.load(z_ptr + sidx, mask=smask, other=0.0).to(tl.float32)
        x = level * s + z
    for r in tl.static_range(RANK):  # GEAR: + A[t, r] B[chunk(t), r, :]
        a = tl.load(la_ptr + tok * RANK + r, mask=tmask, other=0.0).to(tl.float32)
        crow = (bh * lb_cap + offs_t // CHUNK).to(tl.int64)
        bm = tl.load(lb_ptr + crow[:, None] * (RANK * D) + r * D + offs_d[None, :], mask=tmask[:, None],
                     other=0.0).to(tl.float32)
        x += a[:, None] * bm
    for j in tl.static_range(NOUT):  # dense-and-sparse: the row's outliers replace their elements
        oi = tl.load(oi_ptr + tok * NOUT + j, mask=tmask, other=0).to(tl.int32)
        ov = tl.load(ov_ptr + tok * NOUT + j, mask=tmask, other=0.0).to(tl.float32)
        x = tl.where(offs_d[None, :] == oi[:, None], ov[:, None], x)
    return x


@triton.jit
def _e4m3_bits(code):
    """fp8 e4m3 codes (int32 in [0, 256)) -> float32 by building the float's bits: sign bit 7,
    exponent bits 6-3 (bias 7), mantissa bits 2-0; exponent 0 is subnormal (m * 2^-9). No fp8 type
    or conversion is involved, so it is exact under the interpreter too. (0x7F / 0xFF, e4m3's NaN,
    read as +-480: never written, torch's float -> e4m3 conversion saturates at 448.)"""
    e = (code >> 3) & 15
    m = code & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)  # 2^(e - 7) (1 + m / 8)
    v = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    return tl.where((code & 128) != 0, -v, v)


@triton.jit
def _tanh(x):
    """tanh from one exp (no libdevice call, the same under the interpreter): 1 - 2 / (e^2x + 1),
    with x clamped to +-15 (tanh(15) is 1 in float32; e^2x neither overflows nor underflows)."""
    x = tl.minimum(tl.maximum(x, -15.0), 15.0)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    if DOT == 0:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32")


@triton.jit
def kv_decode_split(
        # queries [B * HKV, G, D] float32 (scaled); mask [B, T] uint8 (1 attends) when HAS_MASK
        q_ptr, mask_ptr,
        # keys: codes, scale, zero, codebook, outlier index and value, low-rank A and B, positions
        kc_ptr, ks_ptr, kz_ptr, kcb_ptr, koi_ptr, kov_ptr, kla_ptr, klb_ptr, kpos_ptr, inv_freq_ptr,
        # values: the same fields (no positions)
        vc_ptr, vs_ptr, vz_ptr, vcb_ptr, voi_ptr, vov_ptr, vla_ptr, vlb_ptr,
        # partial results [B * HKV, SPLITS, G, D] and [B * HKV, SPLITS, G]
        acc_ptr, m_ptr, l_ptr,
        HKV, G, T, tokens_per_split, k_cap, ks_cap, klb_cap, v_cap, vs_cap, vlb_cap, pos_cap, rope_scale, softcap,
        D: tl.constexpr, BITS: tl.constexpr, CODEBOOK: tl.constexpr, NOUT: tl.constexpr, RANK: tl.constexpr,
        CHUNK: tl.constexpr, K_SCALE: tl.constexpr, K_CG: tl.constexpr, K_TG: tl.constexpr, V_CG: tl.constexpr,
        PRE_ROPE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
        DOT: tl.constexpr, FP8: tl.constexpr, SOFTCAP: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = bh // HKV
    h = bh - b * HKV
    HALF: tl.constexpr = D // 2
    offs_g = tl.arange(0, BLOCK_G)
    gmask = offs_g < G
    d0 = tl.arange(0, HALF)
    d1 = HALF + d0
    dd = tl.arange(0, D)
    qrow = (bh * G + offs_g).to(tl.int64)[:, None] * D
    q0 = tl.load(q_ptr + qrow + d0[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
    q1 = tl.load(q_ptr + qrow + d1[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
    if PRE_ROPE:
        inv_freq = tl.load(inv_freq_ptr + d0).to(tl.float32)
    m_i = tl.full([BLOCK_G], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    start = split * tokens_per_split
    stop = tl.minimum(start + tokens_per_split, T)
    for t0 in range(start, stop, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        tmask = offs_t < stop
        attend = tmask
        if HAS_MASK:
            keep = tl.load(mask_ptr + b.to(tl.int64) * T + offs_t, mask=tmask, other=0)
            attend = tmask & (keep != 0)
        # ---- keys: the two halves of the head (RoPE pairs channel d with d + D/2)
        k0 = _dequant(kc_ptr, ks_ptr, kz_ptr, kcb_ptr, koi_ptr, kov_ptr, kla_ptr, klb_ptr, bh, h, offs_t, d0, tmask,
                      k_cap, ks_cap, klb_cap, D, BITS, K_SCALE, K_CG, K_TG, CODEBOOK, NOUT, RANK, CHUNK, FP8)
        k1 = _dequant(kc_ptr, ks_ptr, kz_ptr, kcb_ptr, koi_ptr, kov_ptr, kla_ptr, klb_ptr, bh, h, offs_t, d1, tmask,
                      k_cap, ks_cap, klb_cap, D, BITS, K_SCALE, K_CG, K_TG, CODEBOOK, NOUT, RANK, CHUNK, FP8)
        if PRE_ROPE:  # keys stored before RoPE: rotate at their positions (rotate_half)
            pos = tl.load(kpos_ptr + b.to(tl.int64) * pos_cap + offs_t, mask=tmask, other=0).to(tl.float32)
            angle = pos[:, None] * inv_freq[None, :]
            cos = tl.cos(angle) * rope_scale
            sin = tl.sin(angle) * rope_scale
            r0 = k0 * cos - k1 * sin
            r1 = k1 * cos + k0 * sin
            k0 = r0
            k1 = r1
        scores = _dot(q0, tl.trans(k0), DOT) + _dot(q1, tl.trans(k1), DOT)  # [BLOCK_G, BLOCK_T]
        if SOFTCAP:  # Gemma-2's logit soft-capping: softcap * tanh(scores / softcap), before the mask
            scores = softcap * _tanh(scores / softcap)
        scores = tl.where(attend[None, :], scores, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.exp(scores - m_safe[:, None])
        corr = tl.exp(m_i - m_safe)
        l_i = l_i * corr + tl.sum(p, 1)
        v = _dequant(vc_ptr, vs_ptr, vz_ptr, vcb_ptr, voi_ptr, vov_ptr, vla_ptr, vlb_ptr, bh, h, offs_t, dd, tmask,
                     v_cap, vs_cap, vlb_cap, D, BITS, 0, V_CG, 1, CODEBOOK, NOUT, RANK, CHUNK, FP8)
        acc = acc * corr[:, None] + _dot(p, v, DOT)
        m_i = m_new
    out = (bh * splits + split).to(tl.int64) * G + offs_g
    tl.store(acc_ptr + out[:, None] * D + dd[None, :], acc, mask=gmask[:, None])
    tl.store(m_ptr + out, m_i, mask=gmask)
    tl.store(l_ptr + out, l_i, mask=gmask)


@triton.jit
def kv_decode_combine(acc_ptr, m_ptr, l_ptr, out_acc_ptr, out_m_ptr, out_l_ptr, G, SPLITS,
                      D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge the splits of one (batch x KV head, query head): the combined unnormalised acc, max, sum."""
    bh = tl.program_id(0)
    g = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    smask = offs_s < SPLITS
    dd = tl.arange(0, D)
    rows = ((bh * SPLITS + offs_s) * G + g).to(tl.int64)
    m = tl.load(m_ptr + rows, mask=smask, other=-float("inf"))
    l = tl.load(l_ptr + rows, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == -float("inf"), 0.0, m_max)
    w = tl.exp(m - m_safe)
    a = tl.load(acc_ptr + rows[:, None] * D + dd[None, :], mask=smask[:, None], other=0.0)
    o = (bh * G + g).to(tl.int64)
    tl.store(out_acc_ptr + o * D + dd, tl.sum(a * w[:, None], 0))
    tl.store(out_m_ptr + o, m_max)
    tl.store(out_l_ptr + o, tl.sum(l * w, 0))


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------

def _dot_mode() -> int:
    return 0 if _triton_adapter.interpreting() or not torch.cuda.is_available() else 1


def _rope_consts(layer: Any) -> tuple[torch.Tensor, float] | str:
    """(inv_freq [D/2] float32, attention scaling) of the layer's rotary embedding, checked once
    against the embedding itself; or why the kernel cannot reproduce it."""
    rope = layer.rope
    rotary = getattr(rope, "rotary", None)
    if getattr(rotary, "inv_freq", None) is None:
        return "keys before RoPE with a rotary embedding that exposes no inv_freq"
    inv_freq = rotary.inv_freq.float()
    scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    checked = getattr(rope, "_lowbit_triton_checked", None)
    if checked is None:
        pos = torch.tensor([[0, 1, 7, 1000]], device=inv_freq.device)
        cos, sin = rope(pos)
        angle = pos[..., None].float() * inv_freq.to(pos.device)
        ok = cos.shape[-1] == 2 * inv_freq.numel() and torch.allclose(
            cos[..., :inv_freq.numel()], angle.cos() * scale, atol=1e-4) and torch.allclose(
            sin[..., :inv_freq.numel()], angle.sin() * scale, atol=1e-4)
        checked = rope._lowbit_triton_checked = bool(ok)
    if not checked:
        return "the rotary embedding is not cos/sin(position x inv_freq) x attention_scaling"
    return inv_freq, scale


def unsupported(query: torch.Tensor, layer: Any, softcap: float | None = None) -> str | None:
    """Why the Triton kernel does not run for this call (None: it does)."""
    fmt = layer.fmt
    if not (query.is_cuda or _triton_adapter.interpreting()):
        return "a CPU tensor outside the Triton interpreter"
    if query.shape[2] != 1:
        return "prefill (more than one query token)"
    if layer._k.length == 0:
        return "nothing packed yet"
    d = query.shape[-1]
    if d % 32 or d > 256 or d & (d - 1):
        return f"head size {d} (the kernel takes powers of two from 32 to 256)"
    if query.shape[1] // layer._float_k.shape[1] > GMAX:
        return f"more than {GMAX} query heads per KV head"
    if fmt.key_rope == "pre":
        consts = _rope_consts(layer)
        if isinstance(consts, str):
            return consts
    return None


def _fields(store: Any, fmt: Any, role: str, d: int) -> dict[str, Any]:
    """The kernel arguments of one store (keys or values): pointers (a dummy for what the format
    lacks) and token capacities."""
    from lowbit_compiler import kv

    dummy = torch.zeros(1, dtype=torch.float32, device=store.codes.device)
    out: dict[str, Any] = {"codebook": dummy, "oidx": dummy, "oval": dummy, "la": dummy, "lb": dummy,
                           "s_cap": 1, "lb_cap": 1, "scale_mode": PER_TOKEN_GROUP, "cg": fmt.channel_group(d), "tg": 1}
    if isinstance(store, kv._Store):
        out.update(codes=store.codes, scale=store.scale, zero=store.zero if store.zero is not None else dummy)
        if store.axis == "per_channel":
            out.update(scale_mode=PER_TOKEN_BLOCK, tg=store.tokens_per_scale, s_cap=store.scale.shape[2])
        return out
    f = store.fields
    out["codes"] = f["codes"]
    if "oidx" in f:
        out.update(oidx=f["oidx"], oval=f["oval"])
    if isinstance(store, kv._KVQuantStore):
        out["codebook"] = store.codebook.to(store.codes.device, torch.float32).contiguous()
        if role == "keys":
            p = store.params
            out.update(scale=p.key_scale.to(store.codes.device).contiguous(),
                       zero=p.key_center.to(store.codes.device).contiguous(), scale_mode=PER_HEAD_CHANNEL)
        else:
            out.update(scale=f["half"], zero=f["mid"], cg=d // f["mid"].shape[-1])
    else:  # GEAR
        out.update(scale=f["scale"], zero=f["zero"], cg=d // f["scale"].shape[-1])
        if "lr_a" in f:
            out.update(la=f["lr_a"], lb=f["lr_b"], lb_cap=f["lr_b"].shape[2])
    return out


def splits_for(programs: int, tokens: int, target: int = 4 * 132) -> int:
    """Token splits so that batch x KV heads x splits fills an H100's 132 SMs about 4 times over,
    each split at least one ``BLOCK_T`` block (and at most 64 splits)."""
    return max(1, min(64, triton.cdiv(target, programs), triton.cdiv(tokens, BLOCK_T)))


def fp8_mode(query: torch.Tensor) -> int:
    """How the kernel decodes fp8 codes: the GPU's conversion when compiled for a CUDA device, the
    bit construction under the interpreter (whose fp8 conversions are not the hardware's)."""
    return FP8_NATIVE.value if query.is_cuda and not _triton_adapter.interpreting() else FP8_BITS.value


def packed_partials(query: torch.Tensor, layer: Any, mask: torch.Tensor | None, scaling: float,
                    splits: int | None = None, softcap: float | None = None,
                    fp8: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed tokens' (acc [B, HKV, G, D], max [B, HKV, G, 1], sum [B, HKV, G, 1]) for one
    query token: the split kernel, then the combine. ``mask``: [B, T_packed] bool or None;
    ``softcap``: Gemma-2's logit soft-capping (None or 0: off); ``fp8``: the decode mode of fp8
    codes (:func:`fp8_mode` by default)."""
    fmt, store_k, store_v = layer.fmt, layer._k, layer._v
    b, hq, _, d = query.shape
    hkv = layer._float_k.shape[1]
    g = hq // hkv
    n = store_k.length
    dev = query.device
    q = (query.float() * scaling).reshape(b * hkv, g, d).contiguous()
    kf, vf = _fields(store_k, fmt, "keys", d), _fields(store_v, fmt, "values", d)
    if fmt.scheme == "fp8":
        fp8 = fp8_mode(query) if fp8 is None else fp8
    else:
        fp8 = FP8_NONE.value
    tensors = [kf[k] for k in ("codes", "scale", "zero", "oidx", "oval", "la", "lb")]
    tensors += [vf[k] for k in ("codes", "scale", "zero", "oidx", "oval", "la", "lb")]
    if any(not t.is_contiguous() for t in tensors):
        raise ValueError("kv_decode_split: the packed store is not contiguous")
    pre_rope = fmt.key_rope == "pre"
    if pre_rope:
        inv_freq, rope_scale = _rope_consts(layer)
        inv_freq = inv_freq.to(dev).contiguous()
        pos = store_k.fields["pos"]
    else:
        inv_freq, rope_scale, pos = kf["codebook"], 1.0, kf["codebook"]
    splits = splits or splits_for(b * hkv, n)
    per = triton.cdiv(triton.cdiv(n, splits), BLOCK_T) * BLOCK_T
    splits = triton.cdiv(n, per)
    part_acc = torch.empty(b * hkv, splits, g, d, device=dev)
    part_m = torch.empty(b * hkv, splits, g, device=dev)
    part_l = torch.empty(b * hkv, splits, g, device=dev)
    mask_u8 = mask.to(torch.uint8).contiguous() if mask is not None else kf["codebook"]
    block_g = max(16, triton.next_power_of_2(g))
    kv_decode_split[(b * hkv, splits)](
        q, mask_u8,
        kf["codes"], kf["scale"], kf["zero"], kf["codebook"], kf["oidx"], kf["oval"], kf["la"], kf["lb"], pos, inv_freq,
        vf["codes"], vf["scale"], vf["zero"], vf["codebook"], vf["oidx"], vf["oval"], vf["la"], vf["lb"],
        part_acc, part_m, part_l,
        hkv, g, n, per, kf["codes"].shape[2], kf["s_cap"], kf["lb_cap"], vf["codes"].shape[2], vf["s_cap"],
        vf["lb_cap"], pos.shape[-1], rope_scale, float(softcap or 0.0),
        D=d, BITS=fmt.bits, CODEBOOK=fmt.scheme == "kvquant", NOUT=fmt.n_outliers(d),
        RANK=fmt.rank if fmt.scheme == "gear" else 0, CHUNK=fmt.chunk, K_SCALE=kf["scale_mode"], K_CG=kf["cg"],
        K_TG=kf["tg"], V_CG=vf["cg"], PRE_ROPE=pre_rope, HAS_MASK=mask is not None, BLOCK_G=block_g,
        BLOCK_T=BLOCK_T, DOT=_dot_mode(), FP8=fp8, SOFTCAP=bool(softcap), num_warps=NUM_WARPS)
    acc = torch.empty(b * hkv, g, d, device=dev)
    m = torch.empty(b * hkv, g, device=dev)
    s = torch.empty(b * hkv, g, device=dev)
    kv_decode_combine[(b * hkv, g)](part_acc, part_m, part_l, acc, m, s, g, splits, D=d,
                                    BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=1)
    return acc.reshape(b, hkv, g, d), m.reshape(b, hkv, g, 1), s.reshape(b, hkv, g, 1)


def wanted(query: torch.Tensor) -> bool:
    """Whether this call should take the Triton kernel: CUDA tensors (``LOWBIT_KV_KERNEL`` auto or
    triton), or CPU tensors under the interpreter with ``LOWBIT_KV_KERNEL=triton``."""
    mode = os.environ.get(ENV, "auto")
    if mode in ("torch", "c"):
        return False
    return query.is_cuda or (mode == "triton" and _triton_adapter.interpreting())


def decode_attention(query: torch.Tensor, layer: Any, mask: torch.Tensor | None, scaling: float,
                     softcap: float | None = None, splits: int | None = None) -> torch.Tensor | None:
    """Attention of one query token over the layer's cache (B, 1, Hq, D) through the Triton kernel,
    or None when it does not apply (:func:`unsupported`, logged once; the caller runs the torch
    reference)."""
    from lowbit_compiler.backends import kv_cpu

    why = unsupported(query, layer, softcap)
    if why is not None:
        key = f"{layer.fmt.key}: {why}"
        if key not in _LOGGED and why not in ("prefill (more than one query token)", "nothing packed yet"):
            _LOGGED.add(key)
            log.warning("lowbit fallback: Triton decode attention over the %s cache: %s; it takes the blocked torch "
                        "attention (lowbit_compiler.kv.packed_attention_reference)", layer.fmt.key, why)
        return None
    b, hq, _, d = query.shape
    hkv = layer._float_k.shape[1]
    total, sinks, n = layer.get_seq_length(), layer._sink_k.shape[2], layer._k.length
    full_mask = packed_mask = None
    if mask is not None:
        full_mask = mask[:, 0, -1, :total]
        if full_mask.dtype != torch.bool:
            full_mask = full_mask > -1e30  # additive masks: -inf (or the dtype's min) masks out
        packed_mask = full_mask[:, sinks:sinks + n]
    acc, m, s = packed_partials(query, layer, packed_mask, scaling, splits, softcap)
    q = (query.float() * scaling).reshape(b, hkv, hq // hkv, d)
    return kv_cpu.fold_float_tokens(q, layer, full_mask, acc, m, s, query.dtype, softcap)


def aot_job(fmt_name: str, head_dim: int = 128, group: int = 4, arch: int = 90, softcap: bool = False) -> dict:
    """What ``_triton_adapter.compile_for_gpu`` needs to compile the split kernel for one named
    format (``kv.KV_FORMATS``) at ``head_dim`` with ``group`` query heads per KV head (fp8: the
    GPU variant, native e4m3 conversion; ``softcap``: with logit soft-capping)."""
    from lowbit_compiler import kv

    fmt = kv.get_format(fmt_name)
    cg = fmt.channel_group(head_dim)
    kvq = fmt.scheme == "kvquant"
    scale_mode = PER_HEAD_CHANNEL if kvq else (PER_TOKEN_BLOCK if fmt.keys == "per_channel" else PER_TOKEN_GROUP)
    names = ["q_ptr", "mask_ptr", "kc_ptr", "ks_ptr", "kz_ptr", "kcb_ptr", "koi_ptr", "kov_ptr", "kla_ptr", "klb_ptr",
             "kpos_ptr", "inv_freq_ptr", "vc_ptr", "vs_ptr", "vz_ptr", "vcb_ptr", "voi_ptr", "vov_ptr", "vla_ptr",
             "vlb_ptr", "acc_ptr", "m_ptr", "l_ptr"]
    types = {"q_ptr": "*fp32", "mask_ptr": "*u8", "kc_ptr": "*u8", "vc_ptr": "*u8", "kcb_ptr": "*fp32",
             "vcb_ptr": "*fp32", "koi_ptr": "*u8", "voi_ptr": "*u8", "kpos_ptr": "*i32", "inv_freq_ptr": "*fp32",
             "acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32"}
    signature = {n: types.get(n, "*fp16") for n in names}
    for n in ("HKV", "G", "T", "tokens_per_split", "k_cap", "ks_cap", "klb_cap", "v_cap", "vs_cap", "vlb_cap",
              "pos_cap"):
        signature[n] = "i32"
    signature["rope_scale"] = "fp32"
    signature["softcap"] = "fp32"
    return {"path": __file__, "name": "kv_decode_split", "signature": signature,
            "constexprs": {"D": head_dim, "BITS": fmt.bits, "CODEBOOK": kvq, "NOUT": fmt.n_outliers(head_dim),
                           "RANK": fmt.rank if fmt.scheme == "gear" else 0, "CHUNK": fmt.chunk,
                           "K_SCALE": scale_mode, "K_CG": cg, "K_TG": fmt.token_block if scale_mode == 1 else 1,
                           "V_CG": cg, "PRE_ROPE": fmt.key_rope == "pre", "HAS_MASK": True,
                           "BLOCK_G": max(16, triton.next_power_of_2(group)), "BLOCK_T": BLOCK_T, "DOT": 1,
                           "FP8": FP8_NATIVE.value if fmt.scheme == "fp8" else FP8_NONE.value, "SOFTCAP": softcap},
            "num_warps": NUM_WARPS, "arch": arch}
