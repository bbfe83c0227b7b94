"""The "rotate" preset in float64 is exact (relative max error <= 1e-12) through both flows, on tiny
random Llama and Qwen3 models -- measured against the model's float64 forward.

The reference matters: Hugging Face's RMSNorm modules compute in float32 even in a float64 model
(``hidden_states.to(torch.float32)``, transformers' modeling_llama.py / modeling_qwen3.py), so the
model's own eager forward carries float32 rounding (~1e-7 relative). No rotated model can
reproduce that rounding (it happens in the unrotated basis); the reference here is the same
model with its norms computed in float64 (``_float64_norms``), which is also what the canonical
graph computes (``canonicalize`` drops the float32 round trip).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import transformers as tf

from tests.conftest import _decoder_kwargs, prompt

TOL = 1e-12


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**_decoder_kwargs()))
    else:  # Qwen3: q_norm / k_norm (per-head RMSNorms on queries and keys) besides the stream norms
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**_decoder_kwargs(), head_dim=32))
    return model.to(torch.float64).eval()


def _norm_classes():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    return LlamaRMSNorm, Qwen3RMSNorm


@contextlib.contextmanager
def _float64_norms():
    """HF's RMSNorm forward with the float32 upcast replaced by ``promote_types(dtype, float32)``."""
    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.promote_types(dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)

    classes = _norm_classes()
    saved = [c.forward for c in classes]
    for c in classes:
        c.forward = forward
    try:
        yield
    finally:
        for c, f in zip(classes, saved):
            c.forward = f


def _reference(arch: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), _float64_norms():
        return _model(arch)(ids).logits


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_hf_float64_model_itself_rounds_its_norms_to_float32(arch):
    """Where the ~1e-7 "error" of a rotated float64 model comes from: the unrotated model's own
    eager forward already differs from its float64 forward by float32 rounding."""
    ids = prompt()
    with torch.no_grad():
        eager = _model(arch)(ids).logits
    assert 1e-9 < _rel(eager, _reference(arch, ids)) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_compiled_rotate_is_exact_in_float64(arch):
    ids = prompt()
    ref = _reference(arch, ids)
    with torch.no_grad():
        out = torch.compile(_model(arch), backend="lowbit", options={"recipe": "rotate"})(ids).logits
    assert out.dtype == torch.float64 and _rel(out, ref) <= TOL


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_compress_rotate_is_exact_in_float64(arch):
    """Qwen3's q_norm / k_norm are not folded; compress writes back the graph's float64 norm for
    them (offline.GraphRMSNorm), as Hugging Face's would round to float32."""
    from lowbit_compiler import compress

    ids = prompt()
    ref = _reference(arch, ids)
    model = compress(_model(arch), "rotate", progress=False)
    with torch.no_grad():
        out = model(ids).logits
    assert out.dtype == torch.float64 and _rel(out, ref) <= TOL
