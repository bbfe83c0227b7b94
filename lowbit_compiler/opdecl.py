"""Op declarations: what the rest of the compiler knows about each ``lowbit::`` op, in one record.

Each op family is defined once in ``lowbit_compiler/ops.py`` (``torch.library`` schema, fake
implementation, CPU implementation) and declared here with the rest of what it means
(:class:`OpDeclaration`): its float reference, how the backend lowers it for the generated
kernels (or why it cannot), its ``nn.Module`` form in the offline flow, and how ``inspect`` and
the dumps describe a call. Lowering (``backends/lowering.py``), the offline write-back
(``offline.write_back``), the verifier and the summaries read these records and the op's
schema (arguments by name: :func:`args`); none of them branches on op names or indexes
``node.args``.

A new op family is: its definition in ``ops.py``, one ``declare(...)`` here, the passes that
insert it, a lowering registered with ``backends.lowering.register_lowering`` where a kernel
exists, and its tests.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.fx as fx

from lowbit_compiler import ir

# Module forms in the offline flow (offline.write_back):
LINEAR = "linear"              # the op is a linear layer: a LowbitLinear replaces the module
INPUT_TRANSFORM = "input"      # applied to a linear's input: part of that LowbitLinear (or a pre-hook)
SIDE = "side"                  # added to a linear's output (``linear + op``): part of that LowbitLinear (or RSparseLinear)
ATTENTION = "attention"        # on queries/keys before attention: the attention implementation wraps it
LOWERED = "lowered"            # only the backend creates it (a generated kernel's call): no module form
EXPERTS = "experts"            # a grouped matmul over stacked expert weights: a LowbitExperts replaces the experts module
GRAPH = "graph"                # no module form yet: compress refuses it (names the node), torch.compile runs it


@dataclasses.dataclass(frozen=True)
class OpDeclaration:
    """One ``lowbit::`` op family.

    Args:
        name: the op's name in the ``lowbit`` namespace.
        summary: one line: what it computes.
        reference: float reference with the op's signature (every fast path is tested against it).
        module: its form in the offline flow (LINEAR, INPUT_TRANSFORM, SIDE, ATTENTION, LOWERED, EXPERTS).
        no_kernel: why the generated-kernel target has no lowering for it (None: the backend
            registers one); the op's own CPU implementation then runs, and the reason is logged.
        fusion_anchor: a low-bit matmul the fusion groups form around (``backends/fusion.py``).
        describe: inspect's one-line description of a call, from its arguments by name.
    """

    name: str
    summary: str
    reference: Callable[..., Any]
    module: str
    no_kernel: str | None = None
    fusion_anchor: bool = False
    describe: Callable[[dict[str, Any]], str] | None = None

    @property
    def op(self) -> torch._ops.OpOverload:
        return getattr(torch.ops.lowbit, self.name).default


DECLARATIONS: dict[Any, OpDeclaration] = {}


def declare(decl: OpDeclaration) -> OpDeclaration:
    DECLARATIONS[decl.op] = decl
    return decl


def of(node: Any) -> OpDeclaration | None:
    """The declaration of a node's op (None for everything that is not a ``lowbit::`` op)."""
    if isinstance(node, fx.Node) and node.op == "call_function":
        return DECLARATIONS.get(node.target)
    return None


def args(node: fx.Node) -> dict[str, Any]:
    """A ``lowbit::`` node's arguments by name (the op's schema; defaults filled in)."""
    return ir.op_args(node)


def is_module(node: Any, form: str) -> bool:
    decl = of(node)
    return decl is not None and decl.module == form


def describe(node: fx.Node) -> str:
    decl = of(node)
    if decl is None:
        return node.name
    text = decl.describe(args(node)) if decl.describe is not None else ""
    return f"lowbit::{decl.name}" + (f" ({text})" if text else "")


# --------------------------------------------------------------------------------------------
# The built-in ops (defined in ops.py)
# --------------------------------------------------------------------------------------------

def _declare_builtins() -> None:
    from lowbit_compiler import ops

    def linear_text(a: dict[str, Any]) -> str:
        act = f", {a['act']} activations" + (" (static scale)" if a.get("x_scale") is not None else "") \
            if a.get("act") else ""
        return f"{a['fmt']} weights, K={a['in_features']}{act}"

    declare(OpDeclaration(
        "wo_linear", "weight-only quantized linear: x @ dequantize(W).T + b", ops.wo_linear_reference, LINEAR,
        fusion_anchor=True, describe=linear_text))
    declare(OpDeclaration(
        "qa_linear", "quantized weights x quantized activations (per token, or one static scale)",
        ops.qa_linear_reference, LINEAR, fusion_anchor=True, describe=linear_text))
    declare(OpDeclaration(
        "grouped_linear", "grouped low-bit matmul over stacked expert weights: rows sorted by expert, each row times "
        "its expert's dequantised weight (MoE)", ops.grouped_linear_reference, EXPERTS,
        describe=lambda a: linear_text(a) + ", stacked experts"))
    declare(OpDeclaration(
        "hadamard", "x @ H_n / sqrt(n) over the last dimension (online rotation: R3, R4)", ops.hadamard_reference,
        INPUT_TRANSFORM, describe=lambda a: "online Hadamard"))
    declare(OpDeclaration(
        "kron_transform", "x @ (left (x) right) over the last dimension (FlatQuant's online transform)",
        ops.kron_transform_reference, INPUT_TRANSFORM,
        no_kernel=("no standalone Triton kernel for lowbit::kron_transform (it is fused into rotate_quantize only "
                   "where every user is a per-token int8/int4 qa_linear); its torch implementation (two small matmuls) runs"),
        describe=lambda a: "FlatQuant affine transform"))
    declare(OpDeclaration(
        "sparse_linear", "x @ S.T for a sparse [N, K] matrix in COO form (SpQR outliers beside a dense op)",
        ops.sparse_linear, SIDE,
        no_kernel="no Triton kernel for lowbit::sparse_linear yet (SpQR outliers); its torch implementation "
                  "(gather + index_add) runs beside the fused kernel",
        describe=lambda a: f"fp16 outliers, N={a['out_features']}"))
    declare(OpDeclaration(
        "act_sparsify", "x with the entries whose |x| (or |x| * column norm) is below a calibrated threshold zeroed "
        "(TEAL, CATS, WINA)", ops.act_sparsify_reference, INPUT_TRANSFORM,
        no_kernel="no Triton kernel for lowbit::act_sparsify outside a fused sparse_input_linear; its torch "
                  "implementation (one compare, one select) runs",
        describe=lambda a: "activation threshold" + (" x column norm (WINA)" if a.get("col_scale") is not None
                                                     else "")))
    declare(OpDeclaration(
        "sparse_input_linear", "act_sparsify fused into a weight-only quantized linear: the decode GEMV reads only "
        "the weight rows of the inputs kept", ops.sparse_input_linear_reference, LINEAR,
        describe=lambda a: linear_text(a) + ", sparse input"))
    declare(OpDeclaration(
        "sparse_input_qa_linear", "act_sparsify fused into a linear with quantized activations (W8A8 + TEAL/WINA): "
        "one row runs the activation-sparse GEMV on the activation codes", ops.sparse_input_qa_linear_reference,
        LINEAR, describe=lambda a: linear_text(a) + ", sparse input"))
    declare(OpDeclaration(
        "lowrank_residual", "R-Sparse's low-rank part: the thresholded-away inputs times a rank-r factorisation of "
        "the weight, added to the linear over the kept inputs", ops.lowrank_residual_reference, SIDE,
        no_kernel="no Triton kernel for lowbit::lowrank_residual yet; its torch implementation (two small matmuls) "
                  "runs",
        describe=lambda a: "R-Sparse low-rank residual"))
    declare(OpDeclaration(
        "generated", "one call of a generated kernel (inner='inductor')", ops.generated, LOWERED))


_declare_builtins()
