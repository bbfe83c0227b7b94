"""``lowbit::`` custom ops: schema, fake (meta) implementation, float reference.

``lowbit::wo_linear(x, qweight, scale, zero, bias, fmt, in_features)`` is the weight-only
quantized linear for every :class:`~lowbit_compiler.formats.WeightFormat` (``fmt`` is its key):
``y = x @ dequantize(qweight, scale, zero)[:, :in_features].T + bias``.

Implementations:

* :func:`wo_linear_reference`: dequantise to float32, one float32 matmul, cast to x's dtype. It
  defines the op's numerics; every fast path is tested against it.
* The op's own CPU kernel (what eager code and the offline flow run) calls the fast CPU kernels in
  ``lowbit_compiler.backends.cpu_kernels`` and uses the reference where they do not apply. The
  backend chooses explicitly per node at lowering time instead (see ``backends/lowering.py``).
"""
from __future__ import annotations

import torch

from lowbit_compiler.formats import WeightFormat, dequantize_parts


@torch.library.custom_op("lowbit::wo_linear", mutates_args=())
def wo_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
              bias: torch.Tensor | None, fmt: str, in_features: int) -> torch.Tensor:
    from lowbit_compiler.backends import cpu_kernels

    out = cpu_kernels.wo_linear_fast(x, qweight, scale, zero, bias, fmt, in_features)
    if out is None:
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
    """Float reference: dequantise, matmul in float32, cast back to x.dtype."""
    w = dequantize_parts(WeightFormat.parse(fmt), qweight, scale, zero)[:, :in_features]
    out = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
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


@torch.library.custom_op("lowbit::w8a8_linear", mutates_args=())
def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """int8 weights [N, K] (per-channel ``scale`` [N]) x int8 activations quantized per token at run
    time: ``y = (q(x) @ qweight.T) * x_scale * scale + bias`` with integer accumulation
    (``torch._int_mm`` on CPU)."""
    xq, x_scale = quantize_per_token(x)
    shape = x.shape
    acc = torch._int_mm(xq.reshape(-1, shape[-1]), qweight.t()).reshape(*shape[:-1], -1)
    out = acc.float() * x_scale * scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@w8a8_linear.register_fake
def _(x, qweight, scale, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of the last dimension: (codes, scale [..., 1] float32); an all-zero
    row gets scale 1 (codes 0), so nothing divides by zero."""
    xf = x.float()
    x_scale = xf.abs().amax(-1, keepdim=True) / 127.0
    x_scale = torch.where(x_scale > 0, x_scale, torch.ones_like(x_scale))
    return torch.round(xf / x_scale).clamp(-127, 127).to(torch.int8), x_scale


def w8a8_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """Float64 reference of ``lowbit::w8a8_linear`` (exact integer products, then the scales)."""
    xq, x_scale = quantize_per_token(x)
    out = (xq.double() @ qweight.double().t()) * x_scale.double() * scale.double()
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)
