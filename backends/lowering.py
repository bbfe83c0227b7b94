"""Lowering: choose an implementation for every ``lowbit::`` op node.

For each ``lowbit::wo_linear`` node the lowering picks, in order:

1. the requested target's kernel: ``"cpu"`` -> the packed CPU kernels (prepacked here, at compile
   time, and cached per quantized tensor); ``"triton"`` -> the Triton code generator (not built
   yet: every node falls back, with the reason logged);
2. otherwise the float reference (``lowbit_compiler.ops.wo_linear_reference``), with the reason
   logged and counted (``PassContext.fallback``); strict mode raises instead.

The node is rewritten into a direct call of the chosen implementation, so the lowered graph (dumped
as ``NN_lowered.py``) shows exactly what runs. Everything that is not a lowbit op runs as captured
(``inner="eager"``).
"""
from __future__ import annotations

import collections
import dataclasses

import torch
import torch.fx as fx

from lowbit_compiler import _dynamo_adapter, ir
from lowbit_compiler.ops import wo_linear_reference
from lowbit_compiler.pass_base import PassContext
from lowbit_compiler.backends import cpu_kernels

TARGETS = ("auto", "cpu", "triton")


@dataclasses.dataclass
class LoweringReport:
    target: str
    kernels: dict[str, str]  # node name -> implementation
    counts: dict[str, int]


def resolve_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"target={target!r}; expected one of {TARGETS}")
    if target == "auto":
        return "triton" if torch.cuda.is_available() else "cpu"
    return target


def lower(gm: fx.GraphModule, ctx: PassContext, target: str = "auto",
          cpu_compute_dtype: str = "bfloat16") -> LoweringReport:
    target = resolve_target(target)
    kernels: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is torch.ops.lowbit.wo_linear.default):
            continue
        x, qweight, scale, zero, bias, fmt, in_features = node.args
        where = ir.describe(node)
        xv = _dynamo_adapter.example_value(x)
        reason = None
        if target == "triton":
            reason = "target 'triton': the Triton code generator is not available yet; using the float reference"
        elif xv is None:
            reason = "no example value for the activation (dtype/device unknown)"
        else:
            reason = cpu_kernels.unsupported_reason(xv.dtype, xv.device, fmt)
        if reason is not None:
            ctx.fallback(where, reason)
            node.target = wo_linear_reference
            kernels[node.name] = "reference"
            continue
        dtype = cpu_kernels.compute_dtype_for(xv.dtype, cpu_compute_dtype)
        tensors = [None if a is None else ir.fetch_attr(gm, a.target) for a in (qweight, scale, zero)]
        packed = cpu_kernels.prepack(*tensors, fmt, in_features, dtype)
        base = qweight.target.rsplit(".", 1)[0]
        packed_name = f"{base}.packed_{str(dtype).split('.')[-1]}"
        ir.set_attr(gm, packed_name, packed)
        with gm.graph.inserting_before(node):
            packed_node = gm.graph.get_attr(packed_name)
        node.target = cpu_kernels.packed_linear
        node.args = (x, packed_node, bias, dtype)
        kernels[node.name] = f"cpu:{fmt}:{str(dtype).split('.')[-1]}"
    gm.graph.eliminate_dead_code()
    gm.recompile()
    counts = collections.Counter(v.split(":")[0] for v in kernels.values())
    return LoweringReport(target, kernels, dict(counts))
