"""The Triton kernel behind ``lowbit::hadamard`` under ``target="triton"``: ``x @ H_n / sqrt(n)``
per row, as two small matrix products.

``H_n = H_A (x) H_B`` (:func:`lowbit_compiler.hadamard.split_two`: ``A`` carries the non-power-of-two
factor, both near ``sqrt(n)``), so one row viewed as ``X`` [A, B] (row-major) maps to
``H_A^T X H_B`` -- for 4096, two 64 x 64 x 64 ``tl.dot``\\ s per row on tensor cores instead of a
4096 x 4096 matrix. ``A`` and ``B`` are padded to powers of two >= 16 (``tl.dot``'s minimum) with
zero rows/columns in the stored factors, so padding contributes nothing. The factors are stored
as +-1 (exact in any float dtype) and ``1/sqrt(n)`` is applied to the result. 16-bit activations
go into tensor-core dots as they are (exact products, fp32 accumulation) and the fp32 intermediate
enters the second product as a 16-bit hi + lo pair. fp32 activations are scaled by a power of two
and split into three fp16 parts (33 bits: every fp32 row exactly, and exact products with the
+-1 fp16 factors), and so is the fp32 intermediate: tensor-core dots in every variant (fp32 "ieee"
dots run as FMAs with their operands in registers and spilled at sm_90). FlatQuant's learned
factors go in as fp16 hi + lo pairs (``_kron_factors``).

One program per row. Sizes with ``pad(A) * pad(B) > 16384`` (one fp32 row tile above 64 KB) are
refused with the reason, and so are sizes whose factors and row tile do not fit the device's shared
memory (:func:`shared_bytes`; on an H100/H200, Llama-2's 11008 in fp32 needs 232 KB of its 227 KB);
the op's torch implementation then runs. Not yet: fusing the transform
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
    (16-bit: fp32 rows go in as fp16 parts, and their fp32 tile is staged once more). Matches
    Triton's report: 11008 fp32 (256 x 64 padded) 237568."""
    return _shared_bytes(*(_pad(v) for v in hadamard.split_two(n)), dtype)


def _shared_bytes(pa: int, pb: int, dtype: torch.dtype) -> int:
    # (learned factors: the same, their lo parts reuse the hi parts' buffers; 64 x 128: 90112)
    return (pa * pa + pa * pb + pb * pb) * 2 + (pa * pb * 4 if dtype == torch.float32 else 0)


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
                "16-bit activations need less")
    return None


# How one row meets the factors (``_rotate_row``'s MODE): tensor-core dots in every case, so no
# variant keeps fp32 dot operands in registers (the FMA "ieee" dots spilled at sm_90: 80 bytes per
# thread at 4096 and 8-15 KB from 5120 up).
HALF = 0   # 16-bit rows and +-1 factors: exact 16-bit operands; Y re-enters as a hi + lo pair
SPLIT = 1  # fp32 rows and +-1 factors: the row, scaled by a power of two, as three fp16 parts
KRON = 2   # learned fp32 factors (FlatQuant): SPLIT with each factor as an fp16 hi + lo pair
# (Triton's own "tf32x3" keeps fp32 operands: 152 bytes spilled at 128 x 128; "bf16x3" keeps ~16 bits)


@triton.jit
def _pow2(e):
    """2^e for an int32 ``e`` in [-126, 127], built from the float's bits (exact everywhere)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _fp16_parts(v):
    """fp32 ``v`` (|v| < 2^15) as three fp16 values whose sum is ``v`` to ~2^-33 of |v|'s range:
    each residual ``v - part`` is exact in fp32, so the parts carry 3 x 11 bits."""
    p0 = v.to(tl.float16)
    r = v - p0.to(tl.float32)
    p1 = r.to(tl.float16)
    p2 = (r - p1.to(tl.float32)).to(tl.float16)
    return p0, p1, p2


@triton.jit
def _rotate_row(x_ptr, row, stride_x, hat_ptr, hb_ptr,
                A: tl.constexpr, B: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr, MODE: tl.constexpr,
                XEXP: tl.constexpr):
    """``left^T X right`` for one row viewed as an A x B tile (zero-padded to PA x PB), unscaled; with
    its offsets and mask. ``hat_ptr``: the left factor transposed (H_A^T), ``hb_ptr``: the right one.
    ``XEXP`` (SPLIT): the row is scaled so that its largest entry is below 2^(XEXP + 1), which keeps
    ``X H_B`` (at most PB times that) inside fp16's range."""
    ia = tl.arange(0, PA)
    ib = tl.arange(0, PB)
    mask = (ia[:, None] < A) & (ib[None, :] < B)
    offs = ia[:, None] * B + ib[None, :]
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if MODE != 0:
        x = x.to(tl.float32)  # (bf16 rows under the interpreter take SPLIT: nothing computed in bf16)
    hat = tl.load(hat_ptr + ia[:, None] * PA + ia[None, :])
    hb = tl.load(hb_ptr + ib[:, None] * PB + ib[None, :])
    if MODE == 0:
        # 16-bit x and +-1 factors are exact operands of a tensor-core dot (fp32 accumulation);
        # the fp32 intermediate goes into the second dot as a 16-bit hi + lo pair (16+ bits kept)
        y = tl.dot(x, hb)
        hi = y.to(x_ptr.dtype.element_ty)
        lo = (y - hi.to(tl.float32)).to(x_ptr.dtype.element_ty)
        z = tl.dot(hat, hi) + tl.dot(hat, lo)
    else:
        # fp32 x: scaled by 2^k (exact) so that |x 2^k| < 2^(XEXP + 1), split into three fp16 parts
        # (exact products with fp16 factors, fp32 accumulation); X H_B likewise; 2^-k after. KRON:
        # learned factors come as fp16 hi + lo parts (scaled by a power of two on the host), and the
        # products of the parts above ~2^-24 are summed: hi x (3 parts), lo x (2 parts)
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        e = ((amax.to(tl.int32, bitcast=True) >> 23) & 255) - 127
        k = tl.minimum(tl.maximum(XEXP - e, -126), 126)
        x0, x1, x2 = _fp16_parts(x * _pow2(k))
        y = tl.dot(x0, hb)
        y = tl.dot(x1, hb, y)
        y = tl.dot(x2, hb, y)
        if MODE == 2:
            hb_lo = tl.load(hb_ptr + PB * PB + ib[:, None] * PB + ib[None, :])
            y = tl.dot(x0, hb_lo, y)
            y = tl.dot(x1, hb_lo, y)
        y0, y1, y2 = _fp16_parts(y)
        z = tl.dot(hat, y0)
        z = tl.dot(hat, y1, z)
        z = tl.dot(hat, y2, z)
        if MODE == 2:
            hat_lo = tl.load(hat_ptr + PA * PA + ia[:, None] * PA + ia[None, :])
            z = tl.dot(hat_lo, y0, z)
            z = tl.dot(hat_lo, y1, z)
        z = z * _pow2(-k)
    return z, offs, mask


@triton.jit
def hadamard_rows(x_ptr, out_ptr, hat_ptr, hb_ptr, stride_x, stride_o, scale,
                  A: tl.constexpr, B: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr, MODE: tl.constexpr,
                  XEXP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z, offs, mask = _rotate_row(x_ptr, row, stride_x, hat_ptr, hb_ptr, A, B, PA, PB, MODE, XEXP)
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


def mode_of(dtype: torch.dtype, learned: bool = False, interpret: bool | None = None) -> tuple[int, torch.dtype]:
    """(``_rotate_row``'s MODE, the factors' dtype) for rows of ``dtype``. The interpreter computes
    bf16 arithmetic wrongly (no error), so there bf16 rows take SPLIT (loaded, widened, split into
    fp16 parts); the bf16 tensor-core path (HALF, the fp16 one's source with bf16 pointers) runs on GPUs."""
    if learned:
        return KRON, torch.float16
    interpret = _triton_adapter.interpreting() if interpret is None else interpret
    if dtype == torch.float16 or (dtype == torch.bfloat16 and not interpret):
        return HALF, dtype
    return SPLIT, torch.float16


def _constexprs(a: int, b: int, mode: int) -> dict:
    pb = _pad(b)
    # |X H_B| <= PB max|X| (+-1 factors) or 2 PB max|X| (learned ones, scaled into [1, 2)) < 2^15
    return {"A": a, "B": b, "PA": _pad(a), "PB": pb, "MODE": mode,
            "XEXP": 14 - (pb.bit_length() - 1) - (mode == KRON)}


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
        mode, fdt = mode_of(x.dtype)
        hat, hb = _factors(n, fdt, str(x.device))
        hadamard_rows[(rows.shape[0],)](rows, out, hat, hb, rows.stride(0), out.stride(0), 1.0 / math.sqrt(n),
                                        **_constexprs(a, b, mode), num_warps=_warps(a, b, mode))
    return out.reshape(x.shape)


def _warps(a: int, b: int, mode: int) -> int:
    """4 warps up to a 64 x 64 tile, 8 above (sm_90: at most 185 registers, no spills, every mode)."""
    tile = _pad(a) * _pad(b)
    return 4 if tile <= 4096 else 8


_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def aot_job(n: int, dtype: torch.dtype = torch.float16, arch: int = 90) -> dict:
    """What ``_triton_adapter.compile_for_gpu`` needs to compile the kernel for size ``n`` (the
    variant a GPU runs for ``dtype`` rows)."""
    a, b = hadamard.split_two(n)
    mode, fdt = mode_of(dtype, interpret=False)
    ty = _PTR[dtype]
    return {"path": __file__, "name": "hadamard_rows",
            "signature": {"x_ptr": ty, "out_ptr": ty, "hat_ptr": _PTR[fdt], "hb_ptr": _PTR[fdt],
                          "stride_x": "i64", "stride_o": "i64", "scale": "fp32"},
            "constexprs": _constexprs(a, b, mode), "num_warps": _warps(a, b, mode), "arch": arch}


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
                         A: tl.constexpr, B: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr, MODE: tl.constexpr,
                         XEXP: tl.constexpr):
    """One row: ``Z = left^T X right * scale`` (the Hadamard: ``H_A^T X H_B / sqrt(n)``; FlatQuant's
    learned Kronecker transform: its two factors), then symmetric per-row quantization of Z to
    integer codes in [-qmax, qmax] (``absmax / qmax``, round half to even) and its scale. The
    rotated row never leaves registers."""
    row = tl.program_id(0).to(tl.int64)
    z, offs, mask = _rotate_row(x_ptr, row, stride_x, hat_ptr, hb_ptr, A, B, PA, PB, MODE, XEXP)
    z = z * scale
    amax = tl.max(tl.max(tl.abs(z), axis=1), axis=0)  # padding lanes are zero
    xs = amax / qmax
    xs = tl.where(xs > 0.0, xs, 1.0)  # an all-zero row: codes 0, no division by zero
    q = tl.minimum(tl.maximum(z / xs, -qmax), qmax)
    q = (q + 12582912.0) - 12582912.0  # round half to even (|q| < 2^22)
    tl.store(codes_ptr + row * stride_c + offs, q.to(tl.int8), mask=mask)
    tl.store(xscale_ptr + row, xs)


def _kron_factors(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Zero-padded ``left^T`` and ``right``, each as fp16 [2, P, P] (hi, lo) parts of the factor times
    a power of two that puts its largest entry in [1, 2) (the 2^-24 floor of fp16's subnormals is
    then ~2^-24 of the factor's scale), and the product of the two powers' inverses. Cached per
    tensor and in-place version."""
    return _kron_factors_cached(left, right, left._version, right._version)


@functools.lru_cache(maxsize=64)
def _kron_factors_cached(left, right, left_version, right_version):
    def parts(f: torch.Tensor, p: int) -> tuple[torch.Tensor, float]:
        amax = float(f.abs().max())
        e = math.frexp(amax)[1] - 1 if amax > 0 else 0  # amax in [2^e, 2^(e + 1))
        fs = torch.zeros(p, p, dtype=torch.float32, device=f.device)
        fs[:f.shape[0], :f.shape[1]] = f.float() * 2.0 ** -e
        hi = fs.half()
        return torch.stack([hi, (fs - hi.float()).half()]), 2.0 ** e

    hat, sl = parts(left.t(), _pad(left.shape[0]))
    hb, sr = parts(right, _pad(right.shape[0]))
    return hat, hb, sl * sr


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
        mode, fdt = mode_of(x.dtype)
        hat, hb = _factors(n, fdt, str(x.device))
        scale = 1.0 / math.sqrt(n)
    else:
        left, right = transform
        a, b = left.shape[0], right.shape[0]
        if (reason := kron_unsupported_reason(a, b, n, x.device if x.is_cuda else None)) is not None:
            raise ValueError(reason)
        mode = KRON  # learned factors are not exact in 16 bits: hi + lo parts
        hat, hb, scale = _kron_factors(left, right)
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    codes = torch.empty(rows.shape, dtype=torch.int8, device=x.device)
    xscale = torch.empty((rows.shape[0], 1), dtype=torch.float32, device=x.device)
    if rows.shape[0]:
        rotate_quantize_rows[(rows.shape[0],)](rows, codes, xscale, hat, hb, rows.stride(0), codes.stride(0), scale,
                                               ACTIVATION_MAX[act], **_constexprs(a, b, mode),
                                               num_warps=_rq_warps(a, b, mode))
    return codes.reshape(x.shape), xscale.reshape(*x.shape[:-1], 1)


def kron_unsupported_reason(a: int, b: int, n: int, device: torch.device | str | None = None) -> str | None:
    """Why ``rotate_quantize`` cannot take learned ``a`` x ``b`` Kronecker factors for rows of ``n``."""
    if a * b != n:
        return f"the transform's factors {a} x {b} do not multiply to the row size {n}"
    if _pad(a) * _pad(b) > MAX_TILE:
        return (f"the transform's padded row tile {_pad(a)} x {_pad(b)} exceeds {MAX_TILE} elements of one "
                "program")
    limit = SM90_SHARED_BYTES
    if device is not None and torch.device(device).type == "cuda":
        limit = torch.cuda.get_device_properties(torch.device(device)).shared_memory_per_block_optin
    if (need := _shared_bytes(_pad(a), _pad(b), torch.float32)) > limit:
        return (f"the transform {a} x {b} needs {need // 1024} KB of shared memory per program (the factors' "
                f"fp16 parts and the row tile), the device allows {limit // 1024} KB")
    return None


def _rq_warps(a: int, b: int, mode: int) -> int:
    return _warps(a, b, mode)


def rotate_quantize_aot_job(n: int, dtype: torch.dtype = torch.float16, arch: int = 90,
                            kron: tuple[int, int] | None = None) -> dict:
    """``compile_for_gpu``'s job for the rotate-and-quantize kernel at size ``n``: the Hadamard for
    ``dtype`` rows, or (``kron=(a, b)``) learned a x b Kronecker factors."""
    job = aot_job(n, dtype, arch)
    if kron is None:
        a, b = hadamard.split_two(n)
        mode = job["constexprs"]["MODE"]
    else:
        (a, b), mode = kron, KRON
        job["constexprs"] = _constexprs(a, b, KRON)
    job["num_warps"] = _rq_warps(a, b, mode)
    sig = job["signature"]
    factor = "*fp16" if mode == KRON else sig["hat_ptr"]
    job.update(name="rotate_quantize_rows", signature={
        "x_ptr": sig["x_ptr"], "codes_ptr": "*i8", "xscale_ptr": "*fp32", "hat_ptr": factor, "hb_ptr": factor,
        "stride_x": "i64", "stride_c": "i64", "scale": "fp32", "qmax": "fp32"})
    return job
