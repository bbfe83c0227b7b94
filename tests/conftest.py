"""Shared fixtures: tiny random-weight models built from transformers configs (no hub access)."""
from __future__ import annotations

import logging
import os
import tempfile

# Generated Triton kernels run under Triton's interpreter here (no GPU). The mode is fixed when
# triton is first imported, so it is set before anything imports it. Kernel files are cached in a
# per-run directory, not in the user's ~/.cache.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LOWBIT_CACHE_DIR", tempfile.mkdtemp(prefix="lowbit-test-cache-"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences Triton 3.9's default-change warning
# The sparse CPU kernels dispatch by a timing at first use (backends/cpu_sparse.py): timings on a
# shared machine would make which kernel runs vary from run to run, so the suite runs the sparse
# kernel wherever it applies; tests/backends/test_cpu_sparse.py checks the measured dispatch with a
# fake clock.
os.environ.setdefault("LOWBIT_SPARSE_DISPATCH", "sparse")
# Likewise the dense CPU kernels (backends/cpu_dispatch.py): the suite pins the static rule (the
# generated kernel for <= 16 rows, torch's packed kernels above); tests/backends/test_cpu_dispatch.py
# checks every candidate and the measured choice with a fake clock.
os.environ.setdefault("LOWBIT_CPU_DISPATCH", "generated")

import pytest
import torch

import lowbit_compiler  # noqa: F401  (registers ops and passes)

HIDDEN, INTER, VOCAB = 128, 256, 256


def _decoder_kwargs():
    return dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)


def make_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**_decoder_kwargs()))
    elif arch == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**_decoder_kwargs()))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**_decoder_kwargs()))
    elif arch == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**_decoder_kwargs(), pad_token_id=0))
    elif arch == "gemma":
        model = tf.GemmaForCausalLM(tf.GemmaConfig(**_decoder_kwargs(), head_dim=HIDDEN // 4))
    elif arch == "opt":
        model = tf.OPTForCausalLM(tf.OPTConfig(hidden_size=HIDDEN, ffn_dim=INTER, num_hidden_layers=2,
                                               num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=256,
                                               word_embed_proj_dim=HIDDEN, pad_token_id=1))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256,
                                                 bos_token_id=0, eos_token_id=0))
    elif arch == "bert":
        model = tf.BertModel(tf.BertConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=INTER, vocab_size=VOCAB))
    else:
        raise ValueError(arch)
    return model.to(dtype).eval()


DECODERS = ("llama", "mistral", "qwen2", "gpt2")
ARCHS = DECODERS + ("bert",)


def prompt(length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with empty Dynamo caches and counters (tests compile many models)."""
    torch.compiler.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    yield
    torch.compiler.reset()


@pytest.fixture(autouse=True)
def _quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)
