"""Capture: turn Dynamo's graph into the project's IR.

Dynamo hands a backend a GraphModule whose parameters and buffers are placeholders bound to the
real tensors in ``example_inputs``. Capture *freezes* them: each becomes a ``get_attr`` whose target
is the module FQN and whose attribute is the very ``nn.Parameter`` object (identity kept), tagged
``ir.PARAM``. Each op is tagged with the module that called it (``ir.MODULE``), and ``lowbit::``
ops called as packets (``torch.ops.lowbit.wo_linear``, ``qa_linear``, ``sparse_linear``, as a
compressed model's modules do) are
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
    # (position, FQN, parameter, its version when frozen): what must still hold for the graph to be valid
    frozen_parameters: list[tuple[int, str, torch.Tensor, int]] = dataclasses.field(default_factory=list)
    # position -> (FQN, is_parameter) of every frozen input; Dynamo drops the sources it was read
    # from after compilation, so a re-capture of the same graph reuses this
    module_state: dict[int, tuple[str, bool]] = dataclasses.field(default_factory=dict)
    # (position, FQN, buffer): frozen buffers, checked by identity only (a buffer the model updates
    # in place must not recompile the graph; another module's buffer must: see stale_parameter)
    frozen_buffers: list[tuple[int, str, torch.Tensor]] = dataclasses.field(default_factory=list)

    def call_args(self, args: Sequence[Any]) -> list[Any]:
        return [args[i] for i in self.kept_inputs]

    def stale_parameter(self, args: Sequence[Any]) -> str | None:
        """The FQN of a parameter that was replaced or edited in place since capture, else None.

        Dynamo passes parameters as graph inputs without guarding on them, so a swapped
        ``nn.Parameter`` reaches a frozen graph as an ignored argument; the compiled callable
        checks this on every call (a few microseconds) and re-freezes instead of computing with
        the old weights. Edits through ``param.data`` do not bump the version and are not seen.
        Buffers are compared by identity: Dynamo reuses one graph for modules whose forward shares
        code (each decoder layer after a graph break), and a compressed model's packed weights are
        buffers (without this, every layer ran the first layer's packed weights).
        """
        for index, fqn, param, version in self.frozen_parameters:
            if args[index] is not param or param._version != version:
                return fqn
        for index, fqn, buffer in self.frozen_buffers:
            if args[index] is not buffer:
                return fqn
        return None


def capture(gm: fx.GraphModule, example_inputs: Sequence[Any],
            module_state: dict[int, tuple[str, bool]] | None = None) -> Captured:
    """Freeze ``gm``'s parameter inputs. ``module_state`` (from an earlier capture of the same
    Dynamo graph) says which positions are module state when Dynamo's sources are gone."""
    graph = copy.deepcopy(gm.graph)  # Dynamo's graph stays untouched (meta is shared, not copied)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    root = torch.nn.Module()
    kept, frozen, frozen_parameters, states, frozen_buffers = [], {}, [], {}, []
    first_real = next((n for n in graph.nodes if n.op != "placeholder"), None)
    for index, (node, value) in enumerate(zip(placeholders, example_inputs)):
        state = module_state.get(index) if module_state is not None else _dynamo_adapter.module_state_of(node)
        if state is None or not isinstance(value, torch.Tensor):
            kept.append(index)
            continue
        fqn, is_parameter = state
        if fqn in frozen and frozen[fqn] is not value:
            raise RuntimeError(f"capture: two different tensors claim the FQN {fqn!r}")
        frozen[fqn] = value
        states[index] = state
        if is_parameter:
            frozen_parameters.append((index, fqn, value, value._version))
        else:
            frozen_buffers.append((index, fqn, value))
        ir.set_attr(root, fqn, value)
        with graph.inserting_before(first_real):
            attr = graph.get_attr(fqn)
        attr.meta.update(node.meta)
        attr.meta.pop("grapharg", None)
        ir.put(attr, ir.PARAM, ir.ParamInfo(fqn=fqn, is_parameter=is_parameter))
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    for node in graph.nodes:
        if (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverloadPacket)
                and node.target._qualified_op_name.startswith("lowbit::")):
            node.target = node.target.default  # lowbit ops called from eager modules (compressed models)
        if node.op in ("call_function", "call_method", "call_module"):
            module = _dynamo_adapter.calling_module(node)
            if module is not None:
                ir.put(node, ir.MODULE, ir.ModuleInfo(*module))
    # Attributes are copied by reference: the GraphModule holds the user's nn.Parameter objects.
    new_gm = fx.GraphModule(root, graph, class_name="LowbitGraph")
    return Captured(new_gm, kept, frozen, frozen_parameters, states, frozen_buffers)
