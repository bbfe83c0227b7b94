"""spqr: SpQR-style outliers (Dettmers et al., 2023) moved to a sparse fp16 side op, data-free.

Where it runs: after ``canonicalize`` (and ``mixed_precision``, whose formats it reads), before
the quantizing pass (``insert_weight_quant``, ``hqq`` or ``gptq``), which then quantizes a dense
part whose group ranges the outliers no longer stretch.

What it rewrites, for every selected float linear ``y = F.linear(x, W, b)``::

    y = F.linear(x, W', b) + lowbit.sparse_linear(x, rows, cols, values, N)

``W = W' + S`` exactly: ``S`` holds the ``fraction`` of weights that stretch their group's range
most (largest ``|w|`` relative to the group's median ``|w|``: the ones that make every other
weight's grid coarse and carry the largest error there) in fp16 COO form, ``W'`` is ``W`` with
them zeroed (zero is exact in every integer grid, so the dense part adds nothing there). The
linear gets an ``ir.OUTLIERS`` spec, so the quantizing pass counts the side bytes in its layer's
bits per weight. Option: ``fraction`` (0.01).

What it leaves alone: the linears the recipe does not select (``common.select_linears``). A weight
shared with another op (a tied embedding), or stored transposed (GPT-2's Conv1D), gets a dense
``[out, in]`` copy of its own under ``<layer>.spqr_dense``.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from lowbit_compiler import ir
from lowbit_compiler.formats import WeightFormat
from lowbit_compiler.pass_base import Pass, PassContext, PassResult, register_pass
from lowbit_compiler.passes.quantize import common


def split_outliers(w: torch.Tensor, fmt: WeightFormat, fraction: float = 0.01):
    """(dense [N, K] float32 with the outliers zeroed, (rows int32, cols int32, values fp16))."""
    w = w.detach().float()
    n, k = w.shape
    g = fmt.group_size or k
    kp = fmt.padded_k(k)
    groups = torch.nn.functional.pad(w.abs(), (0, kp - k)).view(n, kp // g, g)
    score = (groups / groups.median(-1, keepdim=True).values.clamp(min=1e-12)).view(n, kp)[:, :k]
    count = max(1, int(fraction * w.numel()))
    flat = torch.topk(score.flatten(), count).indices
    rows, cols = flat // k, flat % k
    dense = w.clone()
    dense[rows, cols] = 0.0
    return dense, (rows.to(torch.int32), cols.to(torch.int32), w[rows, cols].to(torch.float16))


@register_pass
class SpQR(Pass):
    name = "spqr"
    requires = ("canonical",)
    ensures = ("outliers_split",)
    before = ("weights_quantized",)

    def __init__(self, fraction: float = 0.01) -> None:
        super().__init__(fraction=fraction)
        self.fraction = fraction

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sites = common.select_linears(gm, ctx, self.name)
        total = 0
        for site in sites:
            dense, (rows, cols, values) = common.RESULTS.get_or_create(
                site.param, ("spqr", self.fraction, site.transposed, site.fmt.key),
                lambda site=site: self._split(site))
            node = site.node
            parts = ir.linear_parts(node)
            n = site.shape[0]
            prefix = common.tensor_prefix(gm, site.layer)
            common.replace_linear_weight(gm, node, dense, f"{prefix}.spqr_dense")
            with gm.graph.inserting_before(node):
                r = common._register(gm, f"{prefix}.outlier_rows", rows)
                c = common._register(gm, f"{prefix}.outlier_cols", cols)
                v = common._register(gm, f"{prefix}.outlier_values", values)
            with gm.graph.inserting_after(node):
                sparse = gm.graph.call_function(torch.ops.lowbit.sparse_linear.default, (parts.x, r, c, v, n))
            with gm.graph.inserting_after(sparse):
                added = gm.graph.call_function(operator.add, (node, sparse))
            node.replace_all_uses_with(added, delete_user_cb=lambda user, added=added: user is not added)
            for extra in (sparse, added):
                extra.meta.update({k: val for k, val in node.meta.items() if k != ir.META})
                if ir.get(node, ir.MODULE) is not None:
                    ir.put(extra, ir.MODULE, ir.get(node, ir.MODULE))
            nbytes = sum(t.numel() * t.element_size() for t in (rows, cols, values))
            ir.put(node, ir.OUTLIERS, ir.OutlierSpec(values.numel(), nbytes))
            total += values.numel()
        ir.eliminate_dead_code(gm)
        gm.recompile()
        return PassResult(bool(sites), len(sites), {"linears": len(sites), "outliers": total,
                                                    "fraction": self.fraction})

    def _split(self, site: common.Site):
        dense, outliers = split_outliers(site.weight, site.fmt, self.fraction)
        return dense.to(site.param.dtype), outliers  # [out, in]
