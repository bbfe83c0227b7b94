"""Write a pass, register it by name, and use it from a recipe.

Two passes: ``count_gated_mlps`` shows the three pieces of a pattern rule (pattern, extra_check,
replacement); ``report_linears`` shows a read-only pass reporting into summary.json. The recipe
runs them between the built-in passes and keeps the LM head in float with an exclude glob.

    python examples/custom_pass.py
"""
from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit_compiler import Pass, PassResult, PatternRule, apply_rules, get_recipe, ir, register_pass
from lowbit_compiler.dump import load_summaries


# -- a pattern rule: silu(a) * b (operator.mul)  ->  torch.mul(silu(a), b) --------------------
def silu_mul_pattern(node):
    """Anchor: mul(silu(a), b), the gated-MLP product."""
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "mul":
        left = node.args[0]
        if isinstance(left, torch.fx.Node) and left.target is F.silu:
            return {"a": left.args[0], "b": node.args[1]}
    return None


def silu_mul_extra_check(match):
    return isinstance(match["b"], torch.fx.Node)


def silu_mul_replacement(gm, node, match):
    gate = gm.graph.call_function(F.silu, (match["a"],))
    return gm.graph.call_function(torch.mul, (gate, match["b"]))


@register_pass
class CountGatedMLPs(Pass):
    """Counts (and re-spells) gated-MLP products; a template for a pattern-based pass."""

    name = "count_gated_mlps"
    requires = ("canonical",)

    def call(self, gm, ctx):
        counts = apply_rules(gm, [PatternRule("silu_mul", silu_mul_pattern, silu_mul_replacement,
                                              silu_mul_extra_check)])
        return PassResult(modified=counts["silu_mul"] > 0, matches=counts["silu_mul"], details=dict(counts))


@register_pass
class ReportLinears(Pass):
    """A read-only pass: lists every linear with its layer FQN and shape in summary.json."""

    name = "report_linears"
    requires = ("canonical",)

    def call(self, gm, ctx):
        found = {}
        for node in gm.graph.nodes:
            if ir.is_linear(node):
                parts = ir.linear_parts(node)
                weight = ir.fetch_attr(gm, parts.weight_node.target)
                found[ir.layer_name(node, parts.weight_node.target)] = list(weight.shape)
        return PassResult(modified=False, matches=len(found), details={"linears": found})


def main() -> dict:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    model = LlamaForCausalLM(cfg).eval()
    recipe = get_recipe("w4a16").replace(
        name="w4a16-keep-head",
        passes=("canonicalize", "count_gated_mlps", "report_linears", "insert_weight_quant"),
        exclude=("lm_head",))
    ids = torch.randint(0, 256, (1, 8))
    with tempfile.TemporaryDirectory() as dump_dir, torch.no_grad():
        torch.compile(model, backend="lowbit", options={"recipe": recipe, "dump_dir": dump_dir})(ids)
        summary = load_summaries(dump_dir)[0]
    for p in summary["passes"]:
        print(f"{p['name']:22s} matches={p['matches']}")
    print("lm_head:", summary["layers"]["lm_head"])
    return summary


if __name__ == "__main__":
    main()
