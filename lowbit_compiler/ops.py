"""``lowbit::`` custom ops: schema, fake (meta) implementation, float reference.

``lowbit::wo_linear(x, qweight, scale, zero, bias, fmt, in_features)`` is the weight-only
quantized linear for every :class:`~lowbit_compiler.formats.WeightFormat` (``fmt`` is its key):
``y = x @ dequantize(qweight, scale, zero)[:, :in_features].T + bias``.

Implementations:

* :func:`wo_linear_reference`: dequantise to float32, one matmul in float32 (float64 for float64
  activations), cast to x's dtype. It defines the op's numerics; every fast path is tested against it.
* The op's own implementation (what eager code and the offline flow run) calls the fast CPU kernels
  in ``lowbit_compiler.backends.cpu_kernels`` and uses the reference where they do not apply. The
  backend chooses explicitly per node at lowering time instead (see ``backends/lowering.py``).

Nothing is silent: an eager call that takes a slow path (the float reference of ``wo_linear``, the
float32 emulation or per-call unpacking of ``qa_linear``) logs a warning through the
``lowbit_compiler`` logger once per (op, format, reason) and counts every such call in
``lowbit_compiler.pass_base.fallback_counter`` (see :func:`eager_fallback`). Every op creates its
tensors on its inputs' device.
"""
from __future__ import annotations

import functools
import logging

import torch

from lowbit_compiler.formats import WeightFormat, dequantize_parts

log = logging.getLogger("lowbit_compiler")

# (op, format, reason) already logged by eager_fallback
_WARNED: set[tuple[str, str, str]] = set()

_REFERENCE_COST = ("the float reference runs instead (the whole weight is dequantised to float32 on every call: "
                   "correct, but slow and memory-hungry)")


def eager_fallback(op: str, fmt: str, reason: str) -> None:
    """Report that an eager call of ``op`` took a slow path: a warning once per (op, fmt, reason),
    and one count per call in ``fallback_counter`` (under the reason's text before its first ";")."""
    from lowbit_compiler import pass_base

    pass_base.record_fallback(reason)
    key = (op, fmt, reason)
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("lowbit fallback: %s (logged once; later calls are counted in "
                    "lowbit_compiler.fallback_counter)", reason)


def _template_gap(fmt: str, act: str | None = None) -> str | None:
    from lowbit_compiler.backends import codegen

    return codegen.template_gap(fmt, act)


def wo_linear_fallback_reason(fmt: str, x_dtype: torch.dtype, device_type: str, rows: int | None = None) -> str | None:
    """Why an eager ``lowbit::wo_linear`` call with these arguments runs the float reference, and
    what to do about it (None: a packed or generated CPU kernel runs). ``rows``: the call's row
    count (None: a decode-sized call); int3/int2 weights have a generated lookup-table kernel for
    calls of at most ``cpu_codegen.MAX_ROWS`` rows, and the CPU dispatch's generated GEMM or
    dequantize-then-matmul above (both need the generated dequantization kernel)."""
    from lowbit_compiler.backends import cpu_codegen, cpu_dispatch, cpu_kernels, cpu_lut

    if device_type == "cuda" and _eager_cuda_reason(fmt, x_dtype) is None:
        return None  # the format's generated Triton kernel (kernel_cache.eager_wo_linear)
    if device_type == "cpu" and x_dtype in cpu_kernels._FAST_DTYPES and cpu_lut.supported(fmt) is None:
        if rows is not None and rows > cpu_codegen.MAX_ROWS:
            if cpu_dispatch.dequant_kernel() is not None:
                return None
            why = ", ".join(dict.fromkeys(r.split(";")[0] for r in cpu_codegen._disabled_reason)) or "not built"
            return (f"lowbit::wo_linear: format {fmt} with more than {cpu_codegen.MAX_ROWS} rows needs the generated "
                    f"dequantization kernel, which is unavailable ({why}; torch has no int3/int2 kernel); "
                    f"{_REFERENCE_COST}; this call has {rows} rows")
        if cpu_lut.kernel(fmt) is None:
            return (f"lowbit::wo_linear: format {fmt}: the generated lookup-table kernel is unavailable "
                    f"({'; '.join(cpu_codegen._disabled_reason) or 'not built'}); {_REFERENCE_COST}")
        return None
    return packed_kernel_reason(fmt, x_dtype, device_type)


@functools.lru_cache(maxsize=None)
def _eager_cuda_reason(fmt: str, x_dtype: torch.dtype) -> str | None:
    """Why an eager CUDA call cannot run the format's generated kernel (None: it can)."""
    if x_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"activation dtype {x_dtype} has no generated kernel"
    return _template_gap(fmt)


@functools.lru_cache(maxsize=None)
def packed_kernel_reason(fmt: str, x_dtype: torch.dtype, device_type: str) -> str | None:
    """Why the CPU kernels behind ``cpu_kernels.packed_linear`` (torch's packed ones, the generated
    ones, the dispatch's dequantize / GEMM candidates, the lookup-table kernel of int3 / int2)
    cannot run a call with these arguments, and what to do about it (None: they can). Stacked
    experts (``grouped_linear``) use these only."""
    from lowbit_compiler.backends import cpu_kernels

    if cpu_kernels.unsupported_reason(x_dtype, torch.device(device_type), fmt) is None:
        return None
    gap = _template_gap(fmt)
    if device_type != "cpu":
        advice = (f"compiling does not help ({gap}); int8 and int4 formats have fast kernels" if gap is not None
                  else "compile the model with torch.compile(model, backend='lowbit') to run generated kernels"
                  + ("" if x_dtype in cpu_kernels._FAST_DTYPES else " (they take float32/bfloat16/float16 activations)"))
        return (f"lowbit::wo_linear: format {fmt} on a {device_type} device: the eager op has packed kernels for the "
                f"CPU only; {_REFERENCE_COST}; {advice}")
    if x_dtype not in cpu_kernels._FAST_DTYPES:
        return (f"lowbit::wo_linear: format {fmt} with {x_dtype} activations has no packed CPU kernel (they take "
                f"float32/bfloat16/float16 activations); {_REFERENCE_COST}; run the model in float32 or bfloat16 "
                "for the packed kernel")
    advice = ("on CUDA, torch.compile(model, backend='lowbit') runs a generated kernel for it" if gap is None
              else "it has no generated-kernel template either, so this format saves memory, not time; use int8 or "
                   "int4_g<G>_<sym|asym> for speed")
    return (f"lowbit::wo_linear: format {fmt} has no packed CPU kernel (torch has int8 and int4 group-wise ones); "
            f"{_REFERENCE_COST}; {advice}")


@torch.library.custom_op("lowbit::wo_linear", mutates_args=())
def wo_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
              bias: torch.Tensor | None, fmt: str, in_features: int) -> torch.Tensor:
    return wo_linear_eager(x, qweight, scale, zero, bias, fmt, in_features)


def wo_linear_eager(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    bias: torch.Tensor | None, fmt: str, in_features: int) -> torch.Tensor:
    """The op's implementation: on CUDA the format's generated Triton kernel; on the CPU the packed
    or generated CPU kernel; else the float reference (logged, counted)."""
    from lowbit_compiler.backends import cpu_kernels

    if x.is_cuda and _eager_cuda_reason(fmt, x.dtype) is None:
        from lowbit_compiler.backends import kernel_cache

        return kernel_cache.eager_wo_linear(x, qweight, scale, zero, bias, fmt, in_features)

    out = cpu_kernels.wo_linear_fast(x, qweight, scale, zero, bias, fmt, in_features)
    if out is None:
        sparse = WeightFormat.parse(fmt).kind == "sparse"
        rows = x.numel() // max(x.shape[-1], 1)
        reason = (f"lowbit::wo_linear: N:M sparse format {fmt}: "
                  f"{cpu_kernels.sparse_reason(x.dtype, x.device, rows, fmt)}; "
                  f"{_REFERENCE_COST}" if sparse else wo_linear_fallback_reason(fmt, x.dtype, x.device.type, rows))
        if reason is None and not bool(torch.isfinite(x).all()):  # the lookup-table kernel declines them
            reason = (f"lowbit::wo_linear: format {fmt}: non-finite activations have no int8 lookup table; "
                      "the float reference runs instead and propagates them")
        eager_fallback("lowbit::wo_linear", fmt, reason or f"lowbit::wo_linear: format {fmt}: {_REFERENCE_COST}")
        out = wo_linear_reference(x, qweight, scale, zero, bias, fmt, in_features)
    return out


@wo_linear.register_fake
def _(x, qweight, scale, zero, bias, fmt, in_features):
    torch._check(x.shape[-1] == in_features, lambda: f"lowbit::wo_linear: x has K={x.shape[-1]}, "
                 f"the weight expects K={in_features}")
    return x.new_empty((*x.shape[:-1], scale.shape[0]))


def wo_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                        zero: torch.Tensor | None, bias: torch.Tensor | None, fmt: str,
                        in_features: int) -> torch.Tensor:
    """Float reference: dequantise (float32), matmul in float32 (float64 for float64 activations),
    cast back to x.dtype."""
    from lowbit_compiler.backends import cpu_quantize

    compute = torch.promote_types(x.dtype, torch.float32)
    f = WeightFormat.parse(fmt)
    w = cpu_quantize.dequantize(f, qweight, scale, zero) if x.device.type == "cpu" else None  # same bits, one pass
    w = (dequantize_parts(f, qweight, scale, zero) if w is None else w)[:, :in_features].to(compute)
    out = torch.nn.functional.linear(x.to(compute), w, None if bias is None else bias.to(compute))
    return out.to(x.dtype)


@torch.library.custom_op("lowbit::generated", mutates_args=())
def generated(kernel: str, tensors: list[torch.Tensor], eps: float, out_features: int,
              out_dtype: torch.dtype) -> torch.Tensor:
    """One call of a generated kernel, as an op other compilers can trace around (``inner=
    "inductor"``): ``tensors`` are the launcher's tensor arguments in order, ``eps`` the fused
    norm's epsilon (unused without a norm)."""
    from lowbit_compiler.backends import kernel_cache

    launch = kernel_cache.loaded(kernel).launch
    return launch(*tensors, eps) if kernel_cache.loaded(kernel).spec.prologue else launch(*tensors)


@generated.register_fake
def _(kernel, tensors, eps, out_features, out_dtype):
    x = tensors[0]
    return x.new_empty((*x.shape[:-1], out_features), dtype=out_dtype)


# Activation quantization schemes of lowbit::qa_linear: per-token scales computed at run time
# (int4 codes live in int8 tensors: the integer matmul is the same).
ACTIVATION_DTYPES = {"int8": torch.int8, "int4": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}


@torch.library.custom_op("lowbit::qa_linear", mutates_args=())
def qa_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
              bias: torch.Tensor | None, fmt: str, in_features: int, act: str,
              x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A linear with quantized weights *and* quantized activations (``act``: "int8", "int4" or
    "fp8_e4m3"): per token at run time, or with one static per-tensor scale ``x_scale`` [1]
    measured on calibration data.

    * int8 x int8 weights (W8A8): one integer matmul (``torch._int_mm``), then both scales;
    * int8 x int4 group-wise weights (W4A8): one integer matmul per group on the centred codes
      ``q - z`` (in [-15, 15]), each scaled by its group's scale, summed;
    * fp8 x fp8_e4m3 weights: fp8 x fp8 products are exact in float32, accumulated in float32 (what
      fp8 tensor cores do), then both scales.

    The last two are emulations (per call: the weight converted to float32, or its codes unpacked);
    they log once and count each call (:func:`eager_fallback`).
    """
    return qa_linear_eager(x, qweight, scale, zero, bias, fmt, in_features, act, x_scale)


@functools.lru_cache(maxsize=None)
def qa_linear_slow_reason(fmt: str, act: str) -> str | None:
    """Why an eager ``lowbit::qa_linear`` call with this format and activation scheme is an
    emulation rather than one integer matmul, and what to do (None: it is one ``torch._int_mm``)."""
    f = WeightFormat.parse(fmt)
    if act != "fp8_e4m3" and f.bits == 8:
        return None
    gap = _template_gap(fmt, act)
    advice = ("on CUDA, torch.compile(model, backend='lowbit') runs a generated kernel for it" if gap is None
              else f"no faster path exists yet ({gap})")
    if act == "fp8_e4m3":
        what = ("is emulated in float32 by the eager op (the whole weight converted to float32 on every call; the "
                "products are exact, accumulated in float32)")
    else:
        what = (f"runs one integer matmul per group of {f.group_size} on codes unpacked and centred on every call "
                "(the eager op has no packed low-bit integer kernel)")
    return f"lowbit::qa_linear: format {fmt} with {act} activations {what}; {advice}"


def qa_linear_eager(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    bias: torch.Tensor | None, fmt: str, in_features: int, act: str,
                    x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The implementation of ``lowbit::qa_linear`` (see there)."""
    f = WeightFormat.parse(fmt)
    if (reason := qa_linear_slow_reason(fmt, act)) is not None:
        eager_fallback("lowbit::qa_linear", f"{fmt}/{act}", reason)
    xq, x_scale = quantize_activations(x, act, x_scale)
    rows = xq.reshape(-1, x.shape[-1]).contiguous()  # torch._int_mm needs rows (a transposed view is not)
    if act == "fp8_e4m3":
        acc = rows.float() @ qweight.float().t() * scale.float()
    elif f.bits == 8:
        acc = _int8_matmul(rows, qweight).float() * scale.float()
    else:
        codes = _centred_codes(f, qweight, zero)
        g = f.group_size
        acc = torch.zeros(rows.shape[0], codes.shape[0], device=rows.device)
        for j in range(0, in_features, g):
            width = min(g, in_features - j)
            part = torch._int_mm(rows[:, j:j + width].contiguous(), codes[:, j:j + width].t().contiguous())
            acc += part.float() * scale[:, j // g].float()
    out = acc.reshape(*x.shape[:-1], -1) * x_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@qa_linear.register_fake
def _(x, qweight, scale, zero, bias, fmt, in_features, act, x_scale=None):
    return x.new_empty((*x.shape[:-1], scale.shape[0]))


def _int8_matmul(rows: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """int8 x int8 -> int32: the generated CPU kernel for decode-sized calls (M <= 16 rows; torch's
    CPU ``_int_mm`` is a reference loop there), else ``torch._int_mm``; both exact."""
    from lowbit_compiler.backends import cpu_codegen

    out = cpu_codegen.int8_matmul(rows, qweight)
    return torch._int_mm(rows, qweight.t()) if out is None else out


def _centred_codes(f: WeightFormat, qweight: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """int8 [N, Kp] codes minus their zero point, for integer matmuls against int8 activations."""
    from lowbit_compiler.formats import _unpack

    q = _unpack(qweight, f.bits).to(torch.int16)
    n, kp = q.shape
    z = (torch.full((n, kp // f.group_size), 2 ** (f.bits - 1), dtype=torch.int16, device=q.device) if zero is None
         else zero.to(torch.int16))
    return (q - z.repeat_interleave(f.group_size, dim=1)).to(torch.int8)


ACTIVATION_MAX = {"int8": 127.0, "int4": 7.0, "fp8_e4m3": 448.0}


def quantize_activations(x: torch.Tensor, act: str, static_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (``static_scale`` None) or with one static scale; values beyond a static scale's
    range saturate."""
    if static_scale is None:
        return quantize_per_token(x, act)
    return _codes(x.float(), static_scale.float().reshape(1), act)


def quantize_per_token(x: torch.Tensor, act: str = "int8") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of the last dimension: (codes, scale [..., 1] float32); an
    all-zero row gets scale 1 (codes 0), so nothing divides by zero."""
    xf = x.float()
    x_scale = xf.abs().amax(-1, keepdim=True) / ACTIVATION_MAX[act]
    x_scale = torch.where(x_scale > 0, x_scale, torch.ones_like(x_scale))
    return _codes(xf, x_scale, act)


def _codes(xf: torch.Tensor, x_scale: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    if act in ("int8", "int4"):  # symmetric: [-127, 127] / [-7, 7]
        top = ACTIVATION_MAX[act]
        return torch.round(xf / x_scale).clamp(-top, top).to(torch.int8), x_scale
    return (xf / x_scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), x_scale


def qa_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                        bias: torch.Tensor | None, fmt: str, in_features: int, act: str,
                        x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 reference of ``lowbit::qa_linear``: quantized activations times the dequantised
    weights (exact products), then the activation scale."""
    xq, x_scale = quantize_activations(x, act, x_scale)
    w = dequantize_parts(WeightFormat.parse(fmt), qweight, scale, zero)[:, :in_features]
    out = (xq.double() @ w.double().t()) * x_scale.double()
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)


@torch.library.custom_op("lowbit::hadamard", mutates_args=())
def hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x @ H_n / sqrt(n)`` over the last dimension: an online rotation (R4 before a
    down-projection whose weight absorbed ``H``; R3 on queries and keys). Sizes: a power of two
    times a known Hadamard order (``lowbit_compiler.hadamard``)."""
    from lowbit_compiler import hadamard as _h

    return _h.transform(x)


@hadamard.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("lowbit::kron_transform", mutates_args=())
def kron_transform(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``x @ (left (x) right)`` over the last dimension (FlatQuant's online affine transform): a row
    viewed as ``X`` [a, b] becomes ``left^T X right``; computed in float32 at least."""
    return kron_transform_eager(x, left, right)


def kron_transform_eager(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The implementation of ``lowbit::kron_transform`` (two batched matmuls; no new tensors)."""
    a, b = left.shape[0], right.shape[0]
    if x.shape[-1] != a * b:
        raise ValueError(f"lowbit::kron_transform: input size {x.shape[-1]} != {a} x {b}")
    compute = torch.promote_types(x.dtype, torch.float32)
    rows = x.to(compute).reshape(-1, a, b)
    out = torch.matmul(left.to(compute).t(), rows) @ right.to(compute)
    return out.reshape(x.shape).to(x.dtype)


@kron_transform.register_fake
def _(x, left, right):
    return torch.empty_like(x)


def kron_transform_reference(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Float64 reference: the dense Kronecker product."""
    return (x.double() @ torch.kron(left.double(), right.double())).to(x.dtype)


def _hadamard_backward(ctx, grad):  # d(x Q)/dx applied to grad: grad Q^T (learned rotations train through it)
    from lowbit_compiler import hadamard as _h

    return _h.transform(grad, transpose=True)


hadamard.register_autograd(_hadamard_backward)


def hadamard_reference(x: torch.Tensor) -> torch.Tensor:
    """Float64 reference: one matmul with the dense orthogonal matrix."""
    from lowbit_compiler import hadamard as _h

    return (x.double() @ _h.matrix(x.shape[-1], device=x.device)).to(x.dtype)


@torch.library.custom_op("lowbit::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                  out_features: int) -> torch.Tensor:
    """``x @ S.T`` for a sparse [N, K] matrix in COO form (SpQR-style outliers beside a quantized
    dense part: the graph adds this to the dense op's output)."""
    return sparse_linear_eager(x, rows, cols, values, out_features)


def sparse_linear_eager(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                        out_features: int) -> torch.Tensor:
    """The implementation of ``lowbit::sparse_linear``: a gather, a product and an ``index_add_``
    (float32 at least), O(tokens x nonzeros); on the input's device."""
    compute = torch.promote_types(x.dtype, torch.float32)
    flat = x.reshape(-1, x.shape[-1]).to(compute)
    contrib = flat[:, cols.long()] * values.to(compute)
    out = torch.zeros(flat.shape[0], out_features, dtype=compute, device=x.device).index_add_(1, rows.long(), contrib)
    return out.reshape(*x.shape[:-1], out_features).to(x.dtype)


@sparse_linear.register_fake
def _(x, rows, cols, values, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


# --------------------------------------------------------------------------------------------
# Grouped low-bit matmul over stacked expert weights (MoE)
# --------------------------------------------------------------------------------------------

def expert_bounds(offs: torch.Tensor, rows: int) -> list[tuple[int, int, int]]:
    """``(expert, first row, end row)`` of every expert that received rows: ``offs`` [E] holds the
    cumulative row counts (``offs[e]`` is the end of expert ``e``'s rows, as ``torch._grouped_mm``
    and transformers' ``grouped_mm_fallback`` take them); rows past ``offs[-1]`` belong to no expert."""
    bounds, start = [], 0
    for e, end in enumerate(offs.tolist()):
        end = min(int(end), rows)
        if end > start:
            bounds.append((e, start, end))
        start = max(start, end)
    return bounds


def _expert(t: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if t is None else t[e]


@torch.library.custom_op("lowbit::grouped_linear", mutates_args=())
def grouped_linear(x: torch.Tensor, offs: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor | None, fmt: str, in_features: int, act: str | None = None) -> torch.Tensor:
    """Grouped low-bit matmul over stacked expert weights: ``x`` [S, K] holds the routed tokens
    sorted by expert, ``offs`` [E] the cumulative row count per expert; row ``r`` of expert ``e``
    gives ``x[r] @ dequantize(qweight[e], scale[e], zero[e])[:, :K].T`` (rows past ``offs[-1]``:
    zero). ``qweight``/``scale``/``zero`` are the per-expert tensors of ``lowbit::wo_linear``
    stacked on a leading expert dimension (same formats). ``act`` (``"int8"``, ``"int4"``,
    ``"fp8_e4m3"``): activations quantized per token, as ``lowbit::qa_linear``."""
    return grouped_linear_eager(x, offs, qweight, scale, zero, fmt, in_features, act)


def grouped_linear_eager(x: torch.Tensor, offs: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                         zero: torch.Tensor | None, fmt: str, in_features: int, act: str | None = None) -> torch.Tensor:
    """The op's implementation: per expert that received tokens, the CPU kernel of ``wo_linear``
    (``cpu_kernels.packed_linear`` over the expert's weight, prepacked once per stacked weight: the
    dispatch's choice; int3 / int2: the lookup-table kernel for decode-sized calls) or
    ``qa_linear``'s integer matmul on its rows; formats no CPU kernel reads run the float
    reference (logged once, counted)."""
    from lowbit_compiler.backends import cpu_kernels

    if act is not None:
        out = x.new_zeros((x.shape[0], scale.shape[1]))
        for e, s, t in expert_bounds(offs, x.shape[0]):
            out[s:t] = qa_linear_eager(x[s:t], qweight[e], scale[e], _expert(zero, e), None, fmt, in_features, act)
        return out
    if (reason := packed_kernel_reason(fmt, x.dtype, x.device.type)) is not None:
        eager_fallback("lowbit::grouped_linear", fmt, reason.replace("lowbit::wo_linear", "lowbit::grouped_linear"))
        return grouped_linear_reference(x, offs, qweight, scale, zero, fmt, in_features, act)
    dtype = cpu_kernels.compute_dtype_for(x.dtype, cpu_kernels._EAGER_POLICY[-1])
    packed = cpu_kernels.prepack_experts(qweight, scale, zero, fmt, in_features, dtype)
    return cpu_kernels.packed_grouped_linear(x, offs, packed, dtype)


@grouped_linear.register_fake
def _(x, offs, qweight, scale, zero, fmt, in_features, act=None):
    torch._check(x.shape[-1] == in_features, lambda: f"lowbit::grouped_linear: x has K={x.shape[-1]}, "
                 f"the expert weights expect K={in_features}")
    return x.new_empty((x.shape[0], scale.shape[1]))


def grouped_linear_reference(x: torch.Tensor, offs: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                             zero: torch.Tensor | None, fmt: str, in_features: int,
                             act: str | None = None) -> torch.Tensor:
    """Float reference: per expert, ``wo_linear_reference`` (dequantised float32 weight, float32
    matmul; float64 for float64 activations) or ``qa_linear_reference`` on its rows."""
    compute = torch.promote_types(x.dtype, torch.float32)
    out = torch.zeros((x.shape[0], scale.shape[1]), dtype=compute, device=x.device)
    for e, s, t in expert_bounds(offs, x.shape[0]):
        rows = x[s:t]
        if act is not None:
            out[s:t] = qa_linear_reference(rows, qweight[e], scale[e], _expert(zero, e), None, fmt, in_features,
                                           act).to(compute)
        else:
            out[s:t] = wo_linear_reference(rows.to(compute), qweight[e], scale[e], _expert(zero, e), None, fmt,
                                           in_features)
    return out.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Activation sparsity (TEAL, CATS, WINA): thresholded inputs, and the matmul that skips them
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("lowbit::act_sparsify", mutates_args=())
def act_sparsify(x: torch.Tensor, threshold: torch.Tensor, col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Zero the entries of ``x`` whose score is below ``threshold``: the score is ``|x|`` (TEAL,
    CATS) or ``|x_i| * col_scale_i`` (WINA: ``col_scale`` [K] is the column norm ``||W[:, i]||_2``
    of the weights that read ``x``). ``threshold`` is [1] (one per site) or [K] (per channel).
    Kept entries are unchanged (exact)."""
    return act_sparsify_reference(x, threshold, col_scale)


@act_sparsify.register_fake
def _(x, threshold, col_scale=None):
    return torch.empty_like(x)


def act_sparsify_reference(x: torch.Tensor, threshold: torch.Tensor,
                           col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The op's definition (also its implementation: one comparison and one select)."""
    score = x.abs() if col_scale is None else x.abs() * col_scale.to(x.dtype)
    return torch.where(score >= threshold.to(x.dtype), x, torch.zeros((), dtype=x.dtype, device=x.device))


@torch.library.custom_op("lowbit::sparse_input_linear", mutates_args=())
def sparse_input_linear(x: torch.Tensor, threshold: torch.Tensor, col_scale: torch.Tensor | None,
                        qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                        bias: torch.Tensor | None, fmt: str, in_features: int) -> torch.Tensor:
    """``lowbit::act_sparsify`` fused into the weight-only quantized linear that reads it:
    ``wo_linear(act_sparsify(x, threshold, col_scale), qweight, ...)``. For one row (decode) the
    generated CPU kernel reads only the weight rows (of its K-major copy) of the inputs kept
    (``backends/cpu_sparse.py``); more rows run the dense kernels on the thresholded input."""
    return sparse_input_linear_eager(x, threshold, col_scale, qweight, scale, zero, bias, fmt, in_features)


def sparse_input_linear_eager(x: torch.Tensor, threshold: torch.Tensor, col_scale: torch.Tensor | None,
                              qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                              bias: torch.Tensor | None, fmt: str, in_features: int) -> torch.Tensor:
    from lowbit_compiler.backends import cpu_sparse

    xs = act_sparsify_reference(x, threshold, col_scale)
    out = cpu_sparse.linear(xs, qweight, scale, zero, bias, fmt, in_features)
    return out if out is not None else wo_linear_eager(xs, qweight, scale, zero, bias, fmt, in_features)


@sparse_input_linear.register_fake
def _(x, threshold, col_scale, qweight, scale, zero, bias, fmt, in_features):
    return x.new_empty((*x.shape[:-1], scale.shape[0]))


@torch.library.custom_op("lowbit::sparse_input_qa_linear", mutates_args=())
def sparse_input_qa_linear(x: torch.Tensor, threshold: torch.Tensor, col_scale: torch.Tensor | None,
                           qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                           bias: torch.Tensor | None, fmt: str, in_features: int, act: str,
                           x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``lowbit::act_sparsify`` fused into the linear with quantized activations that reads it:
    ``qa_linear(act_sparsify(x, threshold, col_scale), qweight, ...)`` (W8A8 / W4A8 + TEAL or WINA).
    The activation codes of a thresholded row are zero where the input was zeroed (the per-token
    scale is the kept row's maximum, as unfused), so for one row the activation-sparse CPU kernel
    (``backends/cpu_sparse.py``) runs on the codes and reads only the weight rows of the inputs
    kept: ``x_scale * (codes @ dequantize(W).T) + bias``, the same products as the integer
    matmul, accumulated in float32. More rows, and formats that kernel lacks, run ``qa_linear``
    on the thresholded input."""
    return sparse_input_qa_linear_eager(x, threshold, col_scale, qweight, scale, zero, bias, fmt, in_features, act,
                                        x_scale)


def sparse_input_qa_linear_eager(x: torch.Tensor, threshold: torch.Tensor, col_scale: torch.Tensor | None,
                                 qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                                 bias: torch.Tensor | None, fmt: str, in_features: int, act: str,
                                 x_scale: torch.Tensor | None = None) -> torch.Tensor:
    from lowbit_compiler.backends import cpu_sparse

    xs = act_sparsify_reference(x, threshold, col_scale)
    if act in ("int8", "int4") and cpu_sparse.unsupported_reason(xs, scale, fmt, in_features) is None:
        xq, s = quantize_activations(xs, act, x_scale)
        acc = cpu_sparse.linear(xq.float(), qweight, scale, zero, None, fmt, in_features)
        if acc is not None:
            out = acc * s.float().reshape(-1)[0]
            if bias is not None:
                out = out + bias.float()
            return out.to(x.dtype)
    return qa_linear_eager(xs, qweight, scale, zero, bias, fmt, in_features, act, x_scale)


@sparse_input_qa_linear.register_fake
def _(x, threshold, col_scale, qweight, scale, zero, bias, fmt, in_features, act, x_scale=None):
    return x.new_empty((*x.shape[:-1], scale.shape[0]))


def sparse_input_qa_linear_reference(x: torch.Tensor, threshold: torch.Tensor, col_scale: torch.Tensor | None,
                                     qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                                     bias: torch.Tensor | None, fmt: str, in_features: int, act: str,
                                     x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 reference: the threshold, then ``qa_linear_reference``."""
    return qa_linear_reference(act_sparsify_reference(x, threshold, col_scale), qweight, scale, zero, bias, fmt,
                               in_features, act, x_scale)


def sparse_input_linear_reference(x: torch.Tensor, threshold: torch.Tensor, col_scale: torch.Tensor | None,
                                  qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                                  bias: torch.Tensor | None, fmt: str, in_features: int) -> torch.Tensor:
    """Float reference: the threshold, then ``wo_linear_reference``."""
    return wo_linear_reference(act_sparsify_reference(x, threshold, col_scale), qweight, scale, zero, bias, fmt,
                               in_features)


@torch.library.custom_op("lowbit::lowrank_residual", mutates_args=())
def lowrank_residual(x: torch.Tensor, kept: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """R-Sparse's low-rank part: ``((x - kept) @ right.T) @ left.T``, the inputs a threshold zeroed
    (``kept`` = ``act_sparsify(x)``) times a rank-``r`` factorisation ``left @ right`` ([N, r] x
    [r, K]) of the weight that reads them; added to the linear over the kept inputs."""
    return lowrank_residual_reference(x, kept, left, right)


@lowrank_residual.register_fake
def _(x, kept, left, right):
    return x.new_empty((*x.shape[:-1], left.shape[0]))


def lowrank_residual_reference(x: torch.Tensor, kept: torch.Tensor, left: torch.Tensor,
                               right: torch.Tensor) -> torch.Tensor:
    """The op's definition (also its implementation: two small matmuls in x's dtype)."""
    return ((x - kept) @ right.to(x.dtype).t()) @ left.to(x.dtype).t()
