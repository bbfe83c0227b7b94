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
