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


def pairwise(factors: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """A small list of cases in which every pair of values of every two factors occurs at least
    once (greedy all-pairs; deterministic)."""
    names = list(factors)

    def pair(a: str, va: int, b: str, vb: int) -> tuple:
        return (a, va, b, vb) if names.index(a) < names.index(b) else (b, vb, a, va)

    uncovered = {pair(a, va, b, vb) for i, a in enumerate(names) for b in names[i + 1:]
                 for va in range(len(factors[a])) for vb in range(len(factors[b]))}
    cases = []
    while uncovered:
        a, va, b, vb = min(uncovered)
        case = {a: va, b: vb}
        for n in names:
            if n not in case:
                case[n] = max(range(len(factors[n])),
                              key=lambda v: sum(pair(m, case[m], n, v) in uncovered for m in case))
        uncovered -= {pair(a, case[a], b, case[b]) for i, a in enumerate(names) for b in names[i + 1:]}
        cases.append({n: factors[n][case[n]] for n in names})
    return cases


def covers_all_pairs(cases: list[dict[str, Any]], factors: dict[str, list[Any]]) -> bool:
    names = list(factors)
    seen = {(a, repr(c[a]), b, repr(c[b])) for c in cases for i, a in enumerate(names) for b in names[i + 1:]}
    return all((a, repr(va), b, repr(vb)) in seen for i, a in enumerate(names) for b in names[i + 1:]
               for va in factors[a] for vb in factors[b])


def softcapped_gemma2_kv4(softcap: float = 0.1):
    """``compress(gemma2, "kv4")`` of the zoo's tiny Gemma-2 with attention logit soft-capping set
    low enough to change the outputs; returns (the compressed model, its input ids)."""
    import copy

    from lowbit_compiler import compress, zoo

    model, inputs = zoo.build("gemma2")
    model.config.attn_logit_softcapping = softcap
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = softcap
    return compress(copy.deepcopy(model), "kv4", progress=False), inputs["input_ids"]
