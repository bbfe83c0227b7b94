"""Generated CPU kernel for activation-sparse decode: a GEMV that reads only the weight rows of the
inputs a threshold kept (TEAL / CATS / WINA, ``lowbit::sparse_input_linear``).

Why a K-major copy: in our storage (``formats.py``) a weight is [N, K], so the K codes one input
multiplies are spread over N rows; skipping an input saves nothing there. The kernel reads a
transposed copy made once per weight (cached by identity, like ``cpu_kernels.prepack``): codes
[K, N] (int8) or [K, N/2] (int4, two columns per byte), scales and zero points [groups, N] in
float32 (bf16 -> float32 is exact). Input ``k`` is one contiguous row; a zero input is a row never
fetched. This is TEAL's column-major GEMV, with low-bit codes and their scales fused in.

Layout of an int4 row: the columns are cut in tiles of ``TILE`` (the last one may be shorter);
within a tile of width ``w``, byte ``j`` holds column ``j`` in its low nibble and column
``w/2 + j`` in its high nibble, so both halves accumulate with unit stride (the loops vectorise).

The computation, per output tile (threads over tiles) and per group ``g`` with a kept input:
``acc[n] = sum_{k in g, x_k != 0} x_k q[k, n]``, then ``y[n] += s[g, n] (acc[n] - z[g, n] sum_g x)``
(int8: one group, ``z = 0``). Groups whose inputs were all zeroed are skipped whole.

One row only (decode); more rows return None and the caller runs the dense kernels on the
thresholded input. Compiled like ``cpu_codegen`` (``cpu_codegen.build``: gcc at first use, disk
cache, logged fallback); ``LOWBIT_CPU_CODEGEN=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import os

import torch

from lowbit_compiler.backends import cpu_codegen
from lowbit_compiler.formats import WeightFormat, _unpack
from lowbit_compiler.identity_cache import IdentityCache

TILE = 512  # output columns per task: a row segment of 512 bytes (int8) or 256 bytes (int4)

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* x [K] float32 (already thresholded); codes K-major; scale, zero float32 [groups, N] (zero may be
   NULL: int8); idx int64 scratch [K + groups + 1]; xs float32 scratch [groups]. */
void {name}(const float* x, const {code_t}* codes, const float* scale, const float* zero,
            const float* bias, float* y, int64_t* idx, float* xs, int64_t N, int64_t K, int threads)
{{
    const int64_t G = {group}, groups = K / G, row = {row_bytes};
    int64_t* gstart = idx + K;
    int64_t nnz = 0;
    for (int64_t g = 0; g < groups; g++) {{  /* the kept inputs, in order, and where each group begins */
        float t = 0.0f;
        gstart[g] = nnz;
        for (int64_t k = g * G; k < (g + 1) * G; k++)
            if (x[k] != 0.0f) {{
                idx[nnz++] = k;
                t += x[k];
            }}
        xs[g] = t;
    }}
    gstart[groups] = nnz;
    const int64_t tiles = (N + {tile} - 1) / {tile};
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {{
        const int64_t n0 = t * {tile}, w = (N - n0 < {tile}) ? N - n0 : {tile};
        float out[{tile}], acc[{tile}];
        memset(out, 0, sizeof out);
        for (int64_t g = 0; g < groups; g++) {{
            if (gstart[g] == gstart[g + 1])
                continue;  /* every input of the group zeroed: its rows are never read */
            memset(acc, 0, sizeof acc);
            int64_t p = gstart[g];
            for (; p + 4 <= gstart[g + 1]; p += 4) {{  /* four kept rows per pass over acc: 4 FMAs per load/store */
                const float x0 = x[idx[p]], x1 = x[idx[p + 1]], x2 = x[idx[p + 2]], x3 = x[idx[p + 3]];
                const {code_t}* r0 = codes + idx[p] * row + {tile_offset};
                const {code_t}* r1 = codes + idx[p + 1] * row + {tile_offset};
                const {code_t}* r2 = codes + idx[p + 2] * row + {tile_offset};
                const {code_t}* r3 = codes + idx[p + 3] * row + {tile_offset};
{inner4}
            }}
            for (; p < gstart[g + 1]; p++) {{
                const float xv = x[idx[p]];
                const {code_t}* r = codes + idx[p] * row + {tile_offset};
{inner}
            }}
            const float* s = scale + g * N + n0;
            const float xg = xs[g];
            if (zero) {{
                const float* z = zero + g * N + n0;
                #pragma omp simd
                for (int64_t j = 0; j < w; j++)
                    out[j] += s[j] * (acc[j] - z[j] * xg);
            }} else {{
                #pragma omp simd
                for (int64_t j = 0; j < w; j++)
                    out[j] += s[j] * acc[j];
            }}
        }}
        for (int64_t j = 0; j < w; j++)
            y[n0 + j] = out[j] + (bias ? bias[n0 + j] : 0.0f);
    }}
}}
"""

_INNER_INT8 = """                #pragma omp simd
                for (int64_t j = 0; j < w; j++)
                    acc[j] += xv * (float)r[j];"""

_INNER4_INT8 = """                #pragma omp simd
                for (int64_t j = 0; j < w; j++)
                    acc[j] += x0 * (float)r0[j] + x1 * (float)r1[j] + x2 * (float)r2[j] + x3 * (float)r3[j];"""

_INNER4_INT4 = """                const int64_t h = w / 2;
                #pragma omp simd
                for (int64_t j = 0; j < h; j++) {
                    acc[j] += x0 * (float)(r0[j] & 15) + x1 * (float)(r1[j] & 15) + x2 * (float)(r2[j] & 15)
                              + x3 * (float)(r3[j] & 15);
                    acc[h + j] += x0 * (float)(r0[j] >> 4) + x1 * (float)(r1[j] >> 4) + x2 * (float)(r2[j] >> 4)
                                  + x3 * (float)(r3[j] >> 4);
                }"""

_INNER_INT4 = """                const int64_t h = w / 2;
                #pragma omp simd
                for (int64_t j = 0; j < h; j++) {
                    acc[j] += xv * (float)(r[j] & 15);
                    acc[h + j] += xv * (float)(r[j] >> 4);
                }"""


def supported(fmt: str) -> str | None:
    """Why the activation-sparse kernel does not take ``fmt`` (None: it does)."""
    f = WeightFormat.parse(fmt)
    if f.kind == "int" and (f.bits == 8 or (f.bits == 4 and f.group_size is not None)):
        return None
    return f"format {fmt}: the activation-sparse CPU kernel exists for int8 and int4 group-wise weights"


def kernel_name(fmt: str) -> str:
    return "lowbit_cpu_sparse_" + fmt.replace("-", "_")


def source(fmt: str) -> str:
    """The C source of the activation-sparse GEMV for ``fmt`` (readable; see the module docstring)."""
    f = WeightFormat.parse(fmt)
    if f.bits == 8:
        fields = dict(code_t="int8_t", group="K", row_bytes="N", tile_offset="n0", inner=_INNER_INT8,
                      inner4=_INNER4_INT8)
    else:
        fields = dict(code_t="uint8_t", group=str(f.group_size), row_bytes="N / 2", tile_offset="n0 / 2",
                      inner=_INNER_INT4, inner4=_INNER4_INT4)
    return (f"/* lowbit generated CPU kernel: activation-sparse decode GEMV, {fmt} weights, K-major */\n"
            + _SOURCE.format(name=kernel_name(fmt), tile=TILE, **fields))


@functools.lru_cache(maxsize=None)
def kernel(fmt: str):
    """The compiled kernel (a ctypes function), or None (why: logged once by ``cpu_codegen``)."""
    if os.environ.get(cpu_codegen.ENV, "1") == "0" or supported(fmt) is not None:
        return None
    return cpu_codegen.build(kernel_name(fmt), source(fmt),
                             [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 2 + [ctypes.c_int],
                             what=f"the activation-sparse {fmt} kernel")


@dataclasses.dataclass
class KMajorWeight:
    """A weight's K-major copy for the activation-sparse kernel (module docstring)."""

    codes: torch.Tensor   # int8 [K, N] or uint8 [K, N/2] (tile-split nibbles)
    scale: torch.Tensor   # float32 [groups, N]
    zero: torch.Tensor | None  # float32 [groups, N] (int4), None (int8)
    out_features: int
    in_features: int


KMAJOR_CACHE = IdentityCache()


def tile_split_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[K, N] codes in [0, 15] -> [K, N/2] bytes: per tile of TILE columns (width w), low nibble =
    column j, high nibble = column w/2 + j."""
    parts = []
    for n0 in range(0, q.shape[1], TILE):
        t = q[:, n0:n0 + TILE]
        h = t.shape[1] // 2
        parts.append((t[:, :h] | (t[:, h:] << 4)).to(torch.uint8))
    return torch.cat(parts, dim=1).contiguous()


def kmajor(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: str,
           in_features: int) -> KMajorWeight:
    """The K-major copy of one quantized weight (cached by the identity of ``qweight``)."""
    def make() -> KMajorWeight:
        f = WeightFormat.parse(fmt)
        n = scale.shape[0]
        if f.bits == 8:
            return KMajorWeight(qweight.t().contiguous(), scale.float().reshape(1, n).contiguous(), None, n,
                                in_features)
        q = _unpack(qweight, 4)[:, :in_features].to(torch.int32)
        z = torch.full_like(scale, 8, dtype=torch.float32) if zero is None else zero.float()
        return KMajorWeight(tile_split_nibbles(q.t()), scale.float().t().contiguous(), z.t().contiguous(), n,
                            in_features)

    return KMAJOR_CACHE.get_or_create(qweight, ("kmajor", fmt), make)


def unsupported_reason(x: torch.Tensor, scale: torch.Tensor, fmt: str, in_features: int) -> str | None:
    """Why a call cannot take the kernel (None: it can). Not an error: the dense path runs."""
    if (why := supported(fmt)) is not None:
        return why
    rows = x.numel() // max(x.shape[-1], 1)
    if rows != 1:
        return f"{rows} rows: the activation-sparse kernel is a decode GEMV (one row); the dense kernels run"
    if x.device.type != "cpu":
        return f"x on {x.device.type}: this is the CPU kernel"
    f = WeightFormat.parse(fmt)
    if f.padded_k(in_features) != in_features:
        return f"K={in_features} is padded to the group size"
    if f.bits == 4 and scale.shape[0] % 2:
        return f"N={scale.shape[0]} is odd (int4 columns are packed in pairs)"
    if kernel(fmt) is None:
        return "the kernel did not compile (logged)"
    return None


def linear(xs: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           bias: torch.Tensor | None, fmt: str, in_features: int) -> torch.Tensor | None:
    """``xs @ dequantize(W).T + bias`` for one thresholded row, reading only the weight rows of its
    nonzero inputs; None when the kernel does not apply (:func:`unsupported_reason`)."""
    if unsupported_reason(xs, scale, fmt, in_features) is not None:
        return None
    w = kmajor(qweight, scale, zero, fmt, in_features)
    k, n = in_features, w.out_features
    groups = w.scale.shape[0]
    # every tensor whose pointer the kernel gets is held by a local until the call returns
    x32 = xs.reshape(k).to(torch.float32).contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    y = torch.empty(n, dtype=torch.float32)
    idx = torch.empty(k + groups + 1, dtype=torch.int64)
    xsum = torch.empty(groups, dtype=torch.float32)
    kernel(fmt)(x32.data_ptr(), w.codes.data_ptr(), w.scale.data_ptr(), cpu_codegen._ptr(w.zero), cpu_codegen._ptr(b),
                y.data_ptr(), idx.data_ptr(), xsum.data_ptr(), n, k, torch.get_num_threads())
    return y.reshape(*xs.shape[:-1], n).to(xs.dtype)
