"""Stacked MoE experts quantized by ``lowbit::grouped_linear`` in both flows (issue "Every model,
nothing silent", point 3): Mixtral, Qwen3-MoE and DeepSeek-V3 (shared experts: plain linears
beside the routed ones) under w8a16, w4a16, w8a8 and w4a16-gptq. Per format: the logits SQNR
floor, the experts' weight SQNR floor, the whole-model size ratio at 4 bits, bit-identical
quantized tensors in both flows, routers float, the experts written back as ``LowbitExperts``."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from lowbit_compiler import LowbitError, compress, zoo
from lowbit_compiler.formats import sqnr_db
from lowbit_compiler.offline import LowbitExperts
from tests.helpers import Recorder

MOE = ("mixtral", "qwen3_moe", "deepseek_v3")
# recipe -> (logits SQNR floor, experts' weight SQNR floor, expert format, activation), dB; tiny random
# models (measured: logits w8a16 22.0-36.4, w4a16 11.7-13.2, w8a8 33.2-34.7, w4a16-gptq 21.2-30.8
# on the calibration tokens; weight SQNR int8 ~38.9, int4 g128 ~19.9 RTN / ~18.3 GPTQ)
FLOORS = {"w8a16": (20.0, 38.0, "int8", None), "w4a16": (10.0, 19.5, "int4_g128_asym", None),
          "w8a8": (30.0, 38.0, "int8", "int8"), "w4a16-gptq": (20.0, 17.5, "int4_g128_asym", None)}
FAST = {("mixtral", "w4a16"), ("mixtral", "w8a8"), ("qwen3_moe", "w4a16-gptq")}
CALIBRATION = [torch.randint(3, zoo.V, (1, 9), generator=torch.Generator().manual_seed(i)) for i in range(2)]


def _both_flows(arch: str, recipe):
    """(float logits, compiled logits, compressed logits, compile summary, compressed model) on the
    zoo input (the second calibration batch)."""
    model, inputs = zoo.build(arch)
    calibration = CALIBRATION if "gptq" in str(getattr(recipe, "name", recipe)) else None
    rec = Recorder(recipe=recipe, calibration=calibration, progress=False)
    with torch.no_grad():
        ref = model(**inputs).logits
        compiled = torch.compile(model, backend=rec)(**inputs).logits
        torch.compiler.reset()
        compressed = compress(copy.deepcopy(model), recipe, calibration=calibration, example_inputs=inputs,
                              progress=False)
        out = compressed(**inputs).logits
    return ref, compiled, out, rec, compressed


def _cases():
    for arch in MOE:
        for recipe in FLOORS:
            marks = () if (arch, recipe) in FAST else (pytest.mark.slow,)
            yield pytest.param(arch, recipe, marks=marks, id=f"{arch}-{recipe}")


@pytest.mark.parametrize("arch, recipe", list(_cases()))
@pytest.mark.heavy
def test_experts_are_quantized_in_both_flows(arch, recipe):
    logits_floor, weight_floor, fmt, act = FLOORS[recipe]
    ref, compiled, out, rec, compressed = _both_flows(arch, recipe)
    summary = rec.summaries[0]
    assert summary["fallbacks"] == {}, summary["fallbacks"]
    assert sqnr_db(ref, compiled) >= logits_floor and sqnr_db(ref, out) >= logits_floor
    assert sqnr_db(compiled, out) >= 60  # the same packed kernels on the same tensors
    experts = {k: v for k, v in summary["layers"].items() if ".experts." in k}
    owners = sorted({k.rpartition(".")[0] for k in experts})
    assert len(experts) == 2 * len(owners) and owners
    for layer, record in experts.items():
        assert record["format"] == fmt and record["experts"] == 4, (layer, record)
        assert record.get("activation") == act
        assert record["weight_sqnr_db"] >= weight_floor, (layer, record)
    weights = summary["coverage"]["weights"]
    assert all(w["status"] == "quantized" for f, w in weights.items() if ".experts." in f)
    routers = [f for f, w in weights.items() if f.endswith("mlp.gate.weight")]
    assert routers and all(weights[r]["status"] == "float" for r in routers)
    if arch != "deepseek_v3":  # its router reads weight.type(float32), a computed weight (512 elements: unlisted)
        assert all("router" in weights[r]["reason"] for r in routers)
    float_matmuls = [f for f, w in weights.items() if w["role"] == "matmul" and w["status"] == "float"
                     and w["elements"] >= 4096]
    assert float_matmuls == [], float_matmuls
    ratio = summary["coverage"]["totals"]["ratio"]
    assert ratio >= (3.5 if "w4" in recipe else 3.0), ratio  # whole model, embeddings and norms included
    # compress: the experts modules became LowbitExperts holding the very tensors of the graph
    graph = dict(rec.graphs[0].named_buffers())
    assert compressed.lowbit_summary["left_float"] == {}
    assert compressed.lowbit_summary["coverage"]["totals"]["ratio"] == ratio
    for owner in owners:
        module = compressed.get_submodule(owner)
        assert isinstance(module, LowbitExperts) and sorted(module.quantized) == sorted(
            k.rpartition(".")[2] for k in experts if k.startswith(owner + "."))
        for attr in module.quantized:
            assert not hasattr(module, attr)  # the float weight is released
            for key in ("qweight", "scale", "zero"):
                mine, theirs = getattr(module, f"{attr}_{key}"), graph.get(f"{owner}.{attr}_quantized.{key}")
                assert (mine is None and theirs is None) or torch.equal(mine, theirs), (owner, attr, key)
    shared = [n for n, m in compressed.named_modules() if n.endswith("shared_experts")]
    assert (arch == "deepseek_v3") == bool(shared)  # DeepSeek-V3's shared experts: plain quantized linears


def _starve_expert(model: torch.nn.Module, expert: int) -> None:
    """DeepSeek-V3's routers pick experts on ``sigmoid(logits) + e_score_correction_bias``: a bias
    of -100 means no token is ever routed to ``expert``."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("mlp.gate"):
                module.e_score_correction_bias[expert] = -100.0


@pytest.mark.heavy
def test_gptq_uses_each_experts_routed_tokens_and_reports_unreached_experts():
    """GPTQ on the experts alone (``include``): each expert's Hessian comes from the tokens the
    router sent to it, and the result beats round-to-nearest on the calibration tokens; an expert
    no token reached is rounded to nearest, reported per expert (strict: an error)."""
    from lowbit_compiler.recipe import PRESETS

    only = dict(include=("*.experts.*",))
    model, inputs = zoo.build("deepseek_v3")  # experts in layer 1 (layer 0 is dense)
    _starve_expert(model, 3)
    ids = CALIBRATION[1]
    results = {}
    for name in ("w4a16", "w4a16-gptq"):
        rec = Recorder(recipe=PRESETS[name].replace(**only), calibration=CALIBRATION, progress=False)
        torch.compiler.reset()
        with torch.no_grad():
            ref = model(ids).logits
            results[name] = (sqnr_db(ref, torch.compile(model, backend=rec)(ids).logits), rec.summaries[0])
    (rtn, _), (gptq, summary) = results["w4a16"], results["w4a16-gptq"]
    assert gptq >= rtn + 3.0, (rtn, gptq)
    assert all(".experts." in k for k, v in summary["layers"].items() if v["format"] != "float")
    fallbacks = summary["fallbacks"]
    assert list(fallbacks) == ["no calibration token was routed to expert 3"] and fallbacks[
        "no calibration token was routed to expert 3"] == 2  # gate_up and down
    torch.compiler.reset()
    with pytest.raises(Exception, match=r"gptq: layer model.layers.1.mlp.experts.gate_up_proj.*expert 3"):
        with torch.no_grad():
            torch.compile(model, backend=Recorder(recipe=PRESETS["w4a16-gptq"].replace(**only), strict=True,
                                                  calibration=CALIBRATION, progress=False))(ids)


def test_static_activation_schemes_quantize_experts_weight_only_and_say_so():
    model, inputs = zoo.build("qwen3_moe")
    rec = Recorder(recipe="w8a8-static", calibration=CALIBRATION, progress=False)
    with torch.no_grad():
        ref = model(**inputs).logits
        out = torch.compile(model, backend=rec)(**inputs).logits
    summary = rec.summaries[0]
    reason = "activation 'int8_static': no static scales per expert (observe_activations observes linears)"
    assert summary["fallbacks"] == {reason: 4}
    experts = {k: v for k, v in summary["layers"].items() if ".experts." in k}
    assert len(experts) == 4 and all(v["format"] == "int8" and "activation" not in v for v in experts.values())
    assert sqnr_db(ref, out) >= 25


class GroupedExperts(torch.nn.Module):
    """Not a transformers experts module: a bare grouped matmul over a stacked weight."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 64, 128, generator=torch.Generator().manual_seed(0)) * 0.05)

    def forward(self, x, offs):
        return torch._grouped_mm(x, self.w.transpose(-2, -1), offs=offs)


def test_a_grouped_matmul_compress_cannot_reproduce_stays_float_there_and_is_quantized_compiled(caplog):
    x = torch.randn(12, 128, generator=torch.Generator().manual_seed(1)).bfloat16()  # _grouped_mm: bf16 only
    offs = torch.tensor([3, 3, 10, 12], dtype=torch.int32)
    model = GroupedExperts().bfloat16().eval()
    with torch.no_grad():
        ref = model(x, offs)
        rec = Recorder(recipe="w8a16")
        compiled = torch.compile(model, backend=rec)(x, offs)
        assert rec.summaries[0]["layers"]["w"]["format"] == "int8" and sqnr_db(ref, compiled) >= 30
        torch.compiler.reset()
        with caplog.at_level(logging.WARNING, logger="lowbit_compiler"):
            compressed = compress(GroupedExperts().bfloat16().eval(), "w8a16", example_inputs=(x, offs))
        assert isinstance(compressed.w, torch.nn.Parameter) and torch.equal(compressed(x, offs), ref)
    left = compressed.lowbit_summary["left_float"]
    assert list(left) == ["w"] and "not a transformers experts module" in left["w"]
    assert any("experts (the model)" in r.getMessage() or "stay float" in r.getMessage() for r in caplog.records)
    assert compressed.lowbit_summary["coverage"]["weights"]["w"]["status"] == "float"
    torch.compiler.reset()
    with pytest.raises(LowbitError, match=r"experts .*not a transformers experts module"):
        compress(GroupedExperts().bfloat16().eval(), "w8a16", example_inputs=(x, offs), strict=True)


def test_a_compressed_moe_model_compiles_without_quantizing_twice():
    model, inputs = zoo.build("mixtral")
    compressed = compress(model, "w4a16", example_inputs=inputs)
    with torch.no_grad():
        eager = compressed(**inputs).logits
        torch.compiler.reset()
        rec = Recorder(recipe="w4a16")
        again = torch.compile(compressed, backend=rec)(**inputs).logits
    kernels = rec.summaries[0]["kernels"]
    assert sum(v.endswith(":experts") for v in kernels.values()) == 4  # the existing ops, lowered
    layers = rec.summaries[0]["layers"]
    for i in range(2):
        for attr in ("gate_up_proj", "down_proj"):
            record = layers[f"model.layers.{i}.mlp.experts.{attr}"]
            assert record["experts"] == 4 and record["format"] == "int4_g128_asym" and "compress" in record["source"]
    assert sqnr_db(eager, again) >= 60


def test_the_verifier_checks_stacked_expert_tensors():
    from lowbit_compiler.verify import IRError, verify

    def graph(qweight, scale):
        root = torch.nn.Module()
        root.register_buffer("qweight", qweight)
        root.register_buffer("scale", scale)
        g = torch.fx.Graph()
        x, offs = g.placeholder("x"), g.placeholder("offs")
        out = g.call_function(torch.ops.lowbit.grouped_linear.default,
                              (x, offs, g.get_attr("qweight"), g.get_attr("scale"), None, "int8", 128, None))
        g.output(out)
        return torch.fx.GraphModule(root, g)

    int8, bf16 = torch.int8, torch.bfloat16
    verify(graph(torch.zeros(4, 8, 128, dtype=int8), torch.ones(4, 8, dtype=bf16)))
    with pytest.raises(IRError, match="disagree on the number of experts"):
        verify(graph(torch.zeros(4, 8, 128, dtype=int8), torch.ones(3, 8, dtype=bf16)))
    with pytest.raises(IRError, match=r"qweight is torch.int8\(8, 64\), format int8 with K=128 needs torch.int8\(8, 128\)"):
        verify(graph(torch.zeros(4, 8, 64, dtype=int8), torch.ones(4, 8, dtype=bf16)))


@pytest.mark.heavy
def test_bfloat16_experts_read_by_torch_grouped_mm_are_quantized_in_both_flows():
    """A bf16 model's experts go through ``torch._grouped_mm`` (the fp32 ones above through
    transformers' ``grouped_mm_fallback`` op): the same rewrite, and both flows agree exactly."""
    model, inputs = zoo.build("mixtral")
    model = model.to(torch.bfloat16)
    rec = Recorder(recipe="w4a16")
    with torch.no_grad():
        ref = model(**inputs).logits
        compiled = torch.compile(model, backend=rec)(**inputs).logits
        torch.compiler.reset()
        compressed = compress(copy.deepcopy(model), "w4a16", example_inputs=inputs)
        out = compressed(**inputs).logits
    layers = rec.summaries[0]["layers"]
    assert sum(1 for k, v in layers.items() if ".experts." in k and v["format"] == "int4_g128_asym") == 4
    assert isinstance(compressed.model.layers[0].mlp.experts, LowbitExperts)
    assert sqnr_db(ref, compiled) >= 10 and torch.equal(compiled, out)


def test_a_projection_the_recipe_excludes_stays_float_inside_lowbit_experts():
    from lowbit_compiler.recipe import PRESETS

    recipe = PRESETS["w4a16"].replace(exclude=("*.experts.down_proj",))
    model, inputs = zoo.build("mixtral")
    rec = Recorder(recipe=recipe)
    with torch.no_grad():
        compiled = torch.compile(model, backend=rec)(**inputs).logits
        torch.compiler.reset()
        compressed = compress(copy.deepcopy(model), recipe, example_inputs=inputs)
        out = compressed(**inputs).logits
    layers = rec.summaries[0]["layers"]
    assert layers["model.layers.0.mlp.experts.down_proj"]["skipped"] == "excluded by recipe"
    assert layers["model.layers.0.mlp.experts.gate_up_proj"]["format"] == "int4_g128_asym"
    experts = compressed.model.layers[0].mlp.experts
    assert isinstance(experts, LowbitExperts) and experts.quantized == ["gate_up_proj"]
    assert torch.equal(experts.down_proj, model.model.layers[0].mlp.experts.down_proj)
    assert sqnr_db(compiled, out) >= 60
