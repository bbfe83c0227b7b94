"""observe_activations: one static per-tensor activation scale per linear, from calibration data.

Where it runs: after the passes that change what the linears read (``smoothquant``, ``rotate``),
before the quantizing pass of a ``*_static`` recipe (``activation="int8_static"``), which needs
it (``"activation_scales"``) and turns each scale into the ``x_scale`` constant of its
``lowbit::qa_linear``.

What it records: the calibration engine observes every selected linear's input; its abs-max over
all calibration tokens divided by the code range (127 for int8) becomes an ``ir.StaticScale`` on
the linear. Values beyond it saturate at run time (the static trade-off); a per-token scheme
(``int8_dynamic``) needs no calibration.
"""
from __future__ import annotations

import torch.fx as fx

from lowbit_compiler import ir
from lowbit_compiler.pass_base import Pass, PassContext, PassResult, register_pass
from lowbit_compiler.passes.quantize import common


@register_pass
class ObserveActivations(Pass):
    name = "observe_activations"
    requires = ("canonical",)
    ensures = ("activation_scales",)
    before = ("weights_quantized",)
    data_driven = True

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from lowbit_compiler.ops import ACTIVATION_MAX
        from lowbit_compiler.recipe import ACTIVATIONS

        act = ACTIVATIONS[ctx.recipe.activation][0] if ctx.recipe.activation else "int8"
        top = ACTIVATION_MAX[act]
        sites = common.select_linears(gm, ctx, self.name, check_groups=False)
        key = common.recipe_key(ctx, self.name, {})
        cached: dict[fx.Node, ir.StaticScale | None] = {s.node: None for s in sites}

        def scale(node: fx.Node, observed) -> ir.StaticScale:
            absmax = observed.absmax.max().clamp(min=1e-8)
            return ir.StaticScale(float((absmax / top).reshape(1).float()), float(absmax), act)

        info, _ = common.calibrate_each(ctx, self.name, {s.node: (s.param, (key, s.transposed)) for s in sites},
                                        {"absmax"}, scale, cached.__setitem__, rewrites=False)
        for node, spec in cached.items():
            if spec is not None:
                ir.put(node, ir.ACT_SCALE, spec)
        observed = sum(v is not None for v in cached.values())
        return PassResult(observed > 0, observed, {"observed": observed, "act": act, "calibration": info,
                                                   "scales": {s.layer: cached[s.node].scale for s in sites
                                                              if cached[s.node] is not None}})

