"""Fast CPU kernels for ``lowbit::wo_linear``: our generated kernels, torch's packed low-bit
matmuls, and dequantize-then-matmul, whichever is fastest for the call.

Which one runs (:func:`packed_linear`): ``cpu_dispatch.choose`` decides per (format, N, K, row
class, compute dtype) by timing the candidates on this host at the first call of the class
(cached on disk; ``LOWBIT_CPU_DISPATCH=measure|generated|torch|dequant|gemm``; see
``backends/cpu_dispatch.py`` and docs/codegen.md): the generated C kernel of
``backends/cpu_codegen.py`` for calls of at most ``cpu_codegen.MAX_ROWS`` rows whose format it
covers (int8; int4 and NF4 with groups a multiple of 16; K not padded), reading the quantized
tensors as stored, float32 activations and accumulation; torch's packed kernels (int8 and int4,
any rows; the only choice without a compiler or with ``LOWBIT_CPU_CODEGEN=0``); for more rows, the
generated blocked GEMM (AVX512_BF16) or the weight dequantized in blocks by a generated kernel and
multiplied by a dense bf16 or float32 matmul. NF4 has no torch kernel: where neither generated kernel can run a call (no compiler) the
float reference runs, logged, counted and in the layer record (:func:`reference_linear`).
int3 and int2 group-wise weights (no torch kernel) run the generated lookup-table kernel of
``backends/cpu_lut.py`` for calls of at most ``MAX_ROWS`` rows, the dispatch above (as NF4: the
generated GEMM or dequantize-then-matmul; without a compiler the float reference, reported).

* int8 per-channel: ``aten._weight_int8pack_mm(x[M, K], w int8 [N, K], scale[N])``.
* int4 group-wise: ``aten._weight_int4pack_mm_for_cpu(x[M, K], packed, group, scales_and_zeros)``
  where ``scales_and_zeros[K/g, N, 2]`` holds ``(s, (8 - z) * s)`` in the compute dtype, so that
  ``(q - 8) * s + (8 - z) * s == (q - z) * s`` reproduces our format exactly; N is padded to a
  multiple of 16 with zero rows.

These kernels are fast with bf16 activations and slow with fp32 ones, so by default an fp32
activation is cast to bf16 at the linear's boundary (``compute_dtype="bfloat16"``; the backend
option ``cpu_compute_dtype="activation"`` keeps fp32 for accuracy studies).

Packed weights are cached by the identity of the quantized tensor they come from; the quantized
tensors themselves are cached per parameter (``passes/quantize.py``), so every graph of a model
(prefill, decode, recompiles) shares one packed copy.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable

import torch

from lowbit_compiler.backends import cpu_codegen, cpu_dispatch, cpu_lut, cpu_quantize
from lowbit_compiler.formats import CHUNK_ELEMENTS, WeightFormat
from lowbit_compiler.identity_cache import IdentityCache

_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "activation": None}


class PackedWeight(torch.nn.Module):
    """A quantized weight in the layout of torch's CPU kernel for one compute dtype.

    A module (holding two buffers) so that lowered graphs can reference it with ``get_attr``.
    The int4 layout of torch's kernel is a second copy of the codes (plus a scale-and-zero table in
    the compute dtype); when the generated kernel covers the format it serves only the calls the
    dispatch gives to torch's kernel, so it is built at the first such call (``torch_layout``),
    not when the weight is packed, and freed again when it was built only to be timed
    (``drop_torch_layout``): a model whose calls all go to other kernels never holds it.
    """

    def __init__(self, fmt: str, weight: torch.Tensor | None, scales: torch.Tensor | None, out_features: int,
                 in_features: int, padded_in_features: int,
                 quantized: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
                 make_layout: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None):
        super().__init__()
        self.fmt = fmt
        # the quantized tensors as stored (not copies; not buffers, so not in the state dict): the
        # generated kernels read them directly for decode-sized calls
        self.quantized = quantized
        self.register_buffer("weight", weight)   # int8 [N, Kp] or the int4pack layout (None until built)
        self.register_buffer("scales", scales)   # int8: [N]; int4: scales_and_zeros [Kp/g, Np, 2]
        self._make_layout = make_layout
        self._bound: dict[tuple, "cpu_codegen.Bound | None"] = {}  # (int8 activations?, isa, split8) -> bound
        self._dispatch: dict[tuple, str] = {}  # (rows, compute dtype, environment) -> kernel (cpu_dispatch.choose)
        self._fast: dict[tuple, Any] = {}  # (rows, compute dtype, environment) -> bound float kernel, or False
        self.out_features, self.in_features, self.padded_in_features = out_features, in_features, padded_in_features

    def forget_choices(self) -> None:
        """Drop the per-(rows, environment) kernel choices and the bound fast paths made from them
        (the next call asks ``cpu_dispatch.choose`` again: its plans, in memory and on disk, stay)."""
        self._dispatch.clear()
        self._fast.clear()

    def torch_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, scales) in torch's packed-kernel layout, built at the first call that needs it."""
        if self.weight is None and self._make_layout is None:
            raise RuntimeError(f"lowbit: torch has no packed CPU kernel for {self.fmt} (cpu_dispatch never picks it)")
        if self.weight is None:
            self.weight, self.scales = self._make_layout()
        return self.weight, self.scales

    def drop_torch_layout(self) -> None:
        """Free torch's int4 layout again (the dispatch built it only to time torch's kernel, and
        chose another); rebuilt by :meth:`torch_layout` if a later call needs it. int8 weights
        keep theirs: it is the quantized tensor itself."""
        if self._make_layout is not None:
            self.weight = self.scales = None

    def generated(self, int8_activations: bool = False) -> "cpu_codegen.Bound | None":
        """This weight bound to its generated kernel (bound at the first call, kept), or None
        (no kernel: torch's runs). ``LOWBIT_CPU_CODEGEN=0`` is still read at every call;
        ``int8_activations`` picks the opt-in int4 kernel with int8 activations where it exists."""
        if cpu_codegen.kernel_disabled():
            return None
        if int8_activations and cpu_codegen.supported(self.fmt + cpu_codegen.A8) is not None:
            int8_activations = False
        key = (int8_activations, cpu_codegen.isa_choice(), cpu_codegen.split8_enabled())
        bound = self._bound.get(key, False)
        if bound is False:
            bound = self._bound[key] = cpu_codegen.bind(*self.quantized, self.fmt, self.in_features,
                                                        int8_activations=int8_activations, isa=key[1])
        return bound

    def extra_repr(self) -> str:
        built = ("" if self.weight is not None else ", torch layout not built" if self._make_layout is not None
                 else ", no torch kernel")
        return f"{self.fmt}, in_features={self.in_features}, out_features={self.out_features}{built}"


# quantized tensor -> {compute dtype: PackedWeight}; .misses counts real repacking
PACK_CACHE = IdentityCache()


def unsupported_reason(x_dtype: torch.dtype, device: torch.device, fmt: str) -> str | None:
    """Why the fast CPU kernel cannot run this call, or None when it can."""
    if device.type != "cpu":
        return f"device {device} is not the CPU"
    if x_dtype not in _FAST_DTYPES:
        return f"activation dtype {x_dtype} has no packed CPU kernel (use float32/bfloat16/float16)"
    f = WeightFormat.parse(fmt)
    if f.kind == "nf4" and f.group_size is not None:
        return None  # no torch kernel: cpu_dispatch runs the generated ones (or the float reference, saying why)
    if f.kind == "int" and f.bits in (2, 3) and f.group_size is not None:
        return None  # likewise (decode-sized calls: packed_linear / wo_linear_fast run cpu_lut's kernel)
    if not (f.kind == "int" and f.bits in (8, 4)):
        return f"format {fmt} has no packed CPU kernel (torch has int8 and int4 ones)"
    return None


def generated_kernel(fmt: str, in_features: int) -> str | None:
    """The name of the generated kernel that runs decode-sized calls of this weight, or None
    (torch's packed kernel runs every call)."""
    if cpu_codegen.kernel(fmt) is None or WeightFormat.parse(fmt).padded_k(in_features) != in_features:
        return None
    return cpu_codegen.kernel_name(fmt)


def compute_dtype_for(x_dtype: torch.dtype, policy: str = "bfloat16") -> torch.dtype:
    if policy not in COMPUTE_DTYPES:
        raise ValueError(f"cpu_compute_dtype={policy!r}; expected one of {sorted(COMPUTE_DTYPES)}")
    wanted = COMPUTE_DTYPES[policy]
    return wanted if (wanted is not None and x_dtype == torch.float32) else x_dtype


def prepack(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: str,
            in_features: int, dtype: torch.dtype) -> PackedWeight:
    """The packed form of one quantized weight for compute dtype ``dtype`` (cached by identity)."""
    return PACK_CACHE.get_or_create(qweight, (fmt, dtype), lambda: _pack(qweight, scale, zero, fmt, in_features, dtype))


def _pack(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: str,
          in_features: int, dtype: torch.dtype) -> PackedWeight:
    f = WeightFormat.parse(fmt)
    n = scale.shape[0]
    if f.kind == "nf4":  # no torch kernel, so no torch layout: the generated kernels read the codes as stored
        return PackedWeight(fmt, None, None, n, in_features, qweight.shape[1] * 2, (qweight, scale, zero))
    if f.kind == "int" and f.bits in (2, 3):  # likewise (the GEMM and the dequantizer read the bit stream)
        return PackedWeight(fmt, None, None, n, in_features, qweight.shape[1] * 8 // f.bits, (qweight, scale, zero))
    if f.kind == "sparse":  # N:M: the generated kernel reads the compressed storage; other calls: dense_copy_packed
        return PackedWeight(fmt, None, None, n, in_features, in_features, (qweight, scale, zero))
    if f.bits == 8:
        packed = PackedWeight(fmt, qweight.contiguous(), scale.to(dtype), n, in_features, in_features,
                              (qweight, scale, zero))
    else:
        kp = qweight.shape[1] * 2
        np_ = (n + 15) // 16 * 16

        def make_layout() -> tuple[torch.Tensor, torch.Tensor]:
            s = scale.float()
            z = torch.full_like(s, 8) if zero is None else zero.float()
            if np_ != n:  # zero rows: their outputs are sliced away
                s = torch.nn.functional.pad(s, (0, 0, 0, np_ - n))
                z = torch.nn.functional.pad(z, (0, 0, 0, np_ - n), value=8)
            scales_and_zeros = torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1).contiguous().to(dtype)
            return _int4pack_rows(qweight, np_), scales_and_zeros

        lazy = generated_kernel(fmt, in_features) is not None  # else every call needs torch's layout
        weight, scales = (None, None) if lazy else make_layout()
        packed = PackedWeight(fmt, weight, scales, n, in_features, kp, (qweight, scale, zero), make_layout)
    return packed


def prebuild(formats: list[str], attention: bool = True) -> list[str]:
    """Start compiling, in the background, the generated CPU kernels a compile for the CPU with
    weights of ``formats`` asks for (:func:`prebuild_specs`; ``cpu_codegen.prebuild``: disk cache
    only, one compiler per core). Returns the names started (none with a warm cache)."""
    return cpu_codegen.prebuild(prebuild_specs(formats, attention))


def prebuild_specs(formats: list[str], attention: bool = True) -> list[dict]:
    """The libraries a compile for the CPU with weights of ``formats`` loads, as
    ``cpu_codegen.build`` source arguments: the quantizer, each format's decode kernel (int3 /
    int2: the lookup-table kernel; N:M: also its dense format's), the dequantizer / GEMM library
    and the dispatch's cache flush,
    and (``attention``) RoPE and decode attention. Best effort: an unknown format or a bad
    ``LOWBIT_CPU_ISA`` gives none (the call that needs the kernel reports it)."""
    from lowbit_compiler.backends import cpu_attention, cpu_rope

    try:
        isa, split8 = cpu_codegen.isa_choice(), cpu_codegen.split8_enabled()
        parsed = [WeightFormat.parse(f) for f in formats]
        parsed += [f.dense_format for f in parsed if f.kind == "sparse"]  # N:M: the dense kernels over its copy
    except (ValueError, KeyError):
        return []
    specs = []
    if any(cpu_quantize.supported(f) is None for f in parsed) and os.environ.get(cpu_quantize.ENV, "1") != "0":
        specs.append(cpu_quantize.build_spec())
    for f in parsed:
        if cpu_codegen.supported(f.key) is None:
            specs.append(cpu_codegen.kernel_spec(f.key, isa, split8))
        elif cpu_lut.supported(f.key) is None:
            specs.append(cpu_lut.build_spec(f.key, "native"))
    if any(cpu_dispatch.dequant_covers(f.key) for f in parsed):
        specs += [cpu_dispatch.dequant_spec(isa), cpu_dispatch.flush_spec()]
    if attention:
        specs += [cpu_rope.build_spec(), cpu_attention.build_spec()]
    return specs


def _int4pack_rows(qweight: torch.Tensor, padded_n: int) -> torch.Tensor:
    """torch's int4pack layout of packed int4 codes [N, Kp/2], padded with code-8 rows to
    ``padded_n``: the generated repacker (``cpu_quantize.int4pack``: one pass over the packed codes,
    its layout checked against torch's converter once per process), else torch's converter. That
    one wants int32 codes (4 bytes per weight: a 32000 x 2048 head would need a 262 MB temporary),
    so it runs on slices of rows: a multiple of 64 rows per slice keeps the layout's row blocks
    whole, so the result is the same bytes as converting at once."""
    n, half = qweight.shape
    if (fast := cpu_quantize.int4pack(qweight, 2 * half, padded_n)) is not None:
        return fast
    rows = max(64, (CHUNK_ELEMENTS // max(2 * half, 1)) // 64 * 64)
    out = None
    for start in range(0, padded_n, rows):
        stop = min(padded_n, start + rows)
        q = cpu_quantize.unpack_codes(qweight[start:min(stop, n)], 4, torch.int32)  # C, one pass (torch fallback)
        if q.shape[0] != stop - start:  # zero rows past N: their outputs are sliced away
            q = torch.nn.functional.pad(q, (0, 0, 0, stop - start - q.shape[0]), value=8)
        part = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        if start == 0 and stop == padded_n:
            return part
        if out is None:  # allocated once (pieces joined by torch.cat would fragment the heap)
            out = part.new_empty((padded_n, *part.shape[1:]))
        out[start:stop] = part
    return out


def packed_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None,
                  compute_dtype: torch.dtype, norm_weight: torch.Tensor | None = None, eps: float | None = None,
                  residual: torch.Tensor | None = None, threshold: torch.Tensor | None = None,
                  col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Run a prepacked weight by the kernel ``cpu_dispatch.choose`` picks for this many rows on this
    host (measured at the first call of each row class, cached; ``LOWBIT_CPU_DISPATCH``): the
    generated kernel (float32), torch's packed kernel (casts x to the compute dtype and back, pads
    K, slices N) or dequantize-then-matmul.

    With ``norm_weight`` the call is ``linear(rms_norm(x, (K,), norm_weight, eps))`` and with
    ``residual`` it returns ``residual + linear(...)`` (the CPU fusion groups' prologue and epilogue,
    folded in by ``lowering._fuse_cpu_prologues``); with ``threshold`` (and ``col_scale``) the input
    is ``lowbit::act_sparsify``'d after the norm (an activation-sparse layer whose sparse kernel
    does not pay: ``cpu_sparse``). The generated kernel's ``_ext`` entry does all of it in the call,
    the generated GEMM (``gemm_bf16``, more rows) the norm and the add; every other kernel, and the
    GEMM with a threshold, runs them in torch around it (what the graph did before); a threshold on
    a row that is not float32 too (the op compares in x's dtype, the kernel in float32)."""
    if threshold is not None and x.dtype != torch.float32:
        x, norm_weight, threshold, col_scale = _prologue(x, norm_weight, eps, threshold, col_scale), None, None, None
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if 0 < rows <= cpu_codegen.MAX_ROWS and _lut_format(packed.fmt):  # int3/int2: the lookup-table kernel (as
        xs = _prologue(x, norm_weight, eps, threshold, col_scale)    # wo_linear_fast: stacked experts, N:M copies)
        y = cpu_lut.linear(xs.reshape(rows, xs.shape[-1]), *packed.quantized, bias, packed.fmt, packed.in_features)
        if y is not None:
            y = y.view(*x.shape[:-1], packed.out_features).to(x.dtype)
            return y if residual is None else residual + y
    if 0 < rows <= cpu_codegen.MAX_ROWS:  # decode: the bound kernel, decided once per (rows, environment)
        env = cpu_dispatch.env_key()
        bound = packed._fast.get((rows, compute_dtype, env))
        if bound is None:
            bound = packed._fast[(rows, compute_dtype, env)] = _fast_bound(packed, rows, compute_dtype, env)
        if bound:
            x2 = x.reshape(rows, x.shape[-1])
            if norm_weight is None and residual is None and threshold is None:
                y = bound(x2, bias)
            else:
                y = bound.ext(x2, bias, norm_weight, eps,
                              None if residual is None else residual.reshape(rows, packed.out_features),
                              threshold, col_scale)
            if y is not None:
                cpu_dispatch.counter[(packed.fmt, "generated")] += 1
                y = y.view(*x.shape[:-1], packed.out_features)
                return y if x.dtype == torch.float32 else y.to(x.dtype)
    choice = cpu_dispatch.choose(packed, rows, compute_dtype)
    if norm_weight is None and residual is None and threshold is None:
        return run_candidate(choice, x, packed, bias, compute_dtype)
    if choice == "gemm_bf16" and threshold is None:  # the norm in the GEMM's packing, the residual in its store
        y = _gemm([packed], x, (bias,), norm_weight, eps, residual)
        if y is not None:
            return y[0]
    y = run_candidate(choice, _prologue(x, norm_weight, eps, threshold, col_scale), packed, bias, compute_dtype)
    return y if residual is None else residual + y


@functools.lru_cache(maxsize=None)
def _lut_format(fmt: str) -> bool:
    """int3 / int2 group-wise: decode-sized calls run ``cpu_lut``'s lookup-table kernel."""
    return cpu_lut.supported(fmt) is None


def _prologue(x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float | None,
              threshold: torch.Tensor | None, col_scale: torch.Tensor | None) -> torch.Tensor:
    """The ``_ext`` entries' prologue in torch: ``rms_norm``, then ``lowbit::act_sparsify``."""
    if norm_weight is not None:
        x = torch.nn.functional.rms_norm(x, (x.shape[-1],), norm_weight, eps)
    if threshold is not None:
        from lowbit_compiler import ops
        x = ops.act_sparsify_reference(x, threshold, col_scale)
    return x


def _generated_chosen(members, rows: int, compute_dtype: torch.dtype, env: tuple) -> bool:
    """Whether the dispatch gives a call of ``rows`` rows on every one of these weights to the
    generated float kernel (int8 activations check x per call, so they never take the memo)."""
    return (not cpu_codegen.int8_activations_enabled()
            and all(cpu_dispatch.choose(m, rows, compute_dtype, env) == "generated" for m in members))


def _fast_bound(packed: PackedWeight, rows: int, compute_dtype: torch.dtype, env: tuple) -> Any:
    """The bound float kernel a decode call of ``rows`` rows takes when the dispatch chose the
    generated kernel, else False (torch's kernel, int8 activations, no kernel): what
    ``packed_linear`` memoises so that a decode call skips the dispatch's per-call Python. The
    call runs cold (the kernels before it streamed the caches empty), so every avoided step
    counts: ~30 -> ~10 us of Python per call. It is also the only path to the ``_ext`` entry:
    without one (None from ``Bound.ext``) the norm and the add run in torch around the kernel."""
    return (_generated_chosen([packed], rows, compute_dtype, env) and packed.generated()) or False


def run_candidate(name: str, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None,
                  compute_dtype: torch.dtype) -> torch.Tensor:
    """One call by the kernel ``name`` (``cpu_dispatch.CANDIDATES``); a kernel that cannot take
    the call (no generated kernel, too many rows, no dequantization kernel) gives torch's."""
    out_dtype = x.dtype
    lead = x.shape[:-1]
    if name == "generated" and x.numel() <= cpu_codegen.MAX_ROWS * x.shape[-1]:
        bound = packed.generated(cpu_codegen.int8_activations_enabled() and bool(torch.isfinite(x).all()))
        if bound is not None:
            cpu_dispatch.counter[(packed.fmt, name)] += 1
            y = bound(x.reshape(-1, x.shape[-1]), bias)
            return y.view(*lead, packed.out_features) if out_dtype == torch.float32 else \
                y.view(*lead, packed.out_features).to(out_dtype)
    elif name == "dense_copy":  # an N:M weight: the dense format's kernels over its decompressed copy
        return packed_linear(x, dense_copy_packed(*packed.quantized, packed.fmt, packed.in_features, compute_dtype),
                             bias, compute_dtype)
    elif name == "gemm_bf16":
        y = _gemm([packed], x, (bias,), None, None)
        if y is not None:
            return y[0]
    elif name in ("dequant_bf16", "dequant_fp32"):
        dtype = torch.bfloat16 if name == "dequant_bf16" else torch.float32
        y = cpu_dispatch.dequant_linear(x.reshape(-1, x.shape[-1]), *packed.quantized, bias, packed.fmt,
                                        packed.in_features, dtype, out_dtype)
        if y is not None:
            cpu_dispatch.counter[(packed.fmt, name)] += 1
            return y.view(*lead, packed.out_features)
    if not cpu_dispatch.has_torch_kernel(packed.fmt):  # NF4: the float reference, logged and counted
        return reference_linear(x, packed, bias)
    cpu_dispatch.counter[(packed.fmt, "torch")] += 1
    return torch_packed_linear(x, packed, bias, compute_dtype)


def dense_copy_packed(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: str,
                      in_features: int, compute_dtype: torch.dtype) -> PackedWeight:
    """The packed dense copy of an N:M weight (``cpu_sparse.dense_copy``: the same matrix in the
    format's ``dense_format``, 1 byte per weight more for int8, built at the first call that needs it
    and cached): what runs the calls the generated N:M kernel does not take (more than ``MAX_ROWS``
    rows, a format it does not cover, the plan's dense choice, no kernel), in the dispatch, the eager op and the
    CPU lowering alike."""
    from lowbit_compiler.backends import cpu_sparse

    d = cpu_sparse.dense_copy(qweight, scale, fmt, in_features, zero)
    return prepack(d.qweight, d.scale, d.zero, d.format.key, in_features, compute_dtype)


def reference_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """The op's float reference for a weight no kernel here can run (a format without a torch
    kernel whose generated kernels are unavailable or do not cover the call): a warning once per
    reason and a count per call (``lowbit_compiler.fallback_counter``), like the eager op's."""
    from lowbit_compiler import ops

    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    ops.eager_fallback("lowbit::wo_linear", packed.fmt, cpu_dispatch.reference_reason(packed, rows))
    cpu_dispatch.counter[(packed.fmt, "reference")] += 1
    return ops.wo_linear_reference(x, *packed.quantized, bias, packed.fmt, packed.in_features)


class FusedWeights(torch.nn.Module):
    """Several packed weights of one input run as one generated call (a CPU fusion group, made by
    ``lowering._fuse_cpu_groups``): q/k/v side by side (``epilogue=0``) or a gated MLP's gate and up
    with ``silu(gate) * up`` (``cpu_codegen.SILU_MUL``). A module so lowered graphs hold it with
    ``get_attr``; the bound group is made at the first decode-sized call and kept."""

    def __init__(self, members: list[PackedWeight], epilogue: int = 0):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.sizes = [m.out_features for m in members]
        self.epilogue = epilogue
        self._bound: dict[tuple, "cpu_codegen.BoundGroup | None"] = {}  # (isa, split8) -> bound group
        self._fast: dict[tuple, Any] = {}  # (rows, compute dtype, environment) -> bound group, or False

    def bound(self) -> "cpu_codegen.BoundGroup | None":
        if cpu_codegen.kernel_disabled():
            return None
        isa = cpu_codegen.isa_choice()
        key = (isa, cpu_codegen.split8_enabled())
        if key not in self._bound:
            parts = [m.generated() for m in self.members]
            self._bound[key] = (None if any(p is None for p in parts)
                                else cpu_codegen.bind_group(parts, self.epilogue, isa=isa))
        return self._bound[key]

    def extra_repr(self) -> str:
        what = "silu(gate) * up" if self.epilogue == cpu_codegen.SILU_MUL else "outputs side by side"
        return f"{len(self.members)} weights of one input, {what}"


def fused_linear(x: torch.Tensor, fused: FusedWeights, biases: tuple, compute_dtype: torch.dtype,
                 norm_weight: torch.Tensor | None = None, eps: float | None = None,
                 threshold: torch.Tensor | None = None, col_scale: torch.Tensor | None = None):
    """A CPU fusion group: one generated call for decode-sized inputs (float32), one call of the
    generated GEMM for larger ones where the dispatch chose it for a member (:func:`_group_gemm`),
    else each weight by ``packed_linear`` and the epilogue in torch (what the graph did before
    fusing). Returns the tensor (SiLU * mul) or a tuple of outputs (side by side). With
    ``norm_weight`` the group reads ``rms_norm(x, (K,), norm_weight, eps)``, with ``threshold`` (and
    ``col_scale``) that
    ``lowbit::act_sparsify``'d: done once inside the generated call (its ``_ext`` entry), or by
    torch before the members run one by one (and for a row that is not float32, as in
    :func:`packed_linear`)."""
    if threshold is not None and x.dtype != torch.float32:
        x, norm_weight, threshold, col_scale = _prologue(x, norm_weight, eps, threshold, col_scale), None, None, None
    lead = x.shape[:-1]
    silu_mul = fused.epilogue == cpu_codegen.SILU_MUL
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    bound = None
    if 0 < rows <= cpu_codegen.MAX_ROWS:  # the bound group, decided once per (rows, environment)
        env = cpu_dispatch.env_key()
        bound = fused._fast.get((rows, compute_dtype, env))
        if bound is None:
            bound = fused._fast[(rows, compute_dtype, env)] = (
                _generated_chosen(fused.members, rows, compute_dtype, env) and fused.bound()) or False
    if bound:
        x2 = x.reshape(rows, x.shape[-1])
        y = (bound(x2, biases) if norm_weight is None and threshold is None
             else bound.ext(x2, biases, norm_weight, eps, threshold, col_scale))
        if y is not None:
            if x.dtype != torch.float32:
                y = y.to(x.dtype)
            if silu_mul:
                return y.view(*lead, y.shape[-1])
            return tuple(t.view(*lead, t.shape[-1]) for t in y.split(fused.sizes, dim=1))
    if rows > cpu_codegen.MAX_ROWS and threshold is None and _group_gemm(fused.members, rows, compute_dtype):
        y = _gemm(fused.members, x, biases, norm_weight, eps, silu_mul=silu_mul)
        if y is not None:  # one packing of x (with the norm) for every member, SiLU * mul in the store
            return y[0] if silu_mul else tuple(y)
    x = _prologue(x, norm_weight, eps, threshold, col_scale)
    outs = [packed_linear(x, m, b, compute_dtype) for m, b in zip(fused.members, biases)]
    return torch.nn.functional.silu(outs[0]) * outs[1] if silu_mul else tuple(outs)


def _group_gemm(members: list[PackedWeight], rows: int, compute_dtype: torch.dtype) -> bool:
    """Whether a fusion group's call of ``rows`` rows runs as one ``gemm_bf16`` call: the plan gave
    the GEMM to a member and every member can take it. A member whose plan chose dequantize + bf16
    matmul by a hair (k/v, 512 x 2048: 3.2 against 3.3 ms, within the timing's noise) would
    otherwise send the whole group back to separate calls with the norm and the epilogue in torch;
    the GEMM computes the same bf16 products of the same rounded operands."""
    choices = [cpu_dispatch.choose(m, rows, compute_dtype) for m in members]
    return "gemm_bf16" in choices and all(
        c == "gemm_bf16" or "gemm_bf16" in cpu_dispatch.candidates(m, rows, compute_dtype)
        for m, c in zip(members, choices))


def _gemm(members: list[PackedWeight], x: torch.Tensor, biases: tuple, norm_weight: torch.Tensor | None,
          eps: float | None, residual: torch.Tensor | None = None, silu_mul: bool = False) -> list | None:
    """The dispatch's ``gemm_bf16`` choice for a call with the fusion groups' prologue (RMSNorm,
    while x is packed) and epilogues (residual, SiLU * mul: in the store), outputs in x's dtype and
    shape; None when the members' formats differ or the kernel is not there (the caller runs them in
    torch around the kernels)."""
    if len({m.fmt for m in members}) != 1 or len({m.in_features for m in members}) != 1:
        return None
    lead = x.shape[:-1]
    # the dtype torch's residual + y would have (bf16 rows, a float32 residual: float32)
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = cpu_dispatch.gemm_group(x.reshape(-1, x.shape[-1]), [(*m.quantized, b) for m, b in zip(members, biases)],
                                  members[0].fmt, members[0].in_features, out_dtype, norm_weight, eps, residual,
                                  silu_mul)
    if out is None:
        return None
    for m in members:
        cpu_dispatch.counter[(m.fmt, "gemm_bf16")] += 1
    return [y.view(*lead, y.shape[-1]) for y in out]


def torch_packed_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None,
                        compute_dtype: torch.dtype) -> torch.Tensor:
    """torch's packed kernel for any number of rows (casts x to the compute dtype and back, pads
    K, slices N)."""
    out_dtype = x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype).contiguous()  # the packed kernels need rows (Mamba's
    # x_proj input is a transposed view)
    if packed.padded_in_features != packed.in_features:
        x2 = torch.nn.functional.pad(x2, (0, packed.padded_in_features - packed.in_features))
    weight, scales = packed.torch_layout()
    if packed.fmt == "int8":
        y = torch.ops.aten._weight_int8pack_mm(x2, weight, scales)
    else:
        group = WeightFormat.parse(packed.fmt).group_size
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight, group, scales)
        if y.shape[-1] != packed.out_features:
            y = y[:, : packed.out_features]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, packed.out_features).to(out_dtype)


# The policy eager calls of lowbit::wo_linear use (compressed models outside torch.compile);
# change it for a block with `eager_compute_dtype("activation")`.
_EAGER_POLICY = ["bfloat16"]


@contextlib.contextmanager
def eager_compute_dtype(policy: str):
    """Within the block, eager ``lowbit::wo_linear`` calls compute with ``policy`` (e.g. the accuracy
    harness measures formats with fp32 activations: ``"activation"``)."""
    if policy not in COMPUTE_DTYPES:
        raise ValueError(f"policy={policy!r}; expected one of {sorted(COMPUTE_DTYPES)}")
    _EAGER_POLICY.append(policy)
    try:
        yield
    finally:
        _EAGER_POLICY.pop()


def wo_linear_fast(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor | None, bias: torch.Tensor | None, fmt: str,
                   in_features: int, policy: str | None = None) -> torch.Tensor | None:
    """The fast path for one call, or None when it does not apply (the caller uses the reference)."""
    if WeightFormat.parse(fmt).kind == "sparse":
        return sparse_linear_fast(x, qweight, scale, zero, bias, fmt, in_features, policy)
    if cpu_lut.supported(fmt) is None and x.numel() <= cpu_codegen.MAX_ROWS * x.shape[-1]:
        # int3/int2: the lookup-table kernel for decode-sized calls (larger ones: the dispatch below)
        y = cpu_lut.linear(x.reshape(-1, x.shape[-1]), qweight, scale, zero, bias, fmt, in_features)
        return None if y is None else y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)
    if unsupported_reason(x.dtype, x.device, fmt) is not None:
        return None
    dtype = compute_dtype_for(x.dtype, policy or _EAGER_POLICY[-1])
    return packed_linear(x, prepack(qweight, scale, zero, fmt, in_features, dtype), bias, dtype)


def sparse_reason(x_dtype: torch.dtype, device: torch.device, rows: int, fmt: str) -> str | None:
    """Why the generated kernel over N:M compressed weights (``cpu_codegen``: 2:4 + int8 / int4, decode
    sizes) cannot run this call, or None when it can."""
    from lowbit_compiler.backends import cpu_codegen

    if device.type != "cpu" or x_dtype not in _FAST_DTYPES:
        return f"{x_dtype} activations on {device}: the sparse kernel takes float32/bfloat16/float16 on the CPU"
    if (why := cpu_codegen.supported(fmt)) is not None:
        return why
    if rows > cpu_codegen.MAX_ROWS:
        return f"{rows} rows: the sparse kernel is for decode sizes (M <= {cpu_codegen.MAX_ROWS})"
    return None


def sparse_linear_fast(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                       bias: torch.Tensor | None, fmt: str, in_features: int,
                       policy: str | None = None) -> torch.Tensor | None:
    """``lowbit::wo_linear`` over an N:M sparse format: the generated kernel that reads only the kept
    values and their indices (float32 accumulation) where it takes the call and the measured plan
    gives it the call; else the dense format's kernels over the decompressed copy (built once,
    cached: 1 byte per weight more for int8; the reason logged once per shape), as the CPU lowering
    does: prefill rows, a format it does not cover, a refused weight. None (the caller runs the reference)
    only where no dense kernel takes the call either."""
    from lowbit_compiler.backends import cpu_codegen

    from lowbit_compiler.backends import cpu_sparse

    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    dense_fmt = WeightFormat.parse(fmt).dense_format.key
    if unsupported_reason(x.dtype, x.device, dense_fmt) is not None:
        return None  # (before building a copy: no dense kernel would take the call either)
    why = sparse_reason(x.dtype, x.device, x2.shape[0], fmt)
    if why is None and cpu_sparse.use_nm_kernel(qweight, scale, fmt, in_features, x2.shape[0], zero):  # measured
        y = cpu_codegen.linear(x2, qweight, scale, zero, bias, fmt, in_features)
        if y is not None:
            return y.reshape(*lead, y.shape[-1]).to(x.dtype)
        why = "the N:M kernel did not bind this weight (logged)"
    if why is not None:  # (the plan's own choice logged itself)
        cpu_sparse._note_dense(fmt, scale.shape[0], in_features, x2.shape[0], f"{why}; the dense {dense_fmt} "
                               "kernels run over a decompressed copy")
    dtype = compute_dtype_for(x.dtype, policy or _EAGER_POLICY[-1])
    return packed_linear(x, dense_copy_packed(qweight, scale, zero, fmt, in_features, dtype), bias, dtype)


class PackedExperts(torch.nn.Module):
    """Stacked expert weights (``lowbit::grouped_linear``), each expert packed for torch's CPU
    kernel like one ``wo_linear`` weight."""

    def __init__(self, experts: list[PackedWeight]):
        super().__init__()
        self.experts = torch.nn.ModuleList(experts)
        self.out_features = experts[0].out_features if experts else 0

    def extra_repr(self) -> str:
        return f"{len(self.experts)} experts"


def prepack_experts(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: str,
                    in_features: int, dtype: torch.dtype) -> PackedExperts:
    """Every expert of a stacked quantized weight ([E, ...]) packed for compute dtype ``dtype``;
    cached by the identity of the stacked tensor (slicing ``qweight[e]`` makes a new tensor per
    call, so the per-expert packs are made once here, not per call)."""
    def make() -> PackedExperts:
        return PackedExperts([_pack(qweight[e], scale[e], None if zero is None else zero[e], fmt, in_features, dtype)
                              for e in range(qweight.shape[0])])

    return PACK_CACHE.get_or_create(qweight, ("experts", fmt, dtype), make)


def packed_grouped_linear(x: torch.Tensor, offs: torch.Tensor, packed: PackedExperts,
                          compute_dtype: torch.dtype) -> torch.Tensor:
    """``lowbit::grouped_linear`` on prepacked experts: each expert's packed kernel on the rows
    routed to it (``x`` sorted by expert, ``offs`` cumulative counts); experts without rows cost
    nothing, rows past ``offs[-1]`` are zero."""
    from lowbit_compiler.ops import expert_bounds

    out = x.new_zeros((x.shape[0], packed.out_features))
    for e, s, t in expert_bounds(offs, x.shape[0]):
        out[s:t] = packed_linear(x[s:t], packed.experts[e], None, compute_dtype)
    return out
