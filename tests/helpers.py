"""Test helpers: compile through the lowbit backend and keep the compiled graphs for inspection."""
from __future__ import annotations

from typing import Any

import torch

from lowbit_compiler.backends.lowbit_backend import BackendOptions, compile_graph


class Recorder:
    """A Dynamo backend that runs the lowbit backend and records each compiled graph."""

    def __init__(self, **options: Any):
        self.options = BackendOptions.from_dict(options)
        self.compiled: list[Any] = []

    def __call__(self, gm, example_inputs):
        compiled, _ = compile_graph(gm, example_inputs, self.options)
        self.compiled.append(compiled)
        return compiled

    @property
    def graphs(self):
        return [c.lowbit_graph for c in self.compiled]

    @property
    def summaries(self):
        return [c.lowbit_summary for c in self.compiled]


def op_names(gm: torch.fx.GraphModule) -> list[str]:
    """The graph as a list of call targets, one short name each (a compact golden form)."""
    names = []
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            target = node.target
            names.append(target if isinstance(target, str) else getattr(target, "__name__", str(target)))
    return names


def count(gm: torch.fx.GraphModule, name: str) -> int:
    return op_names(gm).count(name)
