"""mark_kv_cache: per-layer KV decisions on MHA, GQA and MQA decoders (and the eager
matmul-softmax-matmul attention), shown by `lowbit inspect`."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from lowbit_compiler import ir, zoo
from lowbit_compiler.cli import format_kv_cache
from lowbit_compiler.offline import _capture_each, _example_call
from lowbit_compiler.pipeline import run_pipeline
from lowbit_compiler.recipe import Recipe, get_recipe


@functools.lru_cache(maxsize=None)
def _captured(arch: str, eager: bool) -> torch.fx.GraphModule:
    """The one graph Dynamo captures of the tiny model's forward (kept: capture is the slow part)."""
    model, inputs = zoo.build(arch)
    if eager:
        model.config._attn_implementation = "eager"
    graphs = []
    _capture_each(model, _example_call(model, [], inputs), lambda captured, args: graphs.append(captured.gm))
    assert len(graphs) == 1
    return graphs[0]


def _decisions(arch: str, recipe: Recipe, eager: bool = False):
    gm = copy.deepcopy(_captured(arch, eager))
    for node in gm.graph.nodes:  # a graph copy shares each node's meta dicts: give this run its own
        node.meta[ir.META] = dict(node.meta.get(ir.META, {}))
    report = run_pipeline(gm, recipe)
    nodes = {d.attention: d for n in gm.graph.nodes if (d := ir.get(n, ir.KV_CACHE)) is not None}
    return report.passes[-1], nodes


@pytest.mark.parametrize("arch,kind,heads,kv_heads,prefix,rope", [
    pytest.param("gpt2", "MHA", 4, 4, "transformer.h", False, marks=pytest.mark.slow),  # no RoPE, fused c_attn
    ("llama", "GQA", 4, 2, "model.layers", True),
    ("falcon", "MQA", 4, 1, "transformer.h", True),          # fused query_key_value
])
def test_decisions_per_layer(arch, kind, heads, kv_heads, prefix, rope):
    record, nodes = _decisions(arch, get_recipe("kv4"))
    suffix = {"gpt2": "attn", "llama": "self_attn", "falcon": "self_attention"}[arch]
    assert record.matches == 2 and not record.modified
    assert sorted(nodes) == [f"{prefix}.{i}.{suffix}" for i in range(2)]
    for index, (name, d) in enumerate(sorted(nodes.items())):
        assert (d.layer_index, d.kind, d.heads, d.kv_heads, d.head_dim) == (index, kind, heads, kv_heads, 32)
        assert (d.scheme, d.bits, d.format, d.consumer) == ("int", 4, "int4-g64", "sdpa")
        roles = dict(d.nodes)
        assert {"k_proj", "v_proj", "key_cache_update", "value_cache_update", "consumer"} <= set(roles)
        assert d.keys_quantized == ("post_rope" if rope else "no_rope")
        assert ("keys_pre_rope" in roles) == rope
        if arch in ("gpt2", "falcon"):  # one fused linear makes q, k and v
            assert roles["k_proj"] == roles["v_proj"]
        else:
            assert roles["k_proj"] != roles["v_proj"]
    shown = format_kv_cache(record.details)
    assert f"{prefix}.1.{suffix}" in shown and "int4-g64" in shown and f"{kind} {heads}/{kv_heads}x32" in shown


@pytest.mark.slow
def test_llama_keys_before_and_after_rope_and_eager_consumer():
    _, sdpa = _decisions("llama", get_recipe("kv2-kivi"))
    _, eager = _decisions("llama", get_recipe("kv2-kivi"), eager=True)
    for nodes, consumer in ((sdpa, "sdpa"), (eager, "eager")):
        d = nodes["model.layers.0.self_attn"]
        roles = dict(d.nodes)
        # pre-RoPE: the reshaped k_proj output; post-RoPE: RoPE's add; the cache appends the latter
        assert roles["keys_pre_rope"] == "key_states" and roles["keys_post_rope"] == "k_embed"
        assert d.consumer == consumer and (d.scheme, d.bits, d.window) == ("kivi", 2, 64)


def test_excluded_layer_is_reported():
    recipe = get_recipe("kv4").replace(exclude=("model.layers.1.*",))
    record, nodes = _decisions("llama", recipe)
    assert sorted(nodes) == ["model.layers.0.self_attn"]
    assert record.details["refused"] == {"model.layers.1.self_attn": "excluded by the recipe"}


def test_composed_recipe_orders_weight_passes_before_kv():
    r = get_recipe("w4a16+kv2-kivi")
    assert r.passes == ("canonicalize", "insert_weight_quant", "mark_kv_cache") and r.weight.bits == 4
    assert dict(r.options)["mark_kv_cache"] == (("scheme", "kivi2"),)
