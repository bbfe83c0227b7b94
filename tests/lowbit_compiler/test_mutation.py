"""Never silently wrong (issue "Every model, nothing silent", point 0): no dead-code elimination
drops a write. A value nothing reads may still be written into (``x[..., :k].copy_(y)`` on a
tensor from ``new_empty``: DeepSeek-V3's attention) and removing the write leaves uninitialised
memory behind. One test per mutation pattern, through the backend with no rewrite (``"none"``)
and with a quantizing recipe (whose passes eliminate dead code too), against eager."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit_compiler import ir

K = 128


class Mutating(torch.nn.Module):
    """A linear whose output goes through one in-place write pattern into a fresh tensor."""

    def __init__(self, pattern: str):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(K, K)
        self.pattern = pattern

    def forward(self, x):
        y = self.proj(x)
        half = K // 2
        p = self.pattern
        if p == "copy_into_view":  # DeepSeek-V3: key_states[..., :n].copy_(k_nope)
            out = y.new_empty(y.shape)
            out[..., :half].copy_(y[..., half:])
            out[..., half:].copy_(y[..., :half])
        elif p == "setitem":
            out = torch.empty_like(y)
            out[..., :half] = y[..., half:] * 2
            out[..., half:] = y[..., :half]
        elif p == "index_put_":
            out = torch.zeros_like(y)
            idx = torch.arange(0, K, 2, device=y.device)
            out.index_put_((torch.arange(y.shape[0], device=y.device)[:, None], idx[None]), y[:, ::2] + 1)
        elif p == "out_kwarg":
            out = torch.empty_like(y)
            torch.add(y, 1.0, out=out)
        elif p == "inplace_method_on_view":
            out = y.clone()
            out[:, :half].mul_(3.0)
        elif p == "inplace_kwarg":
            out = y.clone()
            F.relu(out, inplace=True)
        elif p == "iadd":
            out = torch.zeros_like(y)
            view = out[:, half:]
            view += y[:, half:]
        else:
            raise ValueError(p)
        return out


PATTERNS = ["copy_into_view", "setitem", "index_put_", "out_kwarg", "inplace_method_on_view", "inplace_kwarg", "iadd"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_writes_survive_every_dead_code_elimination(pattern):
    model = Mutating(pattern).eval()
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        exact = torch.compile(model, backend="lowbit", options={"recipe": "none"})(x)
        torch.compiler.reset()
        quantized = torch.compile(model, backend="lowbit", options={"recipe": "w8a16"})(x)
    assert torch.equal(exact, expected), f"{pattern}: recipe 'none' changed the numbers"
    # w8a16 changes the linear's numbers but not the write pattern: every element that eager
    # writes is written (uninitialised memory would be far off, or equal where eager has zeros)
    err = (quantized - expected).abs().max() / expected.abs().max()
    assert err < 0.02, f"{pattern}: relative error {err:.3g} under w8a16"


def test_the_predicate_names_every_write():
    """The nodes of each pattern's Dynamo graph that write are the ones has_side_effects keeps."""
    seen: dict[str, list[str]] = {}

    for pattern in PATTERNS:
        def backend(gm, example_inputs, pattern=pattern):
            seen[pattern] = [str(n.target if isinstance(n.target, str) else getattr(n.target, "__name__", n.target))
                             for n in gm.graph.nodes if n.op in ("call_function", "call_method")
                             and ir.has_side_effects(n)]
            return gm

        torch.compiler.reset()
        with torch.no_grad():
            torch.compile(Mutating(pattern), backend=backend)(torch.randn(2, K))
    assert all(seen[p] for p in PATTERNS), seen
    assert seen["copy_into_view"] == ["copy_", "copy_"]


def test_deepseek_v3_exact_under_none():
    """DeepSeek-V3 writes the key's two halves into ``new_empty``: 30 % off before the fix."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.DeepseekV3Config(
        vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16,
        qk_nope_head_dim=16, v_head_dim=32, max_position_embeddings=128)
    model = tf.DeepseekV3ForCausalLM(config).eval()
    ids = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids).logits
        got = torch.compile(model, backend="lowbit", options={"recipe": "none"})(ids).logits
    assert torch.equal(got, expected) or (got - expected).abs().max() <= 1e-5 * expected.abs().max(), \
        (got - expected).abs().max()
