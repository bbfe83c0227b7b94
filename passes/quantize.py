"""insert_weight_quant: replace float linears by ``lowbit::wo_linear`` with quantized weights.

Where it runs: after ``canonicalize`` (it requires "canonical": every linear is ``F.linear``).

What it rewrites: each ``F.linear`` whose weight is a frozen parameter and whose layer FQN the
recipe selects (``include``/``exclude`` globs) becomes::

    lowbit.wo_linear(x, <layer>.qweight, <layer>.scale, <layer>.zero, bias, "<format key>", K)

with the quantized tensors registered on the GraphModule under the layer's FQN, and an
``ir.WEIGHT_QUANT`` decision (format, bits per weight, bytes, weight SQNR) on the node.

Quantized tensors are cached per parameter object (and its in-place version counter), so prefill,
decode and recompiled graphs of one model share a single copy; ``QUANT_CACHE.misses`` counts
real work.

Options (``[recipe.options.insert_weight_quant]``): ``rounding`` = ``"rtn"`` (default), ``"hqq"``
(data-free), ``"gptq"`` or ``"awq"`` (need calibration: ``compress(..., calibration=...)`` runs them
block by block and hands the results over in ``PassContext.quantized``); GPTQ's ``block_size``,
``damp``, ``act_order``; HQQ's ``hqq_iters``; ``smoothquant`` (alpha, W8A8 recipes);
``rounding = "spqr"`` with ``outlier_fraction`` (default 1%: the weights that stretch their group's
range most kept in fp16 beside the dense op, ``+ lowbit::sparse_linear``, their bytes counted);
``mixed_bits`` (average bits per weight) with ``mixed_formats`` (the candidates): per-layer formats
chosen by compress from measured sensitivity, handed over in ``PassContext.formats``. See
``lowbit_compiler/rounding.py``, ``scale_folding.py`` and ``offline.py``.

What it leaves alone, with the reason in ``ir.SKIPPED``: linears whose weight is computed in the
graph (not a parameter), layers the recipe excludes. A layer whose K does not fit the group size
raises (naming the layer and the fix) unless the recipe sets ``pad_to_group``.
"""
from __future__ import annotations

import collections
import operator
from typing import Any

import torch
import torch.fx as fx

from lowbit_compiler import ir
from lowbit_compiler.identity_cache import IdentityCache
from lowbit_compiler.formats import QuantizedWeight, WeightFormat, check_layer, dequantize, quantize, sqnr_db
from lowbit_compiler import rounding as rounding_algorithms
from lowbit_compiler.pass_base import LowbitError, Pass, PassContext, PassResult, register_pass
from lowbit_compiler.recipe import ACTIVATIONS

# parameter -> {(transposed, format key, rounding, options): (QuantizedWeight, weight SQNR, outliers)};
# .misses counts real work
QUANT_CACHE = IdentityCache()


def quantize_parameter(param: torch.Tensor, transposed: bool, fmt: WeightFormat, rounding: str = "rtn",
                       **options: Any) -> tuple[QuantizedWeight, float, rounding_algorithms.Outliers | None]:
    """The quantized form of one parameter by a data-free rounding, its weight SQNR, and the
    fp16 outliers kept beside it (spqr only); cached by identity and in-place version, so the
    prefill and decode graphs of a model share one copy."""

    def make() -> tuple[QuantizedWeight, float, rounding_algorithms.Outliers | None]:
        w = param.detach().t() if transposed else param.detach()
        outliers = None
        if rounding == "spqr":
            qw, outliers = rounding_algorithms.spqr(w, fmt, **options)
            deq = dequantize(qw).index_put((outliers.rows.long(), outliers.cols.long()), outliers.values.float())
        else:
            qw = (rounding_algorithms.hqq(w, fmt, **options) if rounding == "hqq" else
                  rounding_algorithms.mse(w, fmt) if rounding == "mse" else quantize(w, fmt))
            deq = dequantize(qw)
        return qw, sqnr_db(w.float(), deq), outliers

    return QUANT_CACHE.get_or_create(param, (transposed, fmt.key, rounding, tuple(sorted(options.items()))), make)


def _register(gm: fx.GraphModule, target: str, tensor: torch.Tensor) -> fx.Node:
    ir.set_attr(gm, target, tensor)
    return gm.graph.get_attr(target)


@register_pass
class InsertWeightQuant(Pass):
    name = "insert_weight_quant"
    requires = ("canonical",)
    ensures = ("weights_quantized",)

    def __init__(self, rounding: str = "rtn", block_size: int = 128, damp: float = 0.01, act_order: bool = False,
                 hqq_iters: int = 20, smoothquant: float | None = None, mixed_bits: float | None = None,
                 mixed_formats: tuple[str, ...] = ("int3_g128_asym", "int4_g128_asym", "int8"),
                 outlier_fraction: float = 0.01) -> None:
        if rounding not in rounding_algorithms.ALGORITHMS:
            raise LowbitError(f"insert_weight_quant: rounding={rounding!r}; expected one of "
                              f"{rounding_algorithms.ALGORITHMS}")
        super().__init__(rounding=rounding, block_size=block_size, damp=damp, act_order=act_order, hqq_iters=hqq_iters,
                         smoothquant=smoothquant, mixed_bits=mixed_bits, mixed_formats=tuple(mixed_formats),
                         outlier_fraction=outlier_fraction)
        self.rounding = rounding

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        recipe = ctx.recipe
        fmt: WeightFormat | None = recipe.weight
        if fmt is None:
            return PassResult(False, 0, {"note": "recipe has no weight format"})
        if self.options.get("mixed_bits") is not None and not ctx.calibrated:
            raise _needs_calibration(f"recipe {recipe.name!r}: mixed precision measures each layer's sensitivity on "
                                     "calibration data")
        if self.options.get("smoothquant") is not None and not ctx.calibrated:
            raise _needs_calibration(f"recipe {recipe.name!r}: SmoothQuant migrates activation outliers measured on "
                                     "calibration data")
        quantized, skipped = 0, 0
        for node in list(gm.graph.nodes):
            if not ir.is_linear(node):
                continue
            parts = ir.linear_parts(node)
            if parts.weight_node is None:
                ir.put(node, ir.SKIPPED, ir.SkipReason(self.name, "weight is computed in the graph, not a parameter"))
                skipped += 1
                continue
            layer = ir.layer_name(node, parts.weight_node.target)
            if not recipe.applies_to(layer):
                ir.put(node, ir.SKIPPED, ir.SkipReason(self.name, "excluded by the recipe's include/exclude globs"))
                ctx.layers[layer] = {"format": "float", "skipped": "excluded by recipe"}
                skipped += 1
                continue
            param = ir.fetch_attr(gm, parts.weight_node.target)
            n, k = (param.shape[1], param.shape[0]) if parts.transposed else tuple(param.shape)
            fmt = ctx.formats.get(layer, recipe.weight)  # mixed precision assigns formats per layer
            check_layer(fmt, k, layer, recipe.pad_to_group)
            qw, sqnr, outliers = self._quantize(layer, param, parts.transposed, fmt, ctx)
            with gm.graph.inserting_before(node):
                q = _register(gm, f"{layer}.qweight", qw.qweight)
                s = _register(gm, f"{layer}.scale", qw.scale)
                z = None if qw.zero is None else _register(gm, f"{layer}.zero", qw.zero)
                if recipe.activation:  # quantized activations too: per token at run time, or static
                    act = ACTIVATIONS[recipe.activation][0]
                    x_scale = None
                    if recipe.activation.endswith("_static"):
                        if layer not in ctx.activation_scales:
                            raise _needs_calibration(f"layer {layer}: activation {recipe.activation!r} needs a "
                                                     "scale measured on calibration data")
                        x_scale = _register(gm, f"{layer}.x_scale", ctx.activation_scales[layer])
                    new = gm.graph.call_function(torch.ops.lowbit.qa_linear.default,
                                                 (parts.x, q, s, z, parts.bias, fmt.key, k, act, x_scale))
                else:
                    new = gm.graph.call_function(torch.ops.lowbit.wo_linear.default,
                                                 (parts.x, q, s, z, parts.bias, fmt.key, k))
            new.meta.update(node.meta)
            result = new
            side_bytes = 0
            if outliers is not None:  # y = dense(x) + x @ S^T, S the fp16 outliers
                with gm.graph.inserting_before(node):  # after `new`, in this order
                    r = _register(gm, f"{layer}.outlier_rows", outliers.rows)
                    c = _register(gm, f"{layer}.outlier_cols", outliers.cols)
                    v = _register(gm, f"{layer}.outlier_values", outliers.values)
                    sparse = gm.graph.call_function(torch.ops.lowbit.sparse_linear.default, (parts.x, r, c, v, n))
                    result = gm.graph.call_function(operator.add, (new, sparse))
                for extra in (sparse, result):
                    extra.meta.update({key: value for key, value in node.meta.items() if key != ir.META})
                side_bytes = outliers.nbytes()
            decision = ir.WeightQuantDecision(
                layer=layer, format=fmt.key, in_features=k, out_features=n,
                bits_per_weight=(qw.nbytes() + side_bytes) * 8 / (n * k),
                bytes_before=param.numel() * param.element_size(), bytes_after=qw.nbytes() + side_bytes,
                weight_sqnr_db=round(sqnr, 2), padded_in_features=fmt.padded_k(k) if fmt.padded_k(k) != k else 0,
                outliers=0 if outliers is None else outliers.values.numel())
            ir.put(new, ir.WEIGHT_QUANT, decision)
            node.replace_all_uses_with(result)
            gm.graph.erase_node(node)
            ctx.layers[layer] = {k_: v for k_, v in decision.__dict__.items() if k_ != "layer"}
            quantized += 1
        if quantized:
            gm.graph.eliminate_dead_code()
            _drop_unused_attrs(gm)
        details = {"quantized": quantized, "skipped": skipped, "rounding": self.rounding,
                   "format": fmt.key if not ctx.formats else "mixed: " + ", ".join(
                       f"{key} x{count}" for key, count in sorted(collections.Counter(
                           f.key for f in ctx.formats.values()).items())),
                   "activation": recipe.activation or "float"}
        if quantized == 0:
            details["note"] = "nothing was quantized: the graph has no selected linear layers"
        return PassResult(quantized > 0, quantized, details)

    def _quantize(self, layer: str, param: torch.Tensor, transposed: bool, fmt: WeightFormat,
                  ctx: PassContext) -> tuple[QuantizedWeight, float, rounding_algorithms.Outliers | None]:
        if self.rounding in rounding_algorithms.NEEDS_DATA:
            qw = ctx.quantized.get(layer)
            if qw is None or qw.format != fmt:
                raise _needs_calibration(f"layer {layer}: rounding {self.rounding!r} needs calibration data")
            w = param.detach().t() if transposed else param.detach()
            return qw, sqnr_db(w.float(), dequantize(qw)), None
        options = ({"iters": self.options["hqq_iters"]} if self.rounding == "hqq" else
                   {"fraction": self.options["outlier_fraction"]} if self.rounding == "spqr" else {})
        return quantize_parameter(param, transposed, fmt, self.rounding, **options)


def _needs_calibration(what: str) -> LowbitError:
    """The error for data-driven decisions met without data (torch.compile alone sees none)."""
    return LowbitError(f"{what}; use lowbit_compiler.compress(model, recipe, calibration=...) "
                       "(torch.compile alone sees no data)")


def _drop_unused_attrs(gm: fx.GraphModule) -> None:
    """Forget float weights no node reads any more (the user's model still owns them)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner_path, _, attr = name.rpartition(".")
            owner = ir.fetch_attr(gm, owner_path) if owner_path else gm
            delattr(owner, attr)
