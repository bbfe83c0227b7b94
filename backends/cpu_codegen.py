"""Generated CPU kernels: low-bit matmuls for decode-sized batches, as C compiled at first use.

torch's packed int4 CPU kernel is compute-bound at batch 1 (it reaches about 40 % of the memory
bandwidth floor), and its int8 one converts the activation to bf16. For M <= ``MAX_ROWS`` rows a
weight-streaming kernel does better: each weight byte is read once, unpacked in registers and
multiplied against every row of ``x`` (float32 accumulation), threads over output channels.

One kernel per weight format (``int8``; ``int4_g{G}_{sym,asym}``), written from a template
(:func:`source`), compiled by the system C compiler (the one Inductor's CPU backend needs) with
``-O3 -march=native -fopenmp``: the compiler vectorises the inner loops for the machine's ISA
(AVX-512, AVX2 or SSE; the host's flags are part of the cache key), cached on disk under
``$LOWBIT_CACHE_DIR/cpu`` by a hash of source, compiler and flags, loaded with ``ctypes``.
Without a compiler (or when compiling fails) :func:`kernel` returns None, logs why once, and
torch's packed kernels run.

Layouts are our storage formats (``formats.py``): the generated kernels read the quantized
tensors as ``compress`` and the passes wrote them, so they need no repacked copy.

Which kernel runs (``cpu_kernels.packed_linear``): the generated one for ``M <= MAX_ROWS`` rows,
torch's packed kernels above (prefill), measured by ``benchmarks/decode_cpu.py`` and
``benchmarks/cpu_gemv.py``. ``LOWBIT_CPU_CODEGEN=0`` turns generated kernels off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import torch

from lowbit_compiler.formats import WeightFormat

log = logging.getLogger("lowbit_compiler")

MAX_ROWS = 16  # decode and small batches; larger M goes to torch's packed kernels
ENV = "LOWBIT_CPU_CODEGEN"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")

_PRELUDE = r"""
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
"""

# int4 group-wise: codes uint8 [N, K/2] (code k at bits [4k, 4k + 4) of the row: low nibble = even
# k), scale bf16 [N, K/G], zero uint8 [N, K/G] (asymmetric) or none (symmetric: codes centred on 8).
# x is split once per call into its even and odd columns (so the inner loop is unit-stride and
# vectorises: sum_j lo_j * x_even_j + hi_j * x_odd_j), and each group's sum of x is computed once,
# so that a group contributes s * (sum q x - z * sum x) without a subtraction per weight.
_INT4 = r"""
void {name}(const float* x, const uint8_t* codes, const uint16_t* scale, const uint8_t* zero,
            const float* bias, float* y, float* scratch, int64_t M, int64_t N, int64_t K, int threads)
{{
    const int64_t G = {group}, half = K / 2, groups = K / G;
    float* xe = scratch;                  /* [M, K/2] even columns of x */
    float* xo = scratch + M * half;       /* [M, K/2] odd columns */
    float* xs = scratch + 2 * M * half;   /* [M, K/G] sum of x over each group */
    for (int64_t m = 0; m < M; m++) {{
        for (int64_t j = 0; j < half; j++) {{
            xe[m * half + j] = x[m * K + 2 * j];
            xo[m * half + j] = x[m * K + 2 * j + 1];
        }}
        for (int64_t g = 0; g < groups; g++) {{
            float t = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k++)
                t += x[m * K + k];
            xs[m * groups + g] = t;
        }}
    }}
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {{
        float acc[{max_rows}] = {{0}};
        const uint8_t* row = codes + n * half;
        for (int64_t g = 0; g < groups; g++) {{
            const float s = bf16_to_f32(scale[n * groups + g]);
            const float z = {zero_expr};
            const uint8_t* b = row + g * (G / 2);
            if (M == 1) {{  /* decode: convert and multiply in one pass */
                float d = 0.0f;
                #pragma omp simd reduction(+:d)
                for (int64_t j = 0; j < G / 2; j++)
                    d += (float)(b[j] & 15) * xe[g * (G / 2) + j] + (float)(b[j] >> 4) * xo[g * (G / 2) + j];
                acc[0] += s * (d - z * xs[g]);
                continue;
            }}
            float lo[G / 2], hi[G / 2];  /* several rows: convert the group's codes once */
            #pragma omp simd
            for (int64_t j = 0; j < G / 2; j++) {{
                lo[j] = (float)(b[j] & 15);
                hi[j] = (float)(b[j] >> 4);
            }}
            for (int64_t m = 0; m < M; m++) {{
                const float* e = xe + m * half + g * (G / 2);
                const float* o = xo + m * half + g * (G / 2);
                float d = 0.0f;
                #pragma omp simd reduction(+:d)
                for (int64_t j = 0; j < G / 2; j++)
                    d += lo[j] * e[j] + hi[j] * o[j];
                acc[m] += s * (d - z * xs[m * groups + g]);
            }}
        }}
        for (int64_t m = 0; m < M; m++)
            y[m * N + n] = acc[m] + (bias ? bias[n] : 0.0f);
    }}
}}
"""

# int8 per channel: codes int8 [N, K], scale bf16 [N]
_INT8 = r"""
void {name}(const float* x, const int8_t* codes, const uint16_t* scale, const uint8_t* zero,
            const float* bias, float* y, float* scratch, int64_t M, int64_t N, int64_t K, int threads)
{{
    (void)zero; (void)scratch;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {{
        const int8_t* w = codes + n * K;
        const float s = bf16_to_f32(scale[n]);
        float d[{max_rows}] = {{0}};
        for (int64_t k0 = 0; k0 < K; k0 += 256) {{  /* a block of the row converted once for all rows */
            const int64_t k1 = k0 + 256 < K ? k0 + 256 : K;
            float wf[256];
            #pragma omp simd
            for (int64_t k = k0; k < k1; k++)
                wf[k - k0] = (float)w[k];
            for (int64_t m = 0; m < M; m++) {{
                const float* xm = x + m * K;
                float t = 0.0f;
                #pragma omp simd reduction(+:t)
                for (int64_t k = k0; k < k1; k++)
                    t += wf[k - k0] * xm[k];
                d[m] += t;
            }}
        }}
        for (int64_t m = 0; m < M; m++)
            y[m * N + n] = s * d[m] + (bias ? bias[n] : 0.0f);
    }}
}}
"""


def supported(fmt: str) -> str | None:
    """Why no generated CPU kernel exists for ``fmt`` (None: one does)."""
    f = WeightFormat.parse(fmt)
    if f.kind == "int" and f.bits == 8:
        return None
    if f.kind == "int" and f.bits == 4 and f.group_size is not None:
        return None
    return f"format {fmt}: generated CPU kernels exist for int8 and int4 group-wise weights"


def kernel_name(fmt: str) -> str:
    return "lowbit_cpu_" + fmt.replace("-", "_")


def source(fmt: str) -> str:
    """The C source of the kernel for ``fmt`` (readable; dumped beside the Triton kernels)."""
    f = WeightFormat.parse(fmt)
    name = kernel_name(fmt)
    if f.bits == 8:
        body = _INT8.format(name=name, max_rows=MAX_ROWS)
    else:
        body = _INT4.format(name=name, group=f.group_size, max_rows=MAX_ROWS,
                            zero_expr="(float)zero[n * groups + g]" if f.has_zero_points else "8.0f")
    return f"/* lowbit generated CPU kernel: {fmt} weights, float32 rows (M <= {MAX_ROWS}) */\n" + _PRELUDE + body


def _cache_dir() -> pathlib.Path:
    from lowbit_compiler.backends.kernel_cache import cache_dir

    path = cache_dir() / "cpu"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")


_disabled_reason: list[str] = []


@functools.lru_cache(maxsize=None)
def kernel(fmt: str):
    """The compiled kernel for ``fmt`` (a ctypes function), or None (reason logged once)."""
    if os.environ.get(ENV, "1") == "0":
        return None
    why = supported(fmt)
    if why is not None:
        return None
    return build(kernel_name(fmt), source(fmt), [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 3 + [ctypes.c_int],
                 "torch's packed CPU kernels run instead")


def build(name: str, text: str, argtypes: list, fallback: str) -> "ctypes._CFuncPtr | None":
    """Compile ``text`` (C defining the function ``name``) at first use, cached on disk by a hash
    of source, compiler and host flags; the ctypes function, or None (why logged once, naming
    ``fallback``: what runs instead)."""
    compiler = _compiler()
    if compiler is None:
        _note(f"no C compiler on PATH (gcc/cc/clang, or $CC); {fallback}")
        return None
    key = hashlib.sha256("\n".join([text, compiler, " ".join(FLAGS), platform.machine(), _host_flags()])
                         .encode()).hexdigest()[:20]
    lib = _cache_dir() / f"{name}_{key}.so"
    if not lib.exists():
        with tempfile.TemporaryDirectory() as tmp:
            src = pathlib.Path(tmp) / "kernel.c"
            src.write_text(text)
            out = pathlib.Path(tmp) / "kernel.so"
            result = subprocess.run([compiler, *FLAGS, str(src), "-o", str(out)], capture_output=True, text=True)
            if result.returncode != 0:
                _note(f"compiling {name} with {compiler} failed ({result.stderr.strip()[:300]}); {fallback}")
                return None
            os.replace(out, lib)  # atomic: concurrent processes never load a half-written library
    fn = getattr(ctypes.CDLL(str(lib)), name)
    fn.restype = None
    fn.argtypes = argtypes
    return fn


def _note(reason: str) -> None:
    if reason not in _disabled_reason:
        _disabled_reason.append(reason)
        log.warning("lowbit: generated CPU kernels unavailable: %s", reason)


@functools.lru_cache(maxsize=1)
def _host_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return " ".join(sorted(set(line.split(":", 1)[1].split())))
    except OSError:
        pass
    return platform.processor()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           bias: torch.Tensor | None, fmt: str, in_features: int) -> torch.Tensor | None:
    """``x[M, K] @ dequantize(W).T + bias`` in float32 by the generated kernel, or None when it
    does not apply (no kernel, too many rows, padded K): the caller runs torch's kernels."""
    fn = kernel(fmt)
    rows = x.shape[0]
    if fn is None or rows > MAX_ROWS or qweight.device.type != "cpu":
        return None
    k = in_features
    f = WeightFormat.parse(fmt)
    if f.padded_k(k) != k:
        return None
    if scale.dtype != torch.bfloat16:
        return None
    n = scale.shape[0]
    # every tensor whose pointer the kernel gets is held by a local until the call returns
    x32 = x.to(torch.float32).contiguous()
    codes, scales = qweight.contiguous(), scale.contiguous().view(torch.int16)
    zeros = None if zero is None else zero.contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    y = torch.empty(rows, n, dtype=torch.float32)
    groups = k // (f.group_size or k)
    scratch = torch.empty(rows * (k + groups) if codes.dtype == torch.uint8 else 1, dtype=torch.float32)
    fn(x32.data_ptr(), codes.data_ptr(), scales.data_ptr(), _ptr(zeros), _ptr(b), y.data_ptr(), scratch.data_ptr(),
       rows, n, k, torch.get_num_threads())
    return y
