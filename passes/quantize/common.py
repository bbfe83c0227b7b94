"""What every quantizing pass shares: which linears it takes, in which format, and how a linear
becomes a ``lowbit::`` op.

* :func:`select_linears` walks the canonical graph: every ``F.linear`` whose weight is a frozen
  parameter and whose layer the recipe's globs select is a :class:`Site`; the others get an
  ``ir.SKIPPED`` reason (and a ``layers`` record) once.
* :func:`format_of`: the recipe's weight format, or the one ``mixed_precision`` chose for that
  linear (``ir.WEIGHT_FORMAT``).
* :func:`replace_linear`: ``F.linear`` -> ``lowbit::wo_linear`` (weight-only) or
  ``lowbit::qa_linear`` (the recipe's activation scheme; a static scale from
  ``observe_activations``' ``ir.ACT_SCALE``), the quantized tensors registered under the layer's
  FQN, and the ``ir.WEIGHT_QUANT`` decision (bytes, bits per weight, weight SQNR; SpQR outliers
  counted from ``ir.OUTLIERS``).
* :func:`select_experts` / :func:`replace_experts`: the same for the grouped matmuls over stacked
  3-D expert weights (``ir.grouped_parts``: transformers' ``grouped_mm`` experts), which become
  ``lowbit::grouped_linear`` with every expert quantized in the linear's format and stacked;
  the layer is the weight's FQN (``model.layers.0.mlp.experts.gate_up_proj``), so recipe globs
  select experts as they select linears.
* :data:`RESULTS`: data-driven results cached by the identity of the weight they were computed
  for, the pass, its options, the recipe and the calibration data, so that the prefill and
  decode graphs of one compiled model (and its recompiles) share them.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import torch
import torch.fx as fx

from lowbit_compiler import ir
from lowbit_compiler.formats import QuantizedWeight, WeightFormat, check_layer, weight_sqnr_db, weights_sqnr_db
from lowbit_compiler.identity_cache import IdentityCache
from lowbit_compiler.pass_base import LowbitError, PassContext

# parameter -> {(pass, options, recipe, calibration, ...): result}; .misses counts real work
RESULTS = IdentityCache()


@dataclasses.dataclass
class Site:
    """One float linear a quantizing pass may take."""

    node: fx.Node
    layer: str
    param: torch.Tensor          # the weight as stored ([out, in], or [in, out] when transposed)
    transposed: bool
    fmt: WeightFormat | None

    @property
    def weight(self) -> torch.Tensor:
        """[out, in] view of the weight."""
        w = self.param.detach()
        return w.t() if self.transposed else w

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.weight.shape
        return n, k


@dataclasses.dataclass
class ExpertSite:
    """One grouped matmul over a stacked 3-D expert weight a quantizing pass may take."""

    node: fx.Node
    layer: str                   # the weight's FQN
    param: torch.Tensor          # [E, N, K], or [E, K, N] when transposed
    transposed: bool
    fmt: WeightFormat
    parts: ir.GroupedParts

    @property
    def experts(self) -> int:
        return self.param.shape[0]

    def weight(self, e: int) -> torch.Tensor:
        """[N, K] view of expert ``e``'s weight."""
        w = self.param.detach()[e]
        return w.t() if self.transposed else w

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.weight(0).shape
        return n, k


def select_experts(gm: fx.GraphModule, ctx: PassContext, pass_name: str) -> list[ExpertSite]:
    """The grouped matmuls over frozen 3-D expert weights the recipe selects (module docstring);
    the others get an ``ir.SKIPPED`` reason and a layer record."""
    recipe, sites = ctx.recipe, []
    for node in gm.graph.nodes:
        parts = ir.grouped_parts(node)
        if parts is None:
            continue
        layer = parts.weight_node.target
        param = ir.fetch_attr(gm, layer)
        if not isinstance(param, torch.Tensor) or param.dim() != 3:
            continue
        if not recipe.applies_to(layer):
            ir.put(node, ir.SKIPPED, ir.SkipReason(pass_name, "excluded by the recipe's include/exclude globs"))
            ctx.layers[layer] = {"format": "float", "skipped": "excluded by recipe", "weight": layer}
            continue
        fmt = format_of(node, recipe)
        if fmt is None:
            continue
        site = ExpertSite(node, layer, param, parts.transposed, fmt, parts)
        check_layer(fmt, site.shape[1], layer, recipe.pad_to_group)
        sites.append(site)
    return sites


def stack_experts(qws: list[QuantizedWeight]) -> QuantizedWeight:
    """Per-expert quantized weights -> one with a leading expert dimension on every tensor."""
    first = qws[0]
    zero = None if first.zero is None else torch.stack([q.zero for q in qws])
    return QuantizedWeight(first.format, torch.stack([q.qweight for q in qws]), torch.stack([q.scale for q in qws]),
                           zero, first.in_features)


def experts_sqnr(site: ExpertSite, qws: list[QuantizedWeight]) -> float:
    """Weight SQNR over all experts together."""
    return weights_sqnr_db([(site.weight(e), q) for e, q in enumerate(qws)])


def replace_experts(gm: fx.GraphModule, ctx: PassContext, site: ExpertSite, qws: list[QuantizedWeight],
                    sqnr: float | None = None) -> fx.Node:
    """Replace ``site``'s grouped matmul by ``lowbit::grouped_linear`` over the stacked quantized
    experts (registered under ``<weight FQN>_quantized.*``); returns the new node. Activation
    schemes: per-token ones are applied per expert (as ``qa_linear``); a static scheme has no
    per-expert scales, so the experts are quantized weight-only, reported as a fallback."""
    recipe, node, layer = ctx.recipe, site.node, site.layer
    stacked = stack_experts(qws)
    n, k = site.shape
    if sqnr is None:
        sqnr = experts_sqnr(site, qws)
    act = None
    if recipe.activation:
        from lowbit_compiler.recipe import ACTIVATIONS

        if recipe.activation.endswith("_static"):
            ctx.fallback(f"layer {layer} (node {node.name})",
                         f"activation {recipe.activation!r}: no static scales per expert (observe_activations observes "
                         "linears); these stacked experts are quantized weight-only")
        else:
            act = ACTIVATIONS[recipe.activation][0]
    prefix = tensor_prefix(gm, layer)
    with gm.graph.inserting_before(node):
        q = _register(gm, f"{prefix}.qweight", stacked.qweight)
        s = _register(gm, f"{prefix}.scale", stacked.scale)
        z = None if stacked.zero is None else _register(gm, f"{prefix}.zero", stacked.zero)
        new = gm.graph.call_function(torch.ops.lowbit.grouped_linear.default,
                                     (site.parts.x, site.parts.offs, q, s, z, site.fmt.key, k, act))
    new.meta.update(node.meta)
    nbytes = stacked.nbytes()
    decision = ir.WeightQuantDecision(
        layer=layer, format=site.fmt.key, in_features=k, out_features=n, bits_per_weight=nbytes * 8 / (site.experts * n * k),
        bytes_before=site.param.numel() * site.param.element_size(), bytes_after=nbytes, weight_sqnr_db=round(sqnr, 2),
        padded_in_features=site.fmt.padded_k(k) if site.fmt.padded_k(k) != k else 0, experts=site.experts)
    ir.put(new, ir.WEIGHT_QUANT, decision)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    record = {k_: v for k_, v in decision.__dict__.items() if k_ != "layer"}
    record["weight"] = layer
    if act is not None:
        record["activation"] = act
    ctx.layers[layer] = record
    return new


_ROUTING_STEPS = frozenset({"softmax", "sigmoid", "float", "to", "type_as", "view", "reshape", "add", "scatter"})


def is_router(node: fx.Node, depth: int = 6) -> bool:
    """A MoE router: the linear's output reaches ``topk`` through elementwise steps only (softmax,
    sigmoid, casts, a bias add). A quantized router may pick other experts for a token: a discrete
    change no SQNR floor bounds, so routers stay float."""
    frontier, seen = [node], {node}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for user in n.users:
                name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", "")
                if name == "topk":
                    return True
                if name in _ROUTING_STEPS and user not in seen:
                    seen.add(user)
                    nxt.append(user)
        frontier = nxt
    return False


def select_linears(gm: fx.GraphModule, ctx: PassContext, pass_name: str, check_groups: bool = True,
                   needs_format: bool = True) -> list[Site]:
    """The float linears the recipe selects (see the module docstring). ``needs_format=False``
    (passes that change float weights: pruning): also when the recipe quantizes nothing (the
    site's ``fmt`` is then None)."""
    recipe = ctx.recipe
    sites = []
    for node in gm.graph.nodes:
        if not ir.is_linear(node):
            continue
        parts = ir.linear_parts(node)
        if parts.weight_node is None:
            ir.put(node, ir.SKIPPED, ir.SkipReason(pass_name, "weight is computed in the graph, not a parameter"))
            continue
        layer = ir.layer_name(node, parts.weight_node.target)
        if is_router(node) and not recipe.names(layer):
            reason = ("MoE router (its output picks experts through topk); routers stay float unless an include glob "
                      "names them")
            ir.put(node, ir.SKIPPED, ir.SkipReason(pass_name, reason))
            ctx.layers[layer] = {"format": "float", "skipped": reason, "weight": parts.weight_node.target}
            continue
        if not recipe.applies_to(layer):
            ir.put(node, ir.SKIPPED, ir.SkipReason(pass_name, "excluded by the recipe's include/exclude globs"))
            ctx.layers[layer] = {"format": "float", "skipped": "excluded by recipe",
                                 "weight": parts.weight_node.target}
            continue
        fmt = format_of(node, recipe)
        if fmt is None and needs_format:
            continue
        param = ir.fetch_attr(gm, parts.weight_node.target)
        site = Site(node, layer, param, parts.transposed, fmt)
        if check_groups and fmt is not None:
            check_layer(fmt, site.shape[1], layer, recipe.pad_to_group)
        sites.append(site)
    return sites


def format_of(node: fx.Node, recipe: Any) -> WeightFormat | None:
    choice = ir.get(node, ir.WEIGHT_FORMAT)
    return WeightFormat.parse(choice.format) if choice is not None else recipe.weight


def recipe_key(ctx: PassContext, pass_name: str, options: dict[str, Any]) -> str:
    """What a cached data-driven result depends on besides its weight: the pass and its options,
    the whole recipe (earlier passes change the inputs), and the calibration data."""
    calibration = ctx.calibration.fingerprint if ctx.calibration is not None else None
    recipe = ctx.recipe.to_dict() if hasattr(ctx.recipe, "to_dict") else repr(ctx.recipe)
    return json.dumps([pass_name, options, recipe, calibration], sort_keys=True, default=repr)


def calibrate_each(ctx: PassContext, pass_name: str, keys: dict[fx.Node, tuple[torch.Tensor, Any]],
                   needs: set[str], compute: Callable[[fx.Node, Any], Any], apply: Callable[[fx.Node, Any], None],
                   rewrites: bool, reuse_partial: bool = False) -> tuple[dict[str, Any], list[fx.Node]]:
    """The skeleton every per-linear data-driven pass shares: its result for each node of ``keys``
    (node -> (the tensor it belongs to, a key from :func:`recipe_key`)) comes from :data:`RESULTS`
    when every one is cached (an earlier graph of this model), else from one calibration run:
    ``compute(node, stats)`` on the node's :class:`~lowbit_compiler.calibration.LinearStats`,
    cached, then ``apply(node, result)``. ``rewrites``: the pass changes what its block computes,
    so the engine runs the block again for the next one. Returns (the engine's run info, or
    ``{"cached": n}``; the nodes no calibration data reached, which the pass must handle).

    ``reuse_partial``: when only some results are cached and the calibration data does not fit
    this graph (a decode step's graph of a model whose prefill graph was calibrated), apply the
    cached ones and return the others as not reached (``info["not_calibrated"]`` says why), instead
    of raising; the pass then falls back for those, logged (strict: raises)."""
    cached = {node: RESULTS.get(owner, key) for node, (owner, key) in keys.items()}
    if all(c is not None for c in cached.values()):
        for node, result in cached.items():
            apply(node, result)
        return {"cached": len(cached)}, []
    if reuse_partial and (why := reuse_only(ctx, cached.values())) is not None:
        for node, result in cached.items():
            if result is not None:
                apply(node, result)
        missing = [node for node, result in cached.items() if result is None]
        return {"cached": len(cached) - len(missing), "not_calibrated": why}, missing
    pending = dict(keys)

    def on_block(block, stats) -> bool:
        for node, observed in stats.items():
            owner, key = pending.pop(node)
            result = compute(node, observed)
            RESULTS.put(owner, key, result)
            apply(node, result)
        return rewrites and bool(stats)

    info = ctx.calibration_for(pass_name).run(pass_name, lambda n: n in pending, needs, on_block)
    return info, list(pending)


def reuse_only(ctx: PassContext, cached: Any) -> str | None:
    """Why a graph must reuse earlier graphs' results rather than calibrate (some results are
    cached, and the calibration data does not fit this graph: a decode step), else None. A graph
    with nothing cached and no fitting data still raises through ``ctx.calibration_for``."""
    cal = ctx.calibration
    if cal is None or cal.args or not any(c is not None for c in cached):
        return None
    return (f"this graph does not fit the calibration data ({cal.unusable}), and no earlier graph of this model "
            "calibrated this site")


def tensor_prefix(gm: fx.GraphModule, layer: str) -> str:
    """Where a layer's new tensors go in the graph module: ``{layer}.qweight`` etc., or, when the
    layer is itself a tensor (a bare parameter of a module that computes ``x @ self.w.T``),
    ``{layer}_quantized.qweight``."""
    try:
        held = ir.fetch_attr(gm, layer)
    except AttributeError:
        return layer
    return f"{layer}_quantized" if isinstance(held, torch.Tensor) else layer


def replace_linear_weight(gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor, fqn: str) -> None:
    """Point the linear ``node`` at ``weight`` ([out, in], float): swapped in place when the linear
    is its weight's only reader and stores it [out, in], else a copy of its own at ``fqn`` (the
    weight is shared with another op, e.g. a tied embedding, or stored [in, out])."""
    parts = ir.linear_parts(node)
    if len(parts.weight_node.users) == 1 and not parts.transposed:
        ir.replace_attr(gm, parts.weight_node.target, weight)
        return
    ir.set_attr(gm, fqn, weight)
    with gm.graph.inserting_before(node):
        new_w = gm.graph.get_attr(fqn)
    ir.put(new_w, ir.PARAM, ir.ParamInfo(fqn=fqn, is_parameter=False))
    node.args, node.kwargs = (parts.x, new_w, parts.bias), {}


def _register(gm: fx.GraphModule, target: str, tensor: torch.Tensor) -> fx.Node:
    ir.set_attr(gm, target, tensor)
    return gm.graph.get_attr(target)


def replace_linear(gm: fx.GraphModule, ctx: PassContext, site: Site, qw: QuantizedWeight,
                   sqnr: float | None = None) -> fx.Node:
    """Replace ``site``'s ``F.linear`` by the quantized op (module docstring); returns the new node."""
    recipe = ctx.recipe
    node, fmt, layer = site.node, qw.format, site.layer
    parts = ir.linear_parts(node)
    n, k = site.shape
    if sqnr is None:
        sqnr = weight_sqnr_db(site.weight, qw)
    prefix = tensor_prefix(gm, layer)
    weight_fqn = parts.weight_node.target if parts.weight_node is not None else layer
    with gm.graph.inserting_before(node):
        q = _register(gm, f"{prefix}.qweight", qw.qweight)
        s = _register(gm, f"{prefix}.scale", qw.scale)
        z = None if qw.zero is None else _register(gm, f"{prefix}.zero", qw.zero)
        if recipe.activation:  # quantized activations too: per token at run time, or static
            from lowbit_compiler.recipe import ACTIVATIONS

            act = ACTIVATIONS[recipe.activation][0]
            x_scale = None
            if recipe.activation.endswith("_static"):
                observed = ir.get(node, ir.ACT_SCALE)
                if observed is None:
                    raise LowbitError(f"layer {layer} (node {node.name}): activation {recipe.activation!r} needs a "
                                      "static scale measured on calibration data; put 'observe_activations' before "
                                      "the quantizing pass")
                x_scale = _register(gm, f"{prefix}.x_scale", torch.tensor([observed.scale], dtype=torch.float32))
            new = gm.graph.call_function(torch.ops.lowbit.qa_linear.default,
                                         (parts.x, q, s, z, parts.bias, fmt.key, k, act, x_scale))
        else:
            new = gm.graph.call_function(torch.ops.lowbit.wo_linear.default, (parts.x, q, s, z, parts.bias, fmt.key, k))
    new.meta.update(node.meta)
    outliers = ir.get(node, ir.OUTLIERS)
    side = outliers.nbytes if outliers is not None else 0
    decision = ir.WeightQuantDecision(
        layer=layer, format=fmt.key, in_features=k, out_features=n,
        bits_per_weight=(qw.nbytes() + side) * 8 / (n * k),
        bytes_before=site.param.numel() * site.param.element_size(), bytes_after=qw.nbytes() + side,
        weight_sqnr_db=round(sqnr, 2), padded_in_features=fmt.padded_k(k) if fmt.padded_k(k) != k else 0,
        outliers=0 if outliers is None else outliers.count)
    ir.put(new, ir.WEIGHT_QUANT, decision)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    record = {k_: v for k_, v in decision.__dict__.items() if k_ != "layer"}
    record["weight"] = weight_fqn
    pruned = ir.get(node, ir.SPARSITY)
    if pruned is not None:  # a sparsify pass ran first: its sparsity and errors stay in the record
        record.update({f"pruned_{k_}" if k_ == "weight_sqnr_db" else k_: v for k_, v in pruned.__dict__.items()})
    choice = ir.get(new, ir.WEIGHT_FORMAT)
    if choice is not None:
        record["chosen_by"] = choice.chosen_by
    ctx.layers[layer] = record
    return new


def drop_unused_attrs(gm: fx.GraphModule) -> None:
    """Forget float weights no node reads any more (the user's model still owns them)."""
    ir.eliminate_dead_code(gm)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner_path, _, attr = name.rpartition(".")
            owner = ir.fetch_attr(gm, owner_path) if owner_path else gm
            delattr(owner, attr)


def summary_details(pass_name: str, quantized: list[ir.WeightQuantDecision], sites: int, **extra: Any) -> dict[str, Any]:
    formats: dict[str, int] = {}
    for d in quantized:
        formats[d.format] = formats.get(d.format, 0) + 1
    details = {"quantized": len(quantized), "formats": formats, **extra}
    if not quantized:
        details["note"] = "nothing was quantized: the graph has no selected float linear layers"
    return details
