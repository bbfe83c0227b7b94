"""Export to compressed-tensors (issue "Ship the compressed model", point 3), verified by the
compressed-tensors library itself: transformers loads the exported directory with
``CompressedTensorsConfig(dequantize=True)`` (compressed-tensors' own decompression) and every
quantized weight equals our dequantization bit for bit; weight-only models give our reference
logits within float noise. What compressed-tensors cannot express is refused with the reason."""
from __future__ import annotations

import json

import pytest
import torch

from lowbit_compiler import LowbitError, Recipe, WeightFormat, compress, formats, zoo
from lowbit_compiler.backends import cpu_kernels
from lowbit_compiler.offline import LowbitLinear

pytest.importorskip("compressed_tensors", reason="the 'export' extra (compressed-tensors) is not installed: "
                                                 "pip install -e '.[export]'")
from lowbit_compiler.export.compressed_tensors import export_compressed_tensors  # noqa: E402

ROTATED_W4A16 = Recipe("w4a16-r1r2", ("canonicalize", "rotate", "insert_weight_quant"),
                       WeightFormat(4, 128, symmetric=False))
SYM_G32 = Recipe("w4a16-g32-sym", ("canonicalize", "insert_weight_quant"), WeightFormat(4, 32, symmetric=True))


def _load_dequantized(model, out):
    from transformers import CompressedTensorsConfig

    return type(model).from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


def _our_weights(model) -> dict[str, torch.Tensor]:
    return {fqn: formats.dequantize_parts(formats.WeightFormat.parse(m.fmt), m.qweight, m.scale, m.zero)[:, :m.in_features]
            for fqn, m in model.named_modules() if isinstance(m, LowbitLinear)}


@pytest.mark.parametrize("arch, recipe, scheme", [
    ("llama", "w4a16", ("pack-quantized", 4, "group", False)),
    ("llama", SYM_G32, ("pack-quantized", 4, "group", True)),
    ("qwen2", "w8a16", ("pack-quantized", 8, "channel", True)),
    ("llama", ROTATED_W4A16, ("pack-quantized", 4, "group", False)),
    ("llama", "w8a8", ("int-quantized", 8, "channel", True)),
    ("llama", "fp8", ("float-quantized", 8, "channel", True)),
], ids=["w4a16", "w4a16-g32-sym", "qwen2-w8a16", "rotated-w4a16", "w8a8", "fp8"])
@pytest.mark.heavy
def test_export_is_what_compressed_tensors_reads(tmp_path, monkeypatch, arch, recipe, scheme):
    model, inputs = zoo.build(arch)
    compress(model, recipe, progress=False)
    report = export_compressed_tensors(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    fmt, bits, strategy, symmetric = scheme
    assert config["quant_method"] == "compressed-tensors" and config["format"] == fmt
    (group,) = config["config_groups"].values()
    assert (group["weights"]["num_bits"], group["weights"]["strategy"], group["weights"]["symmetric"]) == \
        (bits, strategy, symmetric)
    ours = _our_weights(model)
    assert sorted(group["targets"]) == sorted(ours) and report["ignore"] == []

    loaded = _load_dequantized(model, tmp_path)
    state = loaded.state_dict()
    for fqn, w in ours.items():  # compressed-tensors' decompression = our dequantization, bit for bit
        assert torch.equal(state[fqn + ".weight"], w.to(state[fqn + ".weight"].dtype)), fqn
    if group["input_activations"] is None:  # weight-only: our reference logits within float noise
        monkeypatch.setattr(cpu_kernels, "wo_linear_fast", lambda *args, **kwargs: None)  # the float reference
        with torch.no_grad():
            ours_logits, theirs = model(**inputs)[0], loaded(**inputs)[0]
        torch.testing.assert_close(theirs, ours_logits, rtol=1e-5, atol=1e-5)
    else:  # dequantize=True drops activation quantization (vLLM runs it): dynamic per-token declared
        assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"]


@pytest.mark.parametrize("recipe, reason", [
    ("w4a4-rot", r"down_proj: an online Hadamard \(R4\) runs on its input"),
    ("w4a16-spqr", r"SpQR outliers"),
    ("w3a16", r"int3_g128_asym: 3-bit packing differs between compressed-tensors versions"),
    ("nf4", r"format nf4_g64 is not written by this exporter"),
    ("w8a8-static", r"static scale"),
    ("rotate", r"no layer of the model is quantized"),
])
@pytest.mark.heavy
def test_refused_with_the_reason(tmp_path, recipe, reason):
    from lowbit_compiler.pass_base import get_pass
    from lowbit_compiler.recipe import get_recipe

    model, _ = zoo.build("llama")
    calibration = [torch.randint(0, zoo.V, (1, 16))] if any(get_pass(p).data_driven
                                                            for p in get_recipe(recipe).passes) else None
    compress(model, recipe, calibration=calibration, progress=False)
    with pytest.raises(LowbitError, match=reason):
        export_compressed_tensors(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_cli_exports_a_saved_checkpoint(tmp_path, capsys):
    from lowbit_compiler.cli import main

    model, _ = zoo.build("llama")
    compress(model, "w4a16", progress=False)
    model.save_pretrained(tmp_path / "lowbit")
    assert main(["export", str(tmp_path / "lowbit"), "--format", "compressed-tensors", str(tmp_path / "ct")]) == 0
    assert "compressed-tensors pack-quantized: 15 layers" in capsys.readouterr().out
    loaded = _load_dequantized(model, tmp_path / "ct")
    state = loaded.state_dict()
    for fqn, w in _our_weights(model).items():
        assert torch.equal(state[fqn + ".weight"], w), fqn


def test_quantized_moe_experts_are_refused(tmp_path):
    model, _ = zoo.build("mixtral")
    compress(model, "w4a16", progress=False)
    with pytest.raises(LowbitError, match=r"mlp\.experts: quantized stacked MoE experts"):
        export_compressed_tensors(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
