"""The Triton decode GEMV for activation sparsity (``lowbit::sparse_input_linear``, one row): TEAL's
split-K GEMV over a K-major weight, with int8 / int4 codes and their scales fused.

The weight is the K-major copy the CPU kernel reads (``cpu_sparse.kmajor``: codes [K, N] int8 or
[K, N/2] uint8 with tile-split nibbles, scales and zero points float32 [groups, N]), so one copy
serves both. The grid is (K blocks, N blocks): each program loads its ``BLOCK_K`` inputs, and the
weight rows of the zero ones are masked out of the load (never fetched: the point of TEAL's
layout), dequantises in registers (int4: one group per K block, so one scale and zero per column;
``s * (sum x q - z * sum x)``), reduces over its K block and adds its partial sums into the fp32
output with atomics (split-K). The launcher zero-fills the output and adds the bias.

Checked under the interpreter against the float reference (and that the bytes it loads equal its
cost model, :func:`traffic`, dense and sparse: ``_triton_adapter.count_traffic``), compiled for
sm_90 with registers and spills reported (tests/backends/test_sparse_gemv_kernel.py).
``target="triton"`` lowers a one-row ``sparse_input_linear`` to :func:`sparse_input_linear_triton`
(``backends/lowering.py``); prefill shapes with a known row count are split first into the threshold
+ ``wo_linear``, which the generated dense kernels take (``activation.unfuse_for_triton``); others
run the op's CPU implementation (logged).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit_compiler.backends import cpu_sparse
from lowbit_compiler.formats import WeightFormat

BLOCK_N = 64


@triton.jit
def sparse_input_gemv(
        # the thresholded input row [K] and the fp32 output [N] (zero-filled: programs add into it)
        x_ptr, out_ptr,
        # the K-major weight: codes, scales and zero points [groups, N] (float32)
        qw_ptr, scale_ptr, zero_ptr,
        N, K,
        BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, TILE: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    # ---- this program's inputs: the zero ones select no weight row
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
    kept = (x != 0.0) & (offs_k < K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_k[:, None].to(tl.int64)
    # ---- the weight tile, masked loads: rows of zeroed inputs are not fetched
    if BITS == 8:
        q = tl.load(qw_ptr + rows * N + offs_n[None, :], mask=kept[:, None] & mask_n[None, :], other=0)
        q = q.to(tl.float32)
    else:
        # tile-split nibbles: in a tile of width w, column j < w/2 is the low nibble of byte j, column
        # w/2 + j the high nibble of byte j
        tile = offs_n // TILE
        j = offs_n - tile * TILE
        half = tl.minimum(TILE, N - tile * TILE) // 2
        byte = tile * (TILE // 2) + tl.where(j < half, j, j - half)
        shift = tl.where(j < half, 0, 4)
        packed = tl.load(qw_ptr + rows * (N // 2) + byte[None, :], mask=kept[:, None] & mask_n[None, :], other=0)
        q = ((packed.to(tl.int32) >> shift[None, :]) & 0xF).to(tl.float32)
    # ---- reduce over this K block, then scale (one group per K block)
    group = (pid_k * BLOCK_K) // GROUP
    s = tl.load(scale_ptr + group * N + offs_n, mask=mask_n, other=0.0)
    part = tl.sum(x[:, None] * q, axis=0)
    if HAS_ZERO:
        z = tl.load(zero_ptr + group * N + offs_n, mask=mask_n, other=0.0)
        part = part - z * tl.sum(x, axis=0)
    tl.atomic_add(out_ptr + offs_n, s * part, mask=mask_n)


def block_k(fmt: str, in_features: int) -> int:
    """Inputs per program: one int4 group (so one scale per column), 64 for int8."""
    f = WeightFormat.parse(fmt)
    return f.group_size if f.bits == 4 else min(64, triton.next_power_of_2(in_features))


def traffic(fmt: str, n: int, k: int, kept: int, x_itemsize: int = 4) -> dict[str, int]:
    """Bytes one call loads with ``kept`` of its ``k`` inputs nonzero (the cost model of this kernel).
    ``read`` counts each loaded lane once, as the interpreter does: per kept input its N code lanes
    (int4: a byte per lane, two lanes share it), per (K block, N block) program its x block, per K
    block the N scales (+ int4 zero points, 8 for symmetric codes: ``cpu_sparse.kmajor``), float32.
    ``weight`` is what a GPU fetches from memory: the kept rows' code bytes (int4: N / 2 per row)
    and the scale (+ zero) tensors once (int8: one row of N, which every K block re-reads from
    cache); zeroed inputs' rows are not fetched, so it falls linearly with the sparsity.
    ``written``: the atomic adds of the fp32 partial sums, one per column per K block."""
    f = WeightFormat.parse(fmt)
    bk = block_k(fmt, k)
    k_blocks, n_blocks = -(-k // bk), -(-n // BLOCK_N)
    side = k_blocks * n * 4 * (2 if f.bits == 4 else 1)  # scales (+ int4 zeros: 8 when symmetric), float32
    stored = n * 4 * (2 * (k // f.group_size) if f.bits == 4 else 1)  # the scale (+ zero) tensors' bytes
    x = n_blocks * k * x_itemsize
    return {"codes": kept * n, "scales": side, "x": x, "read": kept * n + side + x,
            "weight": kept * n * f.bits // 8 + stored, "written": k_blocks * n * 4}


def launch(x: torch.Tensor, w: cpu_sparse.KMajorWeight, bias: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """One thresholded row ``x`` [1, K] times the K-major weight (plus bias), in x's dtype."""
    f = WeightFormat.parse(fmt)
    k, n = w.in_features, w.out_features
    if x.numel() != k:
        raise ValueError(f"sparse_input_gemv: one row of K={k} expected, got {tuple(x.shape)} (more rows run the "
                         "dense kernel on the thresholded input)")
    row = x.reshape(k).contiguous()
    out = torch.zeros(n, dtype=torch.float32, device=x.device)
    bk = block_k(fmt, k)
    zero = w.zero if w.zero is not None else w.scale  # unread without zero points
    grid = (triton.cdiv(k, bk), triton.cdiv(n, BLOCK_N))
    sparse_input_gemv[grid](row, out, w.codes, w.scale, zero, n, k, BITS=f.bits, GROUP=f.group_size or k,
                            HAS_ZERO=w.zero is not None, TILE=cpu_sparse.TILE, BLOCK_K=bk, BLOCK_N=BLOCK_N,
                            num_warps=4)
    if bias is not None:
        out += bias.float()
    return out.reshape(*x.shape[:-1], n).to(x.dtype)


def aot_job(fmt: str, in_features: int = 4096, dtype: torch.dtype = torch.float16, arch: int = 90) -> dict:
    """What ``_triton_adapter.compile_for_gpu`` needs to compile the kernel for one format."""
    f = WeightFormat.parse(fmt)
    ty = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    return {"path": __file__, "name": "sparse_input_gemv",
            "signature": {"x_ptr": ty, "out_ptr": "*fp32", "qw_ptr": "*i8" if f.bits == 8 else "*u8",
                          "scale_ptr": "*fp32", "zero_ptr": "*fp32", "N": "i32", "K": "i32"},
            "constexprs": {"BITS": f.bits, "GROUP": f.group_size or in_features, "HAS_ZERO": f.bits == 4,
                           "TILE": cpu_sparse.TILE, "BLOCK_K": block_k(fmt, in_features), "BLOCK_N": BLOCK_N},
            "num_warps": 4, "arch": arch}


def unsupported_reason(fmt: str, x_dtype: torch.dtype, rows: int, out_features: int) -> str | None:
    """Why a ``sparse_input_linear`` call cannot take the Triton kernel (None: it can)."""
    if (why := cpu_sparse.supported(fmt)) is not None:
        return why
    if rows != 1:
        return (f"{rows} rows: the activation-sparse Triton kernel is a decode GEMV (one row); prefill shapes "
                "whose row count is known at compile time are split into the threshold + the generated dense "
                "kernel; this one runs the op's CPU implementation (the threshold, then the dense kernels)")
    if x_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"activation dtype {x_dtype} has no Triton kernel (use float32/bfloat16/float16)"
    if WeightFormat.parse(fmt).bits == 4 and out_features % 2:
        return f"N={out_features} is odd (int4 columns of the K-major copy are packed in pairs)"
    return None


@torch.library.custom_op("lowbit::sparse_input_linear_triton", mutates_args=())
def sparse_input_linear_triton(x: torch.Tensor, threshold: torch.Tensor, col_scale: torch.Tensor | None,
                               qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                               bias: torch.Tensor | None, fmt: str, in_features: int) -> torch.Tensor:
    """``lowbit::sparse_input_linear`` lowered for ``target="triton"`` (one row): the threshold,
    then the kernel above over the weight's K-major copy (made once, cached by identity)."""
    from lowbit_compiler.ops import act_sparsify_reference

    xs = act_sparsify_reference(x, threshold, col_scale)
    return launch(xs, cpu_sparse.kmajor(qweight, scale, zero, fmt, in_features), bias, fmt)


@sparse_input_linear_triton.register_fake
def _(x, threshold, col_scale, qweight, scale, zero, bias, fmt, in_features):
    return x.new_empty((*x.shape[:-1], scale.shape[0]))
