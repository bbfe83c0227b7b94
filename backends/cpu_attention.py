"""Generated CPU kernel for one decode step of float attention: RoPE on the new query and key, the
KV cache's ``cat`` of the new key and value, and ``scaled_dot_product_attention`` of the one query
token over the whole cache, in one C call.

Why: at batch-1 decode the GEMVs stream the weights through the caches, so the graph's Python and
small ops between them run cold. Per layer, Hugging Face's attention between the q/k/v call and
o_proj is two RoPE calls, two ``torch.cat`` (``DynamicCache.update``) and one SDPA call; measured
on the 8-layer decode model (hidden 2048, 16 query / 4 KV heads, ~40 cached tokens; kernels
stubbed out so only the overhead is timed) they cost ~1.1 ms of a 2.3 ms step's overhead: each cat
and SDPA call forks torch's thread pool for a few microseconds of work. ``lowering._fuse_cpu_decode_
attention`` replaces the five calls with one :func:`decode_step`: for each (sequence, KV head) one
task appends the rotated new key and the new value to that head's rows of the new keys and values
(what ``cat`` returns: the cache object keeps them), then for each query head of the group rotates
the query, takes the scaled dot products with every key, the softmax, and the weighted sum of the
values.

The new keys and values are views of the first T + 1 rows of buffers with room to grow (1.5 times
the length when made, at least 64 rows: past 43 cached tokens at most half the cache again in
memory; a cropped view keeps its whole buffer alive), so the next step,
handed exactly those views back by the cache, writes its row in place: ``cat`` copies all T cached
rows every step (per layer, O(T^2) rows over a generation; at 2048 cached tokens of the 8-layer
decode model K and V are 4 MB each, read and written per layer and step: twice the bytes the
attention itself reads). Anything else (a contiguous cache, a cropped one, a branch that already
appended to the same buffer, one tensor passed as both caches) is copied into fresh buffers, so
rows a caller can still see through an older view are never written; the row is claimed under a
lock before the kernel runs, so two threads stepping from one view cannot both append to it.
Under ``torch.inference_mode()`` views record no ``_base``: every step copies (as ``cat``).

Numerics: the new keys and values are bit for bit those of ``rope`` + ``cat`` (copies, and RoPE
compiled with ``-ffp-contract=off`` as in ``cpu_rope``); the attention output is float32 with its
own summation order (dot products in 16 lanes, one softmax pass over the scores), compared with
torch's SDPA and a float64 reference in the tests. Runs for float32 4-D tensors with one query
token, no mask, no dropout, not causal (a one-token query sees every cached token), without
autograd; anything else runs :func:`decode_step_reference`, the torch calls it replaced.
"""
from __future__ import annotations

import collections
import ctypes
import functools
import math
import threading
import weakref

import torch

from lowbit_compiler.backends import cpu_codegen, cpu_rope

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

""" + cpu_rope.ROPE_ROW + r"""
static float dot(const float* a, const float* b, int64_t n)
{
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    float s = 0.0f;
    for (int j = 0; j < 16; j++) s += acc[j];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static void copy_rows(float* dst, const float* src, int64_t rows, int64_t row_stride, int64_t D)
{
    if (row_stride == D) {
        memcpy(dst, src, (size_t)(rows * D) * sizeof(float));
        return;
    }
    for (int64_t t = 0; t < rows; t++) memcpy(dst + t * D, src + t * row_stride, (size_t)D * sizeof(float));
}

/* q [B, Hq, 1, D], k and v [B, Hkv, 1, D], cache_k and cache_v [B, Hkv, T, D], all read through
   their strides (the last dimension contiguous); cos and sin [1 or B, 1, 1, D] (NULL: no RoPE;
   csb = cos's batch stride, 0 when broadcast). Writes keys and values: rows 0 .. T of buffers
   [B, Hkv, cap, D] (cap >= T + 1; the cache's T rows copied first, unless in_place: they are
   already rows 0 .. T - 1 of those buffers), and out [B, Hq, 1, D], contiguous. Returns 0, or 1
   when a task's scratch (T + 1 + D floats; on the stack up to 4096) could not be allocated (the
   caller raises). */
int lowbit_attn_decode(const float* q, const float* k, const float* v, const float* cache_k,
                        const float* cache_v, const float* cos, const float* sin, float* keys, float* values,
                        float* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t D,
                        int64_t qsb, int64_t qsh, int64_t ksb, int64_t ksh, int64_t vsb, int64_t vsh,
                        int64_t cksb, int64_t cksh, int64_t ckst, int64_t cvsb, int64_t cvsh, int64_t cvst,
                        int64_t csb, float scale, int threads, int64_t cap, int in_place)
{
    const int64_t g = Hq / Hkv, T1 = T + 1, tasks = B * Hkv;
    int failed = 0;
    #pragma omp parallel for num_threads(threads) schedule(static) if (tasks > 1 && T1 * D * (g + 2) >= 4096)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t b = task / Hkv, h = task % Hkv;
        float* kd = keys + task * cap * D;
        float* vd = values + task * cap * D;
        if (!in_place) {
            copy_rows(kd, cache_k + b * cksb + h * cksh, T, ckst, D);
            copy_rows(vd, cache_v + b * cvsb + h * cvsh, T, cvst, D);
        }
        const float* c = cos ? cos + b * csb : NULL;
        const float* sn = sin ? sin + b * csb : NULL;
        if (c) rope_row(k + b * ksb + h * ksh, c, sn, kd + T * D, D);
        else memcpy(kd + T * D, k + b * ksb + h * ksh, (size_t)D * sizeof(float));
        memcpy(vd + T * D, v + b * vsb + h * vsh, (size_t)D * sizeof(float));
        float local[4096];
        float* scores = T1 + D <= 4096 ? local : (float*)malloc((size_t)(T1 + D) * sizeof(float));
        if (!scores) {
            #pragma omp atomic write
            failed = 1;
            continue;
        }
        float* qr = scores + T1;
        for (int64_t i = 0; i < g; i++) {
            const int64_t hq = h * g + i;
            const float* qh = q + b * qsb + hq * qsh;
            if (c) {
                rope_row(qh, c, sn, qr, D);
                qh = qr;
            }
            float m = -INFINITY;
            for (int64_t t = 0; t < T1; t++) {
                const float s = dot(qh, kd + t * D, D) * scale;
                scores[t] = s;
                m = s > m ? s : m;
            }
            float sum = 0.0f;
            for (int64_t t = 0; t < T1; t++) {
                const float e = expf(scores[t] - m);
                scores[t] = e;
                sum += e;
            }
            float* o = out + (b * Hq + hq) * D;
            for (int64_t j = 0; j < D; j++) o[j] = 0.0f;
            for (int64_t t = 0; t < T1; t++) {
                const float p = scores[t];
                const float* vt = vd + t * D;
                for (int64_t j = 0; j < D; j++) o[j] += p * vt[j];
            }
            const float inv = 1.0f / sum;
            for (int64_t j = 0; j < D; j++) o[j] *= inv;
        }
        if (scores != local) free(scores);
    }
    return failed;
}
"""

_ARGS = [ctypes.c_void_p] * 10 + [ctypes.c_int64] * 18 + [ctypes.c_float, ctypes.c_int, ctypes.c_int64, ctypes.c_int]
calls = 0  # calls that ran the C kernel (the tests count them)


def kernel():
    """The compiled kernel, or None (no compiler, or ``LOWBIT_CPU_CODEGEN=0``: the reference runs;
    why logged once)."""
    return None if cpu_codegen.kernel_disabled() else _build()


@functools.lru_cache(maxsize=None)
def _build():
    fn = cpu_codegen.build(argtypes=_ARGS, fallback="decode attention runs as torch's rope, cat and SDPA calls",
                           what="the decode attention kernel", **build_spec())
    if fn is not None:
        fn.restype = ctypes.c_int
    return fn


def build_spec() -> dict:
    """The source arguments of the decode attention kernel (``cpu_codegen.prebuild``)."""
    return {"name": "lowbit_attn_decode", "text": _SOURCE, "extra_flags": ("-ffp-contract=off",)}


def decode_step_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
                          cache_v: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                          scale: float | None, enable_gqa: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The calls the kernel replaces, as the graph had them: RoPE on q and k (when ``cos`` is
    given), the cache's two cats, SDPA without mask. Returns (keys, values, attention output)."""
    if cos is not None:
        q, k = cpu_rope.rope(q, cos, sin), cpu_rope.rope(k, cos, sin)
    keys, values = torch.cat([cache_k, k], dim=-2), torch.cat([cache_v, v], dim=-2)
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=enable_gqa)
    return keys, values, out


def fits(q, k, v, cache_k, cache_v, cos, sin, enable_gqa) -> bool:
    """What the kernel needs that stays the same across a graph's calls: float32 4-D CPU tensors,
    one query token, whole KV-head groups (GQA only with ``enable_gqa``), k and v of one token,
    caches of the same batch, heads and head size (their lengths are the call's business), cos/sin
    ``[1 or B, 1, 1, D]`` with D even. The lowering checks it on a graph's example values (the
    caches' lengths symbolic there), an unchecked call on its tensors."""
    tensors = [q, k, v, cache_k, cache_v] + ([] if cos is None else [cos, sin])
    if any(t.dtype != torch.float32 or t.dim() != 4 or t.device.type != "cpu" for t in tensors):
        return False
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    if any(not isinstance(x, int) for x in (b, hq, s, d, hkv)):
        return False
    if s != 1 or d == 0 or hkv == 0 or hq % hkv or (hq != hkv and not enable_gqa):
        return False
    if tuple(k.shape) != (b, hkv, 1, d) or tuple(v.shape) != (b, hkv, 1, d):
        return False
    if any(tuple(c.shape[:2]) != (b, hkv) or c.shape[3] != d for c in (cache_k, cache_v)):
        return False
    return cos is None or not (d % 2 or tuple(cos.shape) != tuple(sin.shape) or cos.shape[0] not in (1, b)
                               or tuple(cos.shape[1:]) != (1, 1, d))


def _runs(qs, ks, vs, cks, cvs, cache_k, cache_v, cos, sin) -> bool:
    """What can change between a graph's calls: every row contiguous (``qs`` ... ``cvs``: the
    strides of q, k, v and the caches), the two caches of one length, cos and sin laid out alike."""
    return (qs[3] == 1 and ks[3] == 1 and vs[3] == 1 and cks[3] == 1 and cvs[3] == 1
            and cache_k.shape[2] == cache_v.shape[2]
            and (cos is None or (cos.stride(3) == 1 and cos.stride() == sin.stride())))


def decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                cos: torch.Tensor | None, sin: torch.Tensor | None, scale: float | None,
                enable_gqa: bool, checked: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step's attention (see the module doc): ``(keys, values, out)`` where ``keys =
    cat([cache_k, rope(k)], -2)``, ``values = cat([cache_v, v], -2)`` and ``out =
    SDPA(rope(q), keys, values, scale=scale, enable_gqa=enable_gqa)``; ``cos=None``: no RoPE. The C
    kernel for float32 one-token queries, :func:`decode_step_reference` otherwise.

    ``checked=True``: the caller has established :func:`fits` and that no autograd is needed (the
    lowering does, on the graph's example values, which Dynamo's guards hold the inputs to), so
    the call checks only what :func:`_runs` checks: ~1 us of Python where the whole check costs
    ~9 (the call runs between cold GEMVs, see the module doc)."""
    global calls
    qs, ks, vs, cks, cvs = q.stride(), k.stride(), v.stride(), cache_k.stride(), cache_v.stride()
    ok = (checked or (fits(q, k, v, cache_k, cache_v, cos, sin, enable_gqa) and not (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, cache_k, cache_v, cos, sin))))) \
        and _runs(qs, ks, vs, cks, cvs, cache_k, cache_v, cos, sin)
    fn = kernel() if ok else None
    if fn is None:
        return decode_step_reference(q, k, v, cache_k, cache_v, cos, sin, scale, enable_gqa)
    b, hq, _, d = q.shape
    hkv, t = k.shape[1], cache_k.shape[2]
    in_place = False
    if grow_in_place:
        with _CLAIM:  # claim row t of both buffers before the kernel runs (it releases the GIL)
            kbuf, vbuf = _grown(cache_k, t), _grown(cache_v, t)
            # one buffer for keys and values (a model that appends both to one past) is not two caches
            in_place = kbuf is not None and vbuf is not None and kbuf is not vbuf and kbuf.shape[2] == vbuf.shape[2]
            if in_place:
                _fill(kbuf, t + 1)
                _fill(vbuf, t + 1)
    if not in_place:  # a fresh pair of buffers with room to grow: the next steps append in place
        cap = max(_MIN_CAPACITY, (t + 1) * 3 // 2) if grow_in_place else t + 1  # 1.5x: a copy every ~T/3 steps
        kbuf = torch.empty(b, hkv, cap, d, dtype=torch.float32, device="cpu")
        vbuf = torch.empty(b, hkv, cap, d, dtype=torch.float32, device="cpu")
        with _CLAIM:
            _fill(kbuf, t + 1)
            _fill(vbuf, t + 1)
    out = torch.empty(b, hq, 1, d, dtype=torch.float32, device="cpu")
    calls += 1
    if fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), cache_k.data_ptr(), cache_v.data_ptr(),
          None if cos is None else cos.data_ptr(), None if sin is None else sin.data_ptr(),
          kbuf.data_ptr(), vbuf.data_ptr(), out.data_ptr(), b, hq, hkv, t, d, qs[0], qs[1], ks[0], ks[1],
          vs[0], vs[1], cks[0], cks[1], cks[2], cvs[0], cvs[1], cvs[2],
          0 if cos is None or cos.shape[0] == 1 else cos.stride(0), 1.0 / math.sqrt(d) if scale is None else scale,
          torch.get_num_threads(), kbuf.shape[2], int(in_place)):
        raise MemoryError(f"lowbit decode attention: no memory for the scores of {t + 1} cached tokens")
    appended_in_place[in_place] += 1
    return kbuf[:, :, : t + 1], vbuf[:, :, : t + 1], out


# Growable caches (module docstring): id(buffer) -> [weak reference, rows filled]. A view keeps its
# buffer alive (its ``_base``), and the entry goes with the buffer.
_FILLED: dict[int, list] = {}
_CLAIM = threading.Lock()  # _grown and _fill of one step together: two threads never claim one row
_MIN_CAPACITY = 64
grow_in_place = True  # False: exact-size copies every step, as ``cat`` (benchmarks/long_context_cpu.py compares)
appended_in_place: collections.Counter = collections.Counter()  # True: appended in place, False: copied


def _fill(buffer: torch.Tensor, rows: int) -> None:
    entry = _FILLED.get(id(buffer))
    if entry is None or entry[0]() is not buffer:
        key = id(buffer)
        entry = _FILLED[key] = [weakref.ref(buffer, lambda _, key=key: _FILLED.pop(key, None)), rows]
    entry[1] = rows


def _grown(cache: torch.Tensor, t: int) -> torch.Tensor | None:
    """The buffer ``cache`` is the filled head of, when its next row can be written in place."""
    base = cache._base
    entry = None if base is None else _FILLED.get(id(base))
    if entry is None or entry[0]() is not base or entry[1] != t or t + 1 > base.shape[2]:
        return None
    if (cache.data_ptr() != base.data_ptr() or cache.stride() != base.stride()
            or cache.shape[:2] != base.shape[:2] or cache.shape[3] != base.shape[3]):
        return None
    return base
