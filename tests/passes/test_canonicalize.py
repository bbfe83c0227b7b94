"""canonicalize: one spelling per op on every supported architecture, numerics unchanged."""
from __future__ import annotations

import pytest
import torch

from lowbit_compiler import Recipe, ir
from lowbit_compiler.verify import verify
from tests.conftest import ARCHS, DECODERS, make_model, prompt
from tests.helpers import Recorder, count, op_names

CANON = Recipe("canon", ("canonicalize",))

# per architecture: linears (incl. head/pooler), rms norms, layer norms, SDPA nodes
EXPECTED = {
    "llama": (15, 5, 0, 2), "mistral": (15, 5, 0, 2), "qwen2": (15, 5, 0, 2),
    "gpt2": (9, 0, 5, 2), "bert": (13, 0, 5, 2),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_canonical_form_and_exact_numerics(arch):
    model = make_model(arch)
    ids = prompt()
    rec = Recorder(recipe=CANON, strict=True)
    with torch.no_grad():
        ref = model(ids)[0]
        out = torch.compile(model, backend=rec)(ids)[0]
    assert len(rec.graphs) == 1
    gm = rec.graphs[0]
    gm.graph.lint()
    verify(gm)
    linears, rms, ln, sdpa = EXPECTED[arch]
    assert (count(gm, "linear"), count(gm, "rms_norm"), count(gm, "layer_norm"),
            count(gm, "scaled_dot_product_attention")) == (linears, rms, ln, sdpa)
    # Conv1D's flatten/unflatten views around each of GPT-2's 8 block linears are folded away
    assert rec.summaries[0]["passes"][0]["details"]["flattened_linear"] == (8 if arch == "gpt2" else 0)
    flattening = [lin.name for lin in gm.graph.nodes if ir.is_linear(lin) and lin.args[0].target in ("view", "reshape")
                  and lin.args[0].meta["example_value"].dim() < lin.args[0].args[0].meta["example_value"].dim()]
    assert flattening == []
    # one spelling: no addmm, matmul-with-parameter, eval dropout, or written-out norm left
    assert {"addmm", "dropout", "rsqrt"}.isdisjoint(op_names(gm))
    # every linear reads a parameter with its module FQN
    for node in gm.graph.nodes:
        if ir.is_linear(node):
            parts = ir.linear_parts(node)
            assert parts.weight_node is not None and parts.weight_node.target.endswith(".weight")
            layer = ir.get(node, ir.MODULE).fqn
            assert parts.transposed == (arch == "gpt2" and layer != "lm_head")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.heavy
def test_cached_decode_graphs_are_canonical_too(arch):
    model = make_model(arch)
    rec = Recorder(recipe=CANON, strict=True)
    model.compile(backend=rec)
    with torch.no_grad():
        model.generate(prompt(), max_new_tokens=4, do_sample=False)
    assert len(rec.graphs) >= 2  # prefill + decode
    linears, rms, ln, sdpa = EXPECTED[arch]
    for gm in rec.graphs:
        assert count(gm, "linear") == linears and count(gm, "rms_norm") == rms and count(gm, "layer_norm") == ln


class HandWritten(torch.nn.Module):
    """RMSNorm written out, a Conv1D-style addmm, eval dropout, and x @ W.t()."""

    def __init__(self):
        super().__init__()
        self.norm_weight = torch.nn.Parameter(torch.rand(64) + 0.5)
        self.conv_weight = torch.nn.Parameter(torch.randn(64, 32) * 0.1)  # [in, out]
        self.conv_bias = torch.nn.Parameter(torch.randn(32) * 0.1)
        self.proj = torch.nn.Parameter(torch.randn(16, 32) * 0.1)

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = self.norm_weight * h.to(x.dtype)
        h = torch.addmm(self.conv_bias, h.view(-1, 64), self.conv_weight)
        h = torch.nn.functional.dropout(h, 0.1, False)
        return torch.matmul(h, self.proj.t())


def test_golden_graph_for_hand_written_spellings():
    torch.manual_seed(0)
    model = HandWritten()
    x = torch.randn(5, 64)
    rec = Recorder(recipe=CANON, strict=True)
    out = torch.compile(model, backend=rec)(x)
    gm = rec.graphs[0]
    assert op_names(gm) == ["rms_norm", "view", "t", "linear", "linear"]
    details = rec.summaries[0]["passes"][0]["details"]
    assert (details["rms_norm"], details["conv1d_addmm_to_linear"], details["eval_dropout"],
            details["matmul_transposed_to_linear"]) == (1, 1, 1, 1)
    norm = next(n for n in gm.graph.nodes if n.target is torch.nn.functional.rms_norm)
    assert ir.get(norm, ir.NORM) == ir.NormSpec("rms", 1e-6, 0.0)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)


class LinearSpellings(torch.nn.Module):
    """One linear per spelling users and model authors write (Falcon's ``x @ W.T + b`` among them)."""

    SPELLINGS = ("dotT", "dotT_bias", "mT", "transpose", "transpose_neg", "permute", "torch_transpose",
                 "mm_t", "matmul_in_out", "addmm_t", "linear_of_t")

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for name in self.SPELLINGS:
            shape = (32, 32)
            self.register_parameter(f"w_{name}", torch.nn.Parameter(torch.randn(*shape, generator=g) * 0.2))
        self.bias = torch.nn.Parameter(torch.randn(32, generator=g) * 0.1)

    def forward(self, x):
        w = {n: getattr(self, f"w_{n}") for n in self.SPELLINGS}
        h = x @ w["dotT"].T
        h = h @ w["dotT_bias"].T + self.bias
        h = h @ w["mT"].mT
        h = torch.matmul(h, w["transpose"].transpose(0, 1))
        h = h @ w["transpose_neg"].transpose(-1, -2)
        h = h @ w["permute"].permute(1, 0)
        h = h @ torch.transpose(w["torch_transpose"], 0, 1)
        h = torch.mm(h, w["mm_t"].t())
        h = h @ w["matmul_in_out"]                      # stored [in, out]
        h = torch.addmm(self.bias, h, w["addmm_t"].t())
        return torch.nn.functional.linear(h, w["linear_of_t"].t())  # stored [in, out]


def test_every_linear_spelling_becomes_the_canonical_linear():
    model = LinearSpellings()
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    rec = Recorder(recipe=CANON, strict=True)
    with torch.no_grad():
        out = torch.compile(model, backend=rec)(x)
    gm = rec.graphs[0]
    names = op_names(gm)
    assert names.count("linear") == len(LinearSpellings.SPELLINGS), names
    assert {"matmul", "mm", "addmm", "add", "transpose", "permute", "getattr"}.isdisjoint(names), names
    weights = {}
    for node in gm.graph.nodes:
        if ir.is_linear(node):
            parts = ir.linear_parts(node)
            weights[parts.weight_node.target.removeprefix("w_")] = (parts.transposed, parts.bias is not None)
    assert weights == {n: (n in ("matmul_in_out", "linear_of_t"), n in ("dotT_bias", "addmm_t"))
                       for n in LinearSpellings.SPELLINGS}
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    # and every one of them is quantized
    rec = Recorder(recipe="w8a16", strict=True)
    torch.compiler.reset()
    with torch.no_grad():
        torch.compile(model, backend=rec)(x)
    assert len([v for v in rec.summaries[0]["layers"].values() if "bytes_after" in v]) == len(LinearSpellings.SPELLINGS)


def test_falcon_linears_are_all_quantized():
    """FalconLinear computes ``input @ self.weight.T (+ self.bias)``: 1 of 9 linears before."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.FalconForCausalLM(tf.FalconConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, bias=True)).eval()
    ids = prompt()
    rec = Recorder(recipe="w8a16", strict=True)
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend=rec)(ids).logits
    from lowbit_compiler.formats import sqnr_db

    quantized = [k for k, v in rec.summaries[0]["layers"].items() if "bytes_after" in v]
    assert len(quantized) == 9, quantized
    assert sqnr_db(ref, out) > 25


def test_parameters_are_frozen_with_fqn_and_identity():
    model = make_model("llama")
    rec = Recorder(recipe="none")
    torch.compile(model, backend=rec)(prompt())
    gm = rec.graphs[0]
    params = dict(model.named_parameters())
    frozen = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
    assert "model.layers.0.mlp.down_proj.weight" in frozen
    for fqn, node in frozen.items():
        assert ir.get(node, ir.PARAM).fqn == fqn
        if fqn in params:
            assert ir.fetch_attr(gm, fqn) is params[fqn]  # the very nn.Parameter
    assert all(n.op != "placeholder" or "parameters" not in n.name for n in gm.graph.nodes)


def test_rms_norm_rewrite_is_exact_in_bf16():
    model = make_model("llama", dtype=torch.bfloat16)
    ids = prompt()
    rec = Recorder(recipe=CANON, strict=True)
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend=rec)(ids).logits
    assert count(rec.graphs[0], "rms_norm") == 5
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
