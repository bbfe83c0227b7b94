"""The Triton kernel behind ``lowbit::hadamard`` under ``target="triton"``: ``x @ H_n / sqrt(n)``
per row, as two small matrix products.

``H_n = H_A (x) H_B`` (:func:`lowbit_compiler.hadamard.split_two`: ``A`` carries the non-power-of-two
factor, both near ``sqrt(n)``), so one row viewed as ``X`` [A, B] (row-major) maps to
``H_A^T X H_B`` -- for 4096, two 64 x 64 x 64 ``tl.dot``\\ s per row on tensor cores instead of a
4096 x 4096 matrix. ``A`` and ``B`` are padded to powers of two >= 16 (``tl.dot``'s minimum) with
zero rows/columns in the stored factors, so padding contributes nothing. The factors are stored
as +-1 (exact in any float dtype) and ``1/sqrt(n)`` is applied to the result. 16-bit activations
go into tensor-core dots as they are (exact products, fp32 accumulation) and the fp32 intermediate
enters the second product as a 16-bit hi + lo pair; fp32 activations use fp32 products
(``input_precision="ieee"``: TF32 would cost ~3 decimal digits).

One program per row. Sizes with ``pad(A) * pad(B) > 16384`` (one fp32 row tile above 64 KB) are
refused with the reason, and so are sizes whose factors and row tile do not fit the device's shared
memory (:func:`shared_bytes`; on an H200, Llama-2's 11008 in fp32 needs 336 KB of its 227 KB); the
op's torch implementation then runs. Not yet: fusing the transform
into the following quantized linear's activation prologue (the prologue quantizes K-tiles as it
streams them, while the transform needs the whole row first).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from lowbit_compiler import hadamard
from lowbit_compiler.backends import _triton_adapter

MAX_TILE = 16384  # elements of the padded [A, B] row tile


def _pad(v: int) -> int:
    return max(16, 1 << (v - 1).bit_length())


SM90_SHARED_BYTES = 232448  # an H100/H200 block's opt-in shared memory (what the AOT check assumes)


def shared_bytes(n: int, dtype: torch.dtype) -> int:
    """Shared memory one program needs: H_A^T, H_B and one row tile, in the dtype the dots use
    (fp32 rows use fp32 factors). Matches Triton's report: 11008 fp32 (256 x 64 padded) 344064."""
    a, b = hadamard.split_two(n)
    pa, pb = _pad(a), _pad(b)
    return (pa * pa + pa * pb + pb * pb) * (4 if dtype == torch.float32 else 2)


def unsupported_reason(n: int, dtype: torch.dtype = torch.float16, device: torch.device | str | None = None) -> str | None:
    """Why the kernel cannot transform rows of ``n`` ``dtype`` values on ``device`` (a CUDA device's
    own shared-memory limit; sm_90's without one), or None."""
    if (reason := hadamard.unsupported_reason(n)) is not None:
        return reason
    a, b = hadamard.split_two(n)
    if _pad(a) * _pad(b) > MAX_TILE:
        return (f"size {n}: the padded row tile {_pad(a)} x {_pad(b)} exceeds {MAX_TILE} fp32 elements of one "
                "program; the CPU implementation runs")
    limit = SM90_SHARED_BYTES
    if device is not None and torch.device(device).type == "cuda":
        limit = torch.cuda.get_device_properties(torch.device(device)).shared_memory_per_block_optin
    if (need := shared_bytes(n, dtype)) > limit:
        return (f"size {n} in {str(dtype).removeprefix('torch.')}: the kernel needs {need // 1024} KB of shared "
                f"memory per program (H_A^T, H_B and the row tile), the device allows {limit // 1024} KB; "
                "16-bit activations need half")
    return None


@triton.jit
def _rotate_row(x_ptr, row, stride_x, hat_ptr, hb_ptr,
                A: tl.constexpr, B: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr, HALF: tl.constexpr):
    """``left^T X right`` for one row viewed as an A x B tile (zero-padded to PA x PB), unscaled; with
    its offsets and mask. ``hat_ptr``: the left factor transposed (H_A^T), ``hb_ptr``: the right one."""
    ia = tl.arange(0, PA)
    ib = tl.arange(0, PB)
    mask = (ia[:, None] < A) & (ib[None, :] < B)
    offs = ia[:, None] * B + ib[None, :]
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    hat = tl.load(hat_ptr + ia[:, None] * PA + ia[None, :])
    hb = tl.load(hb_ptr + ib[:, None] * PB + ib[None, :])
    if HALF:
        # 16-bit x and +-1 factors are exact operands of a tensor-core dot (fp32 accumulation);
        # the fp32 intermediate goes into the second dot as a 16-bit hi + lo pair (16+ bits kept)
        y = tl.dot(x, hb)
        hi = y.to(x_ptr.dtype.element_ty)
        lo = (y - hi.to(tl.float32)).to(x_ptr.dtype.element_ty)
        z = tl.dot(hat, hi) + tl.dot(hat, lo)
    else:
        y = tl.dot(x.to(tl.float32), hb.to(tl.float32), input_precision="ieee")
        z = tl.dot(hat.to(tl.float32), y, input_precision="ieee")
    return z, offs, mask


@triton.jit
def hadamard_rows(x_ptr, out_ptr, hat_ptr, hb_ptr, stride_x, stride_o, scale,
                  A: tl.constexpr, B: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr, HALF: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z, offs, mask = _rotate_row(x_ptr, row, stride_x, hat_ptr, hb_ptr, A, B, PA, PB, HALF)
    tl.store(out_ptr + row * stride_o + offs, (z * scale).to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _factors(n: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded H_A^T and H_B (+-1 entries: exact in every float dtype)."""
    a, b = hadamard.split_two(n)
    ha, hb = hadamard.kron_factor(a), hadamard.kron_factor(b)
    pa, pb = _pad(a), _pad(b)
    hat = torch.zeros(pa, pa, dtype=dtype)
    hat[:a, :a] = ha.t().to(dtype)
    hbp = torch.zeros(pb, pb, dtype=dtype)
    hbp[:b, :b] = hb.to(dtype)
    return hat.to(device), hbp.to(device)


def launch(x: torch.Tensor) -> torch.Tensor:
    """``x @ H_n / sqrt(n)`` over the last dimension with the Triton kernel (same dtype as x)."""
    n = x.shape[-1]
    if (reason := unsupported_reason(n, x.dtype, x.device if x.is_cuda else None)) is not None:
        raise ValueError(reason)
    a, b = hadamard.split_two(n)
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty_like(rows)
    if rows.shape[0]:
        # Triton's interpreter computes bf16 arithmetic wrongly (no error): there bf16 takes the
        # fp32 path (loaded, cast, stored back); the bf16 tensor-core path is compiled for sm_90 only
        half = x.dtype == torch.float16 or (x.dtype == torch.bfloat16 and not _triton_adapter.interpreting())
        hat, hb = _factors(n, x.dtype if half else torch.float32, str(x.device))
        hadamard_rows[(rows.shape[0],)](rows, out, hat, hb, rows.stride(0), out.stride(0), 1.0 / math.sqrt(n),
                                        A=a, B=b, PA=_pad(a), PB=_pad(b), HALF=half, num_warps=_warps(a, b))
    return out.reshape(x.shape)


def _warps(a: int, b: int) -> int:
    return 4 if _pad(a) * _pad(b) <= 4096 else 8


def aot_job(n: int, dtype: torch.dtype = torch.float16, arch: int = 90) -> dict:
    """What ``_triton_adapter.compile_for_gpu`` needs to compile the kernel for size ``n``."""
    a, b = hadamard.split_two(n)
    ty = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    return {"path": __file__, "name": "hadamard_rows",
            "signature": {"x_ptr": ty, "out_ptr": ty, "hat_ptr": ty, "hb_ptr": ty,
                          "stride_x": "i64", "stride_o": "i64", "scale": "fp32"},
            "constexprs": {"A": a, "B": b, "PA": _pad(a), "PB": _pad(b), "HALF": dtype != torch.float32},
            "num_warps": _warps(a, b), "arch": arch}


@torch.library.custom_op("lowbit::hadamard_triton", mutates_args=())
def hadamard_triton(x: torch.Tensor) -> torch.Tensor:
    """``lowbit::hadamard`` lowered for ``target="triton"``: the kernel above."""
    return launch(x)


@hadamard_triton.register_fake
def _(x):
    return torch.empty_like(x)


# ---------------------------------------------------------------------------------------------
# Rotate and quantize in one kernel (QuaRot's online rotation before a quantized linear)
# ---------------------------------------------------------------------------------------------

@triton.jit
def rotate_quantize_rows(x_ptr, codes_ptr, xscale_ptr, hat_ptr, hb_ptr, stride_x, stride_c, scale, qmax,
                         A: tl.constexpr, B: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr, HALF: tl.constexpr):
    """One row: ``Z = left^T X right * scale`` (the Hadamard: ``H_A^T X H_B / sqrt(n)``; FlatQuant's
    learned Kronecker transform: its two factors), then symmetric per-row quantization of Z to
    integer codes in [-qmax, qmax] (``absmax / qmax``, round half to even) and its scale. The
    rotated row never leaves registers."""
    row = tl.program_id(0).to(tl.int64)
    z, offs, mask = _rotate_row(x_ptr, row, stride_x, hat_ptr, hb_ptr, A, B, PA, PB, HALF)
    z = z * scale
    amax = tl.max(tl.max(tl.abs(z), axis=1), axis=0)  # padding lanes are zero
    xs = amax / qmax
    xs = tl.where(xs > 0.0, xs, 1.0)  # an all-zero row: codes 0, no division by zero
    q = tl.minimum(tl.maximum(z / xs, -qmax), qmax)
    q = (q + 12582912.0) - 12582912.0  # round half to even (|q| < 2^22)
    tl.store(codes_ptr + row * stride_c + offs, q.to(tl.int8), mask=mask)
    tl.store(xscale_ptr + row, xs)


@functools.lru_cache(maxsize=None)
def _kron_factors(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = left.shape[0], right.shape[0]
    pa, pb = _pad(a), _pad(b)
    hat = torch.zeros(pa, pa, dtype=torch.float32, device=left.device)
    hat[:a, :a] = left.float().t()
    hbp = torch.zeros(pb, pb, dtype=torch.float32, device=right.device)
    hbp[:b, :b] = right.float()
    return hat, hbp


def rotate_quantize(x: torch.Tensor, act: str = "int8",
                    transform: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """QuaRot's online rotation fused with the activation quantization: ``x @ H_n / sqrt(n)`` (or,
    with ``transform = (left, right)``, ``x @ (left (x) right)``: FlatQuant's Kronecker transform)
    quantized per row to ``act`` codes (``"int8"``: [-127, 127]; ``"int4"``: [-7, 7], held in int8)
    in one kernel. Returns (codes int8 [..., n], scale float32 [..., 1]): what the generated
    GEMV/GEMM with ``KernelSpec.act_prequant`` takes, so the rotated row is written as codes only."""
    from lowbit_compiler.ops import ACTIVATION_MAX

    n = x.shape[-1]
    if transform is None:
        if (reason := unsupported_reason(n, x.dtype, x.device if x.is_cuda else None)) is not None:
            raise ValueError(reason)
        a, b = hadamard.split_two(n)
        half = x.dtype == torch.float16 or (x.dtype == torch.bfloat16 and not _triton_adapter.interpreting())
        hat, hb = _factors(n, x.dtype if half else torch.float32, str(x.device))
        scale = 1.0 / math.sqrt(n)
    else:
        left, right = transform
        a, b = left.shape[0], right.shape[0]
        if a * b != n or _pad(a) * _pad(b) > MAX_TILE:
            raise ValueError(f"rotate_quantize: transform {a} x {b} does not fit a row of {n} in one program")
        half, scale = False, 1.0  # learned factors are not exact in 16 bits: fp32 products
        hat, hb = _kron_factors(left, right)
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    codes = torch.empty(rows.shape, dtype=torch.int8, device=x.device)
    xscale = torch.empty((rows.shape[0], 1), dtype=torch.float32, device=x.device)
    if rows.shape[0]:
        rotate_quantize_rows[(rows.shape[0],)](rows, codes, xscale, hat, hb, rows.stride(0), codes.stride(0), scale,
                                               ACTIVATION_MAX[act], A=a, B=b, PA=_pad(a), PB=_pad(b), HALF=half,
                                               num_warps=_rq_warps(a, b, half))
    return codes.reshape(x.shape), xscale.reshape(*x.shape[:-1], 1)


def _rq_warps(a: int, b: int, half: bool) -> int:
    """fp32 products (fp32 rows, learned factors) are FMAs, not tensor cores: more warps above a
    32 x 32 tile (at 64 x 64 on sm_90: 4 warps spilled 1248 bytes per thread, 8 warps 80, 16 warps 584;
    16-bit rows take tensor cores and do not spill)."""
    return 8 if not half and _pad(a) * _pad(b) > 1024 else _warps(a, b)


def rotate_quantize_aot_job(n: int, dtype: torch.dtype = torch.float16, arch: int = 90) -> dict:
    """``compile_for_gpu``'s job for the rotate-and-quantize kernel at size ``n`` (the Hadamard)."""
    job = aot_job(n, dtype, arch)
    a, b = hadamard.split_two(n)
    job["num_warps"] = _rq_warps(a, b, dtype != torch.float32)
    ty = job["signature"]["x_ptr"]
    job.update(name="rotate_quantize_rows", signature={
        "x_ptr": ty, "codes_ptr": "*i8", "xscale_ptr": "*fp32", "hat_ptr": ty if dtype != torch.float32 else "*fp32",
        "hb_ptr": ty if dtype != torch.float32 else "*fp32", "stride_x": "i64", "stride_c": "i64", "scale": "fp32",
        "qmax": "fp32"})
    return job
