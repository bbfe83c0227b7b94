"""The pipeline: run a recipe's passes in order, check, time and record each.

Read top to bottom, ``run_pipeline`` is the whole story: for each pass named by the recipe, check
that what it requires has been established, run it, lint + verify (strict/debug), time it, record
what it did, and hand the graph to the dump writer; at the end, account for every weight
(``coverage.account``: quantized, or left float and why).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import torch.fx as fx

from lowbit_compiler import coverage, memory, verify
from lowbit_compiler.pass_base import LowbitError, PassContext, get_pass
from lowbit_compiler.recipe import Recipe, instantiate


@dataclasses.dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    matches: int
    details: dict[str, Any]


@dataclasses.dataclass
class PipelineReport:
    recipe: Recipe
    passes: list[PassRecord]
    layers: dict[str, dict[str, Any]]
    fallbacks: dict[str, int]
    coverage: dict[str, Any] = dataclasses.field(default_factory=dict)


def run_pipeline(gm: fx.GraphModule, recipe: Recipe, *, strict: bool = False, debug: bool = False,
                 on_stage: Callable[[str, fx.GraphModule], None] | None = None,
                 ctx: PassContext | None = None) -> PipelineReport:
    """Run ``recipe.passes`` on ``gm`` in place. ``on_stage(name, gm)`` sees the graph after each;
    ``ctx`` (optional) lets the caller keep reporting into the same context afterwards."""
    ctx = ctx if ctx is not None else PassContext(recipe=recipe, strict=strict)
    memory.pin_mmap_threshold()  # a fixed threshold keeps quantizing's peak the same from run to run
    established: set[str] = set()
    records: list[PassRecord] = []
    for pass_name in recipe.passes:
        pass_ = instantiate(get_pass(pass_name), recipe)
        missing = [r for r in pass_.required(recipe) if r not in established]
        if missing:
            raise LowbitError(f"recipe {recipe.name!r}: pass {pass_name!r} requires {missing}, which no "
                              f"earlier pass ensures; put the pass that ensures it first "
                              f"(e.g. 'canonicalize' ensures 'canonical')")
        start = time.perf_counter()
        result = pass_.call(gm, ctx)
        seconds = time.perf_counter() - start
        if result.modified:
            gm.recompile()
        if ctx.strict or debug:
            gm.graph.lint()
            verify.verify(gm)
        established.update(pass_.ensures)
        records.append(PassRecord(pass_name, seconds, result.modified, result.matches, result.details))
        if on_stage is not None:
            on_stage(pass_name, gm)
    account = coverage.account(gm, ctx.layers, recipe, ctx.strict)  # every weight: quantized, or why not
    return PipelineReport(recipe, records, ctx.layers, dict(ctx.fallbacks), account)
