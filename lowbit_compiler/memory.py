"""Giving freed memory back to the operating system.

Quantizing a model frees many float temporaries of a few MB each (``formats.CHUNK_ELEMENTS``).
glibc's allocator keeps freed blocks below its mmap threshold (raised dynamically up to 32 MB as
large blocks are freed) in the process heap, so the resident set stays high after the work is
done, and the next allocations of other sizes (packed weights, activations) grow it further.
:func:`release_freed` asks glibc to return free heap pages (``malloc_trim(0)``) once a batch of
work is over: after a quantizing pass, after lowering, at the end of ``compress``. Elsewhere
(another libc, macOS, Windows) it does nothing.

That alone left the peak to chance: with glibc's *dynamic* threshold, which blocks land in the
heap depends on the order of frees, and on a busy machine (threads scheduled differently) the
same ``compress``/``compile`` of a 4-layer model peaked at 1.56-1.61x the float model instead of
1.11-1.15x (``benchmarks/memory_cpu.py --repeat 3`` under load). :func:`pin_mmap_threshold`, run
by the pipeline before the first pass, fixes the threshold at 1 MiB (``mallopt``): every block of
1 MiB or more is its own mapping, returned to the OS when freed; the same runs then measured 1.11x
and 1.13-1.14x. The cost is a page fault per page of each such block every time it is allocated,
so once the quantizing and packing are over (the end of ``compress`` and of the backend's
compile) :func:`release_mmap_threshold` sets it to glibc's own dynamic maximum, 32 MiB (and the
trim threshold to 64 MiB, as glibc's dynamic rule does): the model's large activations are reused
from the heap again. Left pinned, it cost a 512-token prefill of the 4-layer model ~130k page
faults and ~15 % of its time, eager bf16 in the same process as much. Both are left alone when
``MALLOC_MMAP_THRESHOLD_`` is set, or with ``LOWBIT_PIN_MMAP_THRESHOLD=0``.

:func:`drop_float_weights` frees the float weights a ``torch.compile(backend="lowbit")`` model no
longer reads, for users who do not need the eager model any more.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

import torch

_LIBC: dict[str, Any] = {}  # name -> glibc's function (ctypes) or None, looked up once


def _libc_function(name: str):
    """glibc's function ``name`` (``malloc_trim``, ``mallopt``), or None (not Linux, no such
    function)."""
    if name not in _LIBC:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name, None)
            except OSError:
                fn = None
        _LIBC[name] = fn
    return _LIBC[name]


MMAP_THRESHOLD = 1 << 20  # while quantizing and packing
TRIM_THRESHOLD = 128 << 10  # glibc's default trim threshold: what quantizing runs with
RUN_MMAP_THRESHOLD = 32 << 20  # afterwards: glibc's own dynamic maximum (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)
RUN_TRIM_THRESHOLD = 64 << 20  # twice the mmap threshold, as glibc's dynamic rule sets it
_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD = -3, -1  # glibc's mallopt parameter numbers
_PINNED: list[str] = []  # the decision, made once per process: "pinned at ..." or why not
_CURRENT: list[int] = []  # [the mmap threshold this module set last] (empty: never set)


def _set(mallopt, mmap_threshold: int, trim_threshold: int) -> bool:
    """Both thresholds (the trim threshold left alone when ``MALLOC_TRIM_THRESHOLD_`` is set)."""
    import os

    if mallopt(_M_MMAP_THRESHOLD, mmap_threshold) != 1:
        return False
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    _CURRENT[:] = [mmap_threshold]
    return True


def pin_mmap_threshold() -> str:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` (trim threshold :data:`TRIM_THRESHOLD`)
    for a batch of quantizing work (the decision once per process, logged once; set again after
    each :func:`release_mmap_threshold`, with the heap trimmed so its free blocks do not serve the
    next large allocations); returns the decision ("pinned at ...", or why not)."""
    import logging
    import os

    if _PINNED:
        if _PINNED[0].startswith("pinned") and _CURRENT and _CURRENT[0] != MMAP_THRESHOLD:
            mallopt = _libc_function("mallopt")
            if mallopt is not None and _set(mallopt, MMAP_THRESHOLD, TRIM_THRESHOLD):
                release_freed()  # the heap's free blocks would serve the next large ones: back to the OS
        return _PINNED[0]
    if os.environ.get("LOWBIT_PIN_MMAP_THRESHOLD", "1") == "0":
        why = "not pinned: LOWBIT_PIN_MMAP_THRESHOLD=0"
    elif "MALLOC_MMAP_THRESHOLD_" in os.environ:
        why = "not pinned: MALLOC_MMAP_THRESHOLD_ is set in the environment (glibc uses it)"
    elif not sys.platform.startswith("linux"):
        why = f"not pinned: not glibc ({sys.platform})"
    else:
        mallopt = _libc_function("mallopt")
        ok = mallopt is not None and _set(mallopt, MMAP_THRESHOLD, TRIM_THRESHOLD)
        why = (f"pinned at {MMAP_THRESHOLD} bytes" if ok
               else "not pinned: this C library has no working mallopt (not glibc)")
    after = f", {RUN_MMAP_THRESHOLD} bytes after" if why.startswith("pinned") else ""
    logging.getLogger("lowbit_compiler").info("lowbit: glibc mmap threshold %s while quantizing (peak memory)%s",
                                              why, after)
    _PINNED.append(why)
    return why


def release_mmap_threshold() -> None:
    """After a batch of quantizing work: the mmap threshold back at glibc's dynamic maximum
    (:data:`RUN_MMAP_THRESHOLD`, trim threshold :data:`RUN_TRIM_THRESHOLD`), so that running the
    model reuses its large blocks from the heap instead of faulting in fresh pages every call.
    Does nothing unless :func:`pin_mmap_threshold` pinned it."""
    if not (_CURRENT and _CURRENT[0] == MMAP_THRESHOLD):
        return
    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        _set(mallopt, RUN_MMAP_THRESHOLD, RUN_TRIM_THRESHOLD)


def current_mmap_threshold() -> int | None:
    """The mmap threshold this module set last, or None (it never set one)."""
    return _CURRENT[0] if _CURRENT else None


def release_freed() -> bool:
    """Return the allocator's free heap pages to the OS; True when glibc's ``malloc_trim`` ran."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


def drop_float_weights(model: torch.nn.Module) -> dict[str, Any]:
    """Free the float storage of every parameter of ``model`` that ``torch.compile(model,
    backend="lowbit")`` has quantized, for a user who no longer runs the model eagerly.

    The compiled graphs read the quantized (and packed) copies only; the float weights stay in the
    model for eager calls and recompiles. This releases their memory in place
    (``untyped_storage().resize_(0)``): each parameter keeps its identity, shape and version, so
    the compiled graphs, Dynamo's guards and recompiles for new shapes (which find the quantized
    tensors in the cache by the parameter's identity) still work. Running the model eagerly, or a
    recompile that must quantize again (another recipe), raises torch's storage error instead of
    computing with missing weights. Parameters shared by several modules (tied embeddings) and
    parameters nothing quantized are kept. Returns ``{"dropped": [FQN...], "bytes_freed": n,
    "kept_tied": [FQN...]}``."""
    from lowbit_compiler.passes.quantize import common
    from lowbit_compiler.passes.quantize.rtn import QUANT_CACHE

    owners: dict[int, list[str]] = {}
    params: dict[int, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
        params[id(p)] = p
    report: dict[str, Any] = {"dropped": [], "bytes_freed": 0, "kept_tied": []}
    for key, p in params.items():
        if not (QUANT_CACHE.holds(p) or common.RESULTS.holds(p)):
            continue
        names = owners[key]
        if len({n.rpartition(".")[0] for n in names}) > 1:
            report["kept_tied"].append(names[0])
            continue
        storage = p.untyped_storage()
        if storage.nbytes() == 0:
            continue
        report["bytes_freed"] += storage.nbytes()
        storage.resize_(0)
        report["dropped"].append(names[0])
    release_freed()
    return report


HUGE_PAGE = 2 << 20  # x86-64's transparent huge page
_MADV_HUGEPAGE = 14


def advise_huge_pages(t: torch.Tensor, min_bytes: int = RUN_MMAP_THRESHOLD) -> bool:
    """Ask Linux to back the 2 MiB-aligned interior of a freshly allocated, not yet written tensor of
    at least ``min_bytes`` with transparent huge pages (``madvise(MADV_HUGEPAGE)``): a block that
    large is a fresh mapping from glibc every time (above its mmap threshold), and writing it faults
    once per 4 kB page without the hint, once per 2 MiB with it. Measured on the 512 x 32000 float32
    logits of a 512-token prefill (65 MB): allocating and writing them took 17.3 ms, 5.1 ms with the
    hint. A hint only: True when the kernel took it; False where it cannot (not Linux, THP set to
    ``never``, a small tensor), which changes nothing but the speed."""
    nbytes = t.numel() * t.element_size()
    if nbytes < min_bytes or t.device.type != "cpu" or not t.is_contiguous():
        return False
    madvise = _libc_function("madvise")
    if madvise is None:
        return False
    storage = t.untyped_storage()  # never past the memory the tensor owns
    start = (t.data_ptr() + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    end = min(t.data_ptr() + nbytes, storage.data_ptr() + storage.nbytes()) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise(start, end - start, _MADV_HUGEPAGE) == 0
