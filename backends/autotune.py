"""The autotune hook: pick a kernel's tiling by timing candidates on the device.

Off unless ``options={"autotune": True}`` *and* a CUDA device runs the kernels: on CPU the kernels
run under the interpreter, whose timings say nothing about a GPU. Tiling is part of the
:class:`~lowbit_compiler.backends.codegen.KernelSpec`, so each candidate is its own cached kernel
and the chosen spec's grid and byte model stay exact. Choices are cached per (spec, N, K, M).
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from lowbit_compiler.backends import codegen, kernel_cache

log = logging.getLogger("lowbit_compiler")
_chosen: dict[tuple, codegen.KernelSpec] = {}


def candidates(spec: codegen.KernelSpec) -> list[codegen.KernelSpec]:
    """Tilings worth timing for ``spec`` (BLOCK_K stays: it is the int4 group size)."""
    if spec.fma:  # BLOCK_M stays: all rows in one program
        grid = [(spec.block_m, bn, w) for bn in (8, 16, 32, 64) for w in (2, 4, 8)]
    elif spec.variant == "gemv":  # tl.dot needs 16 columns or more (split_k stays: chosen per shape)
        grid = [(spec.block_m, bn, w) for bn in (16, 32, 64) for w in (4, 8)]
    else:
        grid = [(bm, bn, w) for bm in (16, 32, 64, 128) for bn in (32, 64, 128) for w in (4, 8)]
    return [dataclasses.replace(spec, block_m=bm, block_n=bn, num_warps=w) for bm, bn, w in grid]


def unavailable_reason(interpret: bool) -> str | None:
    if interpret:
        return "autotune is off under the Triton interpreter (its timings say nothing about a GPU)"
    if not torch.cuda.is_available():
        return "autotune needs a CUDA device"
    return None


def tune(spec: codegen.KernelSpec, example_args: list, rows: int, n: int, k: int) -> codegen.KernelSpec:
    """The fastest candidate for these shapes (timed with ``triton.testing.do_bench``)."""
    key = (spec, n, k, rows)
    if key in _chosen:
        return _chosen[key]
    from triton.testing import do_bench

    timings = []
    for candidate in candidates(spec):
        launch = kernel_cache.get_kernel(candidate, interpret=False).launch
        try:
            timings.append((do_bench(lambda: launch(*example_args)), candidate))
        except Exception as e:  # a tiling the device cannot run (shared memory, registers)
            log.info("lowbit autotune: %s skipped: %s", candidate.name, e)
    best = min(timings, key=lambda t: t[0])[1] if timings else spec
    _chosen[key] = best
    return best
