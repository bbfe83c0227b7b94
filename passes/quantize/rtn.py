"""insert_weight_quant (round to nearest) and hqq: data-free quantizing passes.

Where they run: after ``canonicalize`` (they require "canonical": every linear is ``F.linear``)
and after the passes that prepare the weights (``rotate``, ``smoothquant``, ``awq``, ``spqr``,
``mixed_precision``, ``observe_activations``).

What they rewrite: each selected float linear (``common.select_linears``) becomes::

    lowbit.wo_linear(x, <layer>.qweight, <layer>.scale, <layer>.zero, bias, "<format key>", K)

(``lowbit.qa_linear`` with the recipe's activation scheme), the quantized tensors registered on
the GraphModule under the layer's FQN, and an ``ir.WEIGHT_QUANT`` decision on the node.

Options: ``insert_weight_quant``'s ``rounding`` = ``"rtn"`` (default, ``formats.quantize``),
``"mse"`` (per-group clipping of least squared error) or ``"hqq"``; the ``hqq`` pass is
``insert_weight_quant`` with ``rounding="hqq"`` and its ``iters``. The math is in
``lowbit_compiler/rounding.py``. Data-driven rounding is its own pass (``gptq``).

Quantized tensors are cached per parameter object (and its in-place version counter), so prefill,
decode and recompiled graphs of one model share a single copy; ``QUANT_CACHE.misses`` counts
real work.

Stacked 3-D expert weights read by a grouped matmul (transformers' ``grouped_mm`` experts:
``common.select_experts``) become ``lowbit.grouped_linear(x, offs, <weight>_quantized.qweight,
..., "<format key>", K, act)``: every expert rounded the same way as a linear, then stacked.

What it leaves alone, with the reason in ``ir.SKIPPED``: linears whose weight is computed in the
graph (not a parameter), layers the recipe excludes. A layer whose K does not fit the group size
raises (naming the layer and the fix) unless the recipe sets ``pad_to_group``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from lowbit_compiler import ir, memory, rounding as rounding_algorithms
from lowbit_compiler.backends import cpu_quantize
from lowbit_compiler.formats import QuantizedWeight, WeightFormat, quantize, weight_sqnr_db, weights_sqnr_db
from lowbit_compiler.identity_cache import IdentityCache
from lowbit_compiler.pass_base import LowbitError, Pass, PassContext, PassResult, register_pass
from lowbit_compiler.passes.quantize import common

# parameter -> {(transposed, format key, rounding, options): (QuantizedWeight, weight SQNR)}; .misses counts real work
QUANT_CACHE = IdentityCache()

DATA_FREE = ("rtn", "mse", "hqq")
MOVED = {"gptq": "the 'gptq' pass: passes=[..., 'gptq']",
         "awq": "the 'awq' pass before the quantizing pass: passes=[..., 'awq', 'insert_weight_quant']",
         "spqr": "the 'spqr' pass before the quantizing pass: passes=[..., 'spqr', 'insert_weight_quant']"}


def quantize_parameter(param: torch.Tensor, transposed: bool, fmt: WeightFormat, rounding: str = "rtn",
                       *, layer: str = "?", **options: Any) -> tuple[QuantizedWeight, float]:
    """The quantized form of one parameter by a data-free rounding and its weight SQNR; cached by
    identity and in-place version, so the prefill and decode graphs of a model share one copy.

    Round to nearest on int formats runs the one-pass C kernel (``backends/cpu_quantize.py``: the
    same bits, codes + scales + SQNR sums in one read of the weight); the torch path otherwise
    (other roundings and formats, no compiler: logged once). A weight holding inf or NaN raises a
    ``FormatError`` naming ``layer`` on either path."""

    def make() -> tuple[QuantizedWeight, float]:
        w = param.detach().t() if transposed else param.detach()
        return _quantize_with_sqnr(w, fmt, rounding, layer, options)

    return QUANT_CACHE.get_or_create(param, (transposed, fmt.key, rounding, tuple(sorted(options.items()))), make)


def quantize_experts(param: torch.Tensor, transposed: bool, fmt: WeightFormat, rounding: str = "rtn",
                     *, layer: str = "?", **options: Any) -> tuple[list[QuantizedWeight], float]:
    """Every expert of a stacked [E, N, K] (or [E, K, N]) parameter rounded like one linear, and
    the weight SQNR over all of them; cached as :func:`quantize_parameter`."""

    def make() -> tuple[list[QuantizedWeight], float]:
        weights = [param.detach()[e].t() if transposed else param.detach()[e] for e in range(param.shape[0])]
        if rounding == "rtn" and cpu_quantize.available(fmt):  # one pass per expert, sums added up
            qws, signal, noise = [], 0.0, 0.0
            for w in weights:
                qw, sums = cpu_quantize.quantize_with_sums(w, fmt)
                qws.append(qw)
                signal, noise = signal + float(sums[:, 0].sum()), noise + float(sums[:, 1].sum())
            if not math.isfinite(signal):
                raise cpu_quantize.non_finite_error(layer, param.detach())
            return qws, math.inf if noise == 0 else 10 * math.log10(signal / noise)
        qws = [_round(w, fmt, rounding, options) for w in weights]
        sqnr = weights_sqnr_db(list(zip(weights, qws)))
        if math.isnan(sqnr):
            raise cpu_quantize.non_finite_error(layer, param.detach())
        return qws, sqnr

    return QUANT_CACHE.get_or_create(param, ("experts", transposed, fmt.key, rounding, tuple(sorted(options.items()))),
                                     make)


def _round(w: torch.Tensor, fmt: WeightFormat, rounding: str, options: dict) -> QuantizedWeight:
    return (rounding_algorithms.hqq(w, fmt, **options) if rounding == "hqq" else
            rounding_algorithms.mse(w, fmt) if rounding == "mse" else quantize(w, fmt))


def _quantize_with_sqnr(w: torch.Tensor, fmt: WeightFormat, rounding: str, layer: str,
                        options: dict) -> tuple[QuantizedWeight, float]:
    if rounding == "rtn":
        fast = cpu_quantize.quantize_with_sqnr(w, fmt, layer)
        if fast is not None:
            return fast
    qw = _round(w, fmt, rounding, options)
    sqnr = weight_sqnr_db(w, qw)
    if math.isnan(sqnr):  # inf or NaN in the weight (a finite weight's SQNR is never NaN)
        raise cpu_quantize.non_finite_error(layer, w)
    return qw, sqnr


class QuantizeLinears(Pass):
    """Base of the quantizing passes: select the linears, quantize each (``quantize_sites``),
    replace them by ``lowbit::`` ops, report."""

    requires = ("canonical",)
    ensures = ("weights_quantized",)
    quantizes = True

    def required(self, recipe: Any) -> tuple[str, ...]:
        static = (getattr(recipe, "activation", None) or "").endswith("_static")
        return self.requires + (("activation_scales",) if static else ())

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if ctx.recipe.weight is None:
            return PassResult(False, 0, {"note": "recipe has no weight format"})
        sites = common.select_linears(gm, ctx, self.name) + common.select_experts(gm, ctx, self.name)
        decisions, extra = self.quantize_sites(gm, ctx, sites)
        if decisions:
            common.drop_unused_attrs(gm)
            memory.release_freed()  # the rounding's float temporaries (glibc keeps them in the heap)
        details = common.summary_details(self.name, decisions, len(sites), **extra,
                                         activation=ctx.recipe.activation or "float")
        return PassResult(bool(decisions), len(decisions), details)

    def quantize_sites(self, gm: fx.GraphModule, ctx: PassContext, sites: list[common.Site | common.ExpertSite]):
        raise NotImplementedError


@register_pass
class InsertWeightQuant(QuantizeLinears):
    name = "insert_weight_quant"

    def __init__(self, rounding: str = "rtn", hqq_iters: int = 20) -> None:
        if rounding in MOVED:
            raise LowbitError(f"insert_weight_quant: rounding={rounding!r} is now {MOVED[rounding]}")
        if rounding not in DATA_FREE:
            raise LowbitError(f"insert_weight_quant: rounding={rounding!r}; expected one of {DATA_FREE}")
        super().__init__(rounding=rounding, hqq_iters=hqq_iters)
        self.rounding = rounding

    def quantize_sites(self, gm, ctx, sites):
        options = {"iters": self.options["hqq_iters"]} if self.rounding == "hqq" else {}
        decisions = []
        for site in sites:
            if isinstance(site, common.ExpertSite):
                qws, sqnr = quantize_experts(site.param, site.transposed, site.fmt, self.rounding, layer=site.layer,
                                             **options)
                new = common.replace_experts(gm, ctx, site, qws, sqnr)
            else:
                qw, sqnr = quantize_parameter(site.param, site.transposed, site.fmt, self.rounding, layer=site.layer,
                                                 **options)
                new = common.replace_linear(gm, ctx, site, qw, sqnr)
            decisions.append(ir.get(new, ir.WEIGHT_QUANT))
        return decisions, {"rounding": self.rounding}


@register_pass
class HQQ(InsertWeightQuant):
    """Half-Quadratic Quantization (data-free): ``insert_weight_quant`` with ``rounding="hqq"``."""

    name = "hqq"

    def __init__(self, iters: int = 20) -> None:
        super().__init__(rounding="hqq", hqq_iters=iters)
