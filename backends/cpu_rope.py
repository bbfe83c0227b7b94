"""Generated CPU kernel for rotary position embedding in Hugging Face's ``rotate_half`` form:
``x * cos + cat(-x[..., D/2:], x[..., :D/2]) * sin`` on one tensor of queries or keys.

Why: at batch-1 decode on the CPU the GEMVs stream the weights through the caches, so the graph's
Python between them runs cold; the seven torch calls of this expression (two slices, a negation, a
cat, two multiplies, an add) for q and again for k were 14 of the ~35 calls between a layer's q/k/v
and o_proj calls. ``lowering._fuse_cpu_rope`` replaces each matched expression with one call of
:func:`rope`: one C loop over the rows (x read through its strides: the q/k views of the fused
q/k/v output), compiled at first use by ``cpu_codegen.build`` (disk cache, logged fallback).

Exact: compiled with ``-ffp-contract=off``, each element is ``fl(fl(x c) + fl(r s))``, what torch's
multiply, multiply and add give (the tests compare bit for bit). Anything but float32 4-D
``[B, H, S, D]`` rows with ``cos``/``sin`` of shape ``[1 or B, 1, S, D]`` (and without autograd)
runs :func:`rope_reference`, the expression itself.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from lowbit_compiler.backends import cpu_codegen

# One row, shared with the decode attention kernel (cpu_attention): o = x * c + rotate_half(x) * sn,
# with no fused multiply-add (compiled -ffp-contract=off): each value rounds as torch's mul, mul, add.
ROPE_ROW = r"""
static void rope_row(const float* x, const float* c, const float* sn, float* o, int64_t D)
{
    const int64_t h2 = D / 2;
    for (int64_t j = 0; j < h2; j++) {
        const float p = x[j] * c[j];
        const float q = -x[j + h2] * sn[j];
        o[j] = p + q;
    }
    for (int64_t j = h2; j < D; j++) {
        const float p = x[j] * c[j];
        const float q = x[j - h2] * sn[j];
        o[j] = p + q;
    }
}
"""

_SOURCE = r"""
#include <stdint.h>
""" + ROPE_ROW + r"""
/* out[b, h, s, :] = rope_row(x[b, h, s, :]) with the rows cos[b or 0, s, :], sin[b or 0, s, :];
   x through its strides (elements; the last dimension contiguous), out contiguous [B, H, S, D]. */
void lowbit_rope(const float* x, const float* cos, const float* sin, float* out,
                 int64_t B, int64_t H, int64_t S, int64_t D, int64_t xsb, int64_t xsh, int64_t xss,
                 int64_t csb, int64_t css, int threads)
{
    const int64_t rows = B * H * S;
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows * D >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t b = r / (H * S), h = (r / S) % H, s = r % S;
        rope_row(x + b * xsb + h * xsh + s * xss, cos + b * csb + s * css, sin + b * csb + s * css, out + r * D, D);
    }
}
"""

_ARGS = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 9 + [ctypes.c_int]
calls = 0  # calls that ran the C kernel (the tests count them)


def kernel():
    """The compiled kernel, or None (no compiler, or ``LOWBIT_CPU_CODEGEN=0``: the reference runs;
    why logged once)."""
    return None if cpu_codegen.kernel_disabled() else _build()


@functools.lru_cache(maxsize=None)
def _build():
    return cpu_codegen.build(argtypes=_ARGS, fallback="the rotary embedding runs as torch ops", what="the RoPE kernel",
                             **build_spec())


def build_spec() -> dict:
    """The source arguments of the RoPE kernel (``cpu_codegen.prebuild``)."""
    return {"name": "lowbit_rope", "text": _SOURCE, "extra_flags": ("-ffp-contract=off",)}


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The expression the kernel replaces, as the model wrote it."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (x ``[B, H, S, D]``; cos, sin ``[1 or B, 1, S, D]``): the
    C kernel for float32 inference calls, :func:`rope_reference` otherwise."""
    global calls
    if x.dim() != 4 or cos.dim() != 4 or x.dtype != torch.float32 or cos.dtype != torch.float32 \
            or sin.dtype != torch.float32 \
            or (torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad)):
        return rope_reference(x, cos, sin)
    b, h, s, d = x.shape
    if (d % 2 or x.stride(-1) != 1 or cos.shape != sin.shape or cos.stride() != sin.stride()
            or cos.shape[0] not in (1, b) or cos.shape[1] != 1 or cos.shape[2:] != (s, d) or cos.stride(-1) != 1):
        return rope_reference(x, cos, sin)
    fn = kernel()
    if fn is None:
        return rope_reference(x, cos, sin)
    out = torch.empty(b, h, s, d, dtype=torch.float32)
    calls += 1
    fn(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), b, h, s, d, x.stride(0), x.stride(1),
       x.stride(2), cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(2), torch.get_num_threads())
    return out
