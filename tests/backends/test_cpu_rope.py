"""The generated RoPE kernel (``backends/cpu_rope.py``) and its CPU lowering
(``lowering._fuse_cpu_rope``): bit for bit what the model's own rotate_half expression gives, on
decode and prefill shapes, strided (the q/k views of the fused q/k/v output) and broadcast inputs;
the inputs it does not take run the expression itself; in a compiled Llama every q and k rotation
becomes one call, the summary counts them, and the logits are those of the unfused graph."""
from __future__ import annotations

import operator

import pytest
import torch

from lowbit_compiler.backends import cpu_codegen, cpu_rope

pytestmark = pytest.mark.skipif(cpu_rope.kernel() is None, reason=f"no C compiler: {cpu_codegen._disabled_reason}")


def _model_expression(x, cos, sin):
    """transformers' apply_rotary_pos_emb for one tensor, written out (not the code under test)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@pytest.mark.parametrize("b, h, s, d, cos_batch", [(1, 16, 1, 128, 1), (2, 4, 7, 64, 2), (2, 4, 7, 64, 1),
                                                  (1, 3, 300, 128, 1), (3, 5, 2, 6, 3)])
def test_the_kernel_is_bit_exact_on_strided_and_broadcast_inputs(b, h, s, d, cos_batch):
    g = torch.Generator().manual_seed(b * 100 + s)
    x = torch.randn(b, s, h, d, generator=g).transpose(1, 2)  # [B, H, S, D] view, as q/k reach RoPE
    pos = torch.arange(s, dtype=torch.float32)[None, :, None] + torch.arange(cos_batch)[:, None, None] * 3
    angles = pos * torch.rand(d // 2, generator=g).repeat(2)
    cos, sin = angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)  # [1 or B, 1, S, D]
    before = cpu_rope.calls
    out = cpu_rope.rope(x, cos, sin)
    assert cpu_rope.calls == before + 1
    assert out.shape == (b, h, s, d) and torch.equal(out, _model_expression(x, cos, sin))


@pytest.mark.parametrize("case", ["bfloat16", "odd D", "3-D", "requires grad", "sin requires grad"])
def test_inputs_the_kernel_does_not_take_run_the_expression(case):
    x, cos, sin = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    if case == "bfloat16":
        x, cos, sin = x.bfloat16(), cos.bfloat16(), sin.bfloat16()
    elif case == "odd D":
        x, cos, sin = x[..., :7], cos[..., :7], sin[..., :7]
    elif case == "3-D":
        x, cos, sin = x[0], cos[0], sin[0]
    else:
        (x if case == "requires grad" else sin).requires_grad_(True)
    before = cpu_rope.calls
    out = cpu_rope.rope(x, cos, sin)
    assert cpu_rope.calls == before
    assert torch.equal(out, cpu_rope.rope_reference(x, cos, sin))
    if "grad" in case:
        out.sum().backward()
        assert (x if case == "requires grad" else sin).grad is not None


@pytest.mark.heavy
def test_a_compiled_llama_rotates_q_and_k_in_one_call_each(monkeypatch):
    """Every layer's q and k rotation is one ``cpu_rope.rope`` node (none of the expression's
    slices, negation or cat left), counted in the summary; prefill and decode logits equal the
    graph compiled without the fusion. (The decode attention fusion, which folds these calls into
    its own, is off here: ``test_cpu_attention`` covers it.)"""
    from lowbit_compiler.backends import lowering
    from tests.conftest import make_model
    from tests.helpers import Recorder

    monkeypatch.setattr(lowering, "_fuse_cpu_decode_attention", lambda gm: 0)
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(0))

    def run(fuse: bool):
        torch._dynamo.reset()
        if not fuse:
            monkeypatch.setattr(lowering, "_fuse_cpu_rope", lambda gm: 0)
        rec = Recorder(recipe="w4a16", progress=False)
        model = make_model("llama")
        model.compile(backend=rec)
        with torch.no_grad():
            before = cpu_rope.calls
            out = model.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        return rec, torch.stack(out.logits), cpu_rope.calls - before

    rec, fused_logits, ran = run(True)
    layers = make_model("llama").config.num_hidden_layers
    assert ran == 2 * layers * 3  # q and k per layer, prefill + 2 decode steps (the last token is not run)
    for gm, summary in zip(rec.graphs, rec.summaries):
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        assert sum(n.target is cpu_rope.rope for n in nodes) == 2 * layers
        assert not any(n.target in (operator.neg, torch.neg) for n in nodes)  # rotate_half's negation is gone
        assert summary["cpu_fusions"] == {"rope": 2 * layers}
    from lowbit_compiler.cli import format_summary  # what `lowbit inspect` prints for the graph

    assert f"rope expressions as generated calls: {2 * layers}" in format_summary({"graph": "g", **rec.summaries[0]})
    _, plain_logits, plain_ran = run(False)
    assert plain_ran == 0 and torch.equal(fused_logits, plain_logits)
