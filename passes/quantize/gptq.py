"""gptq: GPTQ (Frantar et al., 2023), block by block on the calibration engine.

Where it runs: after ``canonicalize`` and whatever prepares the weights (``smoothquant``, ``awq``,
``rotate``, ``spinquant``, ``mixed_precision``, ``spqr``, ``observe_activations``); it is the
recipe's quantizing pass (instead of ``insert_weight_quant``).

What it does: the engine (``lowbit_compiler/calibration.py``) runs the graph over the calibration
batches one block at a time; for each block, the Hessian ``H = 2/n X^T X`` of every selected
linear's input is accumulated, the weight is quantized column by column with its error spread
through ``H^-1`` (``lowbit_compiler.rounding.gptq``), and the linear becomes a ``lowbit::`` op
right there, so the next block is calibrated on the outputs of the quantized one, as GPTQ does.

Options: ``block_size`` (lazy-update width, 128), ``damp`` (fraction of mean ``diag(H)`` added,
0.01), ``act_order`` (default on, as llm-compressor's: columns by decreasing ``diag(H)``, groups kept in storage order).

Stacked experts (a grouped matmul over a 3-D weight: ``lowbit::grouped_linear``) are quantized
per expert, each with the Hessian of the tokens the router sent to it during calibration
(``LinearStats.experts``). An expert no calibration token reached is rounded to nearest, and that
is reported (``PassContext.fallback``, with the expert's index), never silently.

Results are cached by the identity of each weight (with the recipe and the calibration data):
the decode graph of a compiled model, whose inputs are not calibration batches, reuses what the
prefill graph computed. A linear the calibration never reached would fall back to round to
nearest, reported (never silently).
"""
from __future__ import annotations

import torch.fx as fx

from lowbit_compiler import ir, rounding
from lowbit_compiler.formats import quantize
from lowbit_compiler.pass_base import PassContext, register_pass
from lowbit_compiler.passes.quantize import common
from lowbit_compiler.passes.quantize.rtn import QuantizeLinears


@register_pass
class GPTQ(QuantizeLinears):
    name = "gptq"
    data_driven = True

    def __init__(self, block_size: int = 128, damp: float = 0.01, act_order: bool = True) -> None:
        super().__init__(block_size=block_size, damp=damp, act_order=act_order)

    def quantize_sites(self, gm: fx.GraphModule, ctx: PassContext, sites: list[common.Site]):
        key = common.recipe_key(ctx, self.name, self.options)
        decisions: list[ir.WeightQuantDecision] = []

        def take(site, qw) -> None:
            if isinstance(site, common.ExpertSite):
                qws, unreached = qw
                for e in unreached:
                    ctx.fallback(f"gptq: layer {site.layer}", f"no calibration token was routed to expert {e}; "
                                 "that expert is rounded to nearest instead")
                new = common.replace_experts(gm, ctx, site, qws)
            else:
                new = common.replace_linear(gm, ctx, site, qw)
            decisions.append(ir.get(new, ir.WEIGHT_QUANT))

        def compute(node, observed):
            site = by_node[node]
            if isinstance(site, common.ExpertSite):
                return self._experts(site, observed)
            return rounding.gptq(site.weight, site.fmt, observed.gptq_hessian(), **self.options)

        by_node = {s.node: s for s in sites}
        info, unreached = common.calibrate_each(
            ctx, self.name, {s.node: (s.param, (key, s.transposed, s.fmt.key)) for s in sites}, {"hessian"},
            compute, lambda node, qw: take(by_node[node], qw), rewrites=True)
        for node in unreached:
            site = by_node[node]
            what = "these experts" if isinstance(site, common.ExpertSite) else "this linear"
            ctx.fallback(f"gptq: layer {site.layer}", f"no calibration statistics reached {what}; rounded to "
                                                     "nearest instead")
            if isinstance(site, common.ExpertSite):
                take(site, ([quantize(site.weight(e), site.fmt) for e in range(site.experts)], []))
            else:
                take(site, quantize(site.weight, site.fmt))
        return decisions, {"calibration": info}

    def _experts(self, site: common.ExpertSite, observed) -> tuple[list, list[int]]:
        """GPTQ per expert with the Hessian of the rows routed to it; (quantized experts, the
        experts no calibration token reached, rounded to nearest)."""
        qws, unreached = [], []
        for e in range(site.experts):
            stats = observed.experts[e] if observed.experts is not None else None
            if stats is None or stats.rows == 0 or stats.hessian is None:
                unreached.append(e)
                qws.append(quantize(site.weight(e), site.fmt))
            else:
                qws.append(rounding.gptq(site.weight(e), site.fmt, stats.gptq_hessian(), **self.options))
        return qws, unreached
