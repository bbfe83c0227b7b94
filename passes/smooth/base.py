"""What smoothquant and awq share: groups from the graph, one engine run, a fold per group."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from lowbit_compiler import ir, scale_folding
from lowbit_compiler.pass_base import Pass, PassContext, PassResult
from lowbit_compiler.passes.quantize import common


class FoldScales(Pass):
    """Base: for each group of selected float linears sharing an input, ``scales(group, stats,
    ctx)`` gives ``s`` from the first consumer's input statistics (``needs``), and the fold is
    applied to the graph module's tensors. Groups without a foldable producer are reported."""

    requires = ("canonical",)
    ensures = ("smoothed",)
    before = ("weights_quantized",)
    data_driven = True
    needs: frozenset[str] = frozenset()

    def scales(self, group: scale_folding.ScaleGroup, stats, gm: fx.GraphModule, ctx: PassContext) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        selected = {s.node: s for s in common.select_linears(gm, ctx, self.name, check_groups=False)}
        groups = [g for g in scale_folding.scale_groups(gm) if g.nodes[0] in selected]
        report: dict[str, Any] = {}
        foldable = {}
        for group in groups:
            if group.producer is None:
                report[group.consumers[0]] = {"consumers": group.consumers, "skipped": group.reason}
            else:
                foldable[group.nodes[0]] = group
        key = common.recipe_key(ctx, self.name, self.options)
        folded = 0

        def fold(node: fx.Node, observed) -> tuple[list, dict[str, Any]]:
            group = foldable[node]
            s, extra = self.scales(group, observed, gm, ctx)
            tensors = scale_folding.fold_in_graph(gm, group, s)
            return tensors, {"consumers": group.consumers, "producer": list(group.producer),
                             "max_scale": float(s.max()), "min_scale": float(s.min()), **extra}

        def apply(node: fx.Node, result) -> None:
            nonlocal folded
            tensors, entry = result
            scale_folding.apply_tensors(gm, tensors)
            report[foldable[node].consumers[0]] = entry
            folded += 1

        info, _ = common.calibrate_each(ctx, self.name, {n: (selected[n].param, key) for n in foldable}, set(self.needs),
                                        fold, apply, rewrites=True)
        return PassResult(folded > 0, folded, {"groups": report, "folded": folded, "calibration": info})


def weights_of(gm: fx.GraphModule, group: scale_folding.ScaleGroup) -> list[torch.Tensor]:
    """[out, in] weights of the group's consumers, as the graph module holds them now."""
    out = []
    for node in group.nodes:
        site_w = ir.linear_parts(node)
        w = ir.fetch_attr(gm, site_w.weight_node.target)
        out.append(w.t() if site_w.transposed else w)
    return out
