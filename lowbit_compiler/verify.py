"""The project's IR verifier, run after every pass in strict/debug mode (after ``graph.lint()``).

It checks the conventions of ``lowbit_compiler/ir.py`` that lint cannot know about:

* every ``get_attr`` resolves, and frozen ones carry ``ir.PARAM`` whose FQN is the target;
* ``node.meta["lowbit"]`` holds only known keys with frozen-dataclass values;
* every ``lowbit::wo_linear`` has a valid format key, consistent tensor shapes and dtypes, and
  a ``WEIGHT_QUANT`` decision that agrees with them; every ``lowbit::grouped_linear`` the same
  per expert, with one expert count across its tensors;
* no frozen parameter is left as a placeholder.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from lowbit_compiler import ir, opdecl
from lowbit_compiler.formats import FormatError, WeightFormat


class IRError(AssertionError):
    pass


def _fail(node: fx.Node, message: str) -> None:
    raise IRError(f"IR verifier: node {node.name} ({node.format_node()}): {message}")


def verify(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        meta = node.meta.get(ir.META, {})
        for key, value in meta.items():
            if key not in ir.KNOWN_KEYS:
                _fail(node, f"unknown meta key {key!r}; define it in lowbit_compiler/ir.py")
            if not (dataclasses.is_dataclass(value) and type(value).__dataclass_params__.frozen):
                _fail(node, f"meta[{key!r}] must be a frozen dataclass spec, got {type(value).__name__}")
        if node.op == "get_attr":
            try:
                ir.fetch_attr(gm, node.target)
            except AttributeError:
                _fail(node, f"get_attr target {node.target!r} does not resolve")
            info = meta.get(ir.PARAM)
            if info is not None and info.fqn != node.target:
                _fail(node, f"PARAM fqn {info.fqn!r} differs from the target {node.target!r}")
        if opdecl.is_module(node, opdecl.LINEAR):
            _verify_quantized_linear(gm, node)
        if opdecl.is_module(node, opdecl.EXPERTS):
            _verify_quantized_linear(gm, node, stacked=True)


def _verify_quantized_linear(gm: fx.GraphModule, node: fx.Node, stacked: bool = False) -> None:
    """A quantized linear's tensors against its format's layout; ``stacked``: every tensor has a
    leading expert dimension (the same for all) and the layout holds per expert."""
    a = opdecl.args(node)
    qweight, scale, zero, fmt_key, in_features = a["qweight"], a["scale"], a["zero"], a["fmt"], a["in_features"]
    try:
        fmt = WeightFormat.parse(fmt_key)
    except FormatError as e:
        _fail(node, str(e))
    tensors = {}
    for name, arg in (("qweight", qweight), ("scale", scale), ("zero", zero)):
        if arg is None:
            continue
        if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
            _fail(node, f"{name} must be a get_attr constant")
        tensors[name] = ir.fetch_attr(gm, arg.target)
    experts = 0
    if stacked:
        counts = {name: t.shape[0] if t.dim() else None for name, t in tensors.items()}
        if len(set(counts.values())) != 1:
            _fail(node, f"stacked expert tensors disagree on the number of experts: {counts}")
        experts = counts["scale"]
        tensors = {name: t[0] for name, t in tensors.items()}  # one expert's layout
    n = tensors["scale"].shape[0]
    layout = fmt.layout(n, in_features)
    for name in ("qweight", "scale", "zero"):
        want, got = layout[name], tensors.get(name)
        if (want is None) != (got is None):
            _fail(node, f"format {fmt.key} {'takes no' if want is None else 'needs a'} {name} tensor")
        if want is not None and (got.dtype, tuple(got.shape)) != want:
            _fail(node, f"{name} is {got.dtype}{tuple(got.shape)}, format {fmt.key} with K={in_features} "
                  f"needs {want[0]}{want[1]}")
    decision = ir.get(node, ir.WEIGHT_QUANT)
    if decision is not None and (decision.format, decision.out_features, decision.in_features, decision.experts) != (
            fmt.key, n, in_features, experts):
        _fail(node, f"WEIGHT_QUANT decision {decision} disagrees with the op arguments")
