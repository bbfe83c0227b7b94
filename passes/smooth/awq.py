"""awq: Activation-aware Weight Quantization (Lin et al., 2024): salient input channels scaled up
before the weights are rounded.

Where it runs: after ``canonicalize``, before the quantizing pass (``insert_weight_quant`` for
AWQ as published, ``gptq`` for AWQ + GPTQ).

What it does: for every group of selected linears reading one input with a foldable producer,
``s = mean|x|^alpha`` (normalised), ``alpha`` searched on a grid for the least layer-output error
``sum_i tr(dW_i H dW_i^T)`` of round to nearest in the layer's format, with the input Hessian
``H`` from the calibration engine (no stored activations); then folded like SmoothQuant's.
Option: ``grid`` (20 steps of alpha in [0, 1]).
"""
from __future__ import annotations

from lowbit_compiler import scale_folding
from lowbit_compiler.pass_base import register_pass
from lowbit_compiler.passes.quantize import common
from lowbit_compiler.passes.smooth.base import FoldScales, weights_of


@register_pass
class AWQ(FoldScales):
    name = "awq"
    needs = frozenset({"hessian", "mean_abs"})

    def __init__(self, grid: int = 20) -> None:
        super().__init__(grid=int(grid))

    def scales(self, group, stats, gm, ctx):
        fmt = common.format_of(group.nodes[0], ctx.recipe)
        s, alpha, relative = scale_folding.awq_scales(weights_of(gm, group), stats.hessian, stats.mean_abs, fmt,
                                                      grid=self.options["grid"])
        return s, {"alpha": alpha, "error_vs_rtn": round(relative, 4)}
