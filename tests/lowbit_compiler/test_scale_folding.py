"""AWQ: scale groups found from the graph, exact folding in float64, and the scale search."""
from __future__ import annotations

import collections

import pytest
import torch

from lowbit_compiler import Recipe, compress
from lowbit_compiler import scale_folding
from lowbit_compiler.formats import WeightFormat, dequantize, quantize, sqnr_db
from tests.conftest import make_model, prompt
from tests.helpers import Recorder

CANON = Recipe("canon", ("canonicalize",))


def groups_of(arch, dtype=torch.float32):
    model = make_model(arch, dtype=dtype)
    rec = Recorder(recipe=CANON)
    with torch.no_grad():
        torch.compile(model, backend=rec)(prompt())
    return model, scale_folding.scale_groups(rec.graphs[0])


@pytest.mark.parametrize("arch, foldable", [
    # q/k/v <- input norm, gate/up <- post-attention norm, down <- up (gated product), head <- final norm;
    # o_proj is refused: grouped KV heads
    ("llama", {"norm": 5, "linear": 2}),
    # BERT is post-norm: every LayerNorm output also feeds the residual; only attention.output <- value
    ("bert", {"linear": 2}),
])
def test_scale_groups_are_found_from_the_graph(arch, foldable):
    _, groups = groups_of(arch)
    found = collections.Counter(g.producer[0] for g in groups if g.producer)
    assert found == foldable
    for g in groups:
        assert (g.producer is None) == (g.reason is not None)
    if arch == "llama":
        o = next(g for g in groups if g.consumers == ["model.layers.0.self_attn.o_proj"])
        assert o.reason == "grouped KV heads: one value channel feeds several output channels"
        qkv = next(g for g in groups if "model.layers.0.self_attn.q_proj" in g.consumers)
        assert qkv.producer == ("norm", "model.layers.0.input_layernorm.weight", "")
        assert sorted(qkv.consumers) == [f"model.layers.0.self_attn.{p}_proj" for p in "kqv"]
    else:
        assert any("also used by" in g.reason for g in groups if g.producer is None)


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
@pytest.mark.heavy
def test_folding_any_scale_into_the_graph_is_exact_in_float64(arch):
    model = make_model(arch, dtype=torch.float64)
    rec = Recorder(recipe=CANON)
    ids = prompt()
    compiled = torch.compile(model, backend=rec)
    with torch.no_grad():
        ref = compiled(ids)[0]
        gm = rec.graphs[0]
        g = torch.Generator().manual_seed(0)
        folded = 0
        for group in scale_folding.scale_groups(gm):
            if group.producer is not None:
                k = group.nodes[0].args[0].meta["example_value"].shape[-1]
                tensors = scale_folding.fold_in_graph(gm, group, torch.rand(k, generator=g, dtype=torch.float64) + 0.5)
                scale_folding.apply_tensors(gm, tensors)
                folded += 1
        out = compiled(ids)[0]  # the same graph, its tensors replaced
    assert folded > 0 and len(rec.graphs) == 1
    assert not torch.equal(out, ref)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-12
    assert all(p is model.get_parameter(n) for n, p in model.named_parameters())  # the user's model is untouched


def test_awq_scales_reduce_output_error_on_outlier_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 512, generator=g)
    x[:, :8] *= 30  # salient input channels
    w = torch.randn(384, 512, generator=g) / 512 ** 0.5
    h = x.T @ x
    for key in ("int4_g128_asym", "int3_g128_asym"):
        fmt = WeightFormat.parse(key)
        s, alpha, relative = scale_folding.awq_scales([w], h, x.abs().mean(0), fmt)
        rtn = sqnr_db(x @ w.T, x @ dequantize(quantize(w, fmt)).T)
        awq = sqnr_db(x @ w.T, (x / s) @ dequantize(quantize(w * s, fmt)).T)
        assert 0 < alpha <= 1 and relative < 0.8 and awq > rtn + 1.0, (key, alpha, rtn, awq)


def test_w4a16_awq_through_compress_reports_what_it_folded():
    calibration = [torch.randint(3, 256, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    model = compress(make_model("llama"), "w4a16-awq", calibration=calibration, progress=False)
    awq = next(p for p in model.lowbit_summary["passes"] if p["name"] == "awq")["details"]["groups"]
    folded = [v for v in awq.values() if "alpha" in v]
    assert len(folded) == 7 and all(v["error_vs_rtn"] <= 1.0 for v in folded)  # 3 per layer + the head
    assert {v["skipped"] for v in awq.values() if "skipped" in v} == {
        "grouped KV heads: one value channel feeds several output channels"}
    assert model.lowbit_summary["replaced_modules"] == 15
    with torch.no_grad():
        assert torch.isfinite(model(prompt())[0]).all()
