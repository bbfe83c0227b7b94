"""Capture: turn Dynamo's graph into the project's IR.

Dynamo hands a backend a GraphModule whose parameters and buffers are placeholders bound to the
real tensors in ``example_inputs``. Capture *freezes* them: each becomes a ``get_attr`` whose target
is the module FQN and whose attribute is the very ``nn.Parameter`` object (identity kept), tagged
``ir.PARAM``. Each op is tagged with the module that called it (``ir.MODULE``), and ``lowbit::``
ops called as packets (``torch.ops.lowbit.wo_linear``, as a compressed model's modules do) are
bound to their one overload. The remaining placeholders (token ids, cache tensors, symbolic sizes) stay inputs.

:class:`Captured` remembers which positions of Dynamo's argument list survive, so the compiled
callable can be called with Dynamo's arguments unchanged.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Sequence

import torch
import torch.fx as fx

from lowbit_compiler import _dynamo_adapter, ir


@dataclasses.dataclass
class Captured:
    gm: fx.GraphModule
    kept_inputs: list[int]          # positions of Dynamo's args that remain placeholders
    frozen: dict[str, torch.Tensor]  # FQN -> parameter/buffer object

    def call_args(self, args: Sequence[Any]) -> list[Any]:
        return [args[i] for i in self.kept_inputs]


def capture(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Captured:
    graph = copy.deepcopy(gm.graph)  # Dynamo's graph stays untouched (meta is shared, not copied)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    root = torch.nn.Module()
    kept, frozen = [], {}
    first_real = next((n for n in graph.nodes if n.op != "placeholder"), None)
    for index, (node, value) in enumerate(zip(placeholders, example_inputs)):
        state = _dynamo_adapter.module_state_of(node)
        if state is None or not isinstance(value, torch.Tensor):
            kept.append(index)
            continue
        fqn, is_parameter = state
        if fqn in frozen and frozen[fqn] is not value:
            raise RuntimeError(f"capture: two different tensors claim the FQN {fqn!r}")
        frozen[fqn] = value
        ir.set_attr(root, fqn, value)
        with graph.inserting_before(first_real):
            attr = graph.get_attr(fqn)
        attr.meta.update(node.meta)
        attr.meta.pop("grapharg", None)
        ir.put(attr, ir.PARAM, ir.ParamInfo(fqn=fqn, is_parameter=is_parameter))
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.lowbit.wo_linear:
            node.target = node.target.default  # lowbit ops called from eager modules (compressed models)
        if node.op in ("call_function", "call_method", "call_module"):
            module = _dynamo_adapter.calling_module(node)
            if module is not None:
                ir.put(node, ir.MODULE, ir.ModuleInfo(*module))
    # Attributes are copied by reference: the GraphModule holds the user's nn.Parameter objects.
    new_gm = fx.GraphModule(root, graph, class_name="LowbitGraph")
    return Captured(new_gm, kept, frozen)
