"""prune / wanda / sparsegpt: zero weights of every selected linear (N:M or unstructured);
sparsegpt_quant: SparseGPT jointly with the recipe's sparse int format, as the quantizing pass.

Where they run: after ``canonicalize`` (and whatever prepares the weights: ``smoothquant``,
``awq``, ``rotate``), before the quantizing pass (``prune``, ``wanda``, ``sparsegpt``), or as the
quantizing pass itself (``sparsegpt_quant``).

What they rewrite: the linears ``common.select_linears`` finds (every ``F.linear`` over a frozen
weight the recipe selects: the same matching as the quantizing passes). The pruning passes swap
each weight for its pruned copy (a graph-module tensor; the user's model is untouched until the
offline flow writes back) and put an ``ir.SPARSITY`` spec on the linear; the linear stays a float
``F.linear`` whose weight has zeros. A later quantizing pass then stores it:

* with a sparse recipe format (``s24+int4_g128_asym``, ``s24+int8``: ``sparse_formats.py``) the
  kept values and their 2-bit indices are stored compressed (``formats.quantize`` on a sparse
  format keeps the N largest of every M, which are exactly the pruned weight's nonzeros);
* with a dense format the zeros are stored as codes (dense-with-zeros; zero is exact on every int
  grid).

``sparsegpt_quant`` prunes and rounds in one sweep over the columns (``masks.sparsegpt`` with the
format) and replaces the linear by ``lowbit::wo_linear`` over the compressed storage.

Options: ``pattern`` (``"2:4"``, ``"4:8"``, any ``"N:M"``; None: unstructured; default: the
recipe's sparse format's pattern, else 2:4), ``sparsity`` (unstructured target, 0.5), ``score``
(``prune`` only: magnitude / wanda / sparsegpt), ``block_size`` and ``damp`` (SparseGPT).
Per-layer achieved sparsity, weight SQNR and (data-driven scores) the relative output error on
the calibration data go into the layer records and the pass summary.

What they leave alone: linears the recipe does not select, MoE routers, stacked expert weights
(grouped matmuls: reported in the summary as not pruned), layers whose K is not a multiple of M
(reported, left dense). Data-driven scores run block by block on the calibration engine, each
block calibrated on the outputs of the pruned blocks before it, as SparseGPT does; results are
cached per weight (``common.RESULTS``) so prefill and decode graphs share them.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from lowbit_compiler import ir
from lowbit_compiler.formats import sqnr_db
from lowbit_compiler.pass_base import LowbitError, Pass, PassContext, PassResult, register_pass
from lowbit_compiler.passes.quantize import common
from lowbit_compiler.passes.quantize.rtn import QuantizeLinears
from lowbit_compiler.passes.sparsify import masks
from lowbit_compiler.sparse_formats import SparseFormat


def parse_pattern(pattern: str | None, recipe: Any, pass_name: str) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4); None -> unstructured. Default (``"auto"``): the recipe's sparse format's
    pattern, else 2:4. A pattern that contradicts the recipe's sparse format is refused."""
    weight = getattr(recipe, "weight", None)
    sparse = weight if isinstance(weight, SparseFormat) else None
    if pattern == "auto":
        return (sparse.n, sparse.m) if sparse else (2, 4)
    if pattern is None:
        nm = None
    else:
        try:
            n, m = (int(v) for v in str(pattern).split(":"))
        except ValueError:
            raise LowbitError(f"pass {pass_name!r}: pattern={pattern!r}; expected 'N:M' such as '2:4' or None "
                              "(unstructured, with sparsity=...)") from None
        if not 0 < n < m:
            raise LowbitError(f"pass {pass_name!r}: pattern={pattern!r} needs 0 < N < M")
        nm = (n, m)
    if sparse and nm != (sparse.n, sparse.m):
        raise LowbitError(f"pass {pass_name!r}: pattern={pattern!r} but the recipe stores weights as {sparse.key} "
                          f"({sparse.pattern}); use pattern='{sparse.pattern}' or a dense weight format")
    return nm


class _PruneBase(Pass):
    requires = ("canonical",)
    ensures = ("weights_pruned",)
    before = ("weights_quantized",)
    score = "magnitude"

    def __init__(self, pattern: str | None = "auto", sparsity: float = 0.5, block_size: int = 128,
                 damp: float = 0.01, **extra: Any) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise LowbitError(f"pass {self.name!r}: sparsity={sparsity}; expected 0 <= sparsity < 1")
        super().__init__(pattern=pattern, sparsity=sparsity, block_size=block_size, damp=damp, **extra)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        pattern = parse_pattern(self.options["pattern"], ctx.recipe, self.name)
        sites, refused = [], {}
        for site in common.select_linears(gm, ctx, self.name, check_groups=False, needs_format=False):
            if pattern and site.shape[1] % pattern[1]:
                refused[site.layer] = f"K={site.shape[1]} is not a multiple of M={pattern[1]}; left dense"
                ir.put(site.node, ir.SKIPPED, ir.SkipReason(self.name, refused[site.layer]))
                continue
            sites.append(site)
        for layer, reason in refused.items():
            ctx.fallback(f"{self.name}: layer {layer}", reason)
        key = common.recipe_key(ctx, self.name, self.options)
        layers: dict[str, dict[str, Any]] = {}
        info: dict[str, Any] = {}

        def apply(node: fx.Node, result) -> None:
            pruned, record = result
            site = by_node[node]
            _write_weight(gm, site, pruned.to(site.param.dtype))
            ir.put(node, ir.SPARSITY, ir.SparsitySpec(**record))
            layers[site.layer] = record
            ctx.layers[site.layer] = {"format": "float", "weight": ir.linear_parts(node).weight_node.target,
                                      **record}

        by_node = {s.node: s for s in sites}
        if self.score == "magnitude":
            for site in sites:
                apply(site.node, common.RESULTS.get_or_create(site.param, (key, site.transposed),
                                                              lambda site=site: self._prune(site, pattern, None)))
        else:
            info, unreached = common.calibrate_each(
                ctx, self.name, {s.node: (s.param, (key, s.transposed)) for s in sites}, {"hessian"},
                lambda node, stats: self._prune(by_node[node], pattern, stats), apply, rewrites=True,
                reuse_partial=True)
            for node in unreached:
                site = by_node[node]
                why = info.get("not_calibrated", "no calibration statistics reached this linear")
                ctx.fallback(f"{self.name}: layer {site.layer}", f"{why}; pruned by magnitude instead")
                apply(node, self._prune(site, pattern, None))
        ir.eliminate_dead_code(gm)
        gm.recompile()
        details = summary(self.score, pattern, self.options["sparsity"], layers, refused)
        if info:
            details["calibration"] = info
        return PassResult(bool(layers), len(layers), details)

    def _prune(self, site: common.Site, pattern, stats):
        w = site.weight.float()
        hessian = None if stats is None or stats.hessian is None else stats.gptq_hessian()
        score = self.score if hessian is not None else "magnitude"
        sparsity = self.options["sparsity"]
        if score == "sparsegpt":
            pruned, keep, _ = masks.sparsegpt(w, hessian, pattern, sparsity, None, self.options["block_size"],
                                              self.options["damp"])
        else:
            norms = torch.diag(hessian).clamp(min=0).sqrt() if score == "wanda" else None
            pruned, keep = masks.score_prune(w, pattern, sparsity, norms)
        return pruned, _record(w, pruned, keep, pattern, score, hessian)


def _record(w, pruned, keep, pattern, score, hessian) -> dict[str, Any]:
    return {"pattern": f"{pattern[0]}:{pattern[1]}" if pattern else "unstructured", "score": score,
            "sparsity": round(float((pruned == 0).float().mean()), 4),
            "kept_fraction": round(float(keep.float().mean()), 4),
            "weight_sqnr_db": round(sqnr_db(w, pruned), 2),
            "output_error": None if hessian is None else round(masks.output_error(w, pruned, hessian), 5)}


def summary(score: str, pattern, sparsity: float, layers: dict[str, dict[str, Any]],
            refused: dict[str, str]) -> dict[str, Any]:
    total = len(layers)
    mean = sum(r["sparsity"] for r in layers.values()) / total if total else 0.0
    details = {"pruned": total, "score": score, "pattern": f"{pattern[0]}:{pattern[1]}" if pattern else
               f"unstructured {sparsity:.0%}", "mean_sparsity": round(mean, 4),
               "layers": {k: {"sparsity": r["sparsity"], "weight_sqnr_db": r["weight_sqnr_db"],
                              "output_error": r["output_error"]} for k, r in layers.items()}}
    if refused:
        details["left_dense"] = refused
    if not total:
        details["note"] = "nothing was pruned: the graph has no selected float linear layers"
    return details


def _write_weight(gm: fx.GraphModule, site: common.Site, pruned: torch.Tensor) -> None:
    """Point the linear at its pruned [out, in] weight (a copy of its own, ``<layer>.pruned``, when
    the weight is shared or stored transposed)."""
    common.replace_linear_weight(gm, site.node, pruned, f"{common.tensor_prefix(gm, site.layer)}.pruned")


@register_pass
class Prune(_PruneBase):
    """Pruning by ``score`` (magnitude: data-free; wanda and sparsegpt need calibration)."""

    name = "prune"

    def __init__(self, score: str = "magnitude", pattern: str | None = "auto", sparsity: float = 0.5,
                 block_size: int = 128, damp: float = 0.01) -> None:
        if score not in masks.SCORES:
            raise LowbitError(f"pass 'prune': score={score!r}; expected one of {masks.SCORES}")
        super().__init__(pattern, sparsity, block_size, damp, score=score)
        self.score = score


@register_pass
class Wanda(_PruneBase):
    """Wanda (Sun et al., 2023): ``|W| * ||x||_2`` per input channel, no weight update."""

    name = "wanda"
    data_driven = True
    score = "wanda"


@register_pass
class SparseGPT(_PruneBase):
    """SparseGPT (Frantar & Alistarh, 2023): OBS pruning with error compensation, float weights."""

    name = "sparsegpt"
    data_driven = True
    score = "sparsegpt"


@register_pass
class SparseGPTQuant(QuantizeLinears):
    """SparseGPT jointly with the recipe's sparse int format (``s24+int4_g128_asym``): one sweep
    prunes, rounds and compensates; the quantizing pass of the recipe."""

    name = "sparsegpt_quant"
    data_driven = True
    ensures = ("weights_quantized", "weights_pruned")

    def __init__(self, block_size: int = 128, damp: float = 0.01) -> None:
        super().__init__(block_size=block_size, damp=damp)

    def quantize_sites(self, gm, ctx, sites):
        fmt = ctx.recipe.weight
        if not isinstance(fmt, SparseFormat):
            raise LowbitError(f"pass 'sparsegpt_quant' (recipe {ctx.recipe.name!r}) stores N:M sparse weights; the "
                              f"recipe's weight format is {fmt.key}: use a sparse one such as 's24+int4_g128_asym', "
                              "or the 'sparsegpt' pass before a dense quantizing pass")
        decisions = []
        linears = [s for s in sites if isinstance(s, common.Site)]
        for site in sites:
            if isinstance(site, common.ExpertSite):  # stacked experts: no sparse grouped storage yet, reported
                reason = "stacked expert weights (grouped matmul): sparse formats do not store them yet; left float"
                ctx.fallback(f"sparsegpt_quant: layer {site.layer}", reason)
                ir.put(site.node, ir.SKIPPED, ir.SkipReason(self.name, reason))
                ctx.layers[site.layer] = {"format": "float", "skipped": reason, "weight": site.layer}
        key = common.recipe_key(ctx, self.name, self.options)
        by_node = {s.node: s for s in linears}

        def compute(node, stats):
            site = by_node[node]
            w = site.weight.float()
            hessian = stats.gptq_hessian()
            pruned, keep, stored = masks.sparsegpt(w, hessian, (fmt.n, fmt.m), 0.5, site.fmt,
                                                   self.options["block_size"], self.options["damp"])
            record = _record(w, pruned, keep, (fmt.n, fmt.m), "sparsegpt", hessian)
            return stored, record

        def take(node, result) -> None:
            stored, record = result
            ir.put(node, ir.SPARSITY, ir.SparsitySpec(**record))
            new = common.replace_linear(gm, ctx, by_node[node], stored)
            decisions.append(ir.get(new, ir.WEIGHT_QUANT))

        info, unreached = common.calibrate_each(
            ctx, self.name, {s.node: (s.param, (key, s.transposed, fmt.key)) for s in linears}, {"hessian"},
            compute, take, rewrites=True, reuse_partial=True)
        for node in unreached:
            site = by_node[node]
            why = info.get("not_calibrated", "no calibration statistics reached this linear")
            ctx.fallback(f"sparsegpt_quant: layer {site.layer}", f"{why}; pruned by magnitude and rounded to "
                         "nearest instead")
            from lowbit_compiler.formats import quantize

            new = common.replace_linear(gm, ctx, site, quantize(site.weight, fmt))
            decisions.append(ir.get(new, ir.WEIGHT_QUANT))
        return decisions, {"calibration": info}
