"""Code generation: one Triton kernel per fusion group, rendered from a template.

A :class:`KernelSpec` is everything a kernel is specialised on (weight format, group size, shape
class and tiling, dtypes, the fused prologue and epilogue ops). :func:`render` turns a spec into a
Python file in the style of Triton's matrix-multiplication tutorial:

* ``<name>_kernel``: the ``@triton.jit`` kernel -- arguments grouped by role, a ``# ----`` header
  over each block, explicit masks, every load upcast to float32 (or int32 for codes) right after
  it (bf16 arithmetic is wrong under the interpreter, and fp32 accumulation is what we want);
* ``<name>``: the launcher -- checks shapes, allocates the output, launches;
* ``reference``: the same computation in float32 torch (the weight dequantised by
  ``lowbit_compiler.formats.dequantize_parts``, the one reference dequantiser);
* ``__main__``: a self-check of the kernel against the reference on random inputs.

Two shape classes (chosen per graph from the row count M, static or symbolic):

* ``gemv`` (M <= 16 static rows, decode): all rows in one program per output tile (the weights are
  streamed once) and K split across programs so a call launches >= 4 x 132 programs; each split
  adds its partial sums into a workspace with atomics and the last one runs the epilogue. Up to 4
  rows: FMAs into a ``[BLOCK_M, BLOCK_N, BLOCK_K]`` register tile reduced over K once after the
  loop; 5-16 rows: one 16-row ``tl.dot`` tile;
* ``gemm`` (prefill): ``BLOCK_M x BLOCK_N`` tiles with ``tl.dot`` (float32 operands use
  ``input_precision="ieee"`` under the interpreter and ``"tf32"`` on a GPU; fp16/bf16 models feed
  ``tl.dot`` in their own dtype on a GPU).

Norm statistics and per-token activation scales come from ``<name>_stats``, one program per row,
once per call. Grid and traffic are sympy expressions of the symbolic row count ``M`` (N and K are fixed per
layer), so one generator serves static and dynamic shapes: see :func:`grid` and :func:`traffic`.

Extending the generator (a new fused op): register the op in ``backends/fusion.py``
(``register_elementwise`` for epilogue ops, ``PROLOGUES`` for ops feeding the matmul), and, for a
new prologue or weight format, add its block here (``_stats_kernel``/``_activation_block`` or
``_weight_block``). docs/codegen.md walks through one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import re
import textwrap
from typing import Any

import sympy
import torch
import torch.fx as fx
from sympy.printing.pycode import PythonCodePrinter

from lowbit_compiler import _dynamo_adapter
from lowbit_compiler.formats import SCALE_DTYPE, WeightFormat
from lowbit_compiler.ops import ACTIVATION_MAX
from lowbit_compiler.backends import fusion

# Row count of the activations: the only symbolic size (N and K are fixed per layer).
M = sympy.Symbol("M", integer=True, positive=True)
GEMV_MAX_ROWS = 16  # decode: every row in one program per output tile, split-K for parallelism
FMA_MAX_ROWS = 4  # up to here the decode kernel multiplies with FMAs; above, with tl.dot
# the GPU the grid is sized for: an H100/H200 SXM has 132 SMs; a decode kernel launches at least
# 4 programs per SM (split-K when the output tiles alone are fewer), so every SM has several
# programs' loads in flight while the weights stream through
SMS = 132
MIN_DECODE_PROGRAMS = 4 * SMS
# what the DRAM byte model assumes stays in L2 between programs: half of an H100's 50 MB
L2_BYTES = 25 * 2 ** 20
STATS_BLOCK = 1024  # elements of a row per step of the statistics kernel
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8",
                torch.int8: "i8", torch.int32: "i32", torch.float8_e4m3fn: "fp8e4nv"}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """What one generated kernel is specialised on.

    Args:
        fmt: weight format key (``int8``, ``int4_g128_asym``, ...).
        variant: ``"gemv"`` (elementwise products, one K reduction) or ``"gemm"`` (``tl.dot`` tiles).
        block_m, block_n, block_k, num_warps: tiling (block_k is the group size for int4).
        x_dtype, out_dtype: activation and output dtypes (torch names).
        n_weights: 1, or 2 for a horizontally fused pair (gate and up) reading the same input.
        bias: every weight has a bias.
        prologue: ``None``, ``"rms"`` or ``"layer"``: the norm recomputed in the kernel.
        norm_weight, norm_bias, norm_offset: the norm's affine parameters (offset 1.0 = Gemma).
        steps: the epilogue program: ``(op, operands)`` per step; operands name ``acc0``/``acc1``
            (matmul results), ``t<i>`` (earlier steps), ``e<j>`` (external tensors) or literals.
        externals: ``"full"`` ([M, N]) or ``"row"`` ([N]) per external tensor.
        split_k: programs sharing one output tile along K (decode, to fill the SMs); each adds its
            partial sums into a workspace with atomics and the last one runs the epilogue.
        dot: how ``tl.dot`` multiplies: ``"ieee"``, ``"tf32"``, ``"float16"``, ``"bfloat16"``,
            ``"int8"`` (int8 x int8 -> int32), ``"fp8"`` (e4m3 x e4m3 -> fp32).
        parts: weights side by side (q, k, v: one launch, x read once), each its own slice of the
            output columns; a column tile belongs to one of them (n_weights is 1, no epilogue ops).
        outliers: SpQR's sparse fp16 outliers of weight 0, read in the epilogue from a CSR copy
            (row pointers [N + 1], columns, values): ``acc += x[:, col] * value`` per output channel.
        act: ``None`` (weight-only), ``"int8"`` or ``"fp8_e4m3"``: the kernel quantizes the
            activations (after the norm, when one is fused) before the matmul, as
            ``lowbit::qa_linear`` does -- per token, or with a static per-tensor scale when
            ``act_static``; with ``act_prequant`` the input already is ``act`` codes (int8 [M, K])
            with their per-row scale ``x_scale`` [M, 1] (``hadamard_kernel.rotate_quantize``: the
            QuaRot rotation and quantization in one kernel before this one).
    """

    fmt: str
    variant: str
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    x_dtype: str
    out_dtype: str
    n_weights: int = 1
    bias: bool = False
    prologue: str | None = None
    norm_weight: bool = False
    norm_bias: bool = False
    norm_offset: float = 0.0
    steps: tuple[tuple[str, tuple[str, ...]], ...] = ()
    externals: tuple[str, ...] = ()
    dot: str = "ieee"
    act: str | None = None
    act_static: bool = False
    act_prequant: bool = False
    split_k: int = 1
    outliers: bool = False
    parts: int = 1

    @property
    def weight_sets(self) -> int:
        """Weights the kernel takes: gate.up's pair, or the side-by-side parts (q, k, v)."""
        return self.parts if self.parts > 1 else self.n_weights

    @property
    def fma(self) -> bool:
        """The decode kernel's inner product for M <= 4: elementwise FMAs into a
        ``[BLOCK_M, BLOCK_N, BLOCK_K]`` register tile, reduced over K once after the loop (no
        ``tl.dot``: its 16-row minimum would waste 3/4 of every MMA or more)."""
        return self.variant == "gemv" and self.block_m <= FMA_MAX_ROWS

    @property
    def stats(self) -> tuple[str, ...]:
        """Per-row values the statistics kernel computes once per call (slots of ``stats[M, 3]``):
        ``mean`` (LayerNorm), ``rstd`` (either norm), ``x_scale`` (per-token activation scale)."""
        out = (("mean",) if self.prologue == "layer" else ()) + (("rstd",) if self.prologue else ())
        return out + (("x_scale",) if self.act and not self.act_static and not self.act_prequant else ())

    @property
    def integer(self) -> bool:
        """int8/int4 activations: integer products, exact (int32 accumulator, or one per group)."""
        return self.act in ("int8", "int4")

    @property
    def format(self) -> WeightFormat:
        return WeightFormat.parse(self.fmt)

    @property
    def fused_ops(self) -> list[str]:
        ops = [f"{self.prologue}_norm"] if self.prologue else []
        ops += [f"quantize_{self.act}"] if self.act and not self.act_prequant else []
        ops += ["qa_linear" if self.act else "wo_linear"] * self.weight_sets
        ops += ["bias"] * self.weight_sets if self.bias else []
        ops += ["spqr_outliers"] if self.outliers else []
        return ops + [op for op, _ in self.steps]

    @property
    def name(self) -> str:
        """``<variant>_<format>[_<fused ops>]_<hash>``: readable, unique per specialisation."""
        ops = []
        for op in self.fused_ops:
            if op not in ("wo_linear", "qa_linear") and op not in ops:
                ops.append(op)
        label = "_".join([self.variant, self.fmt] + (["x2"] if self.n_weights == 2 else [])
                         + ([f"{self.parts}parts"] if self.parts > 1 else []) + ops[:6])
        return f"{label}_{self.digest()[:8]}"

    def digest(self) -> str:
        """Hash of the spec, the op spellings it uses and this generator's source: a cache key that
        changes whenever the rendered text could."""
        ops = sorted({op for op, _ in self.steps})
        text = repr(self) + repr([fusion.ELEMENTWISE[o] for o in ops]) + _GENERATOR_SOURCE_HASH
        return hashlib.sha256(text.encode()).hexdigest()


def has_template(fmt: str, act: str | None = None) -> bool:
    """Whether ``_weight_block`` can dequantise this format (int8 per-channel; int4 group-wise; int3,
    int2 and NF4 group-wise with float activations; fp8 e4m3 per-channel) with these activations
    (float, int8 codes for int8/int4 weights, fp8 codes for fp8 weights)."""
    f = WeightFormat.parse(fmt)
    if f.kind == "int" and f.bits in (8, 4):
        return act in (None, "int8", "int4")
    if (f.kind == "int" and f.bits in (2, 3)) or f.kind in ("nf4", "mxfp4", "nvfp4"):
        return act is None  # int2/int3/NF4/MXFP4/NVFP4: float activations (dequantised in registers)
    return f.kind == "fp8_e4m3" and act in (None, "fp8_e4m3")


def template_gap(fmt: str, act: str | None = None) -> str | None:
    """Why there is no template for this weight format and activation scheme (None: there is)."""
    if has_template(fmt, act):
        return None
    if has_template(fmt):
        return f"format {fmt} with {act} activations has no generated-kernel template yet"
    return (f"format {fmt} has no generated-kernel template yet (templates: int8 and int4 with float or int8 "
            f"activations, int3/int2/NF4/MXFP4/NVFP4 with float activations, fp8_e4m3 with float or fp8 activations)")


def e2m1(fmt: WeightFormat) -> bool:
    """MXFP4 / NVFP4: 4-bit e2m1 codes, one shared scale per block of 32 (e8m0) or 16 (e4m3)."""
    return fmt.kind in ("mxfp4", "nvfp4")


def has_second(fmt: WeightFormat) -> bool:
    """The op's ``zero`` slot is a kernel argument: integer zero points, or NVFP4's per-tensor scale."""
    return fmt.has_zero_points or fmt.kind == "nvfp4"


# ---------------------------------------------------------------------------------------------
# From a fusion group to a spec
# ---------------------------------------------------------------------------------------------

def choose_variant(fmt: WeightFormat, rows: int | None, on_gpu: bool, x_dtype: str,
                   act: str | None = None, n: int | None = None, k: int | None = None) -> dict[str, Any]:
    """Tiling per shape class. ``rows`` is M when static, None when symbolic (prefill); with the
    layer's ``n`` and ``k`` the decode class also gets its split-K count."""
    decode = rows is not None and rows <= GEMV_MAX_ROWS
    block_k = fmt.group_size or (128 if decode else 64)
    if e2m1(fmt):
        # blocks of 16/32 are too short a step: a step spans several blocks (one scale each per channel)
        block_k = 128 if decode else 32
    if act in ("int8", "int4"):
        dot = "int8"  # integer tensor cores on a GPU, numpy integers under the interpreter: exact
    elif not on_gpu:
        dot = "ieee"  # the interpreter computes in numpy: exact fp32 products, no reduced-precision dots
    elif act == "fp8_e4m3":
        dot = "fp8"
    else:
        dot = {"float32": "tf32", "float16": "float16", "bfloat16": "bfloat16"}[x_dtype]
    if not decode and fmt.group_size and fmt.group_size > 32:
        # prefill: 32 columns of a group per step (its scale re-loaded from cache each step): at sm_90
        # a 64 x 128 dequantised int4 tile spilled 192-672 bytes per thread (64 x 64 tiles, 8 warps),
        # 64 x 64 still 8 bytes on gate.up; 64 x 32 none (174 registers)
        block_k = 32
    if decode and rows <= FMA_MAX_ROWS:
        # every row in one program (weights read once); 8-wide N tiles. BLOCK_N 8 at 4 warps was
        # the fastest or within 10 % of it for Llama-2-7B's groups at M = 1 and 4 in a sweep of
        # BLOCK_N 8-64 x 2-8 warps on an H200 (benchmarks/gpu_check.py, section "sweep"); 4 rows x
        # 8 x 128 fp32 partial sums are 32 registers per accumulator
        block_m = 1 if rows <= 1 else 2 if rows == 2 else 4
        # FMAs in fp32; "fp8" marks the GPU variant of fp8 activations (native e4m3 rounding, then fp32)
        tiling = dict(variant="gemv", block_m=block_m, block_n=8, block_k=block_k, num_warps=4,
                      dot="fp8" if on_gpu and act == "fp8_e4m3" else "ieee")
    elif decode:
        # 5-16 rows: FMAs would be compute-bound (16 rows x 2 flops per int4 weight at 3.35 TB/s is
        # ~200 TFLOP/s, three times an H100's fp32 FMA rate), so one 16-row tl.dot tile holds every
        # row; BLOCK_N 32 was the faster small-batch tiling in the same sweep. 8 warps: at 4, gate.up
        # (two dequantised 32 x 128 tiles) spills 72-392 bytes per thread at sm_90 (int4 bf16, fp8, W8A8)
        # 64 columns a step (half a 128-group, its scale re-read from L1): gate.up's two dequantised
        # 32 x 128 tiles sat at 255 (int4) and 243 (int8) registers at sm_90; 64 columns need 160 and 127
        block_k = min(block_k, 64)
        tiling = dict(variant="gemv", block_m=16, block_n=32, block_k=block_k, num_warps=8, dot=dot)
    else:
        block_m = 16 if rows is not None and rows <= 64 else 64
        # 64x64 tiles with a dequantised 64xBLOCK_K weight tile spill at 4 warps on sm_90 (1-2 KB for
        # int4, measured with the resource report); 8 warps cut that to 0.2-0.7 KB (int8: none)
        num_warps = 4 if block_m == 16 else 8
        return dict(variant="gemm", block_m=block_m, block_n=64, block_k=block_k, num_warps=num_warps, dot=dot)
    if n is not None and k is not None:
        tiling["split_k"] = split_k_for(-(-rows // tiling["block_m"]), -(-n // tiling["block_n"]), k, block_k)
    return tiling


def split_k_for(m_tiles: int, n_tiles: int, k: int, block_k: int) -> int:
    """How many programs share an output tile along K so that a decode call launches at least
    ``MIN_DECODE_PROGRAMS``: the smallest count that reaches it and divides the K steps evenly
    (up to twice the minimum), else the minimum with the steps spread as evenly as they go."""
    steps = -(-k // block_k)
    need = min(steps, -(-MIN_DECODE_PROGRAMS // (m_tiles * n_tiles)))
    if need <= 1:
        return 1
    for s in range(need, min(steps, 2 * need) + 1):
        if steps % s == 0:
            return s
    per = -(-steps // need)
    return -(-steps // per)


def rows_of(node: fx.Node) -> int | None:
    """M of an anchor's input: the product of its leading dims, None when any is symbolic."""
    value = _dynamo_adapter.example_value(node)
    rows = 1
    for d in value.shape[:-1]:
        if not isinstance(d, int):
            return None
        rows *= d
    return rows


def spec_for(group: fusion.FusionGroup, on_gpu: bool) -> KernelSpec:
    anchor = group.anchors[0]
    x_dtype = str(_dynamo_adapter.example_value(anchor.x).dtype).split(".")[-1]
    out_dtype = str(_dynamo_adapter.example_value(group.sink).dtype).split(".")[-1]
    names: dict[fx.Node, str] = {a.node: f"acc{i}" for i, a in enumerate(group.anchors)}
    names.update({a.outlier_add: f"acc{i}" for i, a in enumerate(group.anchors) if a.outliers is not None})
    names.update({e: f"e{j}" for j, (e, _) in enumerate(group.externals)})
    steps = []
    for i, step in enumerate(group.steps):
        operands = tuple(names[v] if isinstance(v, fx.Node) else repr(float(v)) for v in step.operands)
        steps.append((step.op, operands))
        names[step.node] = f"t{i}"
    p = group.prologue
    variant = choose_variant(WeightFormat.parse(anchor.fmt), rows_of(anchor.x), on_gpu, x_dtype, anchor.act,
                             n=sum(a.out_features for a in group.anchors) if group.side_by_side else anchor.out_features,
                             k=anchor.in_features)
    return KernelSpec(
        fmt=anchor.fmt, **variant,
        x_dtype=x_dtype, out_dtype=out_dtype, n_weights=1 if group.side_by_side else len(group.anchors),
        parts=len(group.anchors) if group.side_by_side else 1, bias=anchor.bias is not None,
        prologue=p.kind if p else None, norm_weight=bool(p and p.weight is not None),
        norm_bias=bool(p and p.bias is not None), norm_offset=p.offset if p else 0.0,
        steps=tuple(steps), externals=tuple(kind for _, kind in group.externals),
        outliers=anchor.outliers is not None,
        act=anchor.act, act_static=anchor.x_scale is not None, act_prequant=anchor.prequant_scale is not None)


def launch_args(group: fusion.FusionGroup) -> list[Any]:
    """The launcher's arguments for a group, in the order of :func:`launcher_params`."""
    p = group.prologue
    args: list[Any] = [p.input if p else group.anchors[0].x]
    if p and p.weight is not None:
        args.append(p.weight)
    if p and p.bias is not None:
        args.append(p.bias)
    if group.anchors[0].x_scale is not None:
        args.append(group.anchors[0].x_scale)
    if group.anchors[0].prequant_scale is not None:
        args.append(group.anchors[0].prequant_scale)
    for a in group.anchors:
        args += [a.qweight, a.scale] + ([a.zero] if a.zero is not None else []) + ([a.bias] if a.bias is not None else [])
        args += list(a.csr) if a.outliers is not None else []  # set by lowering (lowering._outlier_csr)
    args += [e for e, _ in group.externals]
    if p:
        args.append(p.eps)
    return args


def launcher_params(spec: KernelSpec) -> list[str]:
    params = ["x"]
    params += ["norm_w"] if spec.norm_weight else []
    params += ["norm_b"] if spec.norm_bias else []
    params += ["x_scale"] if spec.act_static or spec.act_prequant else []
    asym = has_second(spec.format)
    for i in range(spec.weight_sets):
        params += [f"qw{i}", f"scale{i}"] + ([f"zero{i}"] if asym else []) + ([f"bias{i}"] if spec.bias else [])
        params += [f"optr{i}", f"ocol{i}", f"oval{i}"] if spec.outliers and i == 0 else []
    params += [f"e{j}" for j in range(len(spec.externals))]
    return params + (["eps"] if spec.prologue else [])


# ---------------------------------------------------------------------------------------------
# Grid and memory traffic (sympy)
# ---------------------------------------------------------------------------------------------

def grid(spec: KernelSpec, n: int | tuple[int, ...]) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr]:
    """Programs along (rows, output columns, K splits); ``n``: N, or each side-by-side weight's N."""
    rows = M if spec.block_m == 1 else sympy.ceiling(M / spec.block_m)
    ns = n if isinstance(n, tuple) else (n,)
    return rows, sympy.Integer(sum(-(-x // spec.block_n) for x in ns)), sympy.Integer(spec.split_k)


def programs(spec: KernelSpec, n: int) -> sympy.Expr:
    gm, gn, gk = grid(spec, n)
    return gm * gn * gk


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Bytes per call as expressions of M, at two levels.

    * ``loaded`` / ``stored`` / ``atomic``: what the kernels' lanes load, store and update
      atomically (exactly: every unmasked lane; a test counts them under the interpreter). Most
      loads are served by L2 or L1: the activations are re-read by every column tile.
    * ``read`` / ``written``: the DRAM traffic this model predicts, what decode time is bound by.
      Each tensor comes from DRAM once when the programs that share it run while it is still in L2
      (``L2_BYTES``): weight tiles are shared by the row tiles, which run next to each other (axis 0
      is launched first); the activations are shared by every column tile, so they are read once
      when they fit in L2 and once per column tile when not. The statistics buffer and the split-K
      workspace are counted in full although they stay in L2 (small: M x 3 and M x N floats).
    * ``min_read`` / ``min_written``: each input and the output once.
    """

    read: sympy.Expr
    written: sympy.Expr
    min_read: sympy.Expr
    min_written: sympy.Expr
    loaded: sympy.Expr = sympy.Integer(0)
    stored: sympy.Expr = sympy.Integer(0)
    atomic: sympy.Expr = sympy.Integer(0)

    def at(self, rows: int) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name).subs(M, rows)) for f in dataclasses.fields(self)}


def traffic(spec: KernelSpec, n: int, k: int, itemsize: dict[str, int], nnz: int = 0) -> Traffic:
    """``itemsize``: bytes per element of ``x``, ``out``, ``norm_w``, ``norm_b``, ``bias``, ``e<j>``,
    ``x_scale`` (``oval0``: SpQR outlier values). Covers the statistics kernel (when the spec has
    one) and the main kernel. ``nnz``: SpQR outliers of weight 0 (``spec.outliers``). ``n``: N, or
    each side-by-side weight's N (``spec.parts``)."""
    fmt = spec.format
    m_tiles, n_tiles, splits = grid(spec, n)
    n = sum(n) if isinstance(n, tuple) else n
    tiles = m_tiles * n_tiles
    scale_size = torch.finfo(SCALE_DTYPE).bits // 8
    acc_size = 4  # fp32 or int32 partial sums
    if fmt.bits == 8:  # int8 and fp8_e4m3: per-channel scale, loaded in the epilogue (once per tile)
        codes, step_scales, tile_scales = n * k, 0, n * scale_size
        min_scales = 0
    else:  # int4: one scale (and zero) per group step; the K splits partition the steps
        groups = -(-k // fmt.group_size)
        zero_size = 1 if fmt.has_zero_points else 0
        # bytes of codes loaded: whole units (int4/NF4: a byte of 2, int2: a byte of 4, int3: 3 bytes of 8)
        # that hold a column < K
        per_unit, unit_bytes = {4: (2, 1), 2: (4, 1), 3: (8, 3)}[fmt.bits]
        codes = n * -(-k // per_unit) * unit_bytes
        step_scales = n * -(-k // spec.block_k) * (scale_size + zero_size)
        min_scales = n * groups * (scale_size + zero_size)
        tile_scales = 0
        if e2m1(fmt):  # 1-byte block scales, several per step (masked past K: each block's once)
            step_scales = min_scales = n * groups * fmt.description.scale_dtype.itemsize
    # NVFP4's fp32 per-tensor scale: loaded once per output tile, in the epilogue
    glob = 4 if fmt.kind == "nvfp4" else 0
    bias = n * itemsize["bias"] if spec.bias else 0
    weight_bytes = (codes + min_scales + tile_scales + glob + bias) * spec.n_weights
    norm_bytes = k * (itemsize.get("norm_w", 0) * spec.norm_weight + itemsize.get("norm_b", 0) * spec.norm_bias)
    x_bytes = M * k * itemsize["x"]
    ext_bytes = sum(M * n * itemsize[f"e{j}"] if kind == "full" else n * itemsize[f"e{j}"]
                    for j, kind in enumerate(spec.externals))
    static_scale = itemsize["x_scale"] if spec.act_static else 0
    row_scales = M * 4 if spec.act_prequant else 0  # pre-quantized activations: their scale per row
    slots = len(spec.stats)

    # ---- what the lanes move (exact)
    loaded = stored = atomic = sympy.Integer(0)
    if slots:  # statistics kernel: one program per row
        absmax = int(bool(spec.act and not spec.act_static))
        loaded += x_bytes * (int(bool(spec.prologue)) + absmax) + M * norm_bytes * absmax
        stored += M * slots * 4
    loaded += n_tiles * x_bytes + tiles * norm_bytes + n_tiles * splits * M * slots * 4
    loaded += tiles * splits * static_scale + n_tiles * splits * row_scales
    loaded += m_tiles * (codes + step_scales) * spec.n_weights + m_tiles * (tile_scales + bias) * spec.n_weights
    loaded += tiles * glob * spec.n_weights
    loaded += sum(M * n * itemsize[f"e{j}"] if kind == "full" else m_tiles * n * itemsize[f"e{j}"]
                  for j, kind in enumerate(spec.externals))
    outlier_bytes = 0
    if spec.outliers:  # the epilogue's side-read, once per output tile: row pointers, then per outlier
        # its column and value (per row tile) and the gathered activation (and norm affine) entries
        oval = itemsize.get("oval0", 2)
        outlier_bytes = (n + 1) * 4 + nnz * (4 + oval)
        gathered = nnz * (itemsize.get("norm_w", 0) * spec.norm_weight + itemsize.get("norm_b", 0) * spec.norm_bias)
        loaded += m_tiles * (n * 8 + nnz * (4 + oval) + gathered) + M * nnz * itemsize["x"]
    written = M * n * itemsize["out"]
    stored += written
    workspace = 0
    if spec.split_k > 1:  # partial sums added atomically; the last split reads them back and zeroes them
        workspace = spec.n_weights * M * n * acc_size
        atomic += splits * workspace + tiles * splits * 4  # + the tile's arrival counter
        loaded += workspace
        stored += workspace + tiles * 4

    # ---- DRAM (modelled) and the minimum
    x_dram = sympy.Piecewise((x_bytes, x_bytes <= L2_BYTES), (n_tiles * x_bytes, True))
    read = (x_dram + norm_bytes + weight_bytes + ext_bytes + static_scale + row_scales + M * slots * 4 + workspace
            + outlier_bytes)
    min_read = x_bytes + norm_bytes + weight_bytes + ext_bytes + static_scale + row_scales + outlier_bytes
    dram_written = written + M * slots * 4 + (workspace + tiles * 4 if spec.split_k > 1 else 0)
    return Traffic(sympy.expand(read), dram_written, sympy.expand(min_read), written,
                   sympy.expand(loaded), sympy.expand(stored), sympy.expand(atomic))


class _LauncherPrinter(PythonCodePrinter):
    """Prints ``ceiling(M/16)`` as ``triton.cdiv(M, 16)`` (integer arithmetic in the launcher)."""

    def _print_ceiling(self, expr):
        num, den = expr.args[0].as_numer_denom()
        return f"triton.cdiv({self._print(num)}, {self._print(den)})"


def to_python(expr: sympy.Expr) -> str:
    return _LauncherPrinter().doprint(expr)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

_ALIGN = "\x00"  # continuation marker: aligned under the opening parenthesis by _align()


def _load(ptr: str, mask: str, to: str = "tl.float32", other: str = "0.0") -> str:
    """A masked load, upcast right away (the rule every generated load follows)."""
    if len(ptr) + len(mask) < 60:
        return f"tl.load({ptr}, mask={mask}, other={other}).to({to})"
    return f"tl.load({ptr},\n{_ALIGN}mask={mask}, other={other}).to({to})"


def _align(source: str) -> str:
    """Put each continuation line under the first argument of the call it continues."""
    lines = source.split("\n")
    for i, line in enumerate(lines):
        if line.lstrip(" ").startswith(_ALIGN):
            column = lines[i - 1].rindex("tl.load(") + len("tl.load(")
            lines[i] = " " * column + line.lstrip(" ")[len(_ALIGN):]
    return "\n".join(lines)


def _signature(spec: KernelSpec) -> str:
    fmt = spec.format
    lines = [f"# activations{' (the input of the fused norm)' if spec.prologue else ''}: [M, K], row stride",
             "x_ptr, stride_xm,"]
    if spec.parts > 1:
        lines.append(f"# {spec.parts} weights side by side (N{', N'.join(str(p) for p in range(1, spec.parts))} "
                     "output columns after weight 0's N): same format and K, one output [M, N + ...]")
    if spec.norm_weight or spec.norm_bias:
        parts = (["norm_w_ptr"] if spec.norm_weight else []) + (["norm_b_ptr"] if spec.norm_bias else [])
        lines += [f"# {spec.prologue} norm: {'weight [K], ' if spec.norm_weight else ''}"
                  f"{'bias [K]' if spec.norm_bias else ''}".rstrip(", "), ", ".join(parts) + ","]
    if spec.stats:
        lines += [f"# per-row statistics [M, 3] from {spec.name}_stats ({', '.join(spec.stats)})", "stats_ptr,"]
    if spec.act_static:
        lines += [f"# {spec.act} activations: the static per-tensor scale [1] (from calibration)", "x_scale_ptr,"]
    if spec.act_prequant:
        lines += [f"# x holds {spec.act} codes (int8 [M, K]); their scale per row [M]", "x_scale_ptr,"]
    for i in range(spec.weight_sets):
        if fmt.kind == "fp8_e4m3":
            what = "float8_e4m3 codes [N, K], one scale per output channel [N]"
        elif fmt.bits == 8:
            what = "int8 codes [N, K], one scale per output channel [N]"
        elif e2m1(fmt):
            what = (f"uint8 codes [N, Kp/2] (e2m1, two a byte), "
                    f"{'e8m0 exponents' if fmt.kind == 'mxfp4' else 'fp8 e4m3 scales'} [N, Kp/{fmt.group_size}]"
                    + (", the fp32 per-tensor scale [1]" if fmt.kind == "nvfp4" else ""))
        else:
            what = (f"uint8 codes [N, Kp*{fmt.bits}/8] ({'NF4 indices' if fmt.kind == 'nf4' else f'{fmt.bits}-bit'}), "
                    f"scales [N, Kp/{fmt.group_size}]"
                    + (f", zero points [N, Kp/{fmt.group_size}]" if fmt.has_zero_points else ""))
        parts = [f"qw{i}_ptr", f"scale{i}_ptr"] + ([f"zero{i}_ptr"] if has_second(fmt) else [])
        parts += ([f"bias{i}_ptr"] if spec.bias else []) + [f"stride_qw{i}"] + ([f"stride_s{i}"] if fmt.group_size else [])
        lines += [f"# weight {i} ({spec.fmt}{', with bias [N]' if spec.bias else ''}): {what}", ", ".join(parts) + ","]
        if spec.outliers and i == 0:
            lines += ["# SpQR outliers of weight 0, CSR by output channel: row pointers [N + 1] (int32), "
                      "columns (int32), values", "optr0_ptr, ocol0_ptr, oval0_ptr,"]
    if spec.externals:
        desc = ", ".join(f"e{j} {'[M, N]' if kind == 'full' else '[N]'}" for j, kind in enumerate(spec.externals))
        parts = []
        for j, kind in enumerate(spec.externals):
            parts += [f"e{j}_ptr"] + ([f"stride_e{j}m"] if kind == "full" else [])
        lines += [f"# epilogue operands: {desc}", ", ".join(parts) + ","]
    lines += ["# output: [M, N]", "out_ptr, stride_om,"]
    if spec.split_k > 1:
        acc = "int32" if _int32_acc(spec) else "fp32"
        lines += [f"# split-K: {acc} partial sums [{spec.n_weights}, M, N] and arrivals per output tile, both left zeroed",
                  "ws_ptr, count_ptr,"]
    sizes = "M, N, " + "".join(f"N{p}, " for p in range(1, spec.parts)) + "K,"
    lines += ["# problem size", sizes, "# tiling",
              "BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,"]
    return textwrap.indent("\n".join(lines), " " * 4)


def _x_tile() -> str:
    return _load("x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]", "mask_m[:, None] & mask_k[None, :]")


STATS_SLOTS = {"mean": 0, "rstd": 1, "x_scale": 2}


def _stats_kernel(spec: KernelSpec) -> str:
    """``<name>_stats``: one program per row computes the row's norm statistics and per-token
    activation scale once per call (instead of once per column tile and K split) into ``stats``."""
    lines = ["# ---- one program per row; lanes accumulate elementwise, reduced once after each pass",
             "offs_m = tl.program_id(0) + tl.arange(0, 1)",
             "mask_m = offs_m < M"]
    if spec.prologue:
        lines += [f"# {spec.prologue} norm statistics", "sum_xx = tl.zeros((1, BLOCK_K), dtype=tl.float32)"]
        if spec.prologue == "layer":
            lines.append("sum_x = tl.zeros((1, BLOCK_K), dtype=tl.float32)")
        lines += ["for k0 in range(0, K, BLOCK_K):",
                  "    offs_k = k0 + tl.arange(0, BLOCK_K)",
                  "    mask_k = offs_k < K",
                  "    x = " + _x_tile()]
        if spec.prologue == "layer":
            lines.append("    sum_x += x")
        lines.append("    sum_xx += x * x")
        if spec.prologue == "layer":
            lines += ["mean = tl.sum(sum_x, axis=1) / K", "rstd = tl.rsqrt(tl.sum(sum_xx, axis=1) / K - mean * mean + eps)"]
        else:
            lines += ["rstd = tl.rsqrt(tl.sum(sum_xx, axis=1) / K + eps)"]
    if "x_scale" in spec.stats:
        qmax = ACTIVATION_MAX[spec.act]
        lines += [f"# per-token activation scale = absmax / {qmax} of each {'normalised ' if spec.prologue else ''}row",
                  "amax = tl.zeros((1, BLOCK_K), dtype=tl.float32)",
                  "for k0 in range(0, K, BLOCK_K):",
                  "    offs_k = k0 + tl.arange(0, BLOCK_K)",
                  "    mask_k = offs_k < K",
                  textwrap.indent(_normalised_x(spec), " " * 4),
                  "    amax = tl.maximum(amax, tl.abs(x))",
                  f"x_scale = tl.max(amax, axis=1) / {qmax}",
                  "x_scale = tl.where(x_scale > 0.0, x_scale, 1.0)  # an all-zero row: codes 0, no division by zero"]
    for stat in spec.stats:
        lines.append(f"tl.store(stats_ptr + offs_m * 3 + {STATS_SLOTS[stat]}, {stat}, mask=mask_m)")
    params = ["x_ptr, stride_xm,"]
    if spec.norm_weight or spec.norm_bias:
        params.append(", ".join((["norm_w_ptr"] if spec.norm_weight else []) + (["norm_b_ptr"] if spec.norm_bias else [])) + ",")
    params += (["eps,"] if spec.prologue else []) + ["stats_ptr,", "M, K,", "BLOCK_K: tl.constexpr,"]
    return (f"@triton.jit\ndef {spec.name}_stats(\n" + textwrap.indent("\n".join(params), " " * 4) + "\n):\n"
            + textwrap.indent("\n".join(lines), " " * 4) + "\n")


def _row_stats(spec: KernelSpec) -> str:
    """The main kernel's per-row values: loaded from the statistics kernel's output, or the static
    activation scale."""
    lines = []
    if spec.stats:
        lines.append(f"# ---- per-row {', '.join(spec.stats)}: computed once per call by {spec.name}_stats")
        for stat in spec.stats:
            other = "1.0" if stat == "x_scale" else "0.0"
            lines.append(f"{stat} = " + _load(f"stats_ptr + offs_m * 3 + {STATS_SLOTS[stat]}", "mask_m", other=other))
    if spec.act_prequant:
        lines += ["# ---- the pre-quantized activations' scale per row",
                  "x_scale = " + _load("x_scale_ptr + offs_m", "mask_m", other="1.0")]
    if spec.act_static:
        lines += ["# ---- the static activation scale (one per tensor, from calibration)",
                  "x_scale = tl.load(x_scale_ptr).to(tl.float32) + tl.zeros((BLOCK_M,), dtype=tl.float32)"]
    return "\n".join(lines) + "\n\n" if lines else ""


def _quantize_x(spec: KernelSpec) -> list[str]:
    if spec.integer:
        top = ACTIVATION_MAX[spec.act]
        return [f"# quantize to {spec.act} codes, saturating at +-{top:g}; adding and subtracting 1.5 * 2^23 rounds an",
                "# fp32 of magnitude < 2^22 to an integer, half to even (as torch.round)",
                f"x = tl.minimum(tl.maximum(x / x_scale[:, None], -{top}), {top})",
                "x = ((x + 12582912.0) - 12582912.0).to(tl.int32)"]
    if spec.act == "fp8_e4m3" and spec.dot == "fp8":
        # the GPU variant: the hardware's fp32 -> e4m3 conversion (round to nearest even) after
        # saturating; the fp8 dot takes the codes as they are
        return ["# quantize to fp8 e4m3 (native conversion, round to nearest even), saturating at +-448",
                "x = tl.minimum(tl.maximum(x / x_scale[:, None], -448.0), 448.0).to(tl.float8e4nv)"
                + (".to(tl.float32)  # FMAs: the e4m3 values in fp32" if spec.fma else "")]
    if spec.act == "fp8_e4m3":
        return ["# quantize to fp8 e4m3 values (kept in fp32): saturate at +-448, round to 3 mantissa bits",
                "# half to even, subnormals on the 2^-9 grid (step = 2^(exponent - 3), exponent >= -6);",
                "# written out because the interpreter's fp32 -> fp8 cast rounds wrongly",
                "x = tl.minimum(tl.maximum(x / x_scale[:, None], -448.0), 448.0)",
                "step = ((tl.maximum((x.to(tl.int32, bitcast=True) >> 23) & 0xFF, 121) - 3) << 23).to(tl.float32, bitcast=True)",
                "x = ((x / step + 12582912.0) - 12582912.0) * step"]
    return []


def _activation_block(spec: KernelSpec) -> str:
    if spec.act_prequant:
        return "\n".join(["# activations: pre-quantized codes (rotated and quantized by the kernel before this one)",
                          "x = " + _load("x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]",
                                         "mask_m[:, None] & mask_k[None, :]", to="tl.int32", other="0")])
    header = ["# activations: load, upcast" + (", normalise (padding lanes back to zero)" if spec.prologue else "")]
    return "\n".join(header + [_normalised_x(spec)] + _quantize_x(spec))


def _normalised_x(spec: KernelSpec) -> str:
    lines = ["x = " + _x_tile()]
    if spec.prologue == "layer":
        lines.append("x = (x - mean[:, None]) * rstd[:, None]")
    elif spec.prologue == "rms":
        lines.append("x = x * rstd[:, None]")
    if spec.norm_weight:
        scale = f"(norm_w[None, :] + {spec.norm_offset!r})" if spec.norm_offset else "norm_w[None, :]"
        lines += ["norm_w = " + _load("norm_w_ptr + offs_k", "mask_k"), f"x = x * {scale}"]
    if spec.norm_bias:
        lines += ["norm_b = " + _load("norm_b_ptr + offs_k", "mask_k"),
                  "x = x + norm_b[None, :]"]
    if spec.prologue:
        lines.append("x = tl.where(mask_m[:, None] & mask_k[None, :], x, 0.0)")
    return "\n".join(lines)


def _weight_block(spec: KernelSpec, i: int) -> str:
    fmt = spec.format
    if fmt.bits == 8:
        what, to, other = ("fp8 e4m3 values", "tl.float32", "0.0") if fmt.kind == "fp8_e4m3" else (
            "int8 codes", "tl.int32" if spec.integer else "tl.float32", "0")
        return "\n".join([
            f"# weight {i}: {what} (the per-channel scale is applied once, after the loop)",
            f"w{i} = " + _load(f"qw{i}_ptr + offs_n[:, None] * stride_qw{i} + offs_k[None, :]",
                              "mask_n[:, None] & mask_k[None, :]", to=to, other=other)])
    if spec.integer:  # int8 activations: centred integer codes, the group's scale after its dot
        zero = (f"z{i} = " + _load(f"zero{i}_ptr + offs_n * stride_s{i} + group", "mask_n", to="tl.int32", other="0")
                + "[:, None]" if not fmt.symmetric else f"z{i} = 8  # symmetric codes are stored offset by 8")
        return "\n".join([
            f"# weight {i}: two 4-bit codes per byte (low nibble = even k), centred by the zero point to",
            "# integers in [-15, 15]; BLOCK_K is one group or part of one: its scale multiplies this step's integer dot",
            "offs_kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)",
            f"packed{i} = " + _load(f"qw{i}_ptr + offs_n[:, None] * stride_qw{i} + offs_kb[None, :]",
                                   "mask_n[:, None] & (offs_kb[None, :] * 2 < K)", to="tl.int32", other="0"),
            f"group = k0 // {fmt.group_size}",
            zero,
            f"w{i} = tl.join(packed{i} & 0xF, packed{i} >> 4).reshape(BLOCK_N, BLOCK_K) - z{i}",
            f"s{i} = " + _load(f"scale{i}_ptr + offs_n * stride_s{i} + group", "mask_n")])
    lines = _unpack_codes(fmt, i)
    if e2m1(fmt):
        return "\n".join(lines + _e2m1_block(fmt, i))
    lines += [f"group = k0 // {fmt.group_size}",
              f"s{i} = " + _load(f"scale{i}_ptr + offs_n * stride_s{i} + group", "mask_n")]
    if fmt.kind == "nf4":
        lines += [f"# NF4: the 16-value table in registers, selected by the code's bits (no memory lookup)",
                  f"w{i} = {_nf4_select(f'codes{i}')} * s{i}[:, None]"]
        return "\n".join(lines)
    half = 2 ** (fmt.bits - 1)
    if fmt.symmetric:
        lines.append(f"z{i} = {half:.1f}  # symmetric codes are stored offset by {half}")
    else:
        lines.append(f"z{i} = " + _load(f"zero{i}_ptr + offs_n * stride_s{i} + group", "mask_n", other="0"))
    lines.append(f"w{i} = (codes{i}.to(tl.float32) - z{i}{'' if fmt.symmetric else '[:, None]'}) * s{i}[:, None]")
    return "\n".join(lines)


def _unpack_codes(fmt: WeightFormat, i: int) -> list[str]:
    """Load this step's packed codes and unpack them to ``codes<i>`` [BLOCK_N, BLOCK_K] (int32).
    The storage is a little-endian bit stream per row (formats.pack_codes): int4/NF4 two codes a
    byte (low nibble first), int2 four, int3 eight codes in three bytes. Nested ``tl.join``s put
    the codes of one byte (or 3-byte word) next to each other: the outermost join is the fastest
    axis after the reshape."""
    head = (f"# weight {i} ({fmt.key}): {fmt.bits}-bit codes, BLOCK_K is one group (or part of one), so one "
            f"scale{'' if not fmt.has_zero_points else ' and zero point'} per output channel per step")
    if e2m1(fmt):
        head = f"# weight {i} ({fmt.key}): 4-bit e2m1 codes, BLOCK_K spans BLOCK_K // {fmt.group_size} scale blocks"
    if fmt.bits == 4:
        return [head, "offs_kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)",
                f"packed{i} = " + _load(f"qw{i}_ptr + offs_n[:, None] * stride_qw{i} + offs_kb[None, :]",
                                       "mask_n[:, None] & (offs_kb[None, :] * 2 < K)", to="tl.int32", other="0"),
                f"codes{i} = tl.join(packed{i} & 0xF, packed{i} >> 4).reshape(BLOCK_N, BLOCK_K)"]
    if fmt.bits == 2:
        c = [f"((packed{i} >> {2 * j}) & 3)" for j in range(4)]
        return [head, "offs_kb = k0 // 4 + tl.arange(0, BLOCK_K // 4)",
                f"packed{i} = " + _load(f"qw{i}_ptr + offs_n[:, None] * stride_qw{i} + offs_kb[None, :]",
                                       "mask_n[:, None] & (offs_kb[None, :] * 4 < K)", to="tl.int32", other="0"),
                f"codes{i} = tl.join(tl.join({c[0]}, {c[2]}),",
                f"                  tl.join({c[1]}, {c[3]})).reshape(BLOCK_N, BLOCK_K)"]
    if fmt.bits == 3:
        c = [f"((word{i} >> {3 * j}) & 7)" for j in range(8)]
        lines = [head, "offs_kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)  # 3-byte words of 8 codes",
                 "mask_w = mask_n[:, None] & (offs_kw[None, :] * 8 < K)"]
        for b in range(3):
            lines.append(f"b{b} = " + _load(f"qw{i}_ptr + offs_n[:, None] * stride_qw{i} + offs_kw[None, :] * 3 + {b}",
                                            "mask_w", to="tl.int32", other="0"))
        return lines + [f"word{i} = b0 | (b1 << 8) | (b2 << 16)",
                        f"codes{i} = tl.join(tl.join(tl.join({c[0]}, {c[4]}), tl.join({c[2]}, {c[6]})),",
                        f"                  tl.join(tl.join({c[1]}, {c[5]}), tl.join({c[3]}, {c[7]}))).reshape(BLOCK_N, BLOCK_K)"]
    raise NotImplementedError(f"no code unpacking for {fmt.key}")


def _e2m1_block(fmt: WeightFormat, i: int) -> list[str]:
    """MXFP4/NVFP4: e2m1 codes (sign, 2 exponent bits, 1 mantissa bit) to fp32 by building the float's
    bits (no table), times the step's block scales: BLOCK_K // G of them per output channel (e8m0:
    2^(e - 127) as exponent bits; e4m3: a native fp8 load). NVFP4's per-tensor scale is applied once,
    in the epilogue."""
    g = fmt.group_size
    if fmt.kind == "mxfp4":
        scale = [f"e{i} = " + _load(f"scale{i}_ptr + offs_n[:, None] * stride_s{i} + offs_g[None, :]",
                                    f"mask_n[:, None] & (offs_g[None, :] * {g} < K)", to="tl.int32", other="127"),
                 f"# e8m0: 2^(e - 127) is the float with exponent field e (e = 0: the subnormal 2^-127)",
                 f"s{i} = tl.where(e{i} == 0, 0x00400000, e{i} << 23).to(tl.float32, bitcast=True)"]
    else:
        scale = [f"s{i} = " + _load(f"scale{i}_ptr + offs_n[:, None] * stride_s{i} + offs_g[None, :]",
                                    f"mask_n[:, None] & (offs_g[None, :] * {g} < K)", other="0.0")]
    return [f"# e2m1 -> fp32: |v| = m / 2 for exponent 0, else (1 + m / 2) * 2^(e - 1); bit 3 is the sign",
            f"mag{i} = codes{i} & 7",
            f"ex{i} = mag{i} >> 1",
            f"v{i} = tl.where(ex{i} == 0, (mag{i} & 1).to(tl.float32) * 0.5,",
            f"              (((ex{i} + 126) << 23) | ((mag{i} & 1) << 22)).to(tl.float32, bitcast=True))",
            f"v{i} = tl.where((codes{i} & 8) != 0, -v{i}, v{i})",
            f"# block scales: BLOCK_K // {g} per output channel this step",
            f"offs_g = k0 // {g} + tl.arange(0, BLOCK_K // {g})"] + scale + [
            f"w{i} = (v{i}.reshape(BLOCK_N, BLOCK_K // {g}, {g}) * s{i}[:, :, None]).reshape(BLOCK_N, BLOCK_K)"]


def _nf4_select(code: str) -> str:
    """NF4_GRID[code] as a tree of 15 selects on the code's bits, the table values as immediates."""
    from lowbit_compiler.formats import NF4_GRID

    level = [repr(float(v)) for v in NF4_GRID]
    for bit in range(4):
        cond = f"(({code} >> {bit}) & 1) != 0"
        level = [f"tl.where({cond}, {level[2 * j + 1]}, {level[2 * j]})" for j in range(len(level) // 2)]
    return level[0]


def _dot(spec: KernelSpec, i: int) -> str:
    group_scale = f".to(tl.float32) * s{i}[None, :]" if spec.integer and spec.format.bits == 4 else ""
    if spec.fma:  # partial sums per k lane: reduced once, after the loop
        if group_scale:
            return f"acc{i} += (x[:, None, :] * w{i}[None, :, :]).to(tl.float32) * s{i}[None, :, None]"
        return f"acc{i} += x[:, None, :] * w{i}[None, :, :]"
    if spec.dot == "int8":
        return f"acc{i} += tl.dot(x.to(tl.int8), tl.trans(w{i}.to(tl.int8))){group_scale}  # int8 x int8 -> int32, exact"
    if spec.dot == "fp8":  # x is e4m3 already (native conversion); the weight's e4m3 values convert exactly
        return f"acc{i} += tl.dot(x, tl.trans(w{i}.to(tl.float8e4nv)))  # fp8 tensor cores, fp32 accumulate"
    if spec.dot in ("ieee", "tf32"):
        return f'acc{i} += tl.dot(x, tl.trans(w{i}), input_precision="{spec.dot}")'
    t = "tl.float16" if spec.dot == "float16" else "tl.bfloat16"
    return f"acc{i} += tl.dot(x.to({t}), tl.trans(w{i}.to({t})))  # {spec.dot} tensor cores, fp32 accumulate"


def _epilogue(spec: KernelSpec) -> tuple[str, str]:
    """The epilogue block and the name of the value stored."""
    fmt = spec.format
    lines = ["# ---- epilogue: " + ", ".join(
        (["per-channel scale"] if fmt.bits == 8 else []) + (["activation scale"] if spec.act else [])
        + (["bias"] if spec.bias else []) + [op for op, _ in spec.steps] or ["nothing to fuse"]) + " (fp32 registers)"]
    for i in range(spec.n_weights):
        if _int32_acc(spec):
            lines.append(f"acc{i} = acc{i}.to(tl.float32)")
        if fmt.bits == 8:
            lines += [f"s{i} = " + _load(f"scale{i}_ptr + offs_n", "mask_n"),
                      f"acc{i} = acc{i} * s{i}[None, :]"]
        if spec.act:
            lines.append(f"acc{i} = acc{i} * x_scale[:, None]")
        if fmt.kind == "nvfp4":
            lines.append(f"acc{i} = acc{i} * tl.load(zero{i}_ptr + tl.arange(0, 1)).to(tl.float32)  # per-tensor scale")
        if spec.bias:
            lines += [f"bias{i} = " + _load(f"bias{i}_ptr + offs_n", "mask_n"),
                      f"acc{i} = acc{i} + bias{i}[None, :]"]
        if spec.outliers and i == 0:
            lines += _outlier_block(spec)
    for j, kind in enumerate(spec.externals):
        if kind == "full":
            lines.append(f"e{j} = " + _load(f"e{j}_ptr + offs_m[:, None] * stride_e{j}m + offs_n[None, :]",
                                           "mask_m[:, None] & mask_n[None, :]"))
        else:
            lines += [f"e{j} = " + _load(f"e{j}_ptr + offs_n", "mask_n"), f"e{j} = e{j}[None, :]"]
    result = "acc0"
    for t, (op, operands) in enumerate(spec.steps):
        lines.append(f"t{t} = " + fusion.ELEMENTWISE[op].triton.format(*operands))
        result = f"t{t}"
    return "\n".join(lines), result


def _outlier_block(spec: KernelSpec) -> list[str]:
    """SpQR's outliers as a sparse side-read in the epilogue: each output channel's outliers (CSR),
    one per channel per step, up to the tile's largest count; the activation entries they need are
    gathered from x (normalised like the main loop's tiles when a norm is fused)."""
    xg = ["xg = " + _load("x_ptr + offs_m[:, None] * stride_xm + ocol[None, :]", "mask_m[:, None] & omask[None, :]")]
    if spec.prologue == "layer":
        xg.append("xg = (xg - mean[:, None]) * rstd[:, None]")
    elif spec.prologue == "rms":
        xg.append("xg = xg * rstd[:, None]")
    if spec.norm_weight:
        w = "norm_wg" + (f" + {spec.norm_offset!r}" if spec.norm_offset else "")
        xg += ["norm_wg = " + _load("norm_w_ptr + ocol", "omask"), f"xg = xg * ({w})[None, :]"]
    if spec.norm_bias:
        xg += ["norm_bg = " + _load("norm_b_ptr + ocol", "omask"), "xg = xg + norm_bg[None, :]"]
    return (["# SpQR outliers: a sparse side-read, CSR by output channel (x gathered at the outliers' columns)",
            "olo = " + _load("optr0_ptr + offs_n", "mask_n", to="tl.int32", other="0"),
            "ocnt = " + _load("optr0_ptr + offs_n + 1", "mask_n", to="tl.int32", other="0") + " - olo",
            "for r in range(0, tl.max(ocnt, axis=0)):",
            "    omask = mask_n & (r < ocnt)",
            "    ocol = " + _load("ocol0_ptr + olo + r", "omask", to="tl.int32", other="0"),
            "    oval = " + _load("oval0_ptr + olo + r", "omask")]
            + ["    " + line for line in xg] + ["    acc0 = acc0 + xg * oval[None, :]"])


def _int32_acc(spec: KernelSpec) -> bool:
    """int8 x int8 over all of K: one exact int32 accumulator (int4 weights scale each group)."""
    return spec.integer and spec.format.bits == 8


def render(spec: KernelSpec) -> str:
    """The source of the kernel file for ``spec``."""
    name = spec.name
    acc_type = "tl.int32" if _int32_acc(spec) else "tl.float32"
    if spec.fma:
        acc_type = "tl.float32" if spec.integer and spec.format.bits == 4 else acc_type
        accs = "\n".join(f"acc{i} = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype={acc_type})"
                         for i in range(spec.n_weights))
        reduce = "# ---- the K reduction, once\n" + "\n".join(
            f"acc{i} = tl.sum(acc{i}, axis=2)" for i in range(spec.n_weights)) + "\n\n"
    else:
        accs = "\n".join(f"acc{i} = tl.zeros((BLOCK_M, BLOCK_N), dtype={acc_type})" for i in range(spec.n_weights))
        reduce = ""
    loop_body = "\n\n".join([_activation_block(spec)] + [
        _weight_block(spec, i) + "\n" + _dot(spec, i) for i in range(spec.n_weights)])
    epilogue, result = _epilogue(spec)
    store = ("# ---- store, in the output's dtype\n"
             f"tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], {result}.to(out_ptr.dtype.element_ty),\n"
             "         mask=mask_m[:, None] & mask_n[None, :])\n")
    if spec.split_k > 1:
        k_range = ("# this split's share of K: whole BLOCK_K steps (int4: whole groups)\n"
                   "k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K\n"
                   "k_lo = pid_k * k_per_split\n"
                   "k_hi = tl.minimum(K, k_lo + k_per_split)\n")
        loop = "for k0 in range(k_lo, k_hi, BLOCK_K):\n"
        ws_type = "tl.int32" if acc_type == "tl.int32" else "tl.float32"
        # the partial sums are part<i>; acc<i> (the totals) is defined inside the last split's branch
        accs, loop_body, reduce = (re.sub(r"\bacc(\d)\b", r"part\1", t) for t in (accs, loop_body, reduce))
        adds = "\n".join(f"tl.atomic_add(ws_ptr + {i} * M * N + ws_offs, part{i}, mask=ws_mask, sem=\"relaxed\")"
                         for i in range(spec.n_weights))
        reads = "\n".join(
            f"acc{i} = tl.load(ws_ptr + {i} * M * N + ws_offs, mask=ws_mask, other=0, cache_modifier=\".cg\").to({ws_type})\n"
            f"tl.store(ws_ptr + {i} * M * N + ws_offs, tl.zeros((BLOCK_M, BLOCK_N), dtype={ws_type}), mask=ws_mask)"
            for i in range(spec.n_weights))
        finish = (
            f"# ---- split-K over {spec.split_k} programs: add this split's partial sums into the workspace (atomics\n"
            "# resolve in L2); the last split to arrive at the tile reads the totals, leaves the workspace\n"
            "# and its counter zeroed for the next call, and runs the epilogue\n"
            "ws_offs = offs_m[:, None] * N + offs_n[None, :]\n"
            "ws_mask = mask_m[:, None] & mask_n[None, :]\n"
            + adds + "\n"
            "tl.debug_barrier()  # every thread's adds are issued before the arrival is counted\n"
            "tile = pid_m * tl.num_programs(1) + tl.program_id(1)\n"
            "arrived = tl.atomic_add(count_ptr + tile, 1)  # acq_rel: orders the adds before it\n"
            "if arrived == SPLIT_K - 1:\n"
            + textwrap.indent(reads + "\n" + "tl.store(count_ptr + tile, 0)\n\n" + epilogue + "\n\n" + store, " " * 4))
    else:
        k_range, loop = "", "for k0 in range(0, K, BLOCK_K):\n"
        finish = epilogue + "\n\n" + store
    kernel = (
        f"@triton.jit\ndef {name}_kernel(\n{_signature(spec)}\n):\n"
        + textwrap.indent(
            "# ---- which output tile this program computes\n"
            "pid_m = tl.program_id(0)\n"
            "pid_n = tl.program_id(1)\n"
            + ("pid_k = tl.program_id(2)\n" if spec.split_k > 1 else "")
            + _parts_prelude(spec)
            + "offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\n"
            "offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)\n"
            "mask_m = offs_m < M\n"
            "mask_n = offs_n < N\n\n"
            + _row_stats(spec)
            + "# ---- main loop: acc[m, n] += x[m, k] * w[n, k], dequantising the weight tile by tile\n"
            + k_range
            + accs + "\n"
            + loop
            + "    offs_k = k0 + tl.arange(0, BLOCK_K)\n"
            + "    mask_k = offs_k < K\n"
            + textwrap.indent(loop_body, " " * 4) + "\n\n"
            + reduce
            + finish, " " * 4))
    if spec.split_k > 1:
        kernel = kernel.replace("BLOCK_K: tl.constexpr,\n", "BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,\n", 1)
    if spec.stats:
        kernel = _stats_kernel(spec) + "\n\n" + kernel
    return _HEADER.format(name=name, ops=", ".join(spec.fused_ops), spec=repr(spec)) + _align(kernel) + "\n\n" + \
        _launcher(spec) + "\n\n\n" + _reference(spec) + _MAIN


def _parts_prelude(spec: KernelSpec) -> str:
    """Side-by-side weights: which weight this program's column tile belongs to. The kernel body is
    weight 0's; here its pointers, N, the output columns and the split-K workspace are re-pointed."""
    if spec.parts == 1:
        return ""
    fmt = spec.format
    names = ["qw", "scale"] + (["zero"] if has_second(fmt) else []) + (["bias"] if spec.bias else [])
    lines = [f"# ---- {spec.parts} weights side by side (one launch, x read once): which one this column tile is",
             "col0 = 0"]
    n_names = ["N"] + [f"N{p}" for p in range(1, spec.parts)]
    for p in range(spec.parts - 1, 0, -1):
        before = " + ".join(f"tl.cdiv({n}, BLOCK_N)" for n in n_names[:p])
        lines += [f"{'if' if p == spec.parts - 1 else 'elif'} pid_n >= {before}:",
                  f"    pid_n = pid_n - ({before})",
                  f"    col0 = {' + '.join(n_names[:p])}"]
        lines += [f"    {t}0_ptr = {t}{p}_ptr" for t in names]
        lines.append(f"    N = N{p}")
    lines += ["out_ptr += col0  # this weight's output columns",
              *(["ws_ptr += M * col0  # and its [M, N] block of the split-K workspace"] if spec.split_k > 1 else [])]
    return "\n".join(lines) + "\n"


def _launcher(spec: KernelSpec) -> str:
    fmt = spec.format
    params = launcher_params(spec)
    gm, _, _ = grid(spec, 0)  # the column tiles are rendered from N below
    grid_m = to_python(gm)
    grid_n = " + ".join(f"triton.cdiv({n}, {spec.block_n})" for n in ["N"] + [f"N{p}" for p in range(1, spec.parts)])
    lines = [f"def {spec.name}({', '.join(params)}):",
             f'    """Launch {spec.name}_kernel: returns [..., N] in {spec.out_dtype}."""',
             "    # -- check shapes",
             "    K = x.shape[-1]",
             "    N = scale0.shape[0]" + "".join(f"; N{p} = scale{p}.shape[0]" for p in range(1, spec.parts)),
             "    x = x.reshape(-1, K).contiguous()",
             "    M = x.shape[0]"]
    for i in range(spec.weight_sets):
        lines.append(f"    assert qw{i}.shape[0] == {'N' if i == 0 or spec.parts == 1 else f'N{i}'} and qw{i}.shape[1] * 8 // {fmt.bits} >= K, "
                     f"f\"weight {i}: codes {{tuple(qw{i}.shape)}} do not fit N={{N}}, K={{K}}\"")
    if spec.act_prequant:
        lines.append("    x_scale = x_scale.reshape(-1).float().contiguous()  # one per row")
    for j, kind in enumerate(spec.externals):
        lines.append(f"    e{j} = e{j}.reshape({'M, N' if kind == 'full' else 'N'}).contiguous()")
    lines += ["    # -- allocate the output",
              f"    out = torch.empty((M, {'N' + ''.join(f' + N{p}' for p in range(1, spec.parts))}), device=x.device, "
              f"dtype=torch.{spec.out_dtype})"]
    norm = (["norm_w"] if spec.norm_weight else []) + (["norm_b"] if spec.norm_bias else [])
    if spec.stats:
        lines += [f"    # -- per-row {', '.join(spec.stats)}, once per call",
                  "    stats = torch.empty((M, 3), device=x.device, dtype=torch.float32)",
                  f"    {spec.name}_stats[(M,)](x, x.stride(0), " + "".join(f"{t}, " for t in norm)
                  + ("eps, " if spec.prologue else "") + f"stats, M, K, BLOCK_K={STATS_BLOCK}, num_warps=4)"]
    lines += ["    # -- launch: one program per BLOCK_M rows, BLOCK_N columns" + (" and K split" if spec.split_k > 1 else ""),
              f"    grid = ({grid_m}, {grid_n}" + (f", {spec.split_k})" if spec.split_k > 1 else ")")]
    if spec.split_k > 1:
        lines.append(f"    ws, count = split_workspace(x.device, {spec.n_weights}, M, out.shape[1], grid[0] * grid[1], "
                     f"{_int32_acc(spec)})")
    args = ["x, x.stride(0)"]
    if norm:
        args.append(", ".join(norm))
    if spec.stats:
        args.append("stats")
    if spec.act_static or spec.act_prequant:
        args.append("x_scale")
    for i in range(spec.weight_sets):
        parts = [f"qw{i}", f"scale{i}"] + ([f"zero{i}"] if has_second(fmt) else [])
        parts += ([f"bias{i}"] if spec.bias else []) + [f"qw{i}.stride(0)"] + ([f"scale{i}.stride(0)"] if fmt.group_size else [])
        parts += ["optr0, ocol0, oval0"] if spec.outliers and i == 0 else []
        args.append(", ".join(parts))
    for j, kind in enumerate(spec.externals):
        args.append(f"e{j}, e{j}.stride(0)" if kind == "full" else f"e{j}")
    args += ["out, out.stride(0)"] + (["ws, count"] if spec.split_k > 1 else []) + [
             "M, N, " + "".join(f"N{p}, " for p in range(1, spec.parts)) + "K",
             f"BLOCK_M={spec.block_m}, BLOCK_N={spec.block_n}, BLOCK_K={spec.block_k}"
             + (f", SPLIT_K={spec.split_k}" if spec.split_k > 1 else "") + f", num_warps={spec.num_warps}"]
    lines.append(f"    {spec.name}_kernel[grid](\n        " + ",\n        ".join(args) + ")")
    if spec.parts > 1:  # one output buffer; each weight's columns a view of it
        bounds = ["0", "N"] + ["N" + "".join(f" + N{q}" for q in range(1, p + 1)) for p in range(1, spec.parts)]
        lines.append("    return (" + ", ".join(f"out[:, {bounds[p]}:{bounds[p + 1]}].view(*x_shape_prefix, -1)"
                                             for p in range(spec.parts)) + ")")
    else:
        lines.append("    return out.view(*x_shape_prefix, N)")
    # keep the caller's leading dims: captured before the reshape above
    lines.insert(3, "    x_shape_prefix = x.shape[:-1]")
    return "\n".join(lines)


_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def split_workspace(device: torch.device, n_weights: int, rows: int, n: int, tiles: int,
                    integer: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The zeroed partial-sum workspace ``[n_weights, rows, n]`` and per-tile arrival counters of a
    split-K launch, kept per device and shape: the kernel leaves both zeroed, so a call costs no
    memset launch (and a captured CUDA graph keeps pointing at them). Two launches of the same shape
    must not run concurrently on different streams."""
    key = (str(device), n_weights, rows, n, tiles, integer)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.zeros((n_weights, rows, n), device=device,
                                        dtype=torch.int32 if integer else torch.float32),
                            torch.zeros(tiles, device=device, dtype=torch.int32))
    return _WORKSPACES[key]


def _reference(spec: KernelSpec) -> str:
    fmt = spec.format
    lines = [f"def reference({', '.join(launcher_params(spec))}):",
             '    """The same computation in float32 torch: what the kernel is checked against."""',
             "    K = x.shape[-1]",
             "    h = x.float()"]
    if spec.prologue == "rms":
        w = ("norm_w.float()" + (f" + {spec.norm_offset!r}" if spec.norm_offset else "")) if spec.norm_weight else "None"
        lines.append(f"    h = F.rms_norm(h, [K], {w}, eps)")
    elif spec.prologue == "layer":
        w = "norm_w.float()" if spec.norm_weight else "None"
        b = "norm_b.float()" if spec.norm_bias else "None"
        lines.append(f"    h = F.layer_norm(h, [K], {w}, {b}, eps)")
    if spec.act_prequant:
        lines.append("    h = h * x_scale.float().reshape(*x.shape[:-1], 1)  # the codes, dequantised")
    elif spec.act:
        lines += [f"    h, h_scale = quantize_activations(h, {spec.act!r}, {'x_scale' if spec.act_static else 'None'})",
                  "    h = h.float() * h_scale  # the quantized activations, dequantised"]
    for i in range(spec.weight_sets):
        zero = f"zero{i}" if has_second(fmt) else "None"
        bias = f"bias{i}.float()" if spec.bias else "None"
        lines.append(f"    acc{i} = F.linear(h, dequantize_parts(FORMAT, qw{i}, scale{i}, {zero})[:, :K], {bias})")
        if spec.outliers and i == 0:
            lines += ["    # SpQR outliers, densified from the CSR copy",
                      "    orow = torch.repeat_interleave(torch.arange(optr0.numel() - 1, device=h.device), optr0.diff().long())",
                      "    dense = torch.zeros(optr0.numel() - 1, K, device=h.device)",
                      "    dense[orow, ocol0.long()] = oval0.float()",
                      "    acc0 = acc0 + h @ dense.T"]
    for j, kind in enumerate(spec.externals):
        lines.append(f"    e{j} = e{j}.float()")
    result = "acc0"
    for t, (op, operands) in enumerate(spec.steps):
        lines.append(f"    t{t} = " + fusion.ELEMENTWISE[op].torch.format(*operands))
        result = f"t{t}"
    if spec.parts > 1:
        lines.append("    return tuple(a.to(torch.%s) for a in (%s))" % (spec.out_dtype, ", ".join(
            f"acc{i}" for i in range(spec.parts))))
        return "\n".join(lines)
    lines.append(f"    return {result}.to(torch.{spec.out_dtype})")
    return "\n".join(lines)


_HEADER = '''"""Generated by lowbit-compiler: {name}

Fused ops: {ops}
Specialisation: {spec}

Run this file to check the kernel against its float reference (under Triton's interpreter when
there is no GPU).
"""
import os

import torch
import torch.nn.functional as F

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: check numerics under Triton's interpreter

import triton
import triton.language as tl

from lowbit_compiler.backends.codegen import KernelSpec, split_workspace
from lowbit_compiler.formats import WeightFormat, dequantize_parts
from lowbit_compiler.ops import quantize_activations

SPEC = {spec}
FORMAT = WeightFormat.parse(SPEC.fmt)


'''

_MAIN = '''


if __name__ == "__main__":
    from lowbit_compiler.backends.codegen import self_check

    self_check(SPEC, globals()[SPEC.name], reference)
'''

# ---------------------------------------------------------------------------------------------
# Checks a test or a user runs on generated code
# ---------------------------------------------------------------------------------------------

def arithmetic_violations(source: str) -> list[str]:
    """Why the kernel in ``source`` might compute in a 16-bit float (empty: it does not).

    The rule: every ``tl.load`` is immediately upcast with ``.to(tl.float32)`` (``.to(tl.int32)``
    for integer codes), and the kernel never names ``tl.bfloat16``/``tl.float16`` (a downcast
    before arithmetic). Stores convert to the output's dtype via ``out_ptr.dtype.element_ty``.
    Under the interpreter, bf16 arithmetic silently produces wrong numbers; this catches it first.
    """
    import ast

    tree = ast.parse(source)
    problems = []
    for fn in ast.walk(tree):
        if not (isinstance(fn, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in fn.decorator_list)):
            continue
        upcast = {}
        for node in ast.walk(fn):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "to"
                    and node.args):
                upcast[id(node.func.value)] = ast.unparse(node.args[0])
            if isinstance(node, ast.Attribute) and ast.unparse(node) in ("tl.bfloat16", "tl.float16"):
                problems.append(f"{fn.name} line {node.lineno}: names {ast.unparse(node)}")
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "tl.load":
                to = upcast.get(id(node))
                if to not in ("tl.float32", "tl.int32"):
                    problems.append(f"{fn.name} line {node.lineno}: tl.load not upcast to fp32/int32 (.to({to}))")
    return problems


def make_inputs(spec: KernelSpec, rows: int, n: int, k: int, seed: int = 0, device: str = "cpu") -> list[Any]:
    """Random arguments for the launcher of ``spec`` (weights quantized with the spec's format)."""
    from lowbit_compiler.formats import quantize

    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[spec.x_dtype]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    fmt = spec.format
    args: list[Any] = [randn(rows, k)]
    if spec.norm_weight:
        args.append((torch.rand(k, generator=g) + 0.5).to(dtype).to(device))
    if spec.norm_bias:
        args.append(randn(k, scale=0.1))
    if spec.act_prequant:  # codes and their per-row scale, as rotate_quantize returns them
        top = int(ACTIVATION_MAX[spec.act])
        args[0] = torch.randint(-top, top + 1, (rows, k), generator=g, dtype=torch.int8).to(device)
        args.append((torch.rand(rows, 1, generator=g) * 0.05 + 0.01).to(device))
    if spec.act_static:  # a calibrated scale that saturates the largest activations a little
        args.append((args[0].float().abs().amax() / ACTIVATION_MAX[spec.act] * 0.8).reshape(1))
    ns = n if isinstance(n, tuple) else (n,) * spec.weight_sets
    for wi in range(spec.weight_sets):
        n = ns[wi]
        w = torch.randn(n, k, generator=g) / k ** 0.5
        if fmt.group_size and k % fmt.group_size:
            w = torch.nn.functional.pad(w, (0, fmt.padded_k(k) - k))
        qw = quantize(w, fmt)
        args += [qw.qweight.to(device), qw.scale.to(device)]
        if qw.zero is not None:
            args.append(qw.zero.to(device))
        if spec.bias:
            args.append(randn(n, scale=0.1))
        if spec.outliers and wi == 0:
            args += list(random_outliers(n, k, g, device))
    for kind in spec.externals:
        args.append(randn(rows, n) if kind == "full" else randn(n))
    if spec.prologue:
        args.append(1e-5)
    return args


def random_outliers(n: int, k: int, g: torch.Generator, device: str = "cpu", most: int = 4):
    """A random CSR outlier matrix (0..most per output channel, distinct columns, fp16 values)."""
    counts = torch.randint(0, most + 1, (n,), generator=g)
    cols = [torch.randperm(k, generator=g)[: int(c)].sort().values for c in counts]
    ptr = torch.zeros(n + 1, dtype=torch.int32)
    ptr[1:] = counts.cumsum(0)
    col = torch.cat(cols).to(torch.int32)
    val = (torch.randn(col.numel(), generator=g) * 0.5).to(torch.float16)
    return ptr.to(device), col.to(device), val.to(device)


def csr_outliers(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n: int):
    """SpQR's COO outliers (``lowbit::sparse_linear``'s rows, cols, values) as the kernel's CSR copy:
    row pointers [n + 1] int32, columns int32 and values sorted by (row, column)."""
    order = torch.argsort(rows.long() * (int(cols.max()) + 1 if cols.numel() else 1) + cols.long(), stable=True)
    ptr = torch.zeros(n + 1, dtype=torch.int32, device=rows.device)
    ptr[1:] = torch.bincount(rows.long(), minlength=n).cumsum(0)
    return ptr, cols[order].to(torch.int32).contiguous(), values[order].contiguous()


def self_check(spec: KernelSpec, launch, reference, shapes=((1, 96, 256), (17, 96, 256)), floor_db: float = 40.0) -> None:
    from lowbit_compiler.formats import sqnr_db

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for rows, n, k in shapes:
        args = make_inputs(spec, rows, n, k, device=device)
        db = sqnr_db(reference(*args).float(), launch(*args).float())
        print(f"{spec.name}: M={rows} N={n} K={k}: SQNR vs reference {db:.1f} dB")
        assert db >= floor_db, f"{spec.name}: SQNR {db:.1f} dB is below {floor_db} dB"


_GENERATOR_SOURCE_HASH = hashlib.sha256(
    "".join(inspect.getsource(f) for f in (
        _signature, _stats_kernel, _row_stats, _quantize_x, _activation_block, _normalised_x,
        _weight_block, _unpack_codes, _nf4_select, _e2m1_block, _outlier_block, _dot, _epilogue, _int32_acc, render, _launcher, _reference, choose_variant,
        split_k_for, split_workspace, _parts_prelude)).encode() + repr(STATS_BLOCK).encode() + _HEADER.encode() + _MAIN.encode()).hexdigest()[:16]
