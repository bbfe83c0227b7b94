"""teal, wina, cats: activation sparsity with per-site thresholds calibrated to a target sparsity;
fuse_sparse_input: the threshold fused into the quantized matmul that reads it.

Where they run: after ``canonicalize`` (and after passes that change what the linears read:
``smoothquant``, ``awq``, ``rotate``), before the quantizing pass, which then quantizes the
linears behind the thresholds; ``fuse_sparse_input`` after the quantizing pass.

What they insert: ``lowbit::act_sparsify(x, threshold, col_scale)`` in front of the readers of a
site (one node for q/k/v, which read one input); ``threshold`` is one float per site (a constant
of the graph module, ``{layer}.act_threshold``), chosen on the calibration data so that the
fraction ``sparsity`` of the site's scores falls below it (the ``samples`` the calibration engine
observes, block by block; later blocks see the thresholded earlier ones, as at run time). The
achieved fraction on the same data is in the summary per site (``achieved``).

* ``teal`` (Liu et al., 2024): score ``|x|`` at the input of every linear of the repeated blocks.
* ``wina`` (Chen et al., 2025): score ``|x_i| * ||W[:, i]||_2``; for inputs read by several
  linears (q/k/v, gate/up), the column norm of their weights stacked (``col_scale``).
* ``cats`` (Lee et al., 2024): score ``|act(gate(x))|`` at the output of the MLP's gate activation
  (a SiLU/GELU/ReLU whose output multiplies the up projection before the down projection): MLP
  only. Its zeros feed an elementwise product, not a matmul, so it is not fused.
* ``rsparse`` (Zhang et al., 2025): TEAL's sites and score, plus, per reading linear, a rank-``r``
  SVD of its float weight applied to the inputs the threshold zeroed (``lowbit::lowrank_residual``
  added to the linear's output; see :class:`RSparse`); composes with int8 / int4 weights (the
  factors stay float).

What they leave alone: linears outside the repeated blocks (the head, embeddings' projections),
MoE routers, layers the recipe excludes, grouped expert matmuls (reported as ``skipped``).
"""
from __future__ import annotations

import collections
import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from lowbit_compiler import calibration, ir
from lowbit_compiler.pass_base import (LowbitError, Pass, PassContext, PassResult, PatternRule, apply_rules,
                                       register_pass)
from lowbit_compiler.passes.quantize import common


@dataclasses.dataclass(eq=False)
class ActSite:
    """One place a threshold goes: the tensor ``value`` thresholded in front of ``readers``."""

    name: str                 # the readers' layer FQNs (or the activation module's), for the summary
    value: fx.Node            # the tensor thresholded
    observe: fx.Node          # the node the engine observes (a reader: its input; an activation: its output)
    readers: list[fx.Node]    # the nodes that read the thresholded value
    weights: list[torch.Tensor]  # [out, in] weights of the reading linears (WINA's column norms)
    prefix: str               # where the threshold tensor is registered
    owner: torch.Tensor       # the parameter its cached result is keyed by (the first reader's weight)


_ACTIVATIONS = (F.silu, F.gelu, F.relu, torch.relu, F.relu6, torch.nn.functional.mish)
_MULS = (operator.mul, torch.mul)


def _weight(gm: fx.GraphModule, parts: ir.LinearParts) -> torch.Tensor:
    w = ir.fetch_attr(gm, parts.weight_node.target).detach()
    return w.t() if parts.transposed else w


def _block_linears(gm: fx.GraphModule, ctx: PassContext, pass_name: str, skipped: dict[str, str]):
    """(node, layer, parts) of every float linear inside the repeated blocks the recipe selects."""
    _, blocks = calibration.find_blocks(gm)
    inside = set(blocks)
    for node in gm.graph.nodes:
        if not ir.is_linear(node):
            continue
        parts = ir.linear_parts(node)
        if parts.weight_node is None:
            continue
        layer = ir.layer_name(node, parts.weight_node.target)
        found = calibration.block_of(layer)
        if found is None or found[1] not in inside:
            skipped[layer] = "outside the repeated blocks (the head and embeddings stay dense)"
        elif common.is_router(node):
            skipped[layer] = "MoE router"
        elif not ctx.recipe.applies_to(layer):
            skipped[layer] = "excluded by the recipe's include/exclude globs"
        elif _thresholded(parts.x):
            skipped[layer] = ("its input is already thresholded (lowbit::act_sparsify in the graph: a compressed or "
                              "loaded model's thresholds); not thresholded again")
        else:
            yield node, layer, parts


def _thresholded(x: Any) -> bool:
    """Whether ``x`` is already the output of an activation-sparsity threshold (``act_sparsify``)."""
    return isinstance(x, fx.Node) and x.op == "call_function" and x.target is torch.ops.lowbit.act_sparsify.default


def linear_input_sites(gm: fx.GraphModule, ctx: PassContext, pass_name: str,
                       skipped: dict[str, str]) -> list[ActSite]:
    """TEAL's and WINA's sites: the input of every selected linear, one site per input tensor."""
    by_input: dict[fx.Node, list[tuple[fx.Node, str, ir.LinearParts]]] = {}
    for node, layer, parts in _block_linears(gm, ctx, pass_name, skipped):
        by_input.setdefault(parts.x, []).append((node, layer, parts))
    sites = []
    for x, readers in by_input.items():
        first_layer = readers[0][1]
        name = "+".join([first_layer] + [layer.rpartition(".")[2] for _, layer, _ in readers[1:]])
        sites.append(ActSite(name, x, readers[0][0], [r[0] for r in readers], [_weight(gm, r[2]) for r in readers],
                             prefix=first_layer, owner=ir.fetch_attr(gm, readers[0][2].weight_node.target)))
    return sites


def gate_activation_sites(gm: fx.GraphModule, ctx: PassContext, pass_name: str,
                          skipped: dict[str, str]) -> list[ActSite]:
    """CATS's sites: ``act(gate(x))`` multiplied elementwise into the input of a selected linear
    (the down projection)."""
    sites, seen = [], set()
    for node, layer, parts in _block_linears(gm, ctx, pass_name, skipped):
        product = parts.x
        if not (isinstance(product, fx.Node) and product.op == "call_function" and product.target in _MULS):
            continue
        for act in product.args:
            if (isinstance(act, fx.Node) and act.op == "call_function" and act.target in _ACTIVATIONS
                    and isinstance(act.args[0], fx.Node) and ir.is_linear(act.args[0]) and act not in seen):
                seen.add(act)
                module = ir.get(act, ir.MODULE)
                gate = ir.linear_parts(act.args[0])
                gate_layer = ir.layer_name(act.args[0], gate.weight_node.target) if gate.weight_node is not None \
                    else layer
                name = module.fqn if module is not None and module.fqn else f"{gate_layer}:activation"
                prefix = name if module is not None and module.fqn else f"{gate_layer}_act"
                sites.append(ActSite(name, act, act, [u for u in act.users], [_weight(gm, parts)], prefix,
                                     owner=ir.fetch_attr(gm, parts.weight_node.target)))
                break
    return sites


def threshold_for(scores: torch.Tensor, sparsity: float) -> tuple[float, float]:
    """The threshold below which the fraction ``sparsity`` of ``scores`` falls, and the fraction
    that actually does (ties and the finite sample make them differ slightly)."""
    flat = scores.reshape(-1).float()
    k = int(round(sparsity * flat.numel()))
    if k <= 0:
        return 0.0, 0.0
    ordered = torch.sort(flat).values
    threshold = float(ordered[min(k, flat.numel() - 1)]) if k < flat.numel() else float("inf")
    return threshold, float((flat < threshold).float().mean())


def column_norms(weights: list[torch.Tensor]) -> torch.Tensor:
    """``||W[:, i]||_2`` of the readers' weights stacked on their output dimension (float32 [K])."""
    return torch.stack([w.float().pow(2).sum(0) for w in weights]).sum(0).sqrt()


class ActivationSparsity(Pass):
    """Base: sites from the graph (:meth:`sites`), a score per site (:meth:`col_scale`), one
    calibration run, a threshold per site, ``lowbit::act_sparsify`` inserted in front of its readers."""

    requires = ("canonical",)
    ensures = ("activation_sparse",)
    before = ("weights_quantized",)
    data_driven = True
    at = "input"

    def __init__(self, sparsity: float = 0.5) -> None:
        sparsity = float(sparsity)
        if not 0.0 <= sparsity < 1.0:
            raise LowbitError(f"pass {self.name!r}: sparsity={sparsity}; give the fraction of activations to zero, "
                              "in [0, 1) (0.5 for 50 %)")
        super().__init__(sparsity=sparsity)

    def sites(self, gm: fx.GraphModule, ctx: PassContext, skipped: dict[str, str]) -> list[ActSite]:
        return linear_input_sites(gm, ctx, self.name, skipped)

    def col_scale(self, site: ActSite) -> torch.Tensor | None:
        return None

    def after_threshold(self, gm: fx.GraphModule, site: ActSite, thresholded: fx.Node, entry: dict[str, Any]) -> None:
        """Called once the site's threshold node is in the graph (``entry``: its summary record)."""

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        skipped: dict[str, str] = {}
        sites = {s.observe: s for s in self.sites(gm, ctx, skipped)}
        if not sites:
            reasons = collections.Counter(skipped.values())
            why = "; ".join(f"{n} linear(s): {reason}" for reason, n in reasons.items())
            return PassResult(False, 0, {"sites": {}, "skipped": skipped,
                                         "note": f"{self.name}: no site found in the graph's repeated blocks"
                                                 + (f" ({why})" if why else "")})
        key = common.recipe_key(ctx, self.name, self.options)
        report: dict[str, Any] = {}
        sparsity = self.options["sparsity"]

        def compute(site: ActSite, observed) -> tuple[float, float, torch.Tensor | None]:
            scale = self.col_scale(site)
            x = observed.sample_rows()
            scores = x.abs() if scale is None else x.abs() * scale
            threshold, achieved = threshold_for(scores, sparsity)
            return threshold, achieved, scale

        def apply(site: ActSite, result) -> None:
            threshold, achieved, scale = result
            node = insert_threshold(gm, site, threshold, scale)
            ir.put(node, ir.ACT_SPARSITY, ir.ActSparsitySpec(self.name, site.name, sparsity, round(achieved, 4),
                                                             threshold))
            report[site.name] = {"target": sparsity, "achieved": round(achieved, 4), "threshold": threshold,
                                 "readers": len(site.readers), "score": "|x|" if scale is None else "|x|*||W[:,i]||"}
            self.after_threshold(gm, site, node, report[site.name])
            for reader in site.readers:
                layer = _layer_of(reader)
                if layer:
                    ctx.layers.setdefault(layer, {})["activation_sparsity"] = round(achieved, 4)

        cached = {s: common.RESULTS.get(s.owner, (key, s.name)) for s in sites.values()}
        if all(r is not None for r in cached.values()):
            for site, result in cached.items():
                apply(site, result)
            info: dict[str, Any] = {"cached": len(cached)}
        elif (why := common.reuse_only(ctx, cached.values())) is not None:
            # a later graph (a decode step) of a model whose first graph was calibrated: its
            # thresholds, and a logged fallback (strict: raise) for the sites it never saw
            missing = [site for site, result in cached.items() if result is None]
            for site, result in cached.items():
                if result is not None:
                    apply(site, result)
            for site in missing:
                ctx.fallback(f"{self.name}: site {site.name}", f"{why}; its input stays dense")
            info = {"cached": len(cached) - len(missing), "not_calibrated": why}
        else:
            engine = ctx.calibration_for(self.name)
            info = {"runs": []}
            for level in _levels(gm, list(sites.values())):
                pending = {s.observe: s for s in level}

                def on_block(block, stats) -> bool:
                    for node, observed in stats.items():
                        site = pending.pop(node)
                        result = compute(site, observed)
                        common.RESULTS.put(site.owner, (key, site.name), result)
                        apply(site, result)
                    return bool(stats)

                info["runs"].append(engine.run(self.name, lambda n: n in pending, {"samples"}, on_block, at=self.at))
                for site in pending.values():
                    ctx.fallback(f"{self.name}: site {site.name}",
                                 "no calibration data reached it; its input stays dense")
        gm.graph.lint()
        gm.recompile()
        achieved = [r["achieved"] for r in report.values()]
        return PassResult(bool(report), len(report), {
            "sites": report, "skipped": skipped, "calibration": info, "target": sparsity,
            "mean_achieved": round(sum(achieved) / len(achieved), 4) if achieved else None})


def _levels(gm: fx.GraphModule, sites: list[ActSite]) -> list[list[ActSite]]:
    """Sites grouped so that each is calibrated after every site before it in its block: level
    ``i`` holds the ``i``-th site of every block (q/k/v, then o, then gate/up, then down), so the
    o projection's threshold is measured on the attention output of thresholded q/k/v inputs, as
    it runs. One calibration run per level."""
    order = _position(gm)
    per_block: dict[str, list[ActSite]] = {}
    for site in sorted(sites, key=lambda s: order(s.observe)):
        module = ir.get(site.observe, ir.MODULE)
        found = calibration.block_of(module.fqn) if module is not None else None
        per_block.setdefault(found[1] if found else site.name, []).append(site)
    depth = max((len(v) for v in per_block.values()), default=0)
    return [[v[i] for v in per_block.values() if i < len(v)] for i in range(depth)]


def _layer_of(node: fx.Node) -> str | None:
    if ir.is_linear(node):
        parts = ir.linear_parts(node)
        return ir.layer_name(node, parts.weight_node.target) if parts.weight_node is not None else None
    module = ir.get(node, ir.MODULE)
    return module.fqn if module is not None else None


def insert_threshold(gm: fx.GraphModule, site: ActSite, threshold: float, col_scale: torch.Tensor | None) -> fx.Node:
    """``lowbit::act_sparsify`` on ``site.value``, read by the site's readers instead of the value."""
    first = min(site.readers, key=_position(gm))
    with gm.graph.inserting_before(first):
        thr = common._register(gm, f"{site.prefix}.act_threshold", torch.tensor([threshold], dtype=torch.float32))
        cs = None if col_scale is None else common._register(gm, f"{site.prefix}.act_col_scale",
                                                             col_scale.float().contiguous())
        new = gm.graph.call_function(torch.ops.lowbit.act_sparsify.default, (site.value, thr, cs))
    new.meta.update({k: v for k, v in site.value.meta.items() if k in ("val", "example_value", "tensor_meta")})
    module = ir.get(site.observe, ir.MODULE)
    if module is not None:
        ir.put(new, ir.MODULE, module)
    for reader in site.readers:
        reader.replace_input_with(site.value, new)
    return new


def _position(gm: fx.GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: order[n]


@register_pass
class Teal(ActivationSparsity):
    name = "teal"


@register_pass
class Wina(ActivationSparsity):
    name = "wina"

    def col_scale(self, site: ActSite) -> torch.Tensor:
        return column_norms(site.weights)


@register_pass
class Cats(ActivationSparsity):
    name = "cats"
    at = "output"

    def sites(self, gm: fx.GraphModule, ctx: PassContext, skipped: dict[str, str]) -> list[ActSite]:
        return gate_activation_sites(gm, ctx, self.name, skipped)


@register_pass
class RSparse(ActivationSparsity):
    """R-Sparse (Zhang et al., 2025): TEAL's thresholds at the linears' inputs, plus, for each
    reading linear ``W`` [N, K], a rank-``rank`` factorisation ``W ~ L R`` (truncated SVD of the
    float weight: ``L`` = U_r S_r [N, r], ``R`` = V_r^T [r, K]) applied to the inputs the threshold
    zeroed: ``y = W sparse(x) + L (R (x - sparse(x)))`` (``lowbit::lowrank_residual``). The
    thresholds are calibrated with the low-rank parts of earlier sites in place.

    With a quantizing pass after it (``rsparse-50+w4a16``, ``+w8a16``) the sparse part reads the
    quantized weight (``fuse_sparse_input`` makes it ``lowbit::sparse_input_linear``, the
    activation-sparse GEMV) while ``L`` and ``R`` stay float in the float weight's dtype, factored
    from the float weight: ``y = Q(W) sparse(x) + L R (x - sparse(x))``. ``compress`` writes a linear
    with its low-rank part as ``LowbitLinear`` (quantized) or ``RSparseLinear`` (float) with buffers
    ``lowrank_left`` / ``lowrank_right``. Each site's summary gives the rank, the relative error of
    the factorisation, ``||W - L R||_F / ||W||_F``, per reader, and the factors' dtype and bytes
    (``lowrank_dtype``, ``lowrank_bytes``; the coverage totals count them under ``lowrank``)."""

    name = "rsparse"

    def __init__(self, sparsity: float = 0.5, rank: int = 32) -> None:
        super().__init__(sparsity)
        if int(rank) < 1:
            raise LowbitError(f"pass 'rsparse': rank={rank}; give the rank of the low-rank part (>= 1)")
        self.options["rank"] = int(rank)

    def after_threshold(self, gm: fx.GraphModule, site: ActSite, thresholded: fx.Node, entry: dict[str, Any]) -> None:
        errors, nbytes = [], 0
        for i, (reader, weight) in enumerate(zip(site.readers, site.weights)):
            w = weight.double()
            r = min(self.options["rank"], *w.shape)
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            left, right = (u[:, :r] * sv[:r]).to(weight.dtype), vh[:r].to(weight.dtype)
            nbytes += (left.numel() + right.numel()) * left.element_size()
            errors.append(round(float(torch.linalg.matrix_norm(w - left.double() @ right.double())
                                      / torch.linalg.matrix_norm(w).clamp_min(1e-30)), 4))
            prefix = f"{site.prefix}.lowrank{i}" if len(site.readers) > 1 else f"{site.prefix}.lowrank"
            with gm.graph.inserting_before(reader.next):  # right after the reader, in this order
                ln = common._register(gm, f"{prefix}_left", left.contiguous())
                rn = common._register(gm, f"{prefix}_right", right.contiguous())
                low = gm.graph.call_function(torch.ops.lowbit.lowrank_residual.default,
                                             (site.value, thresholded, ln, rn))
                total = gm.graph.call_function(operator.add, (reader, low))
            total.meta.update({k: v for k, v in reader.meta.items() if k in ("val", "example_value", "tensor_meta")})
            module = ir.get(reader, ir.MODULE)
            if module is not None:
                ir.put(low, ir.MODULE, module)
                ir.put(total, ir.MODULE, module)
            reader.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
        entry.update(rank=self.options["rank"], lowrank_rel_error=errors,
                     lowrank_dtype=str(site.weights[0].dtype).removeprefix("torch."), lowrank_bytes=nbytes)


# --------------------------------------------------------------------------------------------
# The threshold fused into the quantized matmul that reads it
# --------------------------------------------------------------------------------------------

def _threshold_fusion(name: str, linear: Any, fused: Any, extra: tuple[str, ...]) -> PatternRule:
    """``act_sparsify`` feeding ``linear`` -> ``fused``: the sparsify's (x, threshold, col_scale), then the
    linear's weight arguments and ``extra`` (the fused op's trailing arguments, by the linear's names)."""
    def match(node: fx.Node) -> dict[str, Any] | None:
        if not (node.op == "call_function" and node.target is linear):
            return None
        args = ir.op_args(node)
        x = args["x"]
        if isinstance(x, fx.Node) and x.op == "call_function" and x.target is torch.ops.lowbit.act_sparsify.default:
            return {"linear": args, "sparsify": ir.op_args(x), "spec": ir.get(x, ir.ACT_SPARSITY)}
        return None

    def rewrite(gm: fx.GraphModule, node: fx.Node, found: dict[str, Any]) -> fx.Node:
        a, s = found["linear"], found["sparsify"]
        new = gm.graph.call_function(fused, (
            s["x"], s["threshold"], s["col_scale"], a["qweight"], a["scale"], a["zero"], a["bias"], a["fmt"],
            a["in_features"], *(a[k] for k in extra)))
        if found["spec"] is not None:
            ir.put(new, ir.ACT_SPARSITY, found["spec"])
        return new

    return PatternRule(name, match, rewrite)


FUSE_SPARSE_INPUT = _threshold_fusion("act_sparsify + wo_linear -> sparse_input_linear",
                                      torch.ops.lowbit.wo_linear.default,
                                      torch.ops.lowbit.sparse_input_linear.default, ())
FUSE_SPARSE_INPUT_QA = _threshold_fusion("act_sparsify + qa_linear -> sparse_input_qa_linear",
                                         torch.ops.lowbit.qa_linear.default,
                                         torch.ops.lowbit.sparse_input_qa_linear.default, ("act", "x_scale"))
_FUSED = (torch.ops.lowbit.sparse_input_linear.default, torch.ops.lowbit.sparse_input_qa_linear.default)


def _rows(node: fx.Node) -> int | None:
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    rows = value.numel() // max(int(value.shape[-1]), 1)
    return rows if isinstance(rows, int) else None


def unfuse_for_triton(gm: fx.GraphModule) -> dict[str, int]:
    """Before Triton lowering: ``sparse_input_qa_linear`` -> ``act_sparsify`` + ``qa_linear`` (there
    the W8A8 matmul anchors a fusion group with its own generated kernel, which the fused op would
    lose), and ``sparse_input_linear`` over more than one row (prefill: nothing to skip, the
    activation-sparse GEMV is a decode kernel) -> ``act_sparsify`` + ``wo_linear``, so prefill runs
    the generated dense kernel on the thresholded input instead of the op's CPU implementation.
    One-row ``sparse_input_linear`` stays (the Triton sparse GEMV). Returns the counts split."""
    counts = {"qa": 0, "prefill": 0}
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.lowbit.sparse_input_qa_linear.default:
            kind, op, extra = "qa", torch.ops.lowbit.qa_linear.default, ("act", "x_scale")
        elif node.target is torch.ops.lowbit.sparse_input_linear.default and (_rows(ir.op_args(node)["x"]) or 1) > 1:
            kind, op, extra = "prefill", torch.ops.lowbit.wo_linear.default, ()
        else:
            continue
        a = ir.op_args(node)
        with gm.graph.inserting_before(node):
            thr = gm.graph.call_function(torch.ops.lowbit.act_sparsify.default, (a["x"], a["threshold"], a["col_scale"]))
            thr.meta.update({k: v for k, v in a["x"].meta.items() if k in ("val", "example_value", "tensor_meta")})
            new = gm.graph.call_function(op, (thr, a["qweight"], a["scale"], a["zero"], a["bias"], a["fmt"],
                                              a["in_features"], *(a[k] for k in extra)))
        for key in ("val", "example_value", "tensor_meta"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
        for key in (ir.MODULE, ir.WEIGHT_QUANT, ir.ACT_SPARSITY):
            if (value := ir.get(node, key)) is not None:
                ir.put(new, key, value)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        counts[kind] += 1
    return counts


def _cpu_kernel_record(node: fx.Node) -> str:
    """Which CPU kernel one row of this layer gets, until its site decides: the linears behind one
    threshold run as one call (``backends/cpu_sparse.SparseInputGroup``, compiled or eager), which
    times the sparse kernel against the dense one on its stacked shape at its first decode row and
    writes the plan into this entry (``SparseInputGroup.limit``)."""
    from lowbit_compiler.backends import cpu_sparse

    fmt = ir.op_args(node)["fmt"]
    if (why := cpu_sparse.supported(fmt)) is not None:
        return f"dense kernels: {why}"
    mode = cpu_sparse._mode()
    if mode != "measure":
        return f"{'activation-sparse' if mode == 'sparse' else 'dense'} kernel: {cpu_sparse.DISPATCH_ENV}={mode}"
    if node.target is torch.ops.lowbit.sparse_input_qa_linear.default:  # one layer, the op's own plan
        return ("decided at the layer's first decode row: the sparse kernel timed against the dense one on this host "
                "(cached on disk; cpu_sparse.plan, logged when the dense kernel runs)")
    return SITE_DECIDES


# what a fused layer's record says until its site group decides (and writes its decision there)
SITE_DECIDES = ("decided at the site's first decode row: the sparse kernel timed against the dense one on this host "
                "(cached on disk), this entry then says which runs")


@register_pass
class FuseSparseInput(Pass):
    """``wo_linear(act_sparsify(x))`` -> ``sparse_input_linear(x)`` and ``qa_linear(act_sparsify(x))``
    -> ``sparse_input_qa_linear(x)``: the decode GEMV then reads only the weight rows of the inputs
    kept. Thresholds in front of float matmuls stay as they are (reported)."""

    name = "fuse_sparse_input"
    requires = ("activation_sparse", "weights_quantized")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        counts = apply_rules(gm, [FUSE_SPARSE_INPUT, FUSE_SPARSE_INPUT_QA])
        fused = counts[FUSE_SPARSE_INPUT.name] + counts[FUSE_SPARSE_INPUT_QA.name]
        for node in gm.graph.nodes:  # the quantizer rewrote the layer records: the achieved sparsity back in
            spec, decision = ir.get(node, ir.ACT_SPARSITY), ir.get(node, ir.WEIGHT_QUANT)
            if spec is not None and decision is not None and decision.layer in ctx.layers:
                ctx.layers[decision.layer]["activation_sparsity"] = spec.achieved
                if node.target in _FUSED:
                    ctx.layers[decision.layer]["sparse_kernel"] = _cpu_kernel_record(node)
        left = [u.name for n in gm.graph.nodes if n.target is torch.ops.lowbit.act_sparsify.default for u in n.users
                if u.target is not torch.ops.lowbit.lowrank_residual.default]  # R-Sparse's part reads it by design
        return PassResult(fused > 0, fused, {"fused": fused, "fused_qa": counts[FUSE_SPARSE_INPUT_QA.name],
                                             "unfused_readers": left})
