"""mixed_precision: a weight format per linear under an average-bits budget, from measured sensitivity.

Where it runs: after ``canonicalize`` (and the passes that change the weights: ``rotate``,
``smoothquant``, ``awq``), before the quantizing pass, which then uses each linear's chosen
format (``ir.WEIGHT_FORMAT``) instead of the recipe's.

How (HAWQ / SliM-LLM in spirit): the calibration engine accumulates each selected linear's input
Hessian ``H``; for every candidate format the layer-output error of round to nearest,
``tr(dW H dW^T) / tr(W H W^T)``, is measured. Every linear starts at the cheapest format and the
one whose error falls most per extra bit is upgraded, greedily, until the budget is spent.
Options: ``bits`` (the average bits per weight, true bytes: scales and zeros counted) and
``formats`` (the candidates, format keys). Data-driven: ``ctx.calibration_for("mixed_precision")``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from lowbit_compiler import ir
from lowbit_compiler.formats import WeightFormat, check_layer, dequantize, quantize
from lowbit_compiler.pass_base import LowbitError, Pass, PassContext, PassResult, register_pass
from lowbit_compiler.passes.quantize import common


def sensitivity(w: torch.Tensor, h: torch.Tensor, fmt: WeightFormat) -> float:
    """Relative layer-output error of round to nearest in ``fmt``: tr(dW H dW^T) / tr(W H W^T)."""
    signal = float(((w @ h) * w).sum()) or 1.0
    dw = w - dequantize(quantize(w, fmt))
    return float(((dw @ h) * dw).sum()) / signal


def allocate(table: dict[str, list[tuple[float, float]]], params: dict[str, int], budget: float) -> dict[str, int]:
    """Greedy upgrades under ``budget`` bits per weight: ``table[layer]`` = [(bits, error)] per
    candidate (cheapest first); returns the chosen candidate index per layer."""
    choice = {layer: 0 for layer in table}
    spent = sum(rows[0][0] for rows in table.values())
    limit = budget * sum(params.values())
    while True:
        best, best_gain = None, 0.0
        for layer, i in choice.items():
            if i + 1 < len(table[layer]):
                (b0, e0), (b1, e1) = table[layer][i], table[layer][i + 1]
                if spent + b1 - b0 <= limit and (e0 - e1) / (b1 - b0) > best_gain:
                    best, best_gain = layer, (e0 - e1) / (b1 - b0)
        if best is None:
            return choice
        spent += table[best][choice[best] + 1][0] - table[best][choice[best]][0]
        choice[best] += 1


@register_pass
class MixedPrecision(Pass):
    name = "mixed_precision"
    requires = ("canonical",)
    ensures = ("formats_assigned",)
    before = ("weights_quantized",)
    data_driven = True

    def __init__(self, bits: float = 4.5,
                 formats: tuple[str, ...] = ("int3_g128_asym", "int4_g128_asym", "int8")) -> None:
        try:
            candidates = sorted((WeightFormat.parse(k) for k in formats), key=lambda f: f.bits_per_weight(4096, 4096))
        except Exception as e:
            raise LowbitError(f"mixed_precision: formats={formats!r}: {e}") from None
        super().__init__(bits=float(bits), formats=tuple(f.key for f in candidates))
        self.budget, self.candidates = float(bits), candidates

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sites = common.select_linears(gm, ctx, self.name, check_groups=False)
        for site in sites:
            for fmt in self.candidates:
                check_layer(fmt, site.shape[1], site.layer, ctx.recipe.pad_to_group)
        key = common.recipe_key(ctx, self.name, self.options)
        table: dict[str, list[tuple[float, float]]] = {}
        by_node = {s.node: s for s in sites}

        def errors(node: fx.Node, observed) -> list[tuple[float, float]]:
            w = by_node[node].weight.float()
            return [(f.storage_bytes(*w.shape) * 8.0, sensitivity(w, observed.hessian, f)) for f in self.candidates]

        info, _ = common.calibrate_each(ctx, self.name, {s.node: (s.param, (key, s.transposed)) for s in sites},
                                        {"hessian"}, errors,
                                        lambda node, rows: table.__setitem__(by_node[node].layer, rows), rewrites=False)
        sites = [s for s in sites if s.layer in table]
        params = {s.layer: s.param.numel() for s in sites}
        choice = allocate(table, params, self.budget)
        spent = sum(table[layer][i][0] for layer, i in choice.items())
        for site in sites:
            i = choice[site.layer]
            ir.put(site.node, ir.WEIGHT_FORMAT, ir.FormatChoice(
                self.candidates[i].key, self.name, round(table[site.layer][i][1], 6),
                tuple((f.key, round(e, 6)) for f, (_, e) in zip(self.candidates, table[site.layer]))))
        counts: dict[str, int] = {}
        for i in choice.values():
            counts[self.candidates[i].key] = counts.get(self.candidates[i].key, 0) + 1
        details = {"average_bits": spent / max(sum(params.values()), 1), "budget_bits": self.budget,
                   "formats": counts, "calibration": info,
                   "layers": {s.layer: {"format": self.candidates[choice[s.layer]].key,
                                        "relative_error": round(table[s.layer][choice[s.layer]][1], 6),
                                        "sensitivity": {f.key: round(e, 6) for f, (_, e) in
                                                        zip(self.candidates, table[s.layer])}} for s in sites}}
        return PassResult(bool(sites), len(sites), details)
