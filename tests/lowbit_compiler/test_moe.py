"""MoE models and modules that compute more than their linear (issue "Every model, nothing
silent", point 3, first part): routers stay float in both flows, with a reason; ``compress``
never replaces a module by a :class:`LowbitLinear` that would return something else."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from lowbit_compiler import LowbitError, compress
from lowbit_compiler.formats import sqnr_db
from lowbit_compiler.offline import LowbitLinear
from tests.helpers import Recorder


def _mixtral():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.MixtralConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                              num_experts_per_tok=2, max_position_embeddings=128)
    return tf.MixtralForCausalLM(config).eval()


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
    """Every matmul weight is quantized or float with a reason (Mixtral's 3-D experts: about 77 %
    of its parameters, silently float before); totals are over the whole model."""
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
    assert experts and all(weights[f]["status"] == "float" and "expert" in weights[f]["reason"] for f in experts)
    assert all(summary["layers"][f]["format"] == "float" for f in experts)  # listed as layers too
    quantized = {f: w for f, w in weights.items() if w["status"] == "quantized"}
    assert len(quantized) == 2 * 4 + 1  # attention projections and the head
    # whole model: every parameter and the one float buffer forward reads (rotary inv_freq) counted
    # once, quantized ones replaced (original_inv_freq is a buffer forward never reads)
    tensors = list(params.values()) + [model.model.rotary_emb.inv_freq]
    assert totals["bytes_before"] == sum(t.numel() * t.element_size() for t in tensors)
    assert totals["bytes_after"] == totals["bytes_before"] - sum(w["bytes"] - w["bytes_after"] for w in quantized.values())
    text = format_summary(summary)
    assert "3-D stacked expert weights" in text and "whole graph:" in text
    torch.compiler.reset()
    with pytest.raises(Exception, match=r"strict.*weight\(s\) it selects stay float.*experts"):
        with torch.no_grad():
            torch.compile(model, backend=Recorder(recipe="w4a16", strict=True))(ids)
