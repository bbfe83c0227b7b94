"""Quantized activations (W8A8, W4A8 on integer matmuls; FP8), and SmoothQuant."""
from __future__ import annotations

import pytest
import torch

from lowbit_compiler import LowbitError, compress
from lowbit_compiler.formats import WeightFormat, quantize, sqnr_db
from lowbit_compiler.ops import qa_linear_reference, quantize_per_token
from lowbit_compiler.scale_folding import smoothquant_scales
from tests.conftest import make_model, prompt
from tests.helpers import Recorder


def outlier_layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 512, generator=g)
    x[:, [3, 77, 300]] *= 60  # activation outlier channels, as in LLM residual streams
    w = torch.randn(256, 512, generator=g) / 512 ** 0.5
    b = torch.randn(256, generator=g) * 0.01
    return x, w, b


def qa(x, w, b, fmt="int8", act="int8"):
    qw = quantize(w, WeightFormat.parse(fmt))
    args = (qw.qweight, qw.scale, qw.zero, b, fmt, w.shape[1], act)
    return torch.ops.lowbit.qa_linear(x, *args), qa_linear_reference(x, *args)


def w8a8(x, w, b):
    return qa(x, w, b)[0]


@pytest.mark.parametrize("fmt, act, floor", [
    ("int8", "int8", 25.0),              # W8A8: one torch._int_mm
    ("int4_g128_asym", "int8", 17.0),    # W4A8: one integer matmul per group of centred codes
    ("int4_g64_sym", "int8", 16.0),
    ("fp8_e4m3", "fp8_e4m3", 25.0),      # FP8 x FP8, exact products, fp32 accumulation
])
def test_quantized_activation_matmuls_match_the_float64_reference(fmt, act, floor):
    x, w, b = outlier_layer()
    out, ref = qa(x, w, b, fmt, act)
    assert out.dtype == torch.float32 and sqnr_db(ref, out) > 110
    assert sqnr_db(x @ w.T + b, out) > floor  # against float, even with activation outliers


def test_per_token_quantization_has_no_nan_for_zero_rows():
    x = torch.randn(4, 64)
    x[1] = 0
    codes, scale = quantize_per_token(x)
    assert torch.isfinite(scale).all() and (codes[1] == 0).all() and codes.dtype == torch.int8


def test_smoothquant_beats_plain_w8a8_on_outlier_channels_by_6_db():
    x, w, b = outlier_layer()
    ref = x @ w.T + b
    plain = sqnr_db(ref, w8a8(x, w, b))
    s = smoothquant_scales(x.abs().amax(0), [w], alpha=0.5)
    smooth = sqnr_db(ref, w8a8(x / s, w * s, b))  # x / s folds into the producer, w * s into the weight
    assert smooth >= plain + 6.0, (plain, smooth)


CALIBRATION = [torch.randint(3, 256, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(4)]


@pytest.mark.heavy
def test_w8a8_presets_through_both_flows():
    ids = prompt(32)
    with torch.no_grad():
        ref = make_model("llama")(ids).logits
        rec = Recorder(recipe="w8a8", debug=True)
        out = torch.compile(make_model("llama"), backend=rec)(ids).logits
        offline = compress(make_model("llama"), "w8a8")
        smooth = compress(make_model("llama"), "w8a8-smooth", calibration=CALIBRATION, progress=False)
        assert sqnr_db(ref, out) > 30 and sqnr_db(ref, smooth(ids).logits) > 30
        torch.testing.assert_close(offline(ids).logits, out)
    assert rec.summaries[0]["passes"][1]["details"]["activation"] == "int8_dynamic"
    assert sum(n.target is torch.ops.lowbit.qa_linear.default for n in rec.graphs[0].graph.nodes) == 15
    assert offline.model.layers[0].mlp.down_proj.act == "int8"
    groups = next(p for p in smooth.lowbit_summary["passes"] if p["name"] == "smoothquant")["details"]["groups"]
    folded = [v for v in groups.values() if "producer" in v]
    assert len(folded) == 7


def test_smoothquant_and_bad_activation_recipes_say_what_to_do():
    with pytest.raises(Exception, match=r"pass 'smoothquant' \(recipe 'w8a8-smooth'\) needs calibration data"):
        torch.compile(make_model("llama"), backend=Recorder(recipe="w8a8-smooth"))(prompt())
    from lowbit_compiler import Recipe

    with pytest.raises(LowbitError, match="multiplies int8 activations with int8 or int4 weights; got nf4_g64"):
        Recipe("bad", ("canonicalize", "insert_weight_quant"), WeightFormat(4, 64, kind="nf4"), activation="int8_dynamic")
    with pytest.raises(LowbitError, match="multiplies fp8_e4m3 activations with fp8_e4m3 weights; got int8"):
        Recipe("bad", ("canonicalize", "insert_weight_quant"), WeightFormat(8), activation="fp8_dynamic")


@pytest.mark.parametrize("recipe, arch, floor", [("w4a8", "qwen2", 10.0), ("fp8", "bert", 30.0)])
@pytest.mark.heavy
def test_w4a8_and_fp8_presets_through_both_flows(recipe, arch, floor):
    ids = prompt(32)
    with torch.no_grad():
        ref = make_model(arch)(ids)[0]
        rec = Recorder(recipe=recipe, debug=True)
        out = torch.compile(make_model(arch), backend=rec)(ids)[0]
        offline = compress(make_model(arch), recipe)(ids)[0]
    assert sqnr_db(ref, out) >= floor
    torch.testing.assert_close(offline, out)
    acts = {n.args[7] for n in rec.graphs[0].graph.nodes if n.target is torch.ops.lowbit.qa_linear.default}
    assert acts == {"int8" if recipe == "w4a8" else "fp8_e4m3"}


def test_static_activation_scales_from_calibration():
    from lowbit_compiler import get_recipe

    x, w, b = outlier_layer()
    qw = quantize(w, WeightFormat(8))
    static = (x.abs().max() / 127).reshape(1)
    args = (qw.qweight, qw.scale, qw.zero, b, "int8", 512, "int8", static)
    out = torch.ops.lowbit.qa_linear(x, *args)
    assert sqnr_db(qa_linear_reference(x, *args), out) > 110
    # one scale for the whole tensor is coarser than per-token scales on rows without outliers
    assert sqnr_db(x @ w.T + b, out) < sqnr_db(x @ w.T + b, w8a8(x, w, b))

    recipe = get_recipe("w8a8-static")
    ids = prompt(32)
    with torch.no_grad():
        ref = make_model("llama")(ids).logits
        model = compress(make_model("llama"), recipe, calibration=CALIBRATION, progress=False)
        out = model(ids).logits
    assert sqnr_db(ref, out) > 20
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.x_scale.shape == (1,) and layer.x_scale.item() > 0
    with pytest.raises(LowbitError, match=r"pass 'observe_activations' \(recipe 'w8a8-static'\) needs calibration"):
        compress(make_model("llama"), recipe)
    with pytest.raises(LowbitError, match=r"pass 'insert_weight_quant' requires \['activation_scales'\], which no "
                                          r"earlier pass ensures; put 'observe_activations' before it"):
        get_recipe("w8a8").replace(name="w8a8-static-bad", activation="int8_static")
