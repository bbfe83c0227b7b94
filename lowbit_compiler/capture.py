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
import weakref
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


# Full names of compiled models: Dynamo names a graph's parameters from the frame it traced, and
# after a graph break inside a decoder layer (the compressed KV cache's attention: each layer's
# attention and the rest of the layer are separate frames) that frame is the layer or its
# attention, so its names are ``q_proj.weight`` for every layer. The model a compressed KV cache is
# installed on (``kv.install``) is remembered here, and a graph whose tensors it holds gets the
# prefix that makes their names full (looked up when a graph is captured: the model's modules may
# have been swapped since, as ``compress`` swaps its linears).
_MODELS: list[weakref.ref] = []


def remember_names(module: torch.nn.Module) -> None:
    """Name graphs' parameters and buffers after ``module``'s full names where it holds them."""
    _MODELS[:] = [ref for ref in _MODELS if ref() is not None and ref() is not module]
    _MODELS.append(weakref.ref(module))


def full_name_prefix(state: dict[str, torch.Tensor]) -> str | None:
    """The prefix that turns these (name -> tensor) names into the full names a remembered model
    gives the same tensors: ``""`` when they are full already, None when some tensor is unknown
    or the tensors disagree (the names stay as Dynamo gave them)."""
    if not state:
        return None
    wanted = {id(t): t for t in state.values()}
    found: dict[int, str] = {}
    for ref in _MODELS:
        model = ref()
        if model is None:
            continue
        for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            if wanted.get(id(t)) is t and id(t) not in found:
                found[id(t)] = name
    prefixes = set()
    for fqn, t in state.items():
        full = found.get(id(t))
        if full is None or not (full == fqn or full.endswith("." + fqn)):
            return None
        prefixes.add(full[: len(full) - len(fqn)])
    return prefixes.pop() if len(prefixes) == 1 else None


def capture(gm: fx.GraphModule, example_inputs: Sequence[Any],
            module_state: dict[int, tuple[str, bool]] | None = None) -> Captured:
    """Freeze ``gm``'s parameter inputs. ``module_state`` (from an earlier capture of the same
    Dynamo graph) says which positions are module state when Dynamo's sources are gone. Names are
    made full where a remembered model holds the same tensors (:func:`full_name_prefix`)."""
    graph = copy.deepcopy(gm.graph)  # Dynamo's graph stays untouched (meta is shared, not copied)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    root = torch.nn.Module()
    kept, frozen, frozen_parameters, states, frozen_buffers = [], {}, [], {}, []
    first_real = next((n for n in graph.nodes if n.op != "placeholder"), None)
    found = [(index, node, value, module_state.get(index) if module_state is not None
              else _dynamo_adapter.module_state_of(node))
             for index, (node, value) in enumerate(zip(placeholders, example_inputs))]
    prefix = full_name_prefix({st[0]: v for _, _, v, st in found if st is not None and isinstance(v, torch.Tensor)})
    prefix = prefix or ""
    for index, node, value, state in found:
        if state is None or not isinstance(value, torch.Tensor):
            kept.append(index)
            continue
        fqn, is_parameter = prefix + state[0], state[1]  # module_state keeps Dynamo's own name (below)
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
                name = (prefix + module[0]) if module[0] else prefix.rstrip(".")
                ir.put(node, ir.MODULE, ir.ModuleInfo(name, module[1]))
    # Attributes are copied by reference: the GraphModule holds the user's nn.Parameter objects.
    new_gm = fx.GraphModule(root, graph, class_name="LowbitGraph")
    return Captured(new_gm, kept, frozen, frozen_parameters, states, frozen_buffers)
