"""rotate: QuaRot / SpinQuant rotations found from the graph (see ``lowbit_compiler/rotation.py``).

Where it runs: after ``canonicalize``, before ``insert_weight_quant`` (which then quantizes the
rotated weights, and the activations after the online Hadamards).

What it rewrites, each part optional (pass options):

* ``r1`` (default on): fold every stream norm's affine parameters into its readers (a LayerNorm
  becomes an RMSNorm, the stream centred), then rotate the residual stream by ``rotation``
  (``"hadamard"``: a random Hadamard, ``"random"``: a random orthogonal matrix, or a tensor);
* ``r2`` (default on): a per-head rotation of every attention's value/output path;
* ``r4``: random signs ``D`` and ``lowbit::hadamard`` before every down projection, ``D H`` folded
  into the weight (``D`` into a gated MLP's ``up`` rows, else ``x * D`` online);
* ``r3``: ``lowbit::hadamard`` on queries and keys after RoPE (for KV-cache quantization).

Two learned variants share this interface: ``spinquant`` (R1/R2 by Cayley SGD) and
``flatquant`` (per-layer affine Kronecker transforms); see their classes below.

Every rewrite is exact in exact arithmetic; ``details`` (summary.json, ``lowbit inspect``) says what
was found, what was rotated, and what was refused and why. Parameters are replaced inside the
graph module only: the user's model keeps its weights (``compress`` writes them back on purpose).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from lowbit_compiler import hadamard, ir, rotation
from lowbit_compiler.pass_base import LowbitError, Pass, PassContext, PassResult, register_pass

log = logging.getLogger("lowbit_compiler")


_replace_attr = ir.replace_attr


def _new_param_node(gm: fx.GraphModule, fqn: str, value: torch.Tensor, parameter: bool = True) -> fx.Node:
    """A new tensor in ``gm`` and its ``get_attr`` node (tagged ``ir.PARAM`` when a ``parameter``:
    a weight or bias the quantization passes may read; buffers like signs and transforms are not)."""
    ir.set_attr(gm, fqn, value)
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        node = gm.graph.get_attr(fqn)
    if parameter:
        ir.put(node, ir.PARAM, ir.ParamInfo(fqn=fqn, is_parameter=True))
    node.meta["example_value"] = value
    return node


def _first_parameter(gm: fx.GraphModule) -> torch.Tensor | None:
    """The tensor of the graph's first frozen parameter (an owner to key cached results by)."""
    node = next((n for n in gm.graph.nodes if n.op == "get_attr" and ir.param_fqn(n) is not None), None)
    return ir.fetch_attr(gm, node.target) if node is not None else None


def _set_linear_arg(node: fx.Node, index: int, name: str, value: Any) -> None:
    if name in node.kwargs:
        node.update_kwarg(name, value)
    elif len(node.args) > index:
        node.update_arg(index, value)
    else:
        args = list(node.args) + [None] * (index + 1 - len(node.args))
        args[index] = value
        node.args = tuple(args)


def _value_dtype(node: fx.Node) -> torch.dtype:
    v = node.meta.get("example_value")
    return v.dtype if isinstance(v, torch.Tensor) else torch.float32


def _hadamard_before(gm: fx.GraphModule, user: fx.Node, value: fx.Node) -> fx.Node:
    with gm.graph.inserting_before(user):
        h = gm.graph.call_function(torch.ops.lowbit.hadamard.default, (value,))
    h.meta.update({k: v for k, v in value.meta.items() if k != ir.META})
    if ir.get(user, ir.MODULE) is not None:
        ir.put(h, ir.MODULE, ir.get(user, ir.MODULE))
    user.replace_input_with(value, h)
    return h


@register_pass
class Rotate(Pass):
    name = "rotate"
    requires = ("canonical",)
    ensures = ("rotated",)
    before = ("weights_quantized", "smoothed", "activation_scales")
    whole_model = True

    def __init__(self, r1: bool = True, r2: bool = True, r3: bool = False, r4: bool = False,
                 rotation: Any = "hadamard", seed: int = 0):
        super().__init__(r1=r1, r2=r2, r3=r3, r4=r4, rotation=rotation if isinstance(rotation, str) else "matrix",
                         seed=seed)
        self.r1, self.r2, self.r3, self.r4 = r1, r2, r3, r4
        self.rotation, self.seed = rotation, seed

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        a = rotation.analyse(gm)
        details: dict[str, Any] = {
            "stream": {"hidden": a.hidden, "embeddings": a.embeddings, "norms": len(a.norms),
                       "readers": [r.layer for r in a.readers], "writers": [w.layer for w in a.writers]},
            "refused": [],
        }
        refused = details["refused"]
        details["requested"] = {"R1": self.r1, "R2": self.r2, "R3": self.r3, "R4": self.r4}
        r1 = None
        if self.r1:
            if a.stream_ok:
                r1 = rotation.orthogonal(a.hidden, self.rotation, self.seed)
            else:
                for item in a.refusals or [{"what": "R1", "reason": "no stream norm found"}]:
                    refused.append({"what": "R1: " + item["what"], "reason": item["reason"]})
        r2 = None
        if self.r2:
            refused += [{"what": "R2: " + h["what"], "reason": h["reason"]} for h in a.head_refusals]
            dims = {h.head_dim for h in a.heads}
            if len(dims) == 1:
                r2 = rotation.orthogonal(dims.pop(), "hadamard", self.seed + 1)
            elif dims:
                refused.append({"what": "R2", "reason": f"attentions with different head sizes {sorted(dims)}"})
            elif not a.head_refusals:
                refused.append({"what": "R2", "reason": rotation.no_heads_reason(gm)})
        r4_sites = []
        if self.r4:
            bad = {item["what"] for item in rotation.r4_refusals(a)}
            refused += rotation.r4_refusals(a)
            r4_sites = [w for w in a.down_projections() if f"R4 before {w.layer}" not in bad]
            if not a.down_projections():
                refused.append({"what": "R4", "reason": rotation.no_down_projections_reason(a)})
        for item in refused:
            ctx.fallback(f"rotate: {item['what']}", item["reason"])
        if r1 is None and r2 is None and not r4_sites and not self.r3:
            details["rotated"] = {}
            return PassResult(False, 0, details)
        keep = a
        if r1 is None:  # without R1 the stream is left alone (norms keep their parameters)
            keep = rotation.Analysis(hidden=a.hidden, heads=a.heads)
        signs = rotation.r4_signs(r4_sites, self.seed + 2)
        plan = rotation.plan_weights(keep, lambda fqn: ir.fetch_attr(gm, fqn), r1, r2, r4_sites,
                                     fold_norms=r1 is not None, signs=signs)
        self._apply(gm, keep, plan, r1 is not None, r4_sites, signs)
        r3_sites = self._r3(gm, ctx, details["refused"]) if self.r3 else 0
        details["rotated"] = {
            "R1": {"linears": plan.rotated_linears, "embeddings": len(a.embeddings),
                   "norms_folded": len(a.norms) if r1 is not None else 0,
                   "layer_norms_to_rms": sum(n.kind == "layer" for n in a.norms) if r1 is not None else 0} if r1 is not None else None,
            "R2": {"attentions": len(a.heads), "head_dim": a.heads[0].head_dim} if r2 is not None else None,
            "R4": [w.layer for w in r4_sites],
            "R4_signs": {"folded_into": [s.fold_into.layer for s in signs.values() if s.fold_into is not None],
                         "online": [layer for layer, s in signs.items() if s.fold_into is None]},
            "R3": r3_sites,
            "untied": {layer: {"weight": fqn, "extra_bytes": plan.extra_bytes} for layer, fqn in plan.untied.items()},
        }
        matches = plan.rotated_linears + 2 * len(a.heads if r2 is not None else []) + len(r4_sites) + r3_sites
        return PassResult(True, matches, details)

    def _apply(self, gm: fx.GraphModule, a: rotation.Analysis, plan: rotation.WeightPlan, r1: bool,
               r4_sites: list[rotation.LinearRef], signs: dict[str, rotation.R4Signs] | None = None) -> None:
        signs = signs or {}
        folds = [s.fold_into for s in signs.values() if s.fold_into is not None]
        linears = {r.node: r for r in a.readers + a.writers + [h.value for h in a.heads] + [h.output for h in a.heads]
                   + r4_sites + folds}
        created = {}
        for fqn, t in plan.tensors.items():
            if fqn in plan.untied.values() or not _replace_attr(gm, fqn, t):
                created[fqn] = t
        for node, ref in linears.items():
            if ref.layer in plan.untied:
                fqn = plan.untied[ref.layer]
                _set_linear_arg(node, 1, "weight", _new_param_node(gm, fqn, created.pop(fqn)))
            bias_fqn = f"{ref.layer}.bias"
            if ref.bias is None and bias_fqn in created:
                _set_linear_arg(node, 2, "bias", _new_param_node(gm, bias_fqn, created.pop(bias_fqn)))
        assert not created, f"rotate: tensors with no place in the graph: {sorted(created)}"
        if r1:
            for site in a.norms:
                node = site.node
                x, shape = node.args[0], node.args[1]
                eps = float(ir.get(node, ir.NORM).eps)
                node.target = F.rms_norm
                node.args, node.kwargs = (x, list(shape), None, eps), {}
                ir.put(node, ir.NORM, ir.NormSpec("rms", eps, folded=True))
        for ref in r4_sites:
            x = ref.node.args[0]
            site = signs.get(ref.layer)
            if site is not None and site.fold_into is None:  # x * D online (no gated linear to absorb D)
                value = site.signs.to(_value_dtype(x))
                d = _new_param_node(gm, f"{ref.layer}.r4_signs", value, parameter=False)
                with gm.graph.inserting_before(ref.node):
                    x_signed = gm.graph.call_function(torch.mul, (x, d))
                x_signed.meta.update({k: v for k, v in x.meta.items() if k != ir.META})
                if ir.get(ref.node, ir.MODULE) is not None:
                    ir.put(x_signed, ir.MODULE, ir.get(ref.node, ir.MODULE))
                ref.node.replace_input_with(x, x_signed)
                x = x_signed
            _hadamard_before(gm, ref.node, x)
        ir.eliminate_dead_code(gm)
        gm.recompile()

    def _r3(self, gm: fx.GraphModule, ctx: PassContext, refused: list[dict[str, str]]) -> int:
        count, seen = 0, 0
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
                seen += 1
                q, k = node.args[0], node.args[1]
                d = rotation.last_dim(q)
                reason = hadamard.unsupported_reason(d) if d else "unknown head size"
                if reason:
                    refused.append({"what": f"R3 at {node.name}", "reason": reason})
                    ctx.fallback(f"rotate: R3 at {node.name}", reason)
                    continue
                _hadamard_before(gm, node, q)
                _hadamard_before(gm, node, k)
                count += 1
        if not seen:
            refused.append({"what": "R3", "reason": rotation.no_heads_reason(gm)})
            ctx.fallback("rotate: R3", refused[-1]["reason"])
        gm.recompile()
        return count


@register_pass
class SpinQuant(Rotate):
    """``rotate``, then R1 and R2 learned by Cayley SGD on the quantized model's output error
    (``lowbit_compiler/learned_rotation.py``). Same options as ``rotate`` (its ``rotation`` is the
    starting point), plus ``steps``, ``lr`` (the first step's length; cosine decay), ``momentum``
    and ``learn_r2``. Data-driven: the calibration batches come from the engine
    (``ctx.calibration_for("spinquant")``); the learned rotations are cached by the identity of the
    graph's first weight, so a compiled model's decode graph reuses what its prefill graph learned."""

    name = "spinquant"
    data_driven = True

    def __init__(self, r1: bool = True, r2: bool = True, r3: bool = False, r4: bool = False,
                 rotation: Any = "hadamard", seed: int = 0, steps: int = 60, lr: float = 0.2,
                 momentum: float = 0.5, learn_r2: bool = True):
        super().__init__(r1, r2, r3, r4, rotation, seed)
        self.options.update(steps=steps, lr=lr, momentum=momentum, learn_r2=learn_r2)
        self.steps, self.lr, self.momentum, self.learn_r2 = steps, lr, momentum, learn_r2

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from lowbit_compiler import learned_rotation
        from lowbit_compiler.passes.quantize import common

        owner = _first_parameter(gm)
        result = super().call(gm, ctx)
        rotated = result.details.get("rotated") or {}
        has_r1, has_r2 = rotated.get("R1") is not None, rotated.get("R2") is not None and self.learn_r2
        if not (has_r1 or has_r2) or self.steps <= 0:
            return result
        sites = learned_rotation.quant_sites(gm, ctx.recipe)
        if not sites:
            result.details["learned"] = {"skipped": "the recipe quantizes no linear: nothing to learn against"}
            return result
        key = common.recipe_key(ctx, self.name, self.options)
        a = rotation.analyse(gm)
        learned = common.RESULTS.get(owner, key) if owner is not None else None
        inputs = None
        if learned is None:
            inputs = ctx.calibration_for(self.name).args
            learned = learned_rotation.learn(gm, a, inputs, sites, steps=self.steps, lr=self.lr,
                                             momentum=self.momentum, learn_r1=has_r1, learn_r2=has_r2)
            if owner is not None:
                common.RESULTS.put(owner, key, learned)
        if learned.best < learned.losses[0]:
            keep = a if learned.r1 is not None else rotation.Analysis(hidden=a.hidden, heads=a.heads)
            plan = rotation.plan_weights(keep, lambda fqn: ir.fetch_attr(gm, fqn), learned.r1, learned.r2,
                                         fold_norms=False)
            self._apply(gm, keep, plan, learned.r1 is not None, [])
        db = [round(-10 * math.log10(max(x, 1e-30)), 2) for x in learned.losses]
        result.details["learned"] = {
            "R1": learned.r1 is not None, "R2": learned.r2 is not None,
            "inputs": len(inputs) if inputs is not None else "cached",
            "quantized_linears": len(sites), "steps": len(learned.losses) - 1,
            "output_sqnr_db": db, "best_sqnr_db": round(-10 * math.log10(max(learned.best, 1e-30)), 2),
        }
        return result


@register_pass
class FlatQuant(Pass):
    """FlatQuant-style learned affine transforms, one per group of quantized linears that share an
    input (q/k/v, gate/up, o_proj, down_proj, the head): ``x -> x (P1 (x) P2)`` online
    (``lowbit::kron_transform``, two small matmuls) and ``W -> W (P1 (x) P2)^-T`` folded into each
    weight, so the float model is unchanged while the quantized one sees flatter activations and
    weights. ``P1``/``P2`` are learned per group on the group's input rows from the calibration
    engine (block by block) with Adam from the identity, on the group's quantized output error
    (``learned_rotation.learn_affine``);
    a group keeps the identity (no transform) unless learning beats it. Runs after ``rotate`` or
    on its own, before ``insert_weight_quant``. Options: ``steps`` (100), ``lr`` (5e-3),
    ``max_rows`` (4096 calibration rows per group). Not done: FlatQuant's learnable clipping and
    per-channel scales, and fusing the transform into the kernels (it runs as its own op)."""

    name = "flatquant"
    requires = ("canonical",)
    ensures = ("transformed",)
    # weights and static scales computed before the transform would be for untransformed tensors
    before = ("weights_quantized", "activation_scales")
    data_driven = True

    def __init__(self, steps: int = 100, lr: float = 5e-3, max_rows: int = 4096):
        super().__init__(steps=steps, lr=lr, max_rows=max_rows)
        self.steps, self.lr, self.max_rows = steps, lr, max_rows

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from lowbit_compiler import learned_rotation as lr_

        sites = {n: s for n, s in lr_.quant_sites(gm, ctx.recipe).items() if s.act is not None}
        if not sites:
            return PassResult(False, 0, {"skipped": "the recipe quantizes no activations: nothing to flatten"})
        groups: dict[fx.Node, list[fx.Node]] = {}
        refused = []
        for node in sites:
            parts = ir.linear_parts(node)
            if len(parts.weight_node.users) > 1:
                refused.append({"what": sites[node].layer, "reason": "its weight is shared with another op (a tied "
                                "embedding): untie it first (the rotate pass does)"})
                continue
            groups.setdefault(parts.x, []).append(node)
        for item in refused:
            ctx.fallback(f"flatquant: {item['what']}", item["reason"])
        from lowbit_compiler.passes.quantize import common

        key = common.recipe_key(ctx, self.name, self.options)
        report, transformed = [], 0
        firsts = {linears[0]: (x, linears) for x, linears in groups.items()}
        fits = {n: common.RESULTS.get(ir.fetch_attr(gm, ir.linear_parts(n).weight_node.target), key) for n in firsts}
        info: dict[str, Any] = {"cached": len(fits)}

        def transform(first: fx.Node, fit) -> None:
            nonlocal transformed
            x, linears = firsts[first]
            parts = [ir.linear_parts(n) for n in linears]
            weights = []
            for p in parts:
                w = ir.fetch_attr(gm, p.weight_node.target)
                weights.append(w.t() if p.transposed else w)
            names = [sites[n].layer for n in linears]
            db = lambda v: round(-10 * math.log10(max(v, 1e-30)), 2)  # noqa: E731
            entry = {"linears": names, "kron": [fit.left.shape[0], fit.right.shape[0]],
                     "output_sqnr_db": [db(fit.losses[0]), db(fit.best)]}
            report.append(entry)
            if not fit.best < fit.losses[0]:
                entry["kept_identity"] = True
                return
            base = names[0]
            left = _new_param_node(gm, f"{base}.flat_left", fit.left, parameter=False)
            right = _new_param_node(gm, f"{base}.flat_right", fit.right, parameter=False)
            with gm.graph.inserting_before(first):
                t = gm.graph.call_function(torch.ops.lowbit.kron_transform.default, (x, left, right))
            t.meta.update({k: v for k, v in x.meta.items() if k != ir.META})
            if ir.get(first, ir.MODULE) is not None:
                ir.put(t, ir.MODULE, ir.get(first, ir.MODULE))
            i1, i2 = torch.linalg.inv(fit.left.double()).t(), torch.linalg.inv(fit.right.double()).t()
            for node, p, w in zip(linears, parts, weights):
                new = lr_.kron_rows(w.double(), i1, i2)
                _replace_attr(gm, p.weight_node.target, (new.t() if p.transposed else new).contiguous().to(w.dtype))
                node.replace_input_with(x, t)
            transformed += len(linears)

        if all(f is not None for f in fits.values()):
            for first, fit in fits.items():
                transform(first, fit)
        else:
            def on_block(block, stats) -> bool:
                for first, observed in stats.items():
                    x, linears = firsts[first]
                    rows = observed.sample_rows(self.max_rows)
                    weights = []
                    for p in (ir.linear_parts(n) for n in linears):
                        w = ir.fetch_attr(gm, p.weight_node.target)
                        weights.append(w.t() if p.transposed else w)
                    owner = ir.fetch_attr(gm, ir.linear_parts(first).weight_node.target)
                    fit = lr_.learn_affine(rows, weights, [sites[n] for n in linears], steps=self.steps, lr=self.lr)
                    common.RESULTS.put(owner, key, fit)
                    transform(first, fit)
                return bool(stats)

            info = ctx.calibration_for(self.name).run(self.name, lambda n: n in firsts, {"samples"}, on_block)
        ir.eliminate_dead_code(gm)
        gm.recompile()
        return PassResult(transformed > 0, transformed, {"groups": report, "refused": refused, "calibration": info,
                                                         "inputs": info.get("batches", "cached")})

