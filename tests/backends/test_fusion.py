"""Fusion groups: what the generated kernels of a block contain, and the grouping rules."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit_compiler.backends import fusion
from lowbit_compiler.formats import sqnr_db
from tests.conftest import make_model, prompt
from tests.helpers import Recorder


def compile_triton(model, inputs, recipe="w4a16", **options):
    rec = Recorder(recipe=recipe, target="triton", strict=True, **options)
    with torch.no_grad():
        out = torch.compile(model, backend=rec)(*inputs)
    return rec, out


@pytest.mark.parametrize("arch, per_block, ops_replaced, fused", [
    # q, k, v side by side (one kernel, the RMSNorm once), o + residual, gate+up+SiLU*mul, down + residual
    ("llama", 4, 13, [["rms_norm", "wo_linear", "wo_linear", "wo_linear"]] + [["wo_linear", "add"],
                      ["rms_norm", "wo_linear", "wo_linear", "silu", "mul"], ["wo_linear", "add"]]),
    # c_attn (LayerNorm, bias), c_proj + residual, c_fc + tanh-GELU written out, c_proj + residual
    ("gpt2", 4, 16, [["layer_norm", "wo_linear", "bias"], ["wo_linear", "bias", "add"],
                     ["layer_norm", "wo_linear", "bias", "mul", "cube", "mul", "add", "mul", "tanh", "add", "mul"],
                     ["wo_linear", "bias", "add"]]),
])
@pytest.mark.heavy
def test_kernels_per_decoder_layer_are_pinned(arch, per_block, ops_replaced, fused):
    rec, _ = compile_triton(make_model(arch), (prompt(),))
    summary = rec.summaries[0]
    blocks = summary["codegen"]["blocks"]
    layers = [b for b in blocks if b != "(outside blocks)"]
    assert len(layers) == 2
    for b in layers:
        assert blocks[b] == {"kernels": per_block, "ops_replaced": ops_replaced}
        assert per_block < ops_replaced
    first = [r["fused_ops"] for r in summary["generated_kernels"] if r["block"] == layers[0]]
    assert first == fused
    # nothing low-bit is left in the lowered graph
    assert not any(n.target is torch.ops.lowbit.wo_linear.default for n in rec.graphs[0].graph.nodes)


class Block(torch.nn.Module):
    """A norm with a second, non-matmul user; an epilogue operand that depends on the matmul."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.RMSNorm(128, eps=1e-6)
        self.up = torch.nn.Linear(128, 256)
        self.down = torch.nn.Linear(256, 128, bias=False)

    def forward(self, x):
        h = self.norm(x)
        y = self.up(h)
        y = F.gelu(y) * 2.0 + y.flip(-1)   # flip is not elementwise and reads y: stays outside
        return self.down(y) + h * 0.5     # the residual operand h * 0.5 is a full external


def test_grouping_rules_on_a_hand_written_block():
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 5, 128)
    rec, out = compile_triton(model, (x,), recipe="w8a16")
    records = rec.summaries[0]["generated_kernels"]
    # the norm also feeds h * 0.5, so it is not recomputed inside up's kernel
    assert [r["fused_ops"] for r in records] == [["wo_linear", "bias"], ["wo_linear", "add"]]
    assert sqnr_db(model(x), out) > 35


def test_a_registered_elementwise_op_is_fused(monkeypatch):
    monkeypatch.setattr(fusion, "ELEMENTWISE", dict(fusion.ELEMENTWISE))
    monkeypatch.setattr(fusion, "_TARGET_TO_OP", dict(fusion._TARGET_TO_OP))

    class Clipped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(128, 64)

        def forward(self, x):
            return F.hardsigmoid(self.proj(x))

    torch.manual_seed(0)
    model, x = Clipped().eval(), torch.randn(3, 128)
    rec, _ = compile_triton(model, (x,), recipe="w8a16")
    assert rec.summaries[0]["generated_kernels"][0]["fused_ops"] == ["wo_linear", "bias"]
    torch.compiler.reset()

    fusion.register_elementwise(
        fusion.ElementwiseOp("hardsigmoid", "tl.minimum(tl.maximum({0} / 6.0 + 0.5, 0.0), 1.0)", "F.hardsigmoid({0})", 1),
        (F.hardsigmoid,))
    rec, out = compile_triton(model, (x,), recipe="w8a16")
    assert rec.summaries[0]["generated_kernels"][0]["fused_ops"] == ["wo_linear", "bias", "hardsigmoid"]
    assert sqnr_db(model(x), out) > 35


class Operands(torch.nn.Module):
    """Epilogue operands of every kind: a [1, 1, N] row, a 0-d tensor, an integer tensor."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(128, 64, bias=False)
        self.register_buffer("row", torch.randn(1, 1, 64))
        self.register_buffer("scalar", torch.tensor(2.0))
        self.register_buffer("counts", torch.arange(64))

    def forward(self, x):
        y = self.proj(x) * self.row + 1.0   # fused: a row operand and a constant
        y = y * self.scalar                  # a 0-d tensor is not a row: stays outside
        return y + self.counts               # integer operand: stays outside


def test_epilogue_operand_kinds():
    torch.manual_seed(0)
    model, x = Operands().eval(), torch.randn(2, 3, 128)
    rec, out = compile_triton(model, (x,), recipe="w8a16")
    assert [r["fused_ops"] for r in rec.summaries[0]["generated_kernels"]] == [["wo_linear", "mul", "add"]]
    assert sqnr_db(model(x), out) > 35
