"""MoE models and modules that compute more than their linear (issue "Every model, nothing
silent", point 3): routers stay float in both flows, with a reason, unless a recipe names them;
stacked experts are quantized; ``compress`` never replaces a module by one that would return
something else. The per-format matrix over MoE models is in ``test_moe_experts.py``."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from lowbit_compiler import LowbitError, compress
from lowbit_compiler.formats import sqnr_db
from lowbit_compiler.offline import LowbitExperts, LowbitLinear
from tests.helpers import Recorder


def _mixtral():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.MixtralConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                              num_experts_per_tok=2, max_position_embeddings=128)
    return tf.MixtralForCausalLM(config).eval()


@pytest.mark.heavy
def test_mixtral_routers_stay_float_in_both_flows():
    model = _mixtral()
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    rec = Recorder(recipe="w8a16")
    with torch.no_grad():
        ref = model(ids).logits
        compiled = torch.compile(model, backend=rec)(ids).logits
        compressed = compress(model, "w8a16")
        out = compressed(ids).logits  # before: the router became a LowbitLinear -> "too many values to unpack"
    routers = [f"model.layers.{i}.mlp.gate" for i in range(2)]
    for layers in (rec.summaries[0]["layers"], compressed.lowbit_summary["layers"]):
        for router in routers:
            assert layers[router]["format"] == "float" and "router" in layers[router]["skipped"]
    assert all(not isinstance(compressed.get_submodule(r), LowbitLinear) for r in routers)
    assert compressed.lowbit_summary["left_float"] == {}
    for i in range(2):  # the experts are quantized in both flows; the routers in neither
        assert isinstance(compressed.get_submodule(f"model.layers.{i}.mlp.experts"), LowbitExperts)
        assert rec.summaries[0]["layers"][f"model.layers.{i}.mlp.experts.down_proj"]["format"] == "int8"
    assert sqnr_db(ref, compiled) > 25 and sqnr_db(ref, out) > 25


class ScaledLinear(torch.nn.Module):
    """A leaf module whose forward is a linear and then more: it cannot become a LowbitLinear."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(128, 128) * 0.05)

    def forward(self, x):
        return F.linear(x, self.weight) * 2.0


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.plain = torch.nn.Linear(128, 128)
        self.scaled = ScaledLinear()

    def forward(self, x):
        return self.scaled(self.plain(x))


def test_compress_leaves_a_module_that_computes_more_than_its_linear_float(caplog):
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(2))
    model = TwoLayers().eval()
    with torch.no_grad():
        ref = model(x)
    with caplog.at_level(logging.WARNING, logger="lowbit_compiler"):
        compressed = compress(model, "w8a16", example_inputs=(x,))
    summary = compressed.lowbit_summary
    assert isinstance(compressed.plain, LowbitLinear) and isinstance(compressed.scaled, ScaledLinear)
    assert list(summary["left_float"]) == ["scaled"] and "mul" in summary["left_float"]["scaled"]
    assert summary["layers"]["scaled"]["format"] == "float"
    assert any("layer scaled" in r.getMessage() and "stays float" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        assert sqnr_db(ref, compressed(x)) > 30
    with pytest.raises(LowbitError, match=r"layer scaled .*ScaledLinear\.forward computes mul"):
        compress(TwoLayers().eval(), "w8a16", example_inputs=(x,), strict=True)


def test_coverage_accounts_for_every_weight_of_the_model():
    """Every matmul weight is quantized or float with a reason (Mixtral's 3-D experts, about 77 %
    of its parameters, are quantized by lowbit::grouped_linear); totals are over the whole model."""
    from lowbit_compiler.cli import format_summary

    model = _mixtral()
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    rec = Recorder(recipe="w4a16")
    with torch.no_grad():
        torch.compile(model, backend=rec)(ids)
    summary = rec.summaries[0]
    weights, totals = summary["coverage"]["weights"], summary["coverage"]["totals"]
    params = dict(model.named_parameters())
    experts = [f for f in params if ".experts." in f]
    assert len(experts) == 4
    for f in experts:
        assert weights[f]["status"] == "quantized" and weights[f]["format"] == "int4_g128_asym", weights[f]
        assert weights[f]["elements"] == params[f].numel()
        assert summary["layers"][f]["experts"] == 4 and summary["layers"][f]["format"] == "int4_g128_asym"
    routers = [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    assert all(weights[r]["status"] == "float" and "router" in weights[r]["reason"] for r in routers)
    quantized = {f: w for f, w in weights.items() if w["status"] == "quantized"}
    assert len(quantized) == 2 * 4 + 4 + 1  # attention projections, stacked experts and the head
    # whole model: every parameter and the one float buffer forward reads (rotary inv_freq) counted
    # once, quantized ones replaced (original_inv_freq is a buffer forward never reads)
    tensors = list(params.values()) + [model.model.rotary_emb.inv_freq]
    assert totals["bytes_before"] == sum(t.numel() * t.element_size() for t in tensors)
    assert totals["bytes_after"] == totals["bytes_before"] - sum(w["bytes"] - w["bytes_after"] for w in quantized.values())
    assert totals["ratio"] >= 3.5
    text = format_summary(summary)
    assert "whole graph:" in text
    torch.compiler.reset()
    with torch.no_grad():  # strict accepts it: nothing the recipe selects stays float
        torch.compile(model, backend=Recorder(recipe="w4a16", strict=True))(ids)


def test_experts_another_implementation_reads_stay_float_with_the_reason_and_strict_raises():
    """transformers' ``batched_mm`` experts read the 3-D weights through a gather and ``bmm``, not a
    grouped matmul: reported float with the fix (load with experts_implementation='grouped_mm')."""
    model = _mixtral()
    model.set_experts_implementation("batched_mm")
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    rec = Recorder(recipe="w4a16")
    with torch.no_grad():
        torch.compile(model, backend=rec)(ids)
    weights = rec.summaries[0]["coverage"]["weights"]
    experts = [f for f in weights if ".experts." in f]
    assert len(experts) == 4
    assert all(weights[f]["status"] == "float" and "experts_implementation='grouped_mm'" in weights[f]["reason"]
               for f in experts)
    torch.compiler.reset()
    with pytest.raises(Exception, match=r"strict.*weight\(s\) it selects stay float.*experts"):
        with torch.no_grad():
            torch.compile(model, backend=Recorder(recipe="w4a16", strict=True))(ids)


def test_a_recipe_may_select_the_routers():
    """An include glob that names the routers quantizes them in the compiled graph; ``compress``
    keeps them float in the model (the router module returns more than its linear), saying why."""
    from lowbit_compiler.recipe import PRESETS

    recipe = PRESETS["w8a16"].replace(include=("*", "*.mlp.gate"))
    model = _mixtral()
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    rec = Recorder(recipe=recipe)
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend=rec)(ids).logits
        compressed = compress(model, recipe)
    layers = rec.summaries[0]["layers"]
    assert all(layers[f"model.layers.{i}.mlp.gate"]["format"] == "int8" for i in range(2))
    assert sqnr_db(ref, out) > 25
    left = compressed.lowbit_summary["left_float"]
    assert sorted(left) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert all("besides its linear" in r for r in left.values())
