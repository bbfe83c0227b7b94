"""Pass contract, registry, pattern helper, pipeline, verifier and recipes."""
from __future__ import annotations

import importlib.util
import operator
import pathlib

import pytest
import torch
import torch.fx as fx

from lowbit_compiler import (LowbitError, Pass, PassResult, PatternRule, Recipe, apply_rules, get_recipe, ir,
                             load_recipe, register_pass, registered_passes, replace_pattern)
from lowbit_compiler.formats import WeightFormat
from lowbit_compiler.pipeline import run_pipeline
from lowbit_compiler.verify import IRError, verify

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_example_custom_pass_runs_from_a_recipe():
    spec = importlib.util.spec_from_file_location("custom_pass_example", ROOT / "examples" / "custom_pass.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.main()
    assert "count_gated_mlps" in registered_passes() and "report_linears" in registered_passes()
    by_name = {p["name"]: p for p in summary["passes"]}
    assert [p["name"] for p in summary["passes"]] == ["canonicalize", "count_gated_mlps", "report_linears",
                                                      "insert_weight_quant"]
    assert by_name["count_gated_mlps"]["matches"] == 2
    assert by_name["report_linears"]["details"]["linears"]["model.layers.1.mlp.down_proj"] == [128, 256]
    assert by_name["insert_weight_quant"]["matches"] == 14
    assert summary["layers"]["lm_head"]["skipped"] == "excluded by recipe"


def _toy_graph():
    def f(x, y):
        return (x + 0) * 1 + y * 1

    return fx.symbolic_trace(f)


def x_times_one_pattern(node):
    if node.op == "call_function" and node.target is operator.mul and node.args[1] == 1:
        return {"x": node.args[0]}
    return None


def x_plus_zero_pattern(node):
    if node.op == "call_function" and node.target is operator.add and node.args[1] == 0:
        return {"x": node.args[0]}
    return None


def test_pattern_rules_report_match_counts_and_preserve_numerics():
    gm = _toy_graph()
    x, y = torch.randn(4), torch.randn(4)
    expected = gm(x, y)
    counts = apply_rules(gm, [
        PatternRule("x*1", x_times_one_pattern, lambda gm, node, m: m["x"]),        # x*1 -> x
        PatternRule("x+0", x_plus_zero_pattern, lambda gm, node, m: m["x"]),        # x+0 -> x
        PatternRule("never", x_times_one_pattern, lambda gm, node, m: m["x"], extra_check=lambda m: False),
    ])
    assert dict(counts) == {"x*1": 2, "x+0": 1, "never": 0}
    gm.graph.lint()
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [operator.add]
    torch.testing.assert_close(gm(x, y), expected)


def test_replace_pattern_with_traced_functions():
    def model(x):
        return torch.relu(x) * 2.0

    gm = fx.symbolic_trace(model)
    n = replace_pattern(gm, lambda x: torch.relu(x), lambda x: torch.clamp(x, min=0.0))
    assert n == 1
    assert "clamp" in gm.code and "relu" not in gm.code


def test_pipeline_checks_requires_and_records_each_pass():
    @register_pass
    class NeedsQuant(Pass):
        name = "test_needs_quant"
        requires = ("weights_quantized",)

        def call(self, gm, ctx):
            return PassResult(False)

    gm = _toy_graph()
    with pytest.raises(LowbitError, match=r"pass 'test_needs_quant' requires \['weights_quantized'\]"):
        run_pipeline(gm, Recipe("r", ("canonicalize", "test_needs_quant")))
    report = run_pipeline(gm, Recipe("r", ("canonicalize",)), strict=True)
    assert [p.name for p in report.passes] == ["canonicalize"] and report.passes[0].seconds >= 0


def test_strict_pipeline_runs_the_verifier_after_each_pass():
    @register_pass
    class BadMeta(Pass):
        name = "test_bad_meta"

        def call(self, gm, ctx):
            next(n for n in gm.graph.nodes if n.op == "call_function").meta["lowbit"] = {"made_up": 1}
            return PassResult(True, 1)

    recipe = Recipe("r", ("test_bad_meta",))
    run_pipeline(_toy_graph(), recipe)  # not checked outside strict/debug
    with pytest.raises(IRError, match="unknown meta key 'made_up'"):
        run_pipeline(_toy_graph(), recipe, strict=True)
    with pytest.raises(IRError, match="unknown meta key 'made_up'"):
        run_pipeline(_toy_graph(), recipe, debug=True)


def test_unknown_pass_and_name_clash_are_refused():
    with pytest.raises(LowbitError, match=r"unknown pass 'no_such_pass'; registered passes: \["):
        run_pipeline(_toy_graph(), Recipe("r", ("no_such_pass",)))

    with pytest.raises(LowbitError, match="pass name 'canonicalize' is taken"):
        @register_pass
        class Impostor(Pass):
            name = "canonicalize"


def test_verifier_rejects_unknown_meta_and_non_spec_values():
    gm = _toy_graph()
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    node.meta["lowbit"] = {"made_up": ir.NormSpec("rms", 1e-6)}
    with pytest.raises(IRError, match="unknown meta key 'made_up'"):
        verify(gm)
    node.meta["lowbit"] = {ir.NORM: {"kind": "rms"}}
    with pytest.raises(IRError, match="must be a frozen dataclass spec"):
        verify(gm)


def test_recipe_toml_roundtrip_and_errors(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("""
[recipe]
base = "w4a16"
exclude = ["lm_head", "*.down_proj"]
pad_to_group = true

[recipe.weight]
bits = 4
group_size = 64
symmetric = true

[recipe.options.canonicalize]
verbose = true
""")
    recipe = load_recipe(path)
    assert recipe.passes == get_recipe("w4a16").passes
    assert recipe.weight == WeightFormat(4, 64, True) and recipe.pad_to_group
    assert recipe.pass_options("canonicalize") == {"verbose": True}
    assert get_recipe(str(path)) == recipe
    assert recipe.applies_to("model.layers.0.mlp.up_proj")
    assert not recipe.applies_to("model.layers.0.mlp.down_proj") and not recipe.applies_to("lm_head")

    path.write_text("[recipe.weight]\nbits = 5\ngroup_size = 128\n")
    with pytest.raises(LowbitError, match=r"mine.toml: \[recipe.weight\]: bits=5 is out of range"):
        load_recipe(path)
    path.write_text("[recipe]\nbase = 'w4a16'\ngroupsize = 64\n")
    with pytest.raises(LowbitError, match=r"unknown recipe keys \['groupsize'\]"):
        load_recipe(path)
    import re

    from lowbit_compiler import PRESETS

    with pytest.raises(LowbitError, match=re.escape(f"unknown recipe 'w5a16'; presets: {sorted(PRESETS)}")):
        get_recipe("w5a16")
    path.write_text("[recipe]\nbase = 'w4a16'\n[recipe.weight]\nformat = 'nf4_g128'\n")
    assert load_recipe(path).weight == WeightFormat(4, 128, kind="nf4")
    path.write_text("[recipe]\n[recipe.weight]\nformat = 'nf4_g128'\nbits = 4\n")
    with pytest.raises(LowbitError, match=r"takes either format = '<key>'"):
        load_recipe(path)


def test_presets_are_what_the_docs_say():
    assert get_recipe("none").passes == ()
    assert get_recipe("w8a16").weight == WeightFormat(8)
    assert get_recipe("w4a16").weight == WeightFormat(4, 128, symmetric=False)
    with pytest.raises(Exception):
        get_recipe("w4a16").name = "x"  # frozen
