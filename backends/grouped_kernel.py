"""The Triton kernel behind ``lowbit::grouped_linear`` under ``target="triton"``: a grouped GEMM
over tokens sorted by expert, as fused-MoE kernels do, with the expert weights dequantised in
registers (int8 per channel, int4 group-wise symmetric or asymmetric: the formats of
``lowbit::wo_linear``, stacked on a leading expert dimension).

The routed rows ``x`` [S, K] are already sorted by expert (transformers sorts them before its
grouped matmul) and ``offs`` [E] holds each expert's cumulative row count. :func:`tile_map`
cuts every expert's rows into ``BLOCK_M`` tiles on the device, without a host round trip (the
role of vLLM's ``moe_align_block_size``): tile ``t`` gets its expert, its first row and its
expert's end row. The grid has a static upper bound of ``cdiv(S, BLOCK_M) + E`` tiles (each
expert wastes at most one partial tile) times ``cdiv(N, BLOCK_N)``; tiles past the last expert
skip their K loop. Each program loads its expert's weight tile, dequantises it (one group =
one ``BLOCK_K`` step for int4, so one scale and zero per output channel per step; int8's
per-channel scale after the loop) and accumulates ``tl.dot`` in fp32. Rows past ``offs[-1]``
are zero, as in the op.

Every load is upcast to fp32 (int32 for codes) right after it: bf16 arithmetic is wrong under
the interpreter. Dots: ``input_precision="ieee"`` under the interpreter and for fp32 checks;
on a GPU fp32 activations use TF32 and 16-bit activations feed fp16/bf16 tensor cores with fp32
accumulation. Not supported (the op's CPU implementation runs, with the reason logged):
quantized activations (``act``), formats other than int8 / int4, dtypes other than
fp32 / bf16 / fp16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit_compiler.backends import _triton_adapter
from lowbit_compiler.formats import WeightFormat

BLOCK_M = 16
BLOCK_N = 32
DOTS = {"ieee": 0, "tf32": 1, "float16": 2, "bfloat16": 3}


def unsupported_reason(fmt: str, act: str | None, x_dtype: torch.dtype) -> str | None:
    """Why the kernel cannot run this call (None: it can)."""
    if act is not None:
        return (f"lowbit::grouped_linear with {act} activations has no Triton kernel yet (weight-only int8/int4 "
                "experts do)")
    f = WeightFormat.parse(fmt)
    if not (f.kind == "int" and f.bits in (8, 4)):
        return f"format {fmt}: the grouped Triton kernel takes int8 and int4 group-wise experts"
    if x_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"activation dtype {x_dtype} has no grouped Triton kernel (use float32/bfloat16/float16)"
    return None


@triton.jit
def grouped_wo_gemm(
        # activations and output: rows sorted by expert
        x_ptr, out_ptr,
        # stacked expert weights: codes [E, N, K or K/2], scales [E, N] (int8) or [E, N, K/G], zeros like scales
        qw_ptr, scale_ptr, zero_ptr,
        # the tile map: expert, first row and end row of every BLOCK_M tile
        tile_expert_ptr, tile_row_ptr, tile_end_ptr,
        N, K, stride_x, stride_o, stride_qe, stride_qn, stride_se, stride_sn,
        BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    # ---- this program's tile: an expert, its rows [row0, row_end), BLOCK_N output channels
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    row0 = tl.load(tile_row_ptr + tile)
    row_end = tl.load(tile_end_ptr + tile)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k_end = tl.where(row_end > row0, K, 0)  # a tile past the last expert does no work
    qw_base = qw_ptr + expert * stride_qe
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # ---- main loop over K: one group per step for int4
    for k0 in range(0, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_x + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        if BITS == 8:
            # int8 codes; the per-channel scale multiplies after the loop
            w = tl.load(qw_base + offs_n[:, None] * stride_qn + offs_k[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0).to(tl.float32)
        else:
            # two 4-bit codes per byte (low nibble = even k); one scale (and zero) per channel per group
            offs_kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(qw_base + offs_n[:, None] * stride_qn + offs_kb[None, :],
                             mask=mask_n[:, None] & (offs_kb[None, :] * 2 < K), other=0).to(tl.int32)
            codes = tl.join(packed & 0xF, packed >> 4).reshape(BLOCK_N, BLOCK_K)
            group = k0 // GROUP
            s = tl.load(scale_ptr + expert * stride_se + offs_n * stride_sn + group, mask=mask_n,
                        other=0.0).to(tl.float32)
            if SYMMETRIC:
                w = (codes.to(tl.float32) - 8.0) * s[:, None]
            else:
                z = tl.load(zero_ptr + expert * stride_se + offs_n * stride_sn + group, mask=mask_n,
                            other=0).to(tl.float32)
                w = (codes.to(tl.float32) - z[:, None]) * s[:, None]
        if DOT == 0:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        elif DOT == 1:
            acc += tl.dot(x, tl.trans(w), input_precision="tf32")
        elif DOT == 2:
            acc += tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)))
        else:
            acc += tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
    # ---- epilogue: int8's per-channel scale, store
    if BITS == 8:
        s8 = tl.load(scale_ptr + expert * stride_se + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc * s8[None, :]
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_o + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def tile_map(offs: torch.Tensor, rows: int, block_m: int = BLOCK_M) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert, first row, end row) per tile, int32 [cdiv(rows, block_m) + E], on the device
    (tiles past the last one: expert 0 with an empty row range)."""
    e = offs.shape[0]
    ends = offs.to(torch.int64).clamp(max=rows)
    ends = torch.cummax(ends, 0).values
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    tiles = (ends - starts + block_m - 1) // block_m
    cum = torch.cumsum(tiles, 0)
    t = torch.arange(triton.cdiv(rows, block_m) + e, device=offs.device)
    expert = torch.searchsorted(cum, t, right=True)
    valid = expert < e
    ec = expert.clamp(max=e - 1)
    row0 = starts[ec] + (t - (cum - tiles)[ec]) * block_m
    zero = torch.zeros_like(row0)
    return (torch.where(valid, ec, zero).to(torch.int32), torch.where(valid, row0, zero).to(torch.int32),
            torch.where(valid, ends[ec], zero).to(torch.int32))


def _dot(dtype: torch.dtype) -> str:
    if _triton_adapter.interpreting() or dtype == torch.float32 and not torch.cuda.is_available():
        return "ieee"
    return {torch.float32: "tf32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]


def _block_k(f: WeightFormat) -> int:
    return f.group_size if f.bits == 4 else 64


def launch(x: torch.Tensor, offs: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
           zero: torch.Tensor | None, fmt: str, in_features: int, dot: str | None = None) -> torch.Tensor:
    """``lowbit::grouped_linear`` (weight-only) with the Triton kernel; same dtype as x."""
    if (reason := unsupported_reason(fmt, None, x.dtype)) is not None:
        raise ValueError(reason)
    f = WeightFormat.parse(fmt)
    rows = x if x.stride(-1) == 1 else x.contiguous()
    s_rows, n = rows.shape[0], scale.shape[1]
    out = torch.zeros((s_rows, n), dtype=x.dtype, device=x.device)
    if s_rows == 0:
        return out
    experts, starts, ends = tile_map(offs, s_rows)
    qweight, scale = qweight.contiguous(), scale.contiguous()
    zero_t = scale if zero is None else zero.contiguous()  # unread when symmetric / int8
    grid = (experts.shape[0], triton.cdiv(n, BLOCK_N))
    grouped_wo_gemm[grid](
        rows, out, qweight, scale, zero_t, experts, starts, ends, n, in_features, rows.stride(0), out.stride(0),
        qweight.stride(0), qweight.stride(1), scale.stride(0), scale.stride(1) if scale.dim() == 3 else 1,
        BITS=f.bits, GROUP=f.group_size or 0, SYMMETRIC=bool(f.symmetric or f.bits == 8),
        DOT=DOTS[dot or _dot(x.dtype)], BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=_block_k(f), num_warps=4)
    return out


def aot_job(fmt: str, dtype: torch.dtype = torch.float16, arch: int = 90) -> dict:
    """What ``_triton_adapter.compile_for_gpu`` needs to compile the kernel for one format and
    activation dtype (the GPU's dot for that dtype)."""
    f = WeightFormat.parse(fmt)
    ty = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    return {"path": __file__, "name": "grouped_wo_gemm",
            "signature": {"x_ptr": ty, "out_ptr": ty, "qw_ptr": "*i8" if f.bits == 8 else "*u8", "scale_ptr": "*bf16",
                          "zero_ptr": "*u8" if f.bits == 4 and not f.symmetric else "*bf16",
                          "tile_expert_ptr": "*i32", "tile_row_ptr": "*i32", "tile_end_ptr": "*i32",
                          "N": "i32", "K": "i32", "stride_x": "i32", "stride_o": "i32", "stride_qe": "i32",
                          "stride_qn": "i32", "stride_se": "i32", "stride_sn": "i32"},
            "constexprs": {"BITS": f.bits, "GROUP": f.group_size or 0, "SYMMETRIC": bool(f.symmetric or f.bits == 8),
                           "DOT": DOTS[{torch.float32: "tf32", torch.float16: "float16",
                                        torch.bfloat16: "bfloat16"}[dtype]],
                           "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_K": _block_k(f)},
            "num_warps": 4, "arch": arch}


@torch.library.custom_op("lowbit::grouped_linear_triton", mutates_args=())
def grouped_linear_triton(x: torch.Tensor, offs: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                          zero: torch.Tensor | None, fmt: str, in_features: int) -> torch.Tensor:
    """``lowbit::grouped_linear`` lowered for ``target="triton"``: the kernel above."""
    return launch(x, offs, qweight, scale, zero, fmt, in_features)


@grouped_linear_triton.register_fake
def _(x, offs, qweight, scale, zero, fmt, in_features):
    return x.new_empty((x.shape[0], scale.shape[1]))
