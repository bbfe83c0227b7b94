"""compress(): the same passes, decisions written back into the model."""
from __future__ import annotations

import pytest
import torch

from lowbit_compiler import compress
from lowbit_compiler.formats import sqnr_db
from lowbit_compiler.offline import LowbitLinear
from lowbit_compiler.passes import quantize as quantize_pass
from tests.conftest import make_model, prompt
from tests.helpers import Recorder

FLOOR = {"w8a16": 35.0, "w4a16": 19.0}


def _linear_inputs(model, ids):
    """Each float linear's input and output on a real forward pass (forward hooks)."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, (args[0], out)))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("recipe", ["w8a16", "w4a16"])
def test_every_quantized_linear_meets_its_floor(recipe):
    model = make_model("llama")
    ids = prompt(16)
    io = _linear_inputs(model, ids)
    compress(model, recipe)
    worst = min(sqnr_db(out, model.get_submodule(name)(x)) for name, (x, out) in io.items())
    assert len(io) == 15 and worst >= FLOOR[recipe]


def test_compressed_model_keeps_class_generates_and_shrinks():
    model = make_model("llama")
    cls = type(model)
    bf16_bytes = sum(m.weight.numel() * 2 for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and n.startswith("model.layers."))
    compress(model, "w4a16")
    assert type(model) is cls
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, LowbitLinear)}
    assert len(quantized) == 15 and model.lowbit_summary["replaced_modules"] == 15
    layer_bytes = sum(sum(b.numel() * b.element_size() for b in m.buffers())
                      for n, m in quantized.items() if n.startswith("model.layers."))
    assert bf16_bytes / layer_bytes >= 3.5
    assert "model.layers.0.mlp.down_proj.qweight" in model.state_dict()
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    with torch.no_grad():
        out = model.generate(prompt(), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 14)


def test_compiling_a_compressed_model_does_not_quantize_twice():
    model = compress(make_model("llama"), "w4a16")
    ids = prompt()
    with torch.no_grad():
        eager = model(ids).logits
    misses = quantize_pass.QUANT_CACHE.misses
    rec = Recorder(recipe="w4a16", strict=True)
    with torch.no_grad():
        out = torch.compile(model, backend=rec)(ids).logits
    assert quantize_pass.QUANT_CACHE.misses == misses
    summary = rec.summaries[0]
    quant = next(p for p in summary["passes"] if p["name"] == "insert_weight_quant")
    assert quant["matches"] == 0
    assert summary["kernel_counts"] == {"cpu": 15}
    down = summary["layers"]["model.layers.1.mlp.down_proj"]
    assert down["format"] == "int4_g128_asym" and down["source"].startswith("already quantized")
    assert down["bytes_after"] == sum(b.numel() * b.element_size() for b in model.model.layers[1].mlp.down_proj.buffers())
    assert sqnr_db(eager, out) >= 60


def test_gpt2_conv1d_and_tied_head_are_replaced():
    model = make_model("gpt2")
    ids = prompt()
    with torch.no_grad():
        ref = model(ids).logits
    compress(model, "w8a16")
    assert isinstance(model.transformer.h[0].attn.c_attn, LowbitLinear)
    assert isinstance(model.lm_head, LowbitLinear)
    assert isinstance(model.transformer.wte, torch.nn.Embedding)  # the embedding keeps its float table
    with torch.no_grad():
        out = model(ids).logits
    assert sqnr_db(ref, out) >= 25


def test_compress_accepts_calibration_batches_and_globs():
    model = make_model("mistral")
    recipe = __import__("lowbit_compiler").get_recipe("w8a16").replace(exclude=("lm_head", "*.mlp.*"))
    compress(model, recipe, calibration=[prompt(6), prompt(10)])
    assert isinstance(model.model.layers[0].self_attn.q_proj, LowbitLinear)
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)
    assert isinstance(model.lm_head, torch.nn.Linear)


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(128, 256), torch.nn.Linear(256, 128)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class _AnyArgs(_MLP):
    def forward(self, *args, **kwargs):  # no input_ids anywhere: the tensor must arrive positionally
        return super().forward(args[0])


class _TwoInputs(_MLP):
    def forward(self, x, residual):
        return super().forward(x) + residual


@pytest.mark.parametrize("module, example", [
    (_MLP, lambda: torch.randn(2, 128)),
    (_AnyArgs, lambda: torch.randn(2, 128)),
    (_TwoInputs, lambda: (torch.randn(2, 128), torch.randn(2, 128))),
])
def test_compress_takes_positional_example_inputs_for_a_plain_module(module, example):
    model, x = module().eval(), example()
    args = x if isinstance(x, tuple) else (x,)
    with torch.no_grad():
        ref = model(*args)
        compressed = compress(model, "w8a16", example_inputs=x)
        out = compressed(*args)
    assert compressed.lowbit_summary["replaced_modules"] == 2
    assert isinstance(compressed.up, LowbitLinear) and isinstance(compressed.down, LowbitLinear)
    assert sqnr_db(ref, out) > 35


@pytest.mark.parametrize("example", ["none", "tensor"])
@pytest.mark.heavy
def test_compress_builds_decoder_inputs_for_an_encoder_decoder_model(example):
    """T5 without example inputs, or with token ids only: the decoder start token is added, and
    the encoder's and the decoder's linears are all quantized: 33 = encoder 2 x (q, k, v, o, wi, wo)
    + decoder 2 x (self q, k, v, o, cross q, k, v, o, wi, wo) + lm_head."""
    from lowbit_compiler import zoo

    model, inputs = zoo.build("t5")
    with torch.no_grad():
        ref = model(**inputs).logits
        compressed = compress(model, "w8a16", example_inputs=None if example == "none" else inputs["input_ids"])
        out = compressed(**inputs).logits
    linears = [n for n, m in compressed.named_modules() if isinstance(m, LowbitLinear)]
    assert any(n.startswith("encoder.") for n in linears) and any(n.startswith("decoder.") for n in linears)
    assert len(linears) == compressed.lowbit_summary["replaced_modules"] == 33
    assert not any(isinstance(m, torch.nn.Linear) for m in compressed.modules())
    assert sqnr_db(ref, out) > 30
