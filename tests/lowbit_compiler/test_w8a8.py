"""W8A8: int8 weights x per-token int8 activations on integer matmuls, and SmoothQuant."""
from __future__ import annotations

import pytest
import torch

from lowbit_compiler import LowbitError, compress
from lowbit_compiler.formats import WeightFormat, quantize, sqnr_db
from lowbit_compiler.ops import quantize_per_token, w8a8_linear_reference
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


def w8a8(x, w, b):
    qw = quantize(w, WeightFormat(8))
    return torch.ops.lowbit.w8a8_linear(x, qw.qweight, qw.scale, b)


def test_integer_matmul_matches_the_float64_reference():
    x, w, b = outlier_layer()
    qw = quantize(w, WeightFormat(8))
    out = torch.ops.lowbit.w8a8_linear(x, qw.qweight, qw.scale, b)
    ref = w8a8_linear_reference(x, qw.qweight, qw.scale, b)
    assert out.dtype == torch.float32 and sqnr_db(ref, out) > 120
    assert sqnr_db(x @ w.T + b, out) > 25  # int8 x int8 against float, even with outliers


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
    assert sum(n.target is torch.ops.lowbit.w8a8_linear.default for n in rec.graphs[0].graph.nodes) == 15
    assert offline.model.layers[0].mlp.down_proj.activation == "int8_dynamic"
    folded = [v for v in smooth.lowbit_summary["calibration"]["smoothquant"].values() if "producer" in v]
    assert len(folded) == 7


def test_smoothquant_and_bad_activation_recipes_say_what_to_do():
    with pytest.raises(Exception, match="SmoothQuant migrates activation outliers measured on calibration data"):
        torch.compile(make_model("llama"), backend=Recorder(recipe="w8a8-smooth"))(prompt())
    from lowbit_compiler import Recipe

    with pytest.raises(LowbitError, match="int8 x int8 matmuls: use int8 weights"):
        Recipe("bad", ("canonicalize", "insert_weight_quant"), WeightFormat(4, 128), activation="int8_dynamic")
