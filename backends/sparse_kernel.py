"""A Triton kernel over 2:4 compressed weights (``sparse_formats.py``: ``s24+int8``,
``s24+int4_g{G}_{sym,asym}``) for decode sizes: ``y = x @ W.T + b`` that reads only the kept
values' codes, their 2-bit indices and the scales, and dequantizes in registers.

One program per (block of rows of x, block of ``BLOCK_N`` output channels); it walks the kept
values of its channels ``BLOCK_KC`` at a time: codes -> ``(q - z) * s`` (int8: ``q * s``), the
2-bit index of kept value ``j`` gives its input column ``4 * (j // 2) + idx`` (two kept values per
group of 4), and the matching activations are gathered (masked loads) and multiplied in fp32
(``acc[m, n] += sum_j w[n, j] * x[m, col[n, j]]``). Weight bytes read per weight: 0.625 (int8)
or 0.375 + scales (int4) instead of 1 / 0.5.

Not yet: a lowering (the CPU flow runs ``cpu_codegen``'s kernel for ``s24+int8``; the
``target="triton"`` fusion groups do not take sparse formats, so the float reference runs there,
logged), prefill shapes (a gather per (row, kept value) does not feed tensor cores: prefill wants
the weight tile expanded to dense in shared memory and ``tl.dot``), other N:M patterns.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit_compiler.formats import WeightFormat

MAX_ROWS = 16


def blocks(rows: int) -> dict[str, int]:
    """Tile sizes: (rows of x, output channels, kept values per step); the gathered activation
    tile is BLOCK_M x BLOCK_N x BLOCK_KC fp32, kept at <= 64 values per thread (4 warps)."""
    block_m = 1 if rows <= 1 else min(MAX_ROWS, 1 << (rows - 1).bit_length())
    return {"BLOCK_M": block_m, "BLOCK_N": 32 if block_m <= 2 else 16, "BLOCK_KC": 64 if block_m <= 2 else 32}


def unsupported_reason(fmt: str, rows: int) -> str | None:
    f = WeightFormat.parse(fmt)
    if f.kind != "sparse" or (f.n, f.m) != (2, 4) or f.inner.bits not in (8, 4):
        return f"format {fmt}: the Triton sparse kernel takes 2:4 with int8 or int4 kept values"
    if rows > MAX_ROWS:
        return f"{rows} rows: the Triton sparse kernel is for decode sizes (M <= {MAX_ROWS})"
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


def launch(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           bias: torch.Tensor | None, fmt: str, in_features: int) -> torch.Tensor:
    """``x @ W.T + bias`` over a 2:4 compressed weight (x's dtype; fp32 accumulation)."""
    f = WeightFormat.parse(fmt)
    rows = x.reshape(-1, x.shape[-1])
    if (reason := unsupported_reason(fmt, rows.shape[0])) is not None:
        raise ValueError(reason)
    if rows.shape[-1] != in_features:
        raise ValueError(f"x has K={rows.shape[-1]}, the weight expects K={in_features}")
    rows = rows.contiguous()
    n = scale.shape[0]
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    tiles = blocks(rows.shape[0])
    grid = (triton.cdiv(rows.shape[0], tiles["BLOCK_M"]), triton.cdiv(n, tiles["BLOCK_N"]))
    sparse24_gemv[grid](rows, out, qweight, scale, zero if zero is not None else scale,
                        bias if bias is not None else scale, rows.shape[0], n, in_features, rows.stride(0),
                        out.stride(0), BITS=f.inner.bits, GROUP=f.inner.group_size or 1,
                        SYMMETRIC=bool(f.inner.symmetric), HAS_BIAS=bias is not None, **tiles)
    return out.reshape(*x.shape[:-1], n)


def aot_job(fmt: str, dtype: torch.dtype = torch.float16, rows: int = 1, arch: int = 90) -> dict:
    """What ``_triton_adapter.compile_for_gpu`` needs to compile the kernel for one format."""
    f = WeightFormat.parse(fmt)
    ty = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    return {"path": __file__, "name": "sparse24_gemv",
            "signature": {"x_ptr": ty, "out_ptr": ty, "qw_ptr": "*u8", "scale_ptr": "*bf16",
                          "zero_ptr": "*u8" if f.has_zero_points else "*bf16", "bias_ptr": ty,
                          "M": "i32", "N": "i32", "K": "i32", "stride_x": "i32", "stride_o": "i32"},
            "constexprs": {"BITS": f.inner.bits, "GROUP": f.inner.group_size or 1, "SYMMETRIC": bool(f.inner.symmetric),
                           "HAS_BIAS": False, **blocks(rows)},
            "num_warps": 4, "arch": arch}
