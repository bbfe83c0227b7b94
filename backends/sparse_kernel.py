"""Triton kernels over 2:4 compressed weights (``sparse_formats.py``: ``s24+int8``,
``s24+int4_g{G}_{sym,asym}``): ``y = x @ W.T + b`` reading only the kept values' codes, their 2-bit
indices and the scales, dequantized in registers; one launcher (:func:`launch`) picks by rows.

* Decode (M <= 16, ``sparse24_gemv``): one program per (block of rows of x, block of ``BLOCK_N``
  output channels) walks the kept values of its channels ``BLOCK_KC`` at a time: codes ->
  ``(q - z) * s`` (int8: ``q * s``), the 2-bit index of kept value ``j`` gives its input column
  ``4 * (j // 2) + idx`` (two kept values per group of 4), and the matching activations are
  gathered (masked loads) and multiplied in fp32.
* Prefill (M > 16, ``sparse24_matmul``): per step of ``BLOCK_K`` input columns the kept values
  are expanded in registers to the dense weight tile, which feeds ``tl.dot``.

Weight bytes read per weight: 0.625 (int8) or 0.375 + scales (int4) instead of 1 / 0.5
(:func:`traffic`: the cost model, equal to what the interpreter counts). Lowered by
``backends/lowering.py`` for ``target="triton"`` (``lowbit::sparse24_linear_triton``); other N:M
patterns are not taken (float reference, logged).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit_compiler.backends import _triton_adapter
from lowbit_compiler.formats import WeightFormat

MAX_ROWS = 16
PREFILL_WARPS = 8  # 64 x 64 x 64 tiles: 185-191 registers, no spills on sm_90 (4 warps spill 112 bytes)


def blocks(rows: int) -> dict[str, int]:
    """Tile sizes: (rows of x, output channels, kept values per step); the gathered activation
    tile is BLOCK_M x BLOCK_N x BLOCK_KC fp32, kept at <= 64 values per thread (4 warps)."""
    block_m = 1 if rows <= 1 else min(MAX_ROWS, 1 << (rows - 1).bit_length())
    return {"BLOCK_M": block_m, "BLOCK_N": 32 if block_m <= 2 else 16, "BLOCK_KC": 64 if block_m <= 2 else 32}


def unsupported_reason(fmt: str, rows: int | None = None, in_features: int | None = None) -> str | None:
    """Why the 2:4 kernels cannot take this call (None: they can; ``rows`` > 16 takes the prefill kernel)."""
    f = WeightFormat.parse(fmt)
    if f.kind != "sparse" or (f.n, f.m) != (2, 4) or f.inner.bits not in (8, 4):
        return f"format {fmt}: the Triton sparse kernels take 2:4 with int8 or int4 kept values"
    if f.inner.bits == 4 and (f.inner.group_size or 0) % 8:
        return f"format {fmt}: int4 groups of kept values must be a multiple of 8"
    if in_features is not None and in_features % 16:
        return f"K={in_features} is not a multiple of 16 (whole index bytes per step)"
    return None


@triton.jit
def sparse24_gemv(x_ptr, out_ptr, qw_ptr, scale_ptr, zero_ptr, bias_ptr, M, N, K, stride_x, stride_o,
                  BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KC: tl.constexpr):
    # ---- which rows of x and which output channels ------------------------------------------
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    # ---- the compressed row layout: codes of the KC kept values, then their 2-bit indices ---
    KC = K // 2
    code_bytes = KC * BITS // 8
    row_bytes = code_bytes + KC // 4
    row = qw_ptr + rn.to(tl.int64)[:, None] * row_bytes
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, KC, BLOCK_KC):
        j = j0 + tl.arange(0, BLOCK_KC)
        ok = n_ok[:, None] & (j < KC)[None, :]
        # ---- codes -> values, in registers --------------------------------------------------
        if BITS == 8:
            q = tl.load(row + j[None, :], mask=ok, other=0).to(tl.int32)
            q = tl.where(q >= 128, q - 256, q).to(tl.float32)  # the byte is an int8 code
            s = tl.load(scale_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            w = q * s[:, None]
        else:
            byte = tl.load(row + (j // 2)[None, :], mask=ok, other=0).to(tl.int32)
            q = ((byte >> ((j % 2) * 4)[None, :]) & 15).to(tl.float32)
            groups = KC // GROUP
            g = rn[:, None] * groups + (j // GROUP)[None, :]
            s = tl.load(scale_ptr + g, mask=ok, other=0.0).to(tl.float32)
            if SYMMETRIC:
                z = 8.0
            else:
                z = tl.load(zero_ptr + g, mask=ok, other=0).to(tl.float32)
            w = (q - z) * s
        # ---- indices -> input columns --------------------------------------------------------
        meta = tl.load(row + code_bytes + (j // 4)[None, :], mask=ok, other=0).to(tl.int32)
        col = 4 * (j // 2)[None, :] + ((meta >> (2 * (j % 4))[None, :]) & 3)
        # ---- gather the activations and accumulate -------------------------------------------
        xg = tl.load(x_ptr + rm[:, None, None] * stride_x + col[None, :, :],
                     mask=m_ok[:, None, None] & ok[None, :, :], other=0.0).to(tl.float32)
        acc += tl.sum(xg * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_o + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def sparse24_matmul(x_ptr, out_ptr, qw_ptr, scale_ptr, zero_ptr, bias_ptr, M, N, K, stride_x, stride_o,
                    BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
                    FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Prefill shapes (M > 16): per step of ``BLOCK_K`` input columns, the ``BLOCK_K / 2`` kept
    values of each output channel are read once (codes, 2-bit indices, one scale per channel: a
    step lies inside one scale group, :func:`prefill_blocks`), expanded in registers to the dense
    ``[BLOCK_N, BLOCK_K]`` tile (value ``t`` of group ``g`` lands at column ``4 g + idx``, the
    other two columns are zero) and multiplied with ``tl.dot`` (tensor cores)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    KC = K // 2
    code_bytes = KC * BITS // 8
    row_bytes = code_bytes + KC // 4
    row = qw_ptr + rn.to(tl.int64)[:, None] * row_bytes
    G: tl.constexpr = BLOCK_K // 4                 # groups of 4 input columns per step
    g = tl.arange(0, G)
    pos = tl.arange(0, 4)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if BITS == 8:
        s8 = tl.load(scale_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    for k0 in range(0, K, BLOCK_K):
        gg = k0 // 4 + g                          # the step's groups (kept values 2 gg, 2 gg + 1)
        ok = n_ok[:, None] & (gg < K // 4)[None, :]
        # ---- the two kept values of every group, dequantized --------------------------------
        if BITS == 8:
            q0 = tl.load(row + (2 * gg)[None, :], mask=ok, other=0).to(tl.int32)
            q1 = tl.load(row + (2 * gg + 1)[None, :], mask=ok, other=0).to(tl.int32)
            w0 = tl.where(q0 >= 128, q0 - 256, q0).to(tl.float32) * s8
            w1 = tl.where(q1 >= 128, q1 - 256, q1).to(tl.float32) * s8
        else:
            byte = tl.load(row + gg[None, :], mask=ok, other=0).to(tl.int32)  # both 4-bit codes of group gg
            grp = rn * (KC // GROUP) + (k0 // 2) // GROUP
            s = tl.load(scale_ptr + grp, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            if SYMMETRIC:
                z = 8.0
            else:
                z = tl.load(zero_ptr + grp, mask=n_ok, other=0).to(tl.float32)[:, None]
            w0 = ((byte & 15).to(tl.float32) - z) * s
            w1 = ((byte >> 4).to(tl.float32) - z) * s
        # ---- their 2-bit indices: one byte holds the four of groups 2b and 2b + 1 -------------
        meta = tl.load(row + code_bytes + (gg // 2)[None, :], mask=ok, other=0).to(tl.int32)
        nib = (meta >> (4 * (gg % 2))[None, :]) & 15
        i0, i1 = nib & 3, nib >> 2
        # ---- expand to the dense tile: column 4 g + p holds the kept value whose index is p ---
        dense = (tl.where(i0[:, :, None] == pos[None, None, :], w0[:, :, None], 0.0)
                 + tl.where(i1[:, :, None] == pos[None, None, :], w1[:, :, None], 0.0))
        w = tl.reshape(dense, (BLOCK_N, BLOCK_K))
        c = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_x + c[None, :],
                     mask=m_ok[:, None] & (c < K)[None, :], other=0.0)
        if FP32_DOT:  # float32 activations (full-precision products, not TF32), and the interpreter, whose bf16 is wrong
            acc += tl.dot(xt.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:     # fp16 / bf16: the weight tile in the activation's type, fp32 accumulation
            acc += tl.dot(xt, tl.trans(w.to(xt.dtype)))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_o + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def prefill_blocks(fmt: str) -> dict[str, int]:
    """Tiles of :func:`sparse24_matmul`: 64 rows x 64 output channels x ``BLOCK_K`` input columns,
    ``BLOCK_K`` at most 64 and dividing the scale group (``2 * GROUP`` input columns for int4), so
    one scale per channel serves a step."""
    f = WeightFormat.parse(fmt)
    block_k = 64 if f.inner.bits == 8 else min(64, 2 * (f.inner.group_size or 32))
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": block_k}


def traffic(fmt: str, rows: int, n: int, k: int, x_itemsize: int = 4, bias: bool = False) -> dict[str, int]:
    """Bytes the kernel for ``rows`` rows loads and stores (each lane counted once per load, as the
    interpreter counts them; on a GPU the repeats within a program hit L1): ``weight`` = codes +
    index bytes + scales (+ zeros), read once per block of rows; ``x`` once per block of output
    channels. Prefill: each index byte holds two groups' indices and is fetched for both."""
    f = WeightFormat.parse(fmt)
    kc = k // 2
    if rows > MAX_ROWS:
        t = prefill_blocks(fmt)
        row_blocks, col_blocks, steps = -(-rows // t["BLOCK_M"]), -(-n // t["BLOCK_N"]), -(-k // t["BLOCK_K"])
        codes = n * kc * f.inner.bits // 8
        meta = n * (k // 4)                              # one index byte per group of 4 columns (2 per byte)
        if f.inner.bits == 8:
            scales = n * 2                               # bf16 per channel, once per program
        else:
            scales = n * steps * (2 + (0 if f.inner.symmetric else 1))
        weight = row_blocks * (codes + meta + scales)
        x = col_blocks * rows * k * x_itemsize
    else:  # decode: per kept value a code lane, an index-byte lane, a scale (+ zero) lane, and x gathered per row
        t = blocks(rows)
        row_blocks, steps = -(-rows // t["BLOCK_M"]), -(-kc // t["BLOCK_KC"])
        if f.inner.bits == 8:
            per_weight = n * kc * 2 + n * steps * 2      # code + index byte per kept value; bf16 scale per step
        else:
            per_weight = n * kc * (1 + 1 + 2 + (0 if f.inner.symmetric else 1))
        weight = row_blocks * per_weight
        x = rows * n * kc * x_itemsize
    read = weight + x + (row_blocks * n * x_itemsize if bias else 0)
    return {"weight": weight, "x": x, "read": read, "written": rows * n * x_itemsize}


def launch(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           bias: torch.Tensor | None, fmt: str, in_features: int) -> torch.Tensor:
    """``x @ W.T + bias`` over a 2:4 compressed weight (x's dtype; fp32 accumulation)."""
    f = WeightFormat.parse(fmt)
    rows = x.reshape(-1, x.shape[-1])
    if (reason := unsupported_reason(fmt, rows.shape[0], in_features)) is not None:
        raise ValueError(reason)
    if rows.shape[-1] != in_features:
        raise ValueError(f"x has K={rows.shape[-1]}, the weight expects K={in_features}")
    rows = rows.contiguous()
    n = scale.shape[0]
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    common = dict(BITS=f.inner.bits, GROUP=f.inner.group_size or 1, SYMMETRIC=bool(f.inner.symmetric),
                  HAS_BIAS=bias is not None)
    args = (rows, out, qweight, scale, zero if zero is not None else scale, bias if bias is not None else scale,
            rows.shape[0], n, in_features, rows.stride(0), out.stride(0))
    if rows.shape[0] > MAX_ROWS:  # prefill: the dense tile expanded in registers, tl.dot
        tiles = prefill_blocks(fmt)
        grid = (triton.cdiv(rows.shape[0], tiles["BLOCK_M"]), triton.cdiv(n, tiles["BLOCK_N"]))
        fp32_dot = x.dtype == torch.float32 or _triton_adapter.interpreting()
        sparse24_matmul[grid](*args, FP32_DOT=fp32_dot, **common, **tiles, num_warps=PREFILL_WARPS)
    else:
        tiles = blocks(rows.shape[0])
        grid = (triton.cdiv(rows.shape[0], tiles["BLOCK_M"]), triton.cdiv(n, tiles["BLOCK_N"]))
        sparse24_gemv[grid](*args, **common, **tiles)
    return out.reshape(*x.shape[:-1], n)


def aot_job(fmt: str, dtype: torch.dtype = torch.float16, rows: int = 1, arch: int = 90) -> dict:
    """What ``_triton_adapter.compile_for_gpu`` needs to compile the kernel ``launch`` runs for
    ``rows`` rows (the decode GEMV up to 16, the prefill matmul above)."""
    f = WeightFormat.parse(fmt)
    ty = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    prefill = rows > MAX_ROWS
    return {"path": __file__, "name": "sparse24_matmul" if prefill else "sparse24_gemv",
            "signature": {"x_ptr": ty, "out_ptr": ty, "qw_ptr": "*u8", "scale_ptr": "*bf16",
                          "zero_ptr": "*u8" if f.has_zero_points else "*bf16", "bias_ptr": ty,
                          "M": "i32", "N": "i32", "K": "i32", "stride_x": "i32", "stride_o": "i32"},
            "constexprs": {"BITS": f.inner.bits, "GROUP": f.inner.group_size or 1, "SYMMETRIC": bool(f.inner.symmetric),
                           "HAS_BIAS": False, **({"FP32_DOT": dtype == torch.float32, **prefill_blocks(fmt)} if prefill
                                                 else blocks(rows))},
            "num_warps": PREFILL_WARPS if prefill else 4, "arch": arch}


@torch.library.custom_op("lowbit::sparse24_linear_triton", mutates_args=())
def sparse24_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                           bias: torch.Tensor | None, fmt: str, in_features: int) -> torch.Tensor:
    """``lowbit::wo_linear`` over 2:4 storage lowered for ``target="triton"``: :func:`launch` (the
    decode GEMV up to 16 rows, the prefill matmul above) on the compressed tensors as stored."""
    return launch(x, qweight, scale, zero, bias, fmt, in_features)


@sparse24_linear_triton.register_fake
def _(x, qweight, scale, zero, bias, fmt, in_features):
    return x.new_empty((*x.shape[:-1], scale.shape[0]))
