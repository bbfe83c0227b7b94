"""smoothquant: SmoothQuant (Xiao et al., 2023): activation outliers migrated into the weights.

Where it runs: after ``canonicalize``, before the quantizing pass of a W8A8 recipe
(``insert_weight_quant`` or ``gptq``) and before ``observe_activations``.

What it does: for every group of selected linears reading one input whose producer can absorb a
per-channel scale (``scale_folding.scale_groups``: a norm, a linear, the ``up`` side of a gated
product, attention values), ``s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha)`` from the input's
abs-max over the calibration data; the consumers' columns are multiplied by ``s`` and the
producer's output divided by it (exact in exact arithmetic). Option: ``alpha`` (0.5).
"""
from __future__ import annotations

from lowbit_compiler import scale_folding
from lowbit_compiler.pass_base import register_pass
from lowbit_compiler.passes.smooth.base import FoldScales, weights_of


@register_pass
class SmoothQuant(FoldScales):
    name = "smoothquant"
    needs = frozenset({"absmax"})

    def __init__(self, alpha: float = 0.5) -> None:
        super().__init__(alpha=float(alpha))

    def scales(self, group, stats, gm, ctx):
        s = scale_folding.smoothquant_scales(stats.absmax, weights_of(gm, group), self.options["alpha"])
        return s, {"alpha": self.options["alpha"]}
