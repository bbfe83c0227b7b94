"""The pass contract, the registry, and the pattern + replacement helper.

A pass is a class with a ``name``, the IR properties it ``requires`` and ``ensures``, and a
``call(gm, ctx)`` that rewrites the graph in place and returns a :class:`PassResult` saying what it
did. Register it with ``@register_pass`` and name it in a recipe's ``passes`` list::

    @register_pass
    class CountLinears(Pass):
        name = "count_linears"
        requires = ("canonical",)

        def call(self, gm, ctx):
            n = sum(ir.is_linear(node) for node in gm.graph.nodes)
            return PassResult(modified=False, matches=n, details={"linears": n})

Rewrites that look for a shape of nodes use :class:`PatternRule`: three small named functions,
as in Inductor's post-grad passes:

* ``pattern(node) -> dict | None``: does the graph around this anchor node have the shape? Return
  the pieces the replacement needs, or None.
* ``extra_check(match) -> bool`` (optional): the escape hatch for conditions that are not about
  shape (dtypes, values, user options).
* ``replacement(gm, node, match) -> fx.Node``: build the new nodes before ``node`` and return
  the one that replaces it; the anchor's users are redirected and dead nodes removed.

:func:`apply_rules` walks the graph once in order and returns how many places each rule matched.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Callable, ClassVar, Iterable

import torch.fx as fx

from lowbit_compiler import ir

log = logging.getLogger("lowbit_compiler")


class LowbitError(RuntimeError):
    """Raised for invalid configuration, and for fallbacks in strict mode."""


@dataclasses.dataclass
class PassResult:
    """What a pass did: whether the graph changed, how many places matched, and free-form details
    (JSON-serialisable) that land in summary.json."""

    modified: bool
    matches: int = 0
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PassContext:
    """What a pass may read besides the graph: the recipe, strictness, where to report, and the
    calibration engine. Decisions never travel here: they live in the graph (constants,
    ``lowbit::`` ops, ``node.meta["lowbit"]``)."""

    recipe: Any
    strict: bool = False
    # per-layer records passes add for summary.json (FQN -> dict)
    layers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    fallbacks: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    # the calibration batches of this graph and the engine that runs them
    # (lowbit_compiler.calibration.Calibration); None when the caller gave no calibration data
    calibration: Any = None

    def calibration_for(self, pass_name: str) -> Any:
        """The calibration engine, or the error that says how to give it data."""
        if self.calibration is None:
            raise LowbitError(
                f"pass {pass_name!r} (recipe {getattr(self.recipe, 'name', self.recipe)!r}) needs calibration data: "
                "torch.compile(model, backend='lowbit', options={'recipe': ..., 'calibration': batches}) or "
                "lowbit_compiler.compress(model, recipe, calibration=batches) (token-id tensors, dicts of model "
                "inputs, or texts with tokenizer=)")
        self.calibration.require(pass_name)
        return self.calibration

    def fallback(self, where: str, reason: str) -> None:
        """Report that something was left on the reference path; raises in strict mode."""
        message = f"{where}: {reason}"
        if self.strict:
            raise LowbitError(f"[strict] {message}")
        log.warning("lowbit fallback: %s", message)
        self.fallbacks[reason.split(";")[0]] += 1
        record_fallback(reason)


# Process-wide counters of fallbacks (reason -> count), like torch._dynamo.utils.counters.
fallback_counter: collections.Counter = collections.Counter()


def record_fallback(reason: str) -> None:
    fallback_counter[reason.split(";")[0]] += 1


class Pass:
    """Base class of every pass. Subclasses set ``name`` and implement ``call``.

    What a recipe checks when it is built (``Recipe`` construction):

    * ``requires``: properties an earlier pass must ensure (``"canonical"``);
    * ``ensures``: properties this pass establishes;
    * ``before``: properties no earlier pass may have established (``awq`` rescales float weights,
      so it refuses to follow a pass that ensured ``"weights_quantized"``);
    * ``quantizes``: the pass quantizes the selected linears (two such passes in one recipe would
      quantize the same layers twice).

    ``required(recipe)`` may add requirements that depend on the recipe (static activation
    scales need ``"activation_scales"``). ``data_driven`` passes get their data from
    ``ctx.calibration_for(self.name)``.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    ensures: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    quantizes: ClassVar[bool] = False
    data_driven: ClassVar[bool] = False
    whole_model: ClassVar[bool] = False  # needs the whole forward in one graph (rotations)

    def required(self, recipe: Any) -> tuple[str, ...]:
        return self.requires

    def __init__(self, **options: Any) -> None:
        self.options = options

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass usable by name from recipes."""
    if not cls.name:
        raise LowbitError(f"{cls.__name__} has no `name`; set name = 'my_pass' on the class")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise LowbitError(f"pass name {cls.name!r} is taken by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    import lowbit_compiler.passes  # noqa: F401  (registers the built-in passes)

    if name not in _REGISTRY:
        raise LowbitError(f"unknown pass {name!r}; registered passes: {sorted(_REGISTRY)}. "
                          "Import the module that defines it before compiling, or fix the name")
    return _REGISTRY[name]


def registered_passes() -> list[str]:
    import lowbit_compiler.passes  # noqa: F401

    return sorted(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class PatternRule:
    """One rewrite: a name and the three functions described in the module docstring."""

    name: str
    pattern: Callable[[fx.Node], dict[str, Any] | None]
    replacement: Callable[[fx.GraphModule, fx.Node, dict[str, Any]], fx.Node]
    extra_check: Callable[[dict[str, Any]], bool] | None = None


def apply_rules(gm: fx.GraphModule, rules: Iterable[PatternRule]) -> collections.Counter:
    """Apply each rule at every node (in graph order); return matches per rule name."""
    rules = list(rules)
    counts: collections.Counter = collections.Counter({r.name: 0 for r in rules})
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph or node._erased:
            continue
        for rule in rules:
            match = rule.pattern(node)
            if match is None or (rule.extra_check is not None and not rule.extra_check(match)):
                continue
            with gm.graph.inserting_before(node):
                new = rule.replacement(gm, node, match)
            if new is not node:
                for key, value in node.meta.items():  # the replacement inherits what it lacks
                    if key == ir.META:
                        new.meta[ir.META] = {**value, **new.meta.get(ir.META, {})}
                    elif key not in new.meta:
                        new.meta[key] = value
                node.replace_all_uses_with(new)
            counts[rule.name] += 1
            break
    if any(counts.values()):
        ir.eliminate_dead_code(gm)
        gm.recompile()
    return counts


def replace_pattern(gm: fx.GraphModule, pattern: Callable, replacement: Callable,
                    extra_check: Callable | None = None) -> int:
    """Traceable-function patterns (torch.fx.subgraph_rewriter) for pass authors who prefer them:
    ``pattern`` and ``replacement`` are plain functions of the same tensors. Returns the count."""
    from torch.fx import subgraph_rewriter

    filters = [lambda match, _g, _p: extra_check(match)] if extra_check else None
    replaced = subgraph_rewriter.replace_pattern_with_filters(gm, pattern, replacement, filters)
    gm.recompile()
    return len(replaced)
